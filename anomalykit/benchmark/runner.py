"""Train, evaluate, export and time every (detector, category) pair of a benchmark.

Each pair runs in ``out_dir/runs/<detector>/<category>/``. After every pair
``results.csv`` is rewritten atomically, so an interrupted benchmark keeps what finished;
a pair that raises becomes an ``error`` row (traceback in ``error.txt`` beside it) and the
benchmark goes on with the next one.

Timing protocol, identical for PyTorch and onnxruntime: both run the exported module
(uint8 frame in, resize inside, map upsampled back to the frame) one test image at a time
after a short warm-up, with the same number of CPU threads; the median per-image time is
reported. Images are decoded before the clock starts.
"""

from __future__ import annotations

import gc
import math
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalykit.errors import ConfigError

if TYPE_CHECKING:
    from anomalykit.pipeline import FolderData

__all__ = ["run_benchmark", "benchmark_pair"]


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


def benchmark_pair(detector: str, category: str, *, root: str | os.PathLike[str] | None,
                   config: str | os.PathLike[str], overrides: Sequence[str] | None,
                   out_dir: str | os.PathLike[str], device: str, seed: int, onnx: bool = True,
                   progress: bool = True, folder: FolderData | None = None) -> dict[str, Any]:
    """Run one pair and return its results row (see :data:`report.COLUMNS`).

    With ``folder`` the data is that folder dataset and ``category`` only names it.
    """
    from rich.markup import escape

    from anomalykit.benchmark import report
    from anomalykit.benchmark.timing import time_inference
    from anomalykit.export.torch_predictor import TorchPredictor
    from anomalykit.pipeline import evaluate_detector, train_detector
    from anomalykit.training.progress import console

    out = Path(out_dir)
    run_dir = out / "runs" / detector / category
    data: dict[str, Any] = ({"folder": folder} if folder is not None
                            else {"root": root, "category": category})
    trained = train_detector(detector, **data, config=config,
                             overrides=list(overrides or []), out_dir=run_dir, device=device,
                             seed=seed, progress=progress)
    model = trained.detector
    evaluation = evaluate_detector(model, trained.test_records, progress=progress)
    report.save_predictions(evaluation.predictions, run_dir / report.PREDICTIONS)
    report.plot_examples(evaluation.predictions,
                         report.example_figure_path(out, detector, category),
                         f"{detector} on {category}", threshold=float(model.threshold_))

    if hasattr(model, "example_figures"):
        import torch

        from anomalykit.data import AnomalyDataset

        good = AnomalyDataset(trained.train_records[:8], model.image_size)
        images = torch.stack([good[i]["image"] for i in range(len(good))])
        report.save_training_figures(model, images, out, detector, category, seed=seed)

    paths = [r.path for r in trained.test_records]
    torch_ms = time_inference(TorchPredictor(model, device=str(model.device)), paths,
                              progress=progress, desc="time torch")
    notes = [*model.fit_summary(), *trained.warnings]
    onnx_ms = None
    if onnx:
        try:
            onnx_ms = _time_onnx(model, run_dir, category, seed, paths, progress)
        except Exception as exc:  # noqa: BLE001 - keep the metrics of a model that won't export
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            notes.append(f"ONNX export/timing failed: {type(exc).__name__}: {first}")
            onnx_ms = math.nan
            console.print(f"[yellow]warning:[/yellow] {escape(detector)} / {escape(category)}: "
                          f"{escape(notes[-1])}", highlight=False, soft_wrap=True)

    metrics = evaluation.metrics
    return {
        "detector": detector,
        "category": category,
        **{key: metrics.get(key) for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap",
                                             "f1_max", "f1_at_threshold", "fpr_good")},
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


