"""Optional experiment tracking: every run logged to MLflow's local store or TensorBoard files.

Off by default. Turned on by the command-line option ``--track mlflow[:DIR_OR_URI]`` or
``--track tensorboard[:DIR]``, or by a config's ``tracking`` section::

    tracking:
      backend: mlflow          # or tensorboard
      uri: runs/mlruns         # mlflow: a folder or a URI; tensorboard: `dir`, a folder
      experiment: anomalykit   # MLflow experiment / TensorBoard sub-folder
      log_checkpoint: false    # model.ckpt can be big: off unless asked

What a run gets: the resolved config as flat parameters (``model.image_size``, ``train.epochs``,
...), the train and validation loss of every epoch (step = the 0-based epoch, as in the fit
history), the calibration result (``calibration/threshold``, ...), the test metrics
(``test/image_auroc``, ...) and the files (figures, ``metrics.json``, the report; the
checkpoint only with ``log_checkpoint``). A benchmark opens one parent run and one child run per
(detector, category, seed) job: MLflow nests them (``mlflow.parentRunId``), TensorBoard puts
the jobs' folders inside the parent's.

Typical use (what the pipeline does)::

    with track_run(TrackingConfig.parse("mlflow:runs/mlruns"), "ae/bottle") as run:
        history = model.fit(train, val, epoch_callback=run.log_epoch)
        ...
        run.log_training(meta)
        run.log_evaluation(metrics, [figure_path])

Never at the cost of a training run: a backend that raises is caught, warned about once
(:class:`TrackingWarning`) and the run goes on; a run whose block raises is ended ``FAILED``.
Only the process of rank 0 logs under ``torchrun`` (the others get a run that does nothing).
MLflow only ever talks to the store named here (a local folder unless the user gives a URI),
never to ``$MLFLOW_TRACKING_URI``. The backends' packages are imported when a run starts:
``pip install 'anomalykit[tracking]'`` (mlflow-skinny, tensorboard).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from anomalykit.errors import ConfigError, check_choice

Backend = Literal["mlflow", "tensorboard"]
BACKENDS = ("mlflow", "tensorboard")
Status = Literal["FINISHED", "FAILED", "KILLED"]
INSTALL_HINT = "pip install 'anomalykit[tracking]'"
# Where runs go when the option names no folder: next to the toolkit's other outputs (runs/).
DEFAULT_LOCATIONS = {"mlflow": "runs/mlruns", "tensorboard": "runs/tensorboard"}
DEFAULT_EXPERIMENT = "anomalykit"
# The keys a config's `tracking` section accepts (`uri` and `dir` are the same thing).
SECTION_KEYS = ("backend", "uri", "dir", "experiment", "log_checkpoint")
# MLflow refuses parameter values longer than this (6000 in MLflow 2/3); longer ones are cut.
MAX_PARAM_CHARS = 6000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class TrackingWarning(UserWarning):
    """A tracking backend failed; the training run went on without it."""


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how runs are logged; picklable, so a benchmark sends it to its workers.

    Attributes:
        backend: ``mlflow`` or ``tensorboard``.
        location: MLflow: a folder (its file store) or a tracking URI (``file:``, ``sqlite:``,
            ``http(s):`` ... used as given: a server is only ever contacted when the user
            names one); TensorBoard: the log folder. ``None``: :data:`DEFAULT_LOCATIONS`.
        experiment: The MLflow experiment; for TensorBoard a sub-folder of ``location``.
        log_checkpoint: Also upload ``model.ckpt`` (off: a checkpoint can be hundreds of MB).
        parent: Set by :func:`start_parent_run` for a benchmark's jobs: the parent's MLflow run
            id, or the parent's TensorBoard folder (relative to the experiment folder).
    """

    backend: Backend
    location: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    log_checkpoint: bool = False
    parent: str | None = None

    def __post_init__(self) -> None:
        check_choice("tracking backend", self.backend, BACKENDS)
        if not str(self.experiment).strip():
            raise ConfigError("tracking experiment name is empty")

    @classmethod
    def parse(cls, option: str) -> TrackingConfig:
        """``mlflow``, ``mlflow:DIR``, ``mlflow:file:///abs/dir``, ``tensorboard:DIR``."""
        backend, _, location = option.strip().partition(":")
        if backend not in BACKENDS:
            raise ConfigError(f"--track {option!r}: expected mlflow[:DIR_OR_URI] or "
                              "tensorboard[:DIR]")
        return cls(backend, location.strip() or None)  # type: ignore[arg-type]

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> TrackingConfig | None:
        """A config's ``tracking`` section (see the module docstring); empty -> None (off)."""
        if not section:
            return None
        unknown = set(section) - set(SECTION_KEYS)
        if unknown:
            raise ConfigError(f"tracking option(s) {sorted(unknown)} unknown; valid: "
                              f"{', '.join(SECTION_KEYS)}")
        if "backend" not in section:
            raise ConfigError(f"the tracking section needs a backend ({', '.join(BACKENDS)})")
        if section.get("uri") is not None and section.get("dir") is not None:
            raise ConfigError("the tracking section has both uri and dir; give one")
        location = section.get("uri", section.get("dir"))
        return cls(section["backend"], None if location is None else str(location),
                   str(section.get("experiment", DEFAULT_EXPERIMENT)),
                   bool(section.get("log_checkpoint", False)))

    def describe(self) -> str:
        """``mlflow file:///.../runs/mlruns (experiment anomalykit)``, for messages."""
        return f"{self.backend} {self.resolved_location()} (experiment {self.experiment})"

    def resolved_location(self) -> str:
        """The MLflow tracking URI or the TensorBoard folder. Local folders become absolute (a
        benchmark's workers may run in another directory); an MLflow URI is kept as given."""
        location = self.location or DEFAULT_LOCATIONS[self.backend]
        if self.backend == "mlflow" and _has_scheme(location):
            return location
        folder = Path(location).expanduser().absolute()
        return folder.as_uri() if self.backend == "mlflow" else str(folder)


