"""The steps shared by the command line and the benchmark: load data, train, evaluate, predict.

Every step checks its inputs before doing expensive work: the train AND test splits are
scanned and decoded before the first training step, so a corrupt file or a missing mask
fails in seconds, not after an hour of training.

Typical use::

    result = train_detector("ae", root="data/mvtec", category="bottle", out_dir="runs/bottle")
    evaluation = evaluate_detector(result.detector, result.test_records)
    evaluation.metrics["image_auroc"]
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalykit.errors import ConfigError, DataError

CHECKPOINT_NAME = "model.ckpt"


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


def load_split(root: str | os.PathLike[str], category: str, split: str) -> list[Any]:
    """Scan one MVTec-layout split and decode every image and mask once.

    Raises:
        DataError: missing root/category/split (listing the available categories), an
            empty folder, a corrupt image or a mask that does not fit its image; the message
            names the offending file.
    """
    from anomalykit.data import scan_mvtec, validate_records

    records = scan_mvtec(root, category, split)
    validate_records(records)
    return records


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


def train_detector(detector: str, *, root: str | os.PathLike[str], category: str,
                   config: str | os.PathLike[str] = "quick",
                   overrides: Sequence[str] | dict[str, Any] | None = None,
                   out_dir: str | os.PathLike[str], device: str | None = None,
                   seed: int | None = None, progress: bool = True,
                   resume: bool = False) -> TrainResult:
    """Train ``detector`` on the good images of one category and calibrate its threshold.

    Order of work (cheap checks first): resolve the detector name, the config and the
    device; scan and decode the train and test splits; split the good training images into
    train/validation (``train.val_fraction``, seeded); fit; calibrate on the held-out
    validation images (never the test set); save ``out_dir/model.ckpt``.

    Args:
        detector: Registered detector name (``anomalykit list``).
        root, category: MVTec-layout dataset root and category folder.
        config: Profile name (``quick``, ``paper``) or a YAML file.
        overrides: ``["section.key=value", ...]`` (see :func:`anomalykit.config.load_config`).
        out_dir: Run folder; receives ``model.ckpt`` and, during fit, ``last.ckpt``.
        device: ``auto``/``cpu``/``cuda[:N]``; ``None`` = the config's ``train.device`` or auto.
        seed: Seed of the split, the initialisation and the data order; ``None`` = the
            config's ``train.seed`` or 0.
        progress: Show progress bars.
        resume: Continue from ``out_dir/last.ckpt`` if it exists.

    Raises:
        ConfigError: unknown detector (lists the known ones), unknown config key, bad device.
        DataError: bad data (see :func:`load_split`), before any training.
        TrainingError: the loss became NaN/inf.
    """
    from anomalykit.config import load_config
    from anomalykit.data import AnomalyDataset, split_train_val
    from anomalykit.registry import create, get_class
    from anomalykit.training import resolve_device

    # Name first: load_config would otherwise report "no config 'quick'" for a typo.
    get_class(detector)
    cfg = load_config(detector, config,
                      overrides if isinstance(overrides, dict) else list(overrides or []))
    fit_kwargs, data_options = _split_train_section(cfg["train"])
    device_name = device if device is not None else fit_kwargs.pop("device", "auto")
    fit_kwargs.pop("device", None)
    run_seed = int(seed if seed is not None else fit_kwargs.pop("seed", 0))
    fit_kwargs.pop("seed", None)
    torch_device = resolve_device(str(device_name))

    train_records = load_split(root, category, "train")
    test_records = load_split(root, category, "test")
    good = [r for r in train_records if r.label == 0]
    train_part, val_part = split_train_val(good, float(data_options["val_fraction"]), run_seed)

    # Seed before building the model so its initial weights depend on the seed only.
    torch.manual_seed(run_seed)
    model = create(detector, **cfg["model"])
    size = int(model.image_size)
    train_set = AnomalyDataset(train_part, size, augment=bool(data_options["augment"]),
                               seed=run_seed)
    val_set = AnomalyDataset(val_part, size) if val_part else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # model.fit, not fit(model): closed-form models (PCA, GMM) override it.
    history = model.fit(train_set, val_set, device=torch_device, seed=run_seed, out_dir=out,
                  resume=resume, progress=progress, **fit_kwargs)

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
        calibration_set = AnomalyDataset(train_part, size)
        notes.append(f"no validation images (val_fraction={data_options['val_fraction']}, "
                     f"{len(good)} good training image(s)): the threshold was calibrated on the "
                     "training images and will flag more good images than expected")
    model.eval()
    threshold = model.calibrate(calibration_set, progress=progress, **calibrate_kwargs)

    effective_train = {**cfg["train"], "device": str(device_name), "seed": run_seed}
    meta = {
        "detector": detector,
        "category": category,
        "root": str(Path(root).resolve()),
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
    checkpoint = out / CHECKPOINT_NAME
    model.save(checkpoint, meta=meta)
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
            (its test split is loaded and validated).
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


# -- prediction on raw frames ----------------------------------------------------------------


class TorchPredictor:
    """A checkpoint behind the same interface as :class:`anomalykit.export.runtime.OnnxDetector`.

    It runs the very module that is exported (:class:`~anomalykit.export.onnx.
    InferenceWrapper`): uint8 frames in, resize to ``image_size`` inside, map upsampled back
    to the frame size. So a ``.ckpt`` and its ``.onnx`` give the same numbers for the same
    files, and benchmark timings of the two measure the same work.
    """

    def __init__(self, detector: Any, device: str = "auto") -> None:
        from anomalykit.export.onnx import InferenceWrapper
        from anomalykit.training import resolve_device

        self.device = resolve_device(device)
        self.detector = detector.to(self.device).eval()
        self.wrapper = InferenceWrapper(self.detector).eval()
        self.image_size = int(detector.image_size)
        self.threshold = float(detector.threshold_)
        self.pixel_threshold = float(detector.pixel_threshold_)
        self.metadata = dict(getattr(detector, "checkpoint_meta", {}) or {})
        self.providers = [str(self.device)]

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """(N, H, W, 3) or (H, W, 3) uint8 RGB -> the OnnxDetector's outputs, as numpy."""
        from anomalykit.export.onnx import OUTPUT_NAMES

        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"expected uint8 images (N, H, W, 3), got {images.dtype} "
                            f"{images.shape}")
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        outputs = self.wrapper(batch)
        return {name: value.cpu().numpy() for name, value in zip(OUTPUT_NAMES, outputs,
                                                                  strict=True)}


