"""Train, evaluate, export and time every (detector, category, seed) job of a benchmark.

A benchmark is a list of jobs (:class:`~anomalykit.benchmark.executors.Job`), run by an
executor: ``local`` (in this process, one after another) or ``ray`` (one Ray task per job,
on a cluster or a local Ray; see :mod:`anomalykit.benchmark.executors`).

Layout and resume. Each job has a run folder: ``runs/<detector>/<category>/`` when the
benchmark has one seed (the layout of a single-seed benchmark is unchanged) and
``runs/<detector>/<category>/seed<k>/`` when it has several. The job's worker writes its
artefacts there (``model.ckpt``, ``model.onnx``, ``predictions.npz``, ``examples.npz``: a
few test images, masks and low-resolution maps with the calibrated thresholds, from which
the driver draws the side-by-side examples; ``error.txt`` when it failed); the driver
writes the job's row there as ``row.json`` (atomically) as soon as the row comes back,
then rebuilds ``results.csv``, ``results.md`` and ``report.html`` from all the rows so far.
Nothing else in the benchmark folder is written by a worker. A rerun into the same folder
(``resume=True``) reuses every row.json without an error that matches its job (detector,
category, seed, config label, data, ONNX on/off) and runs the rest, so failed jobs run
again; ``resume=False`` runs everything.

On a cluster, the data paths and the benchmark folder must be valid on every node: a
shared filesystem (NFS, a mounted bucket) or the same path on each node. Without a shared
benchmark folder the rows and the tables still come back to the driver, but each job's
artefacts (models, ROC data, heat maps) stay on the node that ran it.

A job that raises becomes an ``error`` row (traceback in its ``error.txt``); so does a job
whose Ray worker dies or that runs past ``job_timeout``; the benchmark goes on.

Timing protocol, identical for PyTorch and onnxruntime: both run the exported module
(uint8 frame in, resize inside, map upsampled back to the frame) one test image at a time
after a short warm-up, with the same number of CPU threads; the median per-image time is
reported. Images are decoded before the clock starts.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalykit.benchmark.executors import (
    EXECUTORS,
    Job,
    JobTimeout,
    LocalExecutor,
    RayExecutor,
    import_ray,
    job_time_limit,
)
from anomalykit.errors import ConfigError
from anomalykit.tracking import RunLog, TrackingConfig, start_parent_run, track_run

if TYPE_CHECKING:
    from anomalykit.pipeline import FolderData

__all__ = ["JobSpec", "benchmark_pair", "run_benchmark", "run_job"]

ROW_FILE = "row.json"
ERROR_FILE = "error.txt"


def _config_label(config: str | os.PathLike[str], overrides: Sequence[str] | None) -> str:
    """The results' ``config`` column: profile or file, then the overrides."""
    return " ".join([str(config), *(overrides or [])])