def _has_scheme(location: str) -> bool:
    """``file:``, ``sqlite:``, ``http:`` ... but not a Windows drive (``C:\\runs``)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", location) is not None


def resolve_tracking(option: str | TrackingConfig | None,
                     section: Mapping[str, Any] | None = None) -> TrackingConfig | None:
    """The run's tracking: the command-line option wins over the config's section; None = off.

    A section's ``experiment`` and ``log_checkpoint`` still apply when the option only names
    the backend and folder.
    """
    from_config = TrackingConfig.from_section(section or {})
    if option is None:
        return from_config
    chosen = TrackingConfig.parse(option) if isinstance(option, str) else option
    if from_config is not None and isinstance(option, str):
        chosen = replace(chosen, experiment=from_config.experiment,
                         log_checkpoint=from_config.log_checkpoint)
    return chosen


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"image_size": 32}}`` -> ``{"model.image_size": "32"}`` (parameters are
    strings in both backends; lists stay one value)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only, NaN/inf left out (a pixel metric of a test set without masks is NaN)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


# -- backends --------------------------------------------------------------------------------


class Tracker(Protocol):
    """What a backend implements. One run at a time; calls may raise (see :class:`SafeTracker`)."""

    def start_run(self, name: str, config: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None) -> None:
        """Open a run named ``name``; ``config`` (nested) is logged as flat parameters."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat ``{name: value}``; values are logged as strings."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalars at ``step`` (``None``: a final value, logged at step 0)."""

    def log_artifact(self, path: str | os.PathLike[str], folder: str | None = None) -> None:
        """A file, under ``folder`` in the run's artefacts."""

    def end_run(self, status: Status = "FINISHED") -> None:
        """Close the run with its final status."""


def _import(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"experiment tracking needs the {package} package, which is not "
                          f"installed ({exc}): {INSTALL_HINT}") from None