def load_predictor(path: str | os.PathLike[str], device: str = "auto") -> Any:
    """``model.ckpt`` -> :class:`TorchPredictor`; ``model.onnx`` -> ``OnnxDetector``.

    Both have ``predict(uint8 (N, H, W, 3))``, ``image_size``, ``threshold``,
    ``pixel_threshold`` and ``metadata``.
    Load failures become :class:`~anomalykit.errors.AnomalyKitError` with one-line messages.
    """
    from anomalykit.training import resolve_device

    path = Path(path)
    if not path.is_file():
        raise DataError(f"model {path} does not exist")
    if path.suffix.lower() == ".onnx":
        from anomalykit.export.runtime import OnnxDetector

        resolve_device(device)  # same device errors as for a checkpoint
        try:
            return OnnxDetector(path, device=device)
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from exc
    from anomalykit.training import load_model

    return TorchPredictor(load_model(path, map_location="cpu"), device=device)


def time_inference(predictor: Any, images: Sequence[np.ndarray | str | os.PathLike[str]], *,
                   warmup: int = 3, progress: bool = False, desc: str = "timing") -> float:
    """Median milliseconds per image of ``predictor.predict`` at batch size 1.

    ``images`` are (H, W, 3) uint8 arrays or image files; files are decoded before the clock
    starts, one at a time, so a large test set is never held in memory. The first ``warmup``
    calls (allocations, kernel selection, lazy initialisation) run but are not counted.
    """
    from anomalykit.data import read_image
    from anomalykit.training.progress import track

    def load(item: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
        return item if isinstance(item, np.ndarray) else read_image(item)

    if len(images) == 0:
        return math.nan
    for item in list(images)[:warmup]:
        predictor.predict(load(item)[None])
    times = []
    for item in track(images, desc, enabled=progress):
        frame = load(item)[None]
        started = time.perf_counter()
        predictor.predict(frame)  # results come back as numpy: GPU work is finished
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000.0)