def _onnx_device(torch_device: str) -> str:
    """onnxruntime device matching the torch one; CPU when this build has no CUDA provider."""
    import onnxruntime

    from anomalykit.export.runtime import CUDA

    if torch_device.startswith("cuda") and CUDA in onnxruntime.get_available_providers():
        return torch_device
    return "cpu"


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (or just the type)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def benchmark_pair(detector: str, category: str, *, root: str | os.PathLike[str] | None,
                   config: str | os.PathLike[str], overrides: Sequence[str] | None,
                   out_dir: str | os.PathLike[str], device: str, seed: int, onnx: bool = True,
                   progress: bool = True, folder: FolderData | None = None,
                   run: RunLog | None = None,
                   run_dir: str | os.PathLike[str] | None = None,
                   format: str | None = "auto") -> dict[str, Any]:
    """Run one job and return its results row (see :data:`report.COLUMNS`).

    Everything it writes goes to ``run_dir`` (default ``out_dir/runs/<detector>/<category>``):
    checkpoint, ONNX model, predictions, example arrays, training figures.
    With ``folder`` the data is that folder dataset and ``category`` only names it; else
    ``root`` is read in layout ``format`` (:mod:`anomalykit.data.formats`; ``auto``: detected).
    """
    from rich.markup import escape

    from anomalykit.benchmark import report
    from anomalykit.benchmark.timing import time_inference
    from anomalykit.export.torch_predictor import TorchPredictor
    from anomalykit.pipeline import evaluate_detector, train_detector
    from anomalykit.training.progress import console

    run_dir = Path(run_dir) if run_dir is not None else Path(out_dir) / "runs" / detector / category
    data: dict[str, Any] = ({"folder": folder} if folder is not None
                            else {"root": root, "category": category, "format": format})
    trained = train_detector(detector, **data, config=config,
                             overrides=list(overrides or []), out_dir=run_dir, device=device,
                             seed=seed, progress=progress, run=run)
    model = trained.detector
    evaluation = evaluate_detector(model, trained.test_records, progress=progress)
    report.save_predictions(evaluation.predictions, run_dir / report.PREDICTIONS)
    calibrated = bool(getattr(model, "calibrated_", False))
    report.save_examples(evaluation.predictions, run_dir / report.EXAMPLE_ARRAYS,
                         threshold=float(model.threshold_) if calibrated else None,
                         pixel_threshold=float(model.pixel_threshold_) if calibrated else None)

    if hasattr(model, "example_figures"):
        import torch

        from anomalykit.data import AnomalyDataset

        good = AnomalyDataset(trained.train_records[:8], model.image_size)
        images = torch.stack([good[i]["image"] for i in range(len(good))])
        report.save_training_figures(model, images, run_dir, seed=seed)

    paths = [r.path for r in trained.test_records]
    torch_ms = time_inference(TorchPredictor(model, device=str(model.device)), paths,
                              progress=progress, desc="time torch")
    notes = [*model.fit_summary(), *trained.warnings]
    onnx_ms = None
    if onnx:
        try:
            onnx_ms = _time_onnx(model, run_dir, category, seed, paths, progress)
        except Exception as exc:  # noqa: BLE001 - keep the metrics of a model that won't export
            notes.append(f"ONNX export/timing failed: {_first_line(exc)}")
            onnx_ms = math.nan
            console.print(f"[yellow]warning:[/yellow] {escape(detector)} / {escape(category)}: "
                          f"{escape(notes[-1])}", highlight=False, soft_wrap=True)

    metrics = evaluation.metrics
    if run is not None:
        run.log_evaluation(metrics, sorted(run_dir.glob("*.png")))
        run.log_metrics({"time/torch_ms": torch_ms, "time/onnx_ms": onnx_ms})
    return {
        "detector": detector,
        "category": category,
        **{key: metrics.get(key) for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap",
                                             "f1_max", "f1_at_threshold", "fpr_good")},
        "miss_rate": _miss_rate(metrics.get("tpr_defect")),
        "threshold_rule": _threshold_rule(model),
        "train_s": trained.meta["train_seconds"],
        "torch_ms": torch_ms,
        "onnx_ms": onnx_ms,
        "n_train": trained.meta["n_train"],
        "n_test": metrics["n_test"],
        "config": _config_label(config, overrides),
        "seed": seed,
        "error": "",
        "notes": "; ".join(notes),
    }


def _miss_rate(tpr_defect: float | None) -> float | None:
    """Defective images passed as good at the calibrated threshold: ``1 - tpr_defect``."""
    return None if tpr_defect is None else 1.0 - float(tpr_defect)


def _threshold_rule(model: Any) -> str:
    """How the image threshold was set, for the report: ``quantile 1`` (of the held-out good
    scores; 1 = their maximum), ``fpr 0.01 (gpd)``; empty when the model does not say."""
    record = getattr(model, "calibration_record", None) or {}
    rule = str(record.get("rule", ""))
    if rule == "quantile" and record.get("quantile") is not None:
        margin = float(record.get("margin") or 0.0)
        return f"quantile {float(record['quantile']):g}" + (f" + {margin:g} std" if margin else "")
    if rule == "fpr" and record.get("target_fpr") is not None:
        used = record.get("tail_used") or record.get("tail")
        return f"fpr {float(record['target_fpr']):g}" + (f" ({used})" if used else "")
    return rule


