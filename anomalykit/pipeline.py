"""The steps shared by the command line and the benchmark: load data, train, evaluate, export.

Every step checks its inputs before doing expensive work: the train AND test splits are
scanned and decoded before the first training step, so a corrupt file or a missing mask
fails in seconds, not after an hour of training.

Data comes as a dataset root (``root`` + ``category``) in one of the layouts of
:mod:`anomalykit.data.formats` (MVTec AD, MPDD, VisA, MVTec LOCO AD, MVTec AD 2, BTAD; named by
``format``, detected for ``"auto"``) or as plain folders (:class:`FolderData`: a folder of good
images, optionally a folder of defective images and one of their masks). The layout is
recorded in the checkpoint, so ``anomalykit test`` reads the same data the same way.

Typical use::

    result = train_detector("ae", root="data/mvtec", category="bottle", out_dir="runs/bottle")
    evaluation = evaluate_detector(result.detector, result.test_records)
    evaluation.metrics["image_auroc"]

Scoring raw frames (``predictions.csv`` and overlays) is in :mod:`anomalykit.predict`, the
predictors in :mod:`anomalykit.export.torch_predictor`, timing in
:mod:`anomalykit.benchmark.timing`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from anomalykit.errors import ConfigError, DataError
from anomalykit.tracking import NO_RUN, RunLog

if TYPE_CHECKING:
    from anomalykit.data import ImageRecord

CHECKPOINT_NAME = "model.ckpt"
METRICS_NAME = "metrics.json"
DEFAULT_TEST_FRACTION = 0.2


@dataclass
class TrainResult:
    """What :func:`train_detector` produced.

    Attributes:
        detector: The trained and calibrated detector, in eval mode, on the training device.
        checkpoint: Path of the saved ``model.ckpt``.
        history: :func:`anomalykit.training.fit`'s history (per-epoch losses, seconds, ...).
        meta: The metadata stored in the checkpoint.
        train_records, val_records, test_records: The data used, so a caller can evaluate
            without scanning again.
        warnings: Things the user should know (e.g. calibration fell back to train images).
    """

    detector: Any
    checkpoint: Path
    history: dict[str, Any]
    meta: dict[str, Any]
    train_records: list[Any]
    val_records: list[Any]
    test_records: list[Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    """What :func:`evaluate_detector` produced.

    Attributes:
        metrics: :func:`anomalykit.metrics.compute_metrics` plus ``threshold``, ``n_test``,
            ``n_good``, ``n_defect``, ``ms_per_image``.
        predictions: :func:`anomalykit.training.predict`'s arrays (scores, maps, labels,
            masks, paths, defect_types).
        ms_per_image: Batched inference wall time per image (data loading included).
        records: The evaluated records, in prediction order.
    """

    metrics: dict[str, Any]
    predictions: dict[str, Any]
    ms_per_image: float
    records: list[Any] = field(default_factory=list)


# -- data ------------------------------------------------------------------------------------


def load_split(root: str | os.PathLike[str], category: str, split: str,
               format: str | None = "auto") -> list[Any]:
    """Scan one split of a dataset root and decode every image and mask once.

    Args:
        root, category: The dataset root and one of its categories.
        split: ``train``, ``test``, or ``val`` for layouts with their own validation split.
        format: A layout of :data:`anomalykit.data.formats.FORMATS`, or ``auto`` (detected).

    Raises:
        ConfigError: unknown format.
        DataError: an undetectable layout, missing root/category/split (listing the available
            categories), an empty folder, a corrupt image or a mask that does not fit its
            image; the message names the offending file.
    """
    from anomalykit.data import scan_split, validate_records

    records = scan_split(root, category, split, format)
    validate_records(records)
    return records


@dataclass(frozen=True)
class FolderData:
    """A dataset given as plain folders instead of the MVTec AD layout.

    What a user with "a folder of good images and a folder of bad ones" expects: the good
    folder is split once, deterministically with the run's seed, into a training part and a
    held-out part of ``test_fraction`` (at least one image when the fraction is > 0) that
    joins the defective images as the test set; the training part is then split again into
    train and validation (``train.val_fraction``, the images that calibrate the threshold),
    exactly as ``train/good`` is for MVTec. The same folders and seed always give the same
    split, so ``anomalykit test`` finds the held-out images again from the checkpoint.

    Attributes:
        good_dir: Folder of good images (not searched recursively).
        defect_dir: Folder of defective images, for the test set only: loose images are type
            ``defect``, images in a subfolder get the subfolder's name. ``None``: the test set
            is the held-out good images only (enough to train; testing needs defects).
        mask_dir: Their binary masks, matched by stem (``<stem>_mask.*`` or ``<stem>.*``);
            ``None``: image-level metrics only.
        test_fraction: Share of the good images held out for testing, in ``[0, 1)``.
    """

    good_dir: Path
    defect_dir: Path | None = None
    mask_dir: Path | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION

    def __post_init__(self) -> None:
        for name in ("good_dir", "defect_dir", "mask_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if not 0.0 <= float(self.test_fraction) < 1.0:
            raise ConfigError(f"test fraction is {self.test_fraction!r}; expected a value in "
                              "[0, 1)")
        if self.mask_dir is not None and self.defect_dir is None:
            raise ConfigError(f"mask folder {self.mask_dir} given without a defect image "
                              "folder (--defect-dir)")

    @property
    def name(self) -> str:
        """The dataset's name in reports: the folder that holds the good folder."""
        return self.good_dir.resolve().parent.name or "folder"

    def as_meta(self) -> dict[str, Any]:
        """Absolute paths, for a checkpoint's record of the run (see :meth:`from_meta`)."""
        def absolute(path: Path | None) -> str | None:
            return str(path.resolve()) if path is not None else None

        return {"good_dir": absolute(self.good_dir), "defect_dir": absolute(self.defect_dir),
                "mask_dir": absolute(self.mask_dir), "test_fraction": float(self.test_fraction)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> FolderData:
        return cls(meta["good_dir"], meta.get("defect_dir"), meta.get("mask_dir"),
                   float(meta.get("test_fraction", DEFAULT_TEST_FRACTION)))



def folder_data(good_dir: str | os.PathLike[str] | None,
                defect_dir: str | os.PathLike[str] | None = None,
                mask_dir: str | os.PathLike[str] | None = None,
                test_fraction: float | None = None) -> FolderData | None:
    """The :class:`FolderData` of command-line options, or None when no folder is given."""
    if good_dir is None:
        if defect_dir is not None or mask_dir is not None:
            raise ConfigError("--defect-dir and --mask-dir need --good-dir (the folder of good "
                              "images)")
        if test_fraction is not None:
            raise ConfigError("--test-fraction applies to a folder dataset (--good-dir) only")
        return None
    return FolderData(good_dir, defect_dir, mask_dir,
                      DEFAULT_TEST_FRACTION if test_fraction is None else float(test_fraction))


def _split_good(folder: FolderData, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The good images as (training part, held-out test part), seeded."""
    from anomalykit.data import scan_folder, split_train_val

    good = scan_folder(folder.good_dir)
    return split_train_val(good, float(folder.test_fraction), seed)


def load_folder_split(folder: FolderData, split: str, seed: int = 0) -> list[ImageRecord]:
    """The ``train`` or ``test`` split of a folder dataset, every image and mask decoded once.

    ``train``: the good images not held out. ``test``: the held-out good images, then the
    defective ones (with their masks when ``mask_dir`` is given).

    Raises:
        DataError: a missing or empty folder, a corrupt image, a defect without its mask or
            a mask without its image; the message names the folder or file.
    """
    from anomalykit.data import scan_folder, validate_records

    if split not in ("train", "test"):
        raise ConfigError(f"split is {split!r}; expected 'train' or 'test'")
    train_good, test_good = _split_good(folder, seed)
    if split == "train":
        records = train_good
    else:
        defects = []
        if folder.defect_dir is not None:
            defects = [r for r in scan_folder(folder.good_dir, folder.defect_dir,
                                              folder.mask_dir) if r.label == 1]
        records = test_good + defects
    validate_records(records)
    return records


def load_folder_records(good_dir: str | os.PathLike[str], defect_dir: str | os.PathLike[str],
                        mask_dir: str | os.PathLike[str] | None = None) -> list[ImageRecord]:
    """Every image of a good folder and a defect folder (with masks), decoded once: a test set."""
    from anomalykit.data import scan_folder, validate_records

    records = scan_folder(good_dir, defect_dir, mask_dir)
    validate_records(records)
    return records


def check_format(format: str | None, folder: FolderData | None) -> None:
    """A dataset root's ``--format`` with ``--good-dir``, or ``--format folder`` without it, is a
    contradiction: ConfigError."""
    from anomalykit.data.formats import AUTO, FOLDER

    if folder is not None and format not in (None, AUTO, FOLDER):
        raise ConfigError(f"--format {format} reads a dataset root (--root); --good-dir is a "
                          "folder dataset (--format folder)")
    if folder is None and format == FOLDER:
        raise ConfigError("--format folder needs --good-dir (a folder of good images)")


def _train_and_test_records(root: str | os.PathLike[str] | None, category: str | None,
                            folder: FolderData | None, seed: int, format: str | None = "auto"
                            ) -> tuple[list[ImageRecord], list[ImageRecord] | None,
                                       list[ImageRecord], str]:
    """Scan and decode the splits of either data source (checked before any training).

    Returns:
        ``(train, val, test, format)``: ``val`` is the dataset's own validation split for
        layouts that have one, else None (carved from train by the caller); ``format`` is the
        resolved layout name (``folder`` for a folder dataset).
    """
    from anomalykit.data.formats import FOLDER, FORMATS, resolve_format

    check_format(format, folder)
    if folder is not None:
        if root is not None or category is not None:
            raise ConfigError("give either --root and --category (a dataset root) or "
                              "--good-dir (folders of images), not both")
        return (load_folder_split(folder, "train", seed), None,
                load_folder_split(folder, "test", seed), FOLDER)
    if root is None or not category:
        raise ConfigError("no data: give --root and --category (a dataset root) or "
                          "--good-dir (a folder of good images)")
    name = resolve_format(root, format)
    val = load_split(root, category, "val", name) if FORMATS[name].has_val else None
    return (load_split(root, category, "train", name), val,
            load_split(root, category, "test", name), name)


# -- training --------------------------------------------------------------------------------


def _history_summary(history: dict[str, Any]) -> dict[str, Any]:
    """The plain, small part of a fit history that belongs in a checkpoint."""
    return {
        "epochs_run": int(history.get("epochs_run", 0)),
        "steps": int(history.get("steps", 0)),
        "best_epoch": history.get("best_epoch"),
        "best_val_loss": history.get("best_val_loss"),
        "stopped_early": bool(history.get("stopped_early", False)),
        "seconds": float(history.get("seconds", 0.0)),
        "train_loss": [float(e.get("loss", math.nan)) for e in history.get("train_loss", [])],
        "val_loss": [float(v) for v in history.get("val_loss", [])],
    }


def _split_train_section(train: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the data options (val_fraction, augment) from fit's keyword arguments."""
    from anomalykit.config import DATA_OPTIONS

    fit_kwargs = dict(train)
    data = {key: fit_kwargs.pop(key, default) for key, default in DATA_OPTIONS.items()}
    return fit_kwargs, data


def train_detector(detector: str, *, root: str | os.PathLike[str] | None = None,
                   category: str | None = None, folder: FolderData | None = None,
                   format: str | None = "auto", config: str | os.PathLike[str] = "quick",
                   overrides: Sequence[str] | dict[str, Any] | None = None,
                   out_dir: str | os.PathLike[str], device: str | None = None,
                   seed: int | None = None, progress: bool = True,
                   resume: bool = False, run: RunLog | None = None) -> TrainResult:
    """Train ``detector`` on the good images of one category and calibrate its threshold.

    Order of work (cheap checks first): resolve the detector name, the config and the
    device; scan and decode the train and test splits; split the good training images into
    train/validation (``train.val_fraction``, seeded), unless the dataset has its own
    validation split (MVTec LOCO AD, MVTec AD 2: ``validation/good``, used as is); fit;
    calibrate on the held-out validation images (never the test set); save ``out_dir/model.ckpt``.

    Args:
        detector: Registered detector name (``anomalykit list``).
        root, category: Dataset root and category folder.
        format: The root's layout (:data:`anomalykit.data.formats.FORMAT_CHOICES`; ``auto``
            detects it); recorded in the checkpoint's ``format``.
        folder: Or a folder dataset (:class:`FolderData`): its good images are split into
            train / validation / held-out test with ``seed``.
        config: Profile name (``quick``, ``paper``) or a YAML file.
        overrides: ``["section.key=value", ...]`` (see :func:`anomalykit.config.load_config`).
        out_dir: Run folder; receives ``model.ckpt`` and, during fit, ``last.ckpt``.
        device: ``auto``/``cpu``/``cuda[:N]``; ``None`` = the config's ``train.device`` or auto.
        seed: Seed of the split, the initialisation and the data order; ``None`` = the
            config's ``train.seed`` or 0.
        progress: Show progress bars.
        resume: Continue from ``out_dir/last.ckpt`` if it exists.
        run: Log the config, every epoch's losses and the calibration there (see
            :func:`anomalykit.tracking.track_run`); ``None``: not tracked.

    Raises:
        ConfigError: unknown detector (lists the known ones), unknown config key, bad device.
        DataError: bad data (see :func:`load_split`), before any training.
        TrainingError: the loss became NaN/inf.
    """
    from anomalykit.config import load_config
    from anomalykit.data import AnomalyDataset, split_train_val
    from anomalykit.registry import create, get_class
    from anomalykit.training import distributed, resolve_device

    # Under torchrun (data-parallel, see anomalykit.training.distributed) every process trains;
    # rank 0 alone shows progress and writes model.ckpt.
    writer = distributed.is_main_process()
    progress = progress and writer
    # Name first: load_config would otherwise report "no config 'quick'" for a typo.
    get_class(detector)
    cfg = load_config(detector, config,
                      overrides if isinstance(overrides, dict) else list(overrides or []))
    fit_kwargs, data_options = _split_train_section(cfg["train"])
    run = run or NO_RUN
    run.log_params({k: cfg[k] for k in ("model", "train", "calibrate", "source")})
    device_name = device if device is not None else fit_kwargs.pop("device", "auto")
    fit_kwargs.pop("device", None)
    run_seed = int(seed if seed is not None else fit_kwargs.pop("seed", 0))
    fit_kwargs.pop("seed", None)
    torch_device = resolve_device(str(device_name))

    train_records, own_val, test_records, data_format = _train_and_test_records(
        root, category, folder, run_seed, format)
    good = [r for r in train_records if r.label == 0]
    if own_val is not None:
        train_part, val_part = good, own_val  # the dataset's validation split, as published
    else:
        train_part, val_part = split_train_val(good, float(data_options["val_fraction"]),
                                               run_seed)

    # Seed before building the model so its initial weights depend on the seed only.
    torch.manual_seed(run_seed)
    model = create(detector, **cfg["model"])
    size = int(model.image_size)
    train_set = AnomalyDataset(train_part, size, augment=bool(data_options["augment"]),
                               seed=run_seed, cache_bytes=int(data_options["cache_bytes"]),
                               cache_dir=data_options["cache_dir"])
    val_set = AnomalyDataset(val_part, size, cache=train_set.cache) if val_part else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = model.fit(train_set, val_set, device=torch_device, seed=run_seed, out_dir=out,
                  resume=resume, progress=progress, epoch_callback=run.log_epoch, **fit_kwargs)

    notes: list[str] = []
    calibrate_kwargs = dict(cfg["calibrate"])
    calibrate_kwargs.pop("progress", None)
    calibrate_kwargs.setdefault("batch_size", int(fit_kwargs.get("batch_size", 16)))
    if val_set is not None:
        calibrated_on = "val"
        calibration_set = val_set
    else:
        # Training images score lower than unseen good ones, so this threshold is optimistic.
        calibrated_on = "train"
        calibration_set = AnomalyDataset(train_part, size, cache=train_set.cache)
        notes.append(f"no validation images (val_fraction={data_options['val_fraction']}, "
                     f"{len(good)} good training image(s)): the threshold was calibrated on the "
                     "training images and will flag more good images than expected")
    model.eval()
    threshold = model.calibrate(calibration_set, progress=progress, **calibrate_kwargs)

    effective_train = {**cfg["train"], "device": str(device_name), "seed": run_seed}
    meta = {
        "detector": detector,
        "category": folder.name if folder is not None else category,
        "root": str(Path(root).resolve()) if root is not None else None,
        "folder": folder.as_meta() if folder is not None else None,
        "format": data_format,
        "val_source": "dataset" if own_val is not None else "train",
        "config": {"model": cfg["model"], "train": effective_train,
                   "calibrate": cfg["calibrate"], "source": cfg["source"]},
        "config_name": str(config),
        "overrides": _overrides_list(overrides),
        "seed": run_seed,
        "device": str(torch_device),
        "history": _history_summary(history),
        "train_seconds": float(history.get("seconds", 0.0)),
        "n_train": len(train_part),
        "n_val": len(val_part),
        "n_test": len(test_records),
        "calibrated_on": calibrated_on,
        "threshold": float(threshold),
        "warnings": notes,
    }
    run.log_training(meta)
    run.log_calibration(model)
    meta["tracking"] = run.describe()
    checkpoint = out / CHECKPOINT_NAME
    if writer:
        model.save(checkpoint, meta=meta)
        run.log_checkpoint(checkpoint)
    model.checkpoint_meta = meta
    return TrainResult(model, checkpoint, history, meta, train_part, val_part, test_records,
                       notes)


def _overrides_list(overrides: Sequence[str] | dict[str, Any] | None) -> list[str]:
    """Overrides as ``key=value`` strings, for the checkpoint's record of the run."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={v}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


# -- evaluation ------------------------------------------------------------------------------


def _pixel_subset(records: Sequence[Any]) -> np.ndarray | None:
    """Indices whose ground truth is known at pixel level, or None when no defect has a mask.

    Good images have an (implicit) empty mask; a defect without a mask has unknown ground
    truth and would count as all-background, so it is left out of the pixel metrics.
    """
    if not any(r.label == 1 and r.mask_path is not None for r in records):
        return None
    return np.array([i for i, r in enumerate(records)
                     if r.label == 0 or r.mask_path is not None], dtype=np.int64)


def evaluate_detector(detector: Any, data: Sequence[Any] | tuple[str | os.PathLike[str], str], *,
                      batch_size: int = 16, device: str | None = None,
                      progress: bool = True) -> EvalResult:
    """Score a test set and compute the MVTec AD metrics.

    Args:
        detector: A trained :class:`~anomalykit.base.Detector`.
        data: A list of :class:`~anomalykit.data.ImageRecord` or a ``(root, category)`` pair
            (its test split is loaded and validated; the root's layout is detected).
        batch_size: Inference batch size.
        device: Move the detector there first; ``None`` keeps it where it is.
        progress: Show a progress bar.

    Returns:
        :class:`EvalResult`. Threshold metrics (``f1_at_threshold``, ``fpr_good``, ...) use
        the calibrated ``detector.threshold_`` and appear only for a calibrated detector;
        pixel metrics appear only when some defect image has a ground-truth mask.
    """
    from anomalykit.data import AnomalyDataset
    from anomalykit.metrics import compute_metrics
    from anomalykit.training import predict, resolve_device

    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], str):
        records = load_split(data[0], data[1], "test")
    else:
        records = list(data)
    if not records:
        raise DataError("nothing to evaluate: the test set is empty")
    if device is not None:
        detector.to(resolve_device(device))
    dataset = AnomalyDataset(records, int(detector.image_size))
    started = time.perf_counter()
    predictions = predict(detector, dataset, batch_size=batch_size, progress=progress,
                          desc="evaluate")
    ms_per_image = (time.perf_counter() - started) * 1000.0 / len(records)

    labels, scores = predictions["labels"], predictions["scores"]
    calibrated = bool(getattr(detector, "calibrated_", False))
    threshold = float(detector.threshold_) if calibrated else None
    subset = _pixel_subset(records)
    if subset is not None:
        metrics = compute_metrics(labels, scores, predictions["masks"][subset],
                                  predictions["maps"][subset], threshold=threshold)
    else:
        metrics = compute_metrics(labels, scores, threshold=threshold)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update({
        "threshold": threshold if threshold is not None else math.nan,
        "n_test": len(records),
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "ms_per_image": ms_per_image,
    })
    return EvalResult(metrics, predictions, ms_per_image, records)


@dataclass
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` produced.

    Attributes:
        detector: The registered name of the evaluated detector.
        dataset: The test set's name (MVTec category, or the folder dataset's name).
        metrics: :attr:`EvalResult.metrics`.
        metrics_path: The ``metrics.json`` written.
        figures: The pictures written (ROC curve when both classes are present, examples).
        notes: Where the test images came from, when that is not obvious.
    """

    detector: str
    dataset: str
    metrics: dict[str, Any]
    metrics_path: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _json_ready(value: Any) -> Any:
    """NaN -> null: JSON has no NaN, and ``json.dumps`` would write invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _same_folder(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _test_set(checkpoint: Path, meta: dict[str, Any], *, root: Any, category: str | None,
              good_dir: Any, defect_dir: Any, mask_dir: Any, format: str | None = "auto"
              ) -> tuple[list[ImageRecord], str, dict[str, Any], list[str]]:
    """(records, dataset name, its description for metrics.json, notes) of a test run.

    Options given on the command line win; what is missing comes from the checkpoint's record
    of its training data (its root is read in its recorded ``format``; checkpoints from before
    formats existed read MVTec AD). On the folder the model was trained on, only its held-out good
    images are used: testing on training images would flatter the model.
    """
    from anomalykit.data.formats import AUTO, FOLDER, resolve_format

    folder_options = any(v is not None for v in (good_dir, defect_dir, mask_dir))
    if folder_options and (root is not None or category is not None):
        raise ConfigError("give either --root/--category (a dataset root) or --good-dir/"
                          "--defect-dir (folders of images), not both")
    if folder_options and format not in (None, AUTO, FOLDER):
        raise ConfigError(f"--format {format} reads a dataset root (--root); --good-dir is a "
                          "folder dataset (--format folder)")
    trained = FolderData.from_meta(meta["folder"]) if meta.get("folder") else None
    if not folder_options and (root is not None or category is not None or trained is None):
        if format == FOLDER:
            raise ConfigError("--format folder needs --good-dir (a folder of good images)")
        if root is None and format in (None, AUTO):
            format = meta.get("format") or "mvtec"  # the trained-on root, read as it was
        root = root if root is not None else meta.get("root")
        category = category or meta.get("category")
        if root is None or not category:
            raise ConfigError(f"{checkpoint} does not record its dataset; pass --root and "
                              "--category, or --good-dir and --defect-dir")
        name = resolve_format(root, format)
        return (load_split(root, category, "test", name), category,
                {"root": str(root), "category": category, "format": name}, [])
    if format not in (None, AUTO, FOLDER):
        raise ConfigError(f"--format {format} reads a dataset root; {checkpoint} was trained on "
                          "a folder dataset: pass --root (and --category) too")

    good = Path(good_dir) if good_dir is not None else (trained.good_dir if trained else None)
    if good is None:
        raise ConfigError(f"{checkpoint} was not trained on a folder dataset; pass --good-dir "
                          "(a folder of good test images) with --defect-dir")
    if defect_dir is None:
        if trained is None or trained.defect_dir is None:
            raise ConfigError("testing needs defective images: pass --defect-dir (a folder of "
                              "defective images)")
        defect_dir, mask_dir = trained.defect_dir, mask_dir or trained.mask_dir
    elif mask_dir is None and trained is not None and _same_folder(defect_dir,
                                                                     trained.defect_dir):
        mask_dir = trained.mask_dir
    notes = []
    if trained is not None and _same_folder(good, trained.good_dir):
        seed = int(meta.get("seed", 0))
        folder = FolderData(trained.good_dir, defect_dir, mask_dir, trained.test_fraction)
        records = load_folder_split(folder, "test", seed)
        n_good = sum(r.label == 0 for r in records)
        if n_good == 0:
            raise DataError(f"no good test images: {good} is the training folder and none of "
                            f"its images was held out (test fraction {trained.test_fraction}); "
                            "pass --good-dir with a folder of good test images")
        notes.append(f"good test images: the {n_good} image(s) of {good} held out from "
                     f"training (test fraction {trained.test_fraction}, seed {seed})")
    else:
        folder = FolderData(good, defect_dir, mask_dir, 0.0)
        records = load_folder_records(good, defect_dir, mask_dir)
    description = {"root": None, "category": folder.name,
                   "folder": {**folder.as_meta(), "held_out_only": bool(notes)}}
    return records, folder.name, description, notes


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], *,
                        root: str | os.PathLike[str] | None = None, category: str | None = None,
                        good_dir: str | os.PathLike[str] | None = None,
                        defect_dir: str | os.PathLike[str] | None = None,
                        mask_dir: str | os.PathLike[str] | None = None,
                        format: str | None = "auto",
                        out_dir: str | os.PathLike[str] | None = None, device: str = "auto",
                        batch_size: int = 16, progress: bool = True,
                        run: RunLog | None = None) -> CheckpointEvaluation:
    """Evaluate a saved model on a test set and write ``metrics.json`` (and pictures).

    The test set is a category of a dataset root (``root``/``category``, read in layout
    ``format``: ``auto`` = the checkpoint's recorded one for its own root, else detected) or
    folders (``good_dir`` of
    good images, ``defect_dir`` of defective ones, ``mask_dir`` of their masks); whatever is
    not given comes from the data the checkpoint was trained on (see :func:`_test_set`).

    Args:
        checkpoint: ``model.ckpt`` written by :func:`train_detector`.
        out_dir: Folder for ``metrics.json``, ``roc.png`` and ``examples.png``; ``None``:
            ``metrics.json`` next to the checkpoint and no pictures.
        device, batch_size, progress: Inference options.
    """
    import json

    from anomalykit.training import load_model
    from anomalykit.training.checkpoint import atomic_write_text

    checkpoint = Path(checkpoint)
    model = load_model(checkpoint, map_location="cpu")
    meta = getattr(model, "checkpoint_meta", {}) or {}
    records, dataset, description, notes = _test_set(
        checkpoint, meta, root=root, category=category, good_dir=good_dir,
        defect_dir=defect_dir, mask_dir=mask_dir, format=format)
    result = evaluate_detector(model, records, device=device, batch_size=batch_size,
                               progress=progress)
    name = model.registry_name
    payload = {"checkpoint": str(checkpoint), "detector": name, **description,
               "metrics": result.metrics}
    folder = Path(out_dir) if out_dir is not None else checkpoint.parent
    metrics_path = atomic_write_text(folder / METRICS_NAME,
                                     json.dumps(_json_ready(payload), indent=2) + "\n")
    figures: list[Path] = []
    if out_dir is not None:
        from anomalykit.benchmark import report

        predictions = result.predictions
        if len(set(predictions["labels"].tolist())) == 2:
            figures.append(report.plot_roc({name: (predictions["labels"],
                                                   predictions["scores"])},
                                           folder / "roc.png", f"ROC: {dataset}"))
        figures.append(report.plot_examples(predictions, folder / "examples.png",
                                            f"{name} on {dataset}",
                                            threshold=result.metrics.get("threshold")))
    (run or NO_RUN).log_evaluation(result.metrics, [metrics_path, *figures])
    return CheckpointEvaluation(name, dataset, result.metrics, metrics_path, figures, notes)


# -- export ----------------------------------------------------------------------------------


PARITY_OUTPUTS = ("score", "normalized_score", "label", "anomaly_map", "pred_mask")


@dataclass
class ExportResult:
    """What :func:`export_with_parity` produced.

    Attributes:
        path: The ONNX file.
        detector: The registered name of the exported detector.
        parity: ``(frames "NxHxW", {output name: max |onnxruntime - PyTorch|})`` per check.
    """

    path: Path
    detector: str
    parity: list[tuple[str, dict[str, float]]]


def export_with_parity(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       opset: int = 18, seed: int = 0) -> ExportResult:
    """Export a checkpoint to one ONNX file, then compare onnxruntime with PyTorch.

    The comparison runs on random uint8 frames at the native size and at a larger non-square
    one (the graph resizes inside).
    """
    from anomalykit.export import compare_with_torch, export_onnx
    from anomalykit.training import load_model

    model = load_model(checkpoint, map_location="cpu")
    path = Path(export_onnx(model, out, opset=opset))
    size = int(model.image_size)
    rng = np.random.default_rng(seed)
    parity = []
    for shape in [(2, size, size, 3), (1, size + size // 2, size * 2, 3)]:
        frames = rng.integers(0, 256, size=shape, dtype=np.uint8)
        diffs = compare_with_torch(model, path, frames)
        parity.append((f"{shape[0]}x{shape[1]}x{shape[2]}",
                       {k: float(diffs[k]) for k in PARITY_OUTPUTS}))
    return ExportResult(path, model.registry_name, parity)
