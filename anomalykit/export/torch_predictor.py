"""The PyTorch predictor, and one loader for both predictors (checkpoint or ONNX file).

:class:`TorchPredictor` puts a checkpoint behind the interface of
:class:`anomalykit.export.runtime.OnnxDetector` (which stays torch-free, for line PCs):
``predict(uint8 (N, H, W, 3))``, ``image_size``, ``threshold``, ``pixel_threshold``,
``metadata``. :func:`load_predictor` picks one from the file's suffix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalykit.errors import ConfigError, DataError

__all__ = ["TorchPredictor", "load_predictor"]


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