class MlflowTracker:
    """MLflow through an explicit :class:`mlflow.MlflowClient` (no global active run, no
    ``$MLFLOW_TRACKING_URI``): a folder is a local file store."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self.uri = config.resolved_location()
        if self.uri.startswith("file:"):
            # MLflow 3 refuses its file store unless this is set (it wants a database); the
            # file store is what works with mlflow-skinny and nothing else installed.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking = _import("mlflow.tracking", "mlflow-skinny (or mlflow)")
        self.client = tracking.MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        name = self.config.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another job created it in the meantime
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, name: str, config: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None) -> None:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if self.config.parent:
            all_tags["mlflow.parentRunId"] = self.config.parent
        run = self.client.create_run(self._experiment_id(), run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        if config:
            self.log_params(flatten(config))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step or 0) for k, v in _finite_metrics(metrics).items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | os.PathLike[str], folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def end_run(self, status: Status = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def run_ref(self) -> str | None:
        """The run id (what a child run names as its parent)."""
        return self.run_id


def _safe_name(name: str) -> str:
    """A run name as one folder name: ``ae/bottle (seed 0)`` -> ``ae_bottle_seed_0``."""
    # No leading dot: "." / ".." would leave the folder, ".x" would hide it.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).rstrip("_").lstrip(".") or "run"


class TensorBoardTracker:
    """TensorBoard event files, one folder per run: ``<dir>/<experiment>/[<parent>/]<name>``.

    Scalars per step; the parameters, the status and non-image files as text; PNG/JPEG files
    as images (TensorBoard has no artefact store, so other files are logged as their paths).
    A name already used gets ``-2``, ``-3`` ...: two runs never share a folder.
    """

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self.root = Path(config.resolved_location()) / _safe_name(config.experiment)
        if config.parent:
            self.root = self.root / config.parent
        self._summary = _import("torch.utils.tensorboard", "tensorboard")
        self.writer: Any = None
        self.folder: Path | None = None
        self._artifacts: list[str] = []

    def start_run(self, name: str, config: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None) -> None:
        base = self.root / _safe_name(name)
        folder, n = base, 1
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        folder.mkdir(parents=True)
        self.folder = folder
        self.writer = self._summary.SummaryWriter(log_dir=str(folder))
        if tags:
            self.writer.add_text("tags", _markdown_table({k: str(v) for k, v in tags.items()}))
        if config:
            self.log_params(flatten(config))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("params", _markdown_table({k: str(v) for k, v in params.items()}))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in _finite_metrics(metrics).items():
            self.writer.add_scalar(key, value, global_step=step or 0)

    def log_artifact(self, path: str | os.PathLike[str], folder: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no file {path} to log")
        tag = f"{folder}/{path.name}" if folder else path.name
        if path.suffix.lower() in IMAGE_SUFFIXES:
            from anomalykit.export.runtime import decode_image

            self.writer.add_image(tag, decode_image(path.read_bytes(), source=str(path)),
                                  dataformats="HWC")
        self._artifacts.append(f"{tag}: {path.absolute()}")

    def end_run(self, status: Status = "FINISHED") -> None:
        if self._artifacts:  # one list at the end, not a growing copy per file
            self.writer.add_text("artifacts", "\n\n".join(self._artifacts))
        self.writer.add_text("status", status)
        self.writer.close()

    def run_ref(self) -> str | None:
        """The run's folder relative to the experiment folder (a child run's parent)."""
        if self.folder is None:
            return None
        experiment = Path(self.config.resolved_location()) / _safe_name(self.config.experiment)
        return self.folder.relative_to(experiment).as_posix()


def _markdown_table(values: Mapping[str, str]) -> str:
    rows = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in sorted(values.items()))
    return f"| name | value |\n|---|---|\n{rows}"


def create_tracker(config: TrackingConfig) -> Tracker:
    """The backend of ``config``, its package imported now (ConfigError naming the extra)."""
    return MlflowTracker(config) if config.backend == "mlflow" else TensorBoardTracker(config)


class SafeTracker:
    """Wraps a backend so that it never stops a run: the first failure is warned about
    (:class:`TrackingWarning`), later ones are counted; a run that could not start is not
    logged to at all."""

    def __init__(self, tracker: Tracker, label: str) -> None:
        self.tracker, self.label = tracker, label
        self.failures = 0
        self.started = False

    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never lose a training run
            self.failures += 1
            if self.failures == 1:
                warnings.warn(f"experiment tracking ({self.label}) failed in {what}: "
                              f"{type(exc).__name__}: {exc}; the run goes on without it",
                              TrackingWarning, stacklevel=3)
            return None

    def start_run(self, name: str, config: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None) -> None:
        self.started = self._call("start_run", lambda: (self.tracker.start_run(name, config, tags),
                                                        True)[1]) is True

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.started and params:
            self._call("log_params", self.tracker.log_params, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.started and metrics:
            self._call("log_metrics", self.tracker.log_metrics, metrics, step)

    def log_artifact(self, path: str | os.PathLike[str], folder: str | None = None) -> None:
        if self.started:
            self._call("log_artifact", self.tracker.log_artifact, path, folder)

    def end_run(self, status: Status = "FINISHED") -> None:
        if self.started:
            self._call("end_run", self.tracker.end_run, status)
            self.started = False

    def run_ref(self) -> str | None:
        ref = getattr(self.tracker, "run_ref", None)
        return self._call("run_ref", ref) if self.started and callable(ref) else None


# -- runs ------------------------------------------------------------------------------------


@dataclass
class RunLog:
    """One tracked run, as the pipeline sees it; with ``tracker=None`` every method does nothing
    (tracking off, or a process other than rank 0), so callers never test for it."""

    tracker: SafeTracker | None = None
    config: TrackingConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.tracker is not None and self.tracker.started

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested or flat parameters (a resolved config)."""
        if self.tracker is not None:
            self.tracker.log_params(flatten(params))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)

    def log_epoch(self, epoch: int, train_loss: Mapping[str, float],
                  val_loss: float | None = None) -> None:
        """The ``epoch_callback`` of :func:`anomalykit.training.fit`: ``train/<name>`` for each
        logged training loss (``train/loss``; a GAN's ``train/d_loss``, ``train/g_loss``) and
        ``val/loss``, at step ``epoch`` (0-based, as the fit history counts)."""
        metrics = {f"train/{k}": v for k, v in train_loss.items()}
        if val_loss is not None:
            metrics["val/loss"] = val_loss
        self.log_metrics(metrics, step=epoch)

    def log_training(self, meta: Mapping[str, Any]) -> None:
        """What ``train_detector`` recorded in the checkpoint: the run's facts as parameters,
        the calibration (``calibration/threshold``) and the fit summary as metrics."""
        facts = {k: meta[k] for k in ("detector", "category", "seed", "device", "n_train",
                                      "n_val", "n_test", "calibrated_on") if k in meta}
        self.log_params({**facts, "config_name": meta.get("config_name", "")})
        history = meta.get("history", {})
        self.log_metrics({"calibration/threshold": meta.get("threshold"),
                          "train_seconds": meta.get("train_seconds"),
                          "epochs_run": history.get("epochs_run"),
                          "best_val_loss": history.get("best_val_loss")})

    def log_calibration(self, detector: Any) -> None:
        """The detector's calibrated thresholds and score range (its ``*_`` buffers)."""
        values = {}
        for name in ("threshold_", "pixel_threshold_", "score_min_", "score_max_"):
            value = getattr(detector, name, None)
            if value is not None:
                values[f"calibration/{name.rstrip('_')}"] = float(value)
        self.log_metrics(values)

    def log_evaluation(self, metrics: Mapping[str, Any],
                       files: Iterable[str | os.PathLike[str]] = ()) -> None:
        """Test metrics as ``test/<name>``, then the files (figures, metrics.json, report)."""
        self.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        self.log_files(files, "evaluation")

    def log_files(self, files: Iterable[str | os.PathLike[str]], folder: str | None = None) -> None:
        """Files, and folders with everything under them (kept in their sub-folders); paths
        that do not exist are skipped (a figure that was not drawn is not an error)."""
        if self.tracker is None:
            return
        for path in map(Path, (f for f in files if f is not None)):
            if path.is_file():
                self.tracker.log_artifact(path, folder)
            elif path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    parts = [folder] if folder else []
                    parts += [path.name, *file.relative_to(path).parent.parts]
                    self.tracker.log_artifact(file, "/".join(parts))

    def log_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """``model.ckpt``, only when the tracking config asks for it (``log_checkpoint``)."""
        if self.config is not None and self.config.log_checkpoint:
            self.log_files([path], "model")

    def describe(self) -> dict[str, Any] | None:
        """Where this run lives, for a checkpoint's metadata (None when not tracked)."""
        if not self.enabled or self.config is None:
            return None
        assert self.tracker is not None
        return {"backend": self.config.backend, "location": self.config.resolved_location(),
                "experiment": self.config.experiment, "run": self.tracker.run_ref()}

    def end(self, status: Status = "FINISHED") -> None:
        if self.tracker is not None:
            self.tracker.end_run(status)


