"""Run exported anomalykit models without PyTorch: numpy + onnxruntime + OpenCV only.

This file imports nothing from torch or from the rest of anomalykit, so it can be copied
alone onto a line PC (see ``deploy/README.md``)::

    detector = OnnxDetector("bottle.onnx")
    results = detector.predict_files(["frame_001.png", "frame_002.png"])
    results[0]["score"], results[0]["label"], results[0]["anomaly_map"]  # map is (H, W)

The model takes uint8 RGB frames (N, H, W, 3) of any size and returns ``score`` (N,),
``normalized_score`` (N,), ``label`` (N,) int64, ``anomaly_map`` (N, 1, H, W) float32 and
``pred_mask`` (N, 1, H, W) uint8, all at the input resolution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# Metadata every anomalykit export carries; a model without it was not made by us.
REQUIRED_METADATA = ("anomalykit_version", "detector", "image_size", "threshold", "outputs")
_JSON_KEYS = ("config", "outputs", "training", "calibration")
_FLOAT_KEYS = ("threshold", "pixel_threshold", "score_min", "score_max")
# Floats that are "" where they do not apply (target_fpr of the quantile rule) -> None.
_OPTIONAL_FLOAT_KEYS = ("target_fpr", "expected_fpr")
_INT_KEYS = ("image_size", "opset")


def _onnxruntime():
    """onnxruntime, imported on first use: reading images (training imports the decoder
    below) must not need it."""
    import onnxruntime

    return onnxruntime


def available_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``device``, best first.

    ``auto``: CUDA first when this onnxruntime build has it (``onnxruntime-gpu``), then CPU.
    ``cpu``: CPU only. ``cuda`` / ``cuda:N``: CUDA then CPU; an error if CUDA is missing.
    """
    device = device.strip().lower()
    has_cuda = CUDA in _onnxruntime().get_available_providers()
    if device == "auto":
        return [CUDA, CPU] if has_cuda else [CPU]
    if device == "cpu":
        return [CPU]
    if device == "cuda" or device.startswith("cuda:"):
        if not has_cuda:
            raise ValueError(
                f"device {device!r} asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(it has {', '.join(_onnxruntime().get_available_providers())}); install onnxruntime-gpu "
                "instead of onnxruntime, or use device='cpu'"
            )
        return [CUDA, CPU]
    raise ValueError(f"device must be one of auto, cpu, cuda[:N], got {device!r}")