def _time_onnx(model: Any, run_dir: Path, category: str, seed: int, paths: Sequence[Path],
               progress: bool) -> float:
    """Export ``model`` to run_dir/model.onnx and time onnxruntime on ``paths``."""
    import torch

    from anomalykit.benchmark.timing import time_inference
    from anomalykit.export import export_onnx
    from anomalykit.export.runtime import OnnxDetector

    onnx_path = export_onnx(model, run_dir / "model.onnx",
                            metadata={"category": category, "seed": seed})
    # Same thread count as torch: otherwise the comparison measures the thread pools.
    session = OnnxDetector(onnx_path, device=_onnx_device(str(model.device)),
                           threads=torch.get_num_threads())
    return time_inference(session, paths, progress=progress, desc="time onnx")


# -- jobs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """What every job of one benchmark shares; sent to the workers with each job (picklable).

    Attributes:
        config: Profile name or YAML file (absolute path) the jobs load.
        config_label: The results' ``config`` column (as the user gave it, with overrides).
        out_dir: The benchmark folder (as the workers see it).
        several_seeds: Run folders get a ``seed<k>`` level.
        threads: torch / onnxruntime CPU threads in the job (``None``: leave as is).
        job_timeout: Seconds a job may run (``None``: no limit).
        modules: Modules to import in a worker before the job: where detectors registered
            outside anomalykit live (a fresh worker knows only the built-in ones).
        progress: Progress bars inside the job (off on Ray: workers have no terminal).
        format: The layout ``root`` is read in (resolved, never ``auto``).
    """

    root: str | None
    folder: FolderData | None
    config: str
    config_label: str
    overrides: tuple[str, ...]
    out_dir: str
    device: str
    onnx: bool
    several_seeds: bool
    threads: int | None = None
    job_timeout: float | None = None
    modules: tuple[str, ...] = ()
    tracking: TrackingConfig | None = None  # a child run per job (anomalykit.tracking)
    progress: bool = False
    format: str = "mvtec"

    @property
    def data_label(self) -> str:
        """Which data the rows come from, to tell a reusable row from another data set's."""
        if self.folder is not None:
            folder = self.folder
            return (f"folder {folder.good_dir} {folder.defect_dir} {folder.mask_dir} "
                    f"test_fraction={folder.test_fraction:g}")
        return f"root {self.root}" + (f" format={self.format}" if self.format != "mvtec" else "")

    def run_dir(self, job: Job) -> Path:
        """The job's folder (see the module docstring for the layout)."""
        path = Path(self.out_dir) / "runs" / job.detector / job.category
        return path / f"seed{job.seed}" if self.several_seeds else path

    def key(self, job: Job) -> dict[str, Any]:
        """What a saved row must match to be reused for ``job``."""
        return {"detector": job.detector, "category": job.category, "seed": job.seed,
                "config": self.config_label, "data": self.data_label, "onnx": self.onnx}


def error_row(job: Job, spec: JobSpec, message: str) -> dict[str, Any]:
    """The row of a job that failed: its identity and the error message, no metrics."""
    return {"detector": job.detector, "category": job.category, "error": message,
            "config": spec.config_label, "seed": job.seed}