NO_RUN = RunLog()  # tracking off: a RunLog whose methods do nothing


def start_run(tracking: TrackingConfig | None, name: str, *,
              config: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None) -> RunLog:
    """Open a run (see :func:`track_run`, which also ends it). Tracking off or not rank 0:
    :data:`NO_RUN`. A missing package raises ConfigError (before any training); a backend
    that fails to open a run only warns."""
    from anomalykit.training import is_main_process

    if tracking is None or not is_main_process():
        return NO_RUN
    label = tracking.describe()
    try:
        backend = create_tracker(tracking)
    except ConfigError:
        raise  # a missing package: the user asked for tracking, so say how to get it
    except Exception as exc:  # noqa: BLE001 - e.g. a store that cannot be opened
        warnings.warn(f"experiment tracking ({label}) could not start: {type(exc).__name__}: "
                      f"{exc}; the run goes on without it", TrackingWarning, stacklevel=2)
        return NO_RUN
    tracker = SafeTracker(backend, label)
    tracker.start_run(name, config, {k: str(v) for k, v in (tags or {}).items()})
    return RunLog(tracker, tracking)


@contextlib.contextmanager
def track_run(tracking: TrackingConfig | None, name: str, *,
              config: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None) -> Iterator[RunLog]:
    """A run around a block: ``FINISHED`` when it completes, ``FAILED`` when it raises (the
    exception goes on), ``KILLED`` on Ctrl-C."""
    run = start_run(tracking, name, config=config, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def start_parent_run(tracking: TrackingConfig | None, name: str, *,
                     config: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None) -> tuple[RunLog, TrackingConfig | None]:
    """A benchmark's parent run, and the tracking its jobs use to open their runs under it.

    The returned config is plain data (picklable: it travels to Ray workers) with an absolute
    location (a worker runs in another directory); the caller ends the parent with
    ``parent.end(status)`` when every job is done.
    """
    parent = start_run(tracking, name, config=config, tags=tags)
    if tracking is None:
        return parent, None
    ref = parent.tracker.run_ref() if parent.tracker is not None else None
    return parent, replace(tracking, location=tracking.resolved_location(),
                           parent=ref or tracking.parent)


def tracking_for(option: str | TrackingConfig | None, detector: str,
                 config: str | os.PathLike[str] = "quick",
                 overrides: Sequence[str] | Mapping[str, Any] | None = None
                 ) -> TrackingConfig | None:
    """A command's tracking: ``--track`` wins over the config's ``tracking`` section (read as
    :func:`anomalykit.config.load_config` returns it); None = off, the default."""
    from anomalykit.config import load_config
    from anomalykit.registry import get_class

    get_class(detector)  # an unknown name is reported as such, not as a missing profile
    loaded = load_config(detector, config,
                         dict(overrides) if isinstance(overrides, Mapping) else list(overrides or []))
    return resolve_tracking(option, loaded.get("tracking"))