def _parse_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Strings from ``metadata_props`` -> JSON fields decoded, numbers as numbers."""
    parsed: dict[str, Any] = dict(raw)
    for key in _JSON_KEYS:
        if key in parsed:
            parsed[key] = json.loads(parsed[key])
    for key in _FLOAT_KEYS:
        if key in parsed:
            parsed[key] = float(parsed[key])
    for key in _OPTIONAL_FLOAT_KEYS:
        if key in parsed:
            parsed[key] = float(parsed[key]) if parsed[key] else None
    for key in _INT_KEYS:
        if key in parsed:
            parsed[key] = int(parsed[key])
    if "calibrated" in parsed:
        parsed["calibrated"] = parsed["calibrated"].lower() == "true"
    return parsed


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB with :func:`decode_image`.

    Raises FileNotFoundError for a missing file and ValueError for one that cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    # np.fromfile + imdecode instead of imread: imread cannot open non-ASCII paths on Windows.
    return decode_image(np.fromfile(path, dtype=np.uint8), source=f"image {path}")


def decode_image(data: bytes | bytearray | memoryview | np.ndarray, *,
                 source: str = "image") -> np.ndarray:
    """Decode an image file's bytes (PNG, JPEG, BMP, TIFF, WebP...) to (H, W, 3) uint8 RGB.

    The one image decoder of anomalykit: training (``anomalykit.data.io.read_image``),
    ``predict``, this runtime and ``deploy/service.py`` all call it, so a model is given the
    same pixels on the line as in training. It lives here because this file must run alone.
    Gray is repeated to three channels; an alpha channel (gray+alpha, RGBA) is dropped, not
    composited; 16-bit data is scaled so 65535 maps to 255 (``round(v / 257)``); the stored
    pixel order is used (a JPEG's EXIF orientation is ignored).

    Raises ValueError naming ``source``: not decodable, a pixel type other than 8/16-bit
    unsigned, or a channel count other than 1, 2, 3 or 4.
    """
    buffer = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    try:
        # IMREAD_UNCHANGED keeps 16-bit depth and alpha so both are handled here, one way.
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    except cv2.error:  # e.g. a TIFF with more than 4 samples per pixel
        image = None
    if image is None or image.size == 0:
        raise ValueError(f"cannot read {source}: corrupt or unsupported file")
    if image.dtype == np.uint16:
        # v * 255 / 65535 == v / 257, rounded; exact for values that came from 8-bit data.
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"cannot read {source}: unsupported pixel type {image.dtype}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.ndim == 3 and channels in (1, 2):
        image = image[:, :, 0]  # gray (+ alpha): keep the gray plane
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"{source} has {channels} channels; expected 1, 2, 3 or 4")


class OnnxDetector:
    """An exported anomalykit detector, run with onnxruntime.

    Attributes: ``metadata`` (parsed: ``config``/``outputs``/``training`` decoded from JSON,
    thresholds as floats), ``image_size``, ``detector`` (registry name), ``threshold``,
    ``pixel_threshold``, ``providers`` (the ones the session really uses).
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "auto",
                 threads: int | None = None) -> None:
        self.path = Path(path)
        device = device.strip().lower()
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        providers: list[Any] = available_providers(device)
        if device.startswith("cuda:"):
            providers[0] = (CUDA, {"device_id": int(device.split(":", 1)[1])})
        options = _onnxruntime().SessionOptions()
        options.log_severity_level = 3  # onnxruntime's warnings are noise on a line PC
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = _onnxruntime().InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - any load failure means "not a usable model"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot load ONNX model {self.path}: {first}") from exc
        self.providers = self.session.get_providers()
        if device.startswith("cuda") and CUDA not in self.providers:
            # onnxruntime falls back to CPU silently when the CUDA libraries fail to load.
            raise ValueError(f"CUDA was asked for but onnxruntime could not start it for "
                             f"{self.path}; check the CUDA/cuDNN install or use device='cpu'")
        raw = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [key for key in REQUIRED_METADATA if key not in raw]
        if missing:
            raise ValueError(f"{self.path} was not exported by anomalykit (metadata lacks "
                             f"{', '.join(missing)}); export it with anomalykit.export.export_onnx")
        try:
            self.metadata = _parse_metadata(raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.path}: corrupt anomalykit metadata: {exc}") from exc
        self.image_size: int = self.metadata["image_size"]
        self.detector: str = self.metadata["detector"]
        self.threshold: float = self.metadata["threshold"]
        self.pixel_threshold: float = self.metadata.get("pixel_threshold", 0.0)
        self.output_names: list[str] = list(self.metadata["outputs"])
        self.input_name: str = self.session.get_inputs()[0].name

    def __repr__(self) -> str:
        return (f"OnnxDetector({str(self.path)!r}, detector={self.detector!r}, "
                f"image_size={self.image_size}, providers={self.providers})")

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch of same-size frames.

        images: (N, H, W, 3) or (H, W, 3) uint8 RGB. Returns batched arrays (a single
        image gives N = 1): ``score`` (N,), ``normalized_score`` (N,), ``label`` (N,) int64,
        ``anomaly_map`` (N, 1, H, W) float32, ``pred_mask`` (N, 1, H, W) uint8.
        """
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3) or (H, W, 3), "
                             f"got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (0..255), got {images.dtype}; "
                             "the model rescales to [0, 1] itself")
        if images.shape[0] == 0:
            raise ValueError("predict got an empty batch")
        outputs = self.session.run(self.output_names,
                                   {self.input_name: np.ascontiguousarray(images)})
        return dict(zip(self.output_names, outputs, strict=True))

    def predict_image(self, image: np.ndarray) -> dict[str, Any]:
        """One (H, W, 3) uint8 RGB frame -> plain result: scalars and (H, W) map/mask."""
        return _unbatch(self.predict(image), 0)

    def predict_files(self, paths: Iterable[str | os.PathLike], *,
                      batch_size: int = 8) -> list[dict[str, Any]]:
        """Read image files (:func:`decode_image`) and score them, in order.

        Files are read ``batch_size`` at a time and frames of equal size are run together.
        Returns one dict per file: ``path``, ``score``, ``normalized_score``, ``label``,
        ``anomaly_map`` (H, W) float32, ``pred_mask`` (H, W) uint8. An unreadable file
        raises ValueError naming it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        paths = [str(p) for p in paths]
        results: list[dict[str, Any]] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = [read_image(p) for p in chunk]
            chunk_results: list[dict[str, Any] | None] = [None] * len(chunk)
            for indices in group_by_shape(images):
                batch = self.predict(np.stack([images[i] for i in indices]))
                for row, i in enumerate(indices):
                    chunk_results[i] = {"path": chunk[i], **_unbatch(batch, row)}
            results.extend(r for r in chunk_results if r is not None)
        return results


def group_by_shape(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of ``images`` grouped by array shape, in order of first appearance: only frames
    of one size stack into one (N, H, W, 3) batch (predict_files, the service, the watcher)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    return list(groups.values())


def _unbatch(batch: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    """Row ``row`` of a predict() result: Python scalars, maps squeezed to (H, W)."""
    result: dict[str, Any] = {}
    for name, value in batch.items():
        item = value[row]
        if item.ndim == 0:
            result[name] = item.item()
        else:
            result[name] = item[0] if item.ndim == 3 and item.shape[0] == 1 else item
    return result


def heatmap_range(pixel_threshold: float | None) -> dict[str, float]:
    """``vmin`` / ``vmax`` for :func:`overlay_heatmap` on one scale for every image: blue at 0,
    red at twice the calibrated pixel threshold (the threshold sits mid-scale), so a calm good
    image looks calm and a defect stands out. A model without a pixel threshold gets ``{}``
    (each map on its own min/max)."""
    threshold = float(pixel_threshold or 0.0)
    return {"vmin": 0.0, "vmax": 2.0 * threshold} if threshold > 0 else {}


def overlay_heatmap(image_rgb: np.ndarray, anomaly_map: np.ndarray, *, vmin: float | None = None,
                    vmax: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an image.

    image_rgb: (H, W, 3) uint8 RGB. anomaly_map: (H, W) or (1, H, W), any float range; it is
    resized to the image when sizes differ. vmin/vmax: the map values shown as blue/red
    (default: this map's min/max; pass fixed values, e.g. 0 and the threshold scale, to make
    heatmaps comparable across images). Returns (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.asarray(anomaly_map, dtype=np.float32)
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"expected an (H, W) anomaly map, got shape {heat.shape}")
    if heat.shape != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    low = float(heat.min()) if vmin is None else float(vmin)
    high = float(heat.max()) if vmax is None else float(vmax)
    scaled = np.clip((heat - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(heat)
    colored = cv2.applyColorMap((scaled * 255.0).round().astype(np.uint8), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colored.astype(np.float32)
    return np.clip(blended.round(), 0, 255).astype(np.uint8)