def run_job(job: Job, spec: JobSpec) -> dict[str, Any]:
    """Run one job where this is called (here or in a Ray worker) and return its row.

    Never raises for a failing job (KeyboardInterrupt aside): the row then has an ``error``
    and the traceback is in the run folder's ``error.txt``.
    """
    run_dir = spec.run_dir(job)
    try:
        with job_time_limit(spec.job_timeout), track_run(
                spec.tracking, f"{job.detector}/{job.category}/seed{job.seed}",
                tags={"detector": job.detector, "category": job.category,
                      "seed": job.seed, "benchmark": spec.out_dir}) as run:
            for module in spec.modules:
                importlib.import_module(module)
            if spec.threads is not None:
                import torch

                torch.set_num_threads(spec.threads)
            row = benchmark_pair(job.detector, job.category, run=run, root=spec.root,
                                 config=spec.config,
                                 overrides=list(spec.overrides), out_dir=spec.out_dir,
                                 device=spec.device, seed=job.seed, onnx=spec.onnx,
                                 progress=spec.progress, folder=spec.folder, run_dir=run_dir,
                                 format=spec.format)
            row["config"] = spec.config_label  # as the user wrote it, not the absolute path
    except (Exception, JobTimeout) as exc:  # noqa: BLE001 - one failing job must not stop the rest
        from rich.markup import escape

        from anomalykit.training.progress import console

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        message = _first_line(exc)
        console.print(f"[red]error:[/red] {escape(job.label)}: {escape(message)} (traceback in "
                      f"{escape(str(run_dir / ERROR_FILE))})", highlight=False, soft_wrap=True)
        row = error_row(job, spec, message)
    row["run_dir"] = run_dir.relative_to(spec.out_dir).as_posix()
    return row


def _json_value(value: Any) -> Any:
    """numpy scalars to Python numbers for row.json."""
    return value.item() if hasattr(value, "item") else str(value)


def save_row(job: Job, spec: JobSpec, row: dict[str, Any]) -> Path:
    """Write ``row.json`` in the job's run folder, atomically (driver side)."""
    from anomalykit.training.checkpoint import atomic_write_text

    text = json.dumps({"job": spec.key(job), "row": row}, indent=1, default=_json_value)
    return atomic_write_text(spec.run_dir(job) / ROW_FILE, text)


def load_finished_row(job: Job, spec: JobSpec) -> dict[str, Any] | None:
    """The saved row of ``job`` if it finished without error under the same settings."""
    path = spec.run_dir(job) / ROW_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing, or cut short by a crash on a filesystem without atomic rename
    if not isinstance(saved, dict) or saved.get("job") != spec.key(job):
        return None
    row = saved.get("row")
    if not isinstance(row, dict) or row.get("error"):
        return None
    return row


def _check_inputs(detectors: Sequence[str], root: str | os.PathLike[str] | None,
                  categories: Sequence[str], config: str | os.PathLike[str],
                  overrides: Sequence[str] | None, folder: FolderData | None = None,
                  format: str | None = "auto") -> str:
    """Fail before the first job on typos: names, categories or folders, config keys, and a
    dataset layout that is unknown or cannot be detected.

    A per-job failure is recorded and skipped; a typo would otherwise turn the whole
    benchmark into a table of identical error rows.

    Returns:
        The resolved layout name (``folder`` for a folder dataset).
    """
    from anomalykit.config import load_config
    from anomalykit.data import scan_folder
    from anomalykit.data.formats import FOLDER, FORMATS, resolve_format
    from anomalykit.pipeline import check_format

    if not detectors:
        raise ConfigError("no detectors to benchmark")
    for detector in detectors:
        load_config(detector, config, list(overrides or []))  # checks the name too
    check_format(format, folder)
    if folder is not None:
        if folder.defect_dir is None:
            raise ConfigError(f"benchmarking on {folder.good_dir} needs defective test images "
                              "(--defect-dir)")
        scan_folder(folder.good_dir, folder.defect_dir, folder.mask_dir)  # names a bad folder
        return FOLDER
    if root is None:
        raise ConfigError("no data: give a dataset root or a folder dataset")
    name = resolve_format(root, format)
    available = FORMATS[name].list_categories(Path(root))
    if not categories:
        raise ConfigError(f"no categories to benchmark in {root}")
    missing = [c for c in categories if c not in available]
    if missing:
        raise ConfigError(f"category {', '.join(repr(c) for c in missing)} not found in {root} "
                          f"({FORMATS[name].title} layout); available: "
                          f"{', '.join(available) or 'none'}")
    return name


def _plugin_modules(detectors: Sequence[str]) -> tuple[str, ...]:
    """Modules outside anomalykit that registered some of ``detectors`` (workers import them)."""
    from anomalykit.registry import get_class

    modules = {get_class(name, "detector").__module__ for name in detectors}
    return tuple(sorted(m for m in modules if m.split(".")[0] != "anomalykit"))