def _check_inputs(detectors: Sequence[str], root: str | os.PathLike[str] | None,
                  categories: Sequence[str], config: str | os.PathLike[str],
                  overrides: Sequence[str] | None, folder: FolderData | None = None) -> None:
    """Fail before the first pair on typos: names, categories or folders, config keys.

    A per-pair failure is recorded and skipped; a typo would otherwise turn the whole
    benchmark into a table of identical error rows.
    """
    from anomalykit.config import load_config
    from anomalykit.data import list_mvtec_categories, scan_folder

    if not detectors:
        raise ConfigError("no detectors to benchmark")
    for detector in detectors:
        load_config(detector, config, list(overrides or []))  # checks the name too
    if folder is not None:
        if folder.defect_dir is None:
            raise ConfigError(f"benchmarking on {folder.good_dir} needs defective test images "
                              "(--defect-dir)")
        scan_folder(folder.good_dir, folder.defect_dir, folder.mask_dir)  # names a bad folder
        return
    if root is None:
        raise ConfigError("no data: give a dataset root (MVTec AD layout) or a folder dataset")
    available = list_mvtec_categories(root)
    if not categories:
        raise ConfigError(f"no categories to benchmark in {root}")
    missing = [c for c in categories if c not in available]
    if missing:
        raise ConfigError(f"category {', '.join(repr(c) for c in missing)} not found in {root}; "
                          f"available: {', '.join(available) or 'none'}")


def run_benchmark(detectors: Sequence[str], root: str | os.PathLike[str] | None,
                  categories: Sequence[str], *, folder: FolderData | None = None,
                  config: str | os.PathLike[str] = "quick",
                  overrides: Sequence[str] | None = None,
                  out_dir: str | os.PathLike[str] = "runs/benchmark", device: str = "auto",
                  seed: int = 0, onnx: bool = True, progress: bool = True,
                  threads: int | None = None, command: str | None = None
                  ) -> list[dict[str, Any]]:
    """Benchmark every detector on every category; write results.csv, results.md, report.html.

    Args:
        detectors: Registered detector names.
        root: MVTec-layout dataset root (``None`` with ``folder``).
        categories: Category folders under ``root``; ignored with ``folder``.
        folder: Benchmark on this folder dataset (:class:`~anomalykit.pipeline.FolderData`,
            with a defect folder) instead; its :attr:`~anomalykit.pipeline.FolderData.name`
            is the results' category.
        config, overrides: Profile/YAML and ``key=value`` overrides, the same for every pair.
        out_dir: Benchmark folder (see :mod:`anomalykit.benchmark.report` for its layout).
        device: ``auto``/``cpu``/``cuda[:N]`` for training and PyTorch inference.
        seed: Seed of every pair.
        onnx: Export each model to ONNX and time onnxruntime.
        progress: Progress bars (benchmark loop, training, inference, timing).
        threads: CPU threads for torch and onnxruntime (default: torch's current setting,
            which onnxruntime then uses too).
        command: The command line to print in the report header.

    Returns:
        The rows, in run order; failed pairs have a non-empty ``error``.
    """
    import torch
    from rich.markup import escape

    from anomalykit.benchmark import report
    from anomalykit.training import resolve_device
    from anomalykit.training.progress import console, progress_bar

    torch_device = str(resolve_device(device))
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if folder is not None:
        root, categories = None, [folder.name]
    _check_inputs(detectors, root, categories, config, overrides, folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = report.environment_info(torch_device, command or "(python API) run_benchmark")
    if onnx:
        info["device"] += f"; onnxruntime on {_onnx_device(torch_device)}"

    rows: list[dict[str, Any]] = []
    pairs = [(d, c) for d in detectors for c in categories]
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("benchmark", total=len(pairs), info="")
            for detector, category in pairs:
                bar.update(task, info=f"{detector} / {category}")
                try:
                    row = benchmark_pair(detector, category, root=root, config=config,
                                         overrides=overrides, out_dir=out, device=torch_device,
                                         seed=seed, onnx=onnx, progress=progress,
                                         folder=folder)
                except Exception as exc:  # noqa: BLE001 - one failing pair must not stop the rest
                    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
                    run_dir = out / "runs" / detector / category
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
                    console.print(f"[red]error:[/red] {escape(detector)} / {escape(category)}: "
                                  f"{escape(message)} (traceback in "
                                  f"{escape(str(run_dir / 'error.txt'))})", highlight=False,
                                  soft_wrap=True)
                    row = {"detector": detector, "category": category, "error": message,
                           "config": _config_label(config, overrides), "seed": seed}
                rows.append(row)
                report.write_csv(rows, out / "results.csv")
                bar.advance(task)
                gc.collect()  # free the finished model before the next one is built
    finally:
        # Also on Ctrl-C: the report covers every pair that finished.
        if rows:
            report.write_report(rows, out, info)
    return rows