def _check_seeds(seed: int, seeds: Sequence[int] | None) -> list[int]:
    chosen = [seed] if seeds is None else [int(s) for s in seeds]
    if not chosen:
        raise ConfigError("no seeds to benchmark")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"seeds repeat: {', '.join(map(str, chosen))}")
    return chosen


def run_benchmark(detectors: Sequence[str], root: str | os.PathLike[str] | None,
                  categories: Sequence[str], *, folder: FolderData | None = None,
                  format: str | None = "auto", config: str | os.PathLike[str] = "quick",
                  overrides: Sequence[str] | None = None,
                  out_dir: str | os.PathLike[str] = "runs/benchmark", device: str = "auto",
                  seed: int = 0, seeds: Sequence[int] | None = None, onnx: bool = True,
                  progress: bool = True, threads: int | None = None, command: str | None = None,
                  executor: str = "local", address: str | None = None,
                  cpus_per_job: float = 1.0, ray_num_cpus: int | None = None,
                  resume: bool = True, job_timeout: float | None = None,
                  tracking: TrackingConfig | None = None
                  ) -> list[dict[str, Any]]:
    """Benchmark every detector on every category and seed; write results.csv/.md, report.html.

    Args:
        detectors: Registered detector names.
        root: Dataset root (``None`` with ``folder``).
        categories: Categories of ``root``; ignored with ``folder``.
        folder: Benchmark on this folder dataset (:class:`~anomalykit.pipeline.FolderData`,
            with a defect folder) instead; its :attr:`~anomalykit.pipeline.FolderData.name`
            is the results' category.
        format: The layout of ``root`` (:data:`anomalykit.data.formats.FORMAT_CHOICES`;
            ``auto``: detected, failing when it is ambiguous).
        config, overrides: Profile/YAML and ``key=value`` overrides, the same for every job.
        out_dir: Benchmark folder (see :mod:`anomalykit.benchmark.report` for its layout).
        device: ``auto``/``cpu``/``cuda[:N]`` for training and PyTorch inference (resolved
            here; on Ray, ``cuda`` also reserves one GPU per task).
        seed: The seed of a single-seed benchmark.
        seeds: Several seeds (overrides ``seed``): every (detector, category) runs once per
            seed, and the tables add a mean ± std line per detector.
        onnx: Export each model to ONNX and time onnxruntime.
        progress: Progress bars (local: also inside each job; Ray: the job bar only).
        threads: CPU threads for torch and onnxruntime in each job (default: local, torch's
            current setting; Ray, ``cpus_per_job``).
        command: The command line to print in the report header.
        executor: ``local`` (in this process, sequential) or ``ray`` (a Ray task per job).
        address: Ray only: ``None`` starts a local Ray, ``"auto"`` / ``"ray://host:port"``
            joins a cluster.
        cpus_per_job: Ray only: CPUs reserved per task.
        ray_num_cpus: Ray only: CPUs of a local Ray (default: all).
        resume: Reuse the rows of jobs that already finished in ``out_dir`` (see the module
            docstring); ``False`` runs every job again.
        job_timeout: Seconds a job may run before it becomes an error row (``None``: no limit).
        tracking: Log a parent run for the benchmark and a child run per job (see
            :mod:`anomalykit.tracking`); ``None``: not tracked.

    Returns:
        The rows, ordered by (detector, category, seed) as given; failed jobs have a
        non-empty ``error``; rows reused from an earlier run have ``reused=True``.
    """
    import torch

    from anomalykit.benchmark import report
    from anomalykit.training import resolve_device

    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    if job_timeout is not None and job_timeout <= 0:
        raise ConfigError(f"job timeout must be positive, got {job_timeout}")
    torch_device = str(resolve_device(device))
    seed_list = _check_seeds(seed, seeds)
    if folder is not None:
        root, categories = None, [folder.name]
    data_format = _check_inputs(detectors, root, categories, config, overrides, folder, format)
    if executor == "ray":
        pool: LocalExecutor | RayExecutor = RayExecutor(
            address=address, cpus_per_job=cpus_per_job, num_cpus=ray_num_cpus,
            gpus_per_job=1.0 if torch_device.startswith("cuda") else 0.0,
            job_timeout=job_timeout, progress=progress)
        import_ray()  # a missing Ray fails here, before any folder is made
        threads = threads if threads is not None else max(1, int(cpus_per_job))
    else:
        pool = LocalExecutor(progress=progress)
        if threads is not None:
            torch.set_num_threads(threads)

    # Absolute paths: a Ray worker does not run in this directory (on a cluster, not even
    # on this machine; then these paths must exist on every node).
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if folder is not None:
        from anomalykit.pipeline import FolderData

        folder = FolderData.from_meta(folder.as_meta())
    # A YAML file as load_config tells it from a profile name; profile names stay names.
    is_file = Path(config).suffix in (".yaml", ".yml") or Path(config).exists()
    config_file = Path(config).absolute() if is_file else None
    spec = JobSpec(root=None if root is None else str(Path(root).absolute()), folder=folder,
                   config=str(config_file or config),
                   config_label=_config_label(config, overrides),
                   overrides=tuple(overrides or ()), out_dir=str(out), device=torch_device,
                   onnx=onnx, several_seeds=len(seed_list) > 1, threads=threads,
                   job_timeout=job_timeout, modules=_plugin_modules(detectors),
                   progress=progress and executor == "local", format=data_format)
    parent, job_tracking = start_parent_run(
        tracking, f"benchmark {out.name}",
        config={"detectors": ",".join(detectors), "categories": ",".join(categories),
                "seeds": ",".join(map(str, seed_list)), "config": spec.config_label,
                "device": torch_device, "onnx": onnx})
    spec = replace(spec, tracking=job_tracking)
    info = report.environment_info(torch_device, command or "(python API) run_benchmark")
    if onnx:
        info["device"] += f"; onnxruntime on {_onnx_device(torch_device)}"
    if threads is not None:
        info["torch_threads"] = str(threads)
    info["executor"] = pool.describe() if isinstance(pool, RayExecutor) else "local"

    jobs = [Job(d, c, s) for d in detectors for c in categories for s in seed_list]
    rows: dict[Job, dict[str, Any]] = {}
    for job in jobs if resume else ():
        row = load_finished_row(job, spec)
        if row is not None:
            rows[job] = {**row, "reused": True}
    todo = [job for job in jobs if job not in rows]
    reused = len(jobs) - len(todo)
    info["resumed"] = (f"{reused} of {len(jobs)} rows reused from an earlier run in this folder"
                       if reused else "")

    def ordered() -> list[dict[str, Any]]:
        return [rows[job] for job in jobs if job in rows]

    def finished(job: Job, row: dict[str, Any]) -> None:
        row.setdefault("run_dir", spec.run_dir(job).relative_to(out).as_posix())
        save_row(job, spec, row)
        rows[job] = row
        report.write_report(ordered(), out, info, categories=[job.category])

    def failed(job: Job, message: str) -> dict[str, Any]:
        """A job whose task never returned (its worker died, or it was killed)."""
        run_dir = spec.run_dir(job)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).write_text(message + "\n", encoding="utf-8")
        return error_row(job, spec, message)

    for job in todo:  # a stale row must not outlive an interrupted rerun of its job
        for name in (ROW_FILE, ERROR_FILE):
            (spec.run_dir(job) / name).unlink(missing_ok=True)
    try:
        pool.run(todo, run_job, spec, finished, failed)
    finally:
        # Also on Ctrl-C, and when every row was reused: the report covers every finished job.
        if rows:
            report.write_report(ordered(), out, info)
            parent.log_files([out / name for name in ("results.csv", "results.md",
                                                      "report.html", "figures")],
                             "report")
        parent.end("FINISHED" if len(rows) == len(jobs) else "KILLED")
    return ordered()
