"""ONNX export (needs torch) and the torch-free ONNX runtime.

Names are resolved lazily so that ``import anomalykit.export.runtime`` on a line PC never
imports torch, and a training machine without onnxruntime can still import this package.

- :func:`export_onnx`, :func:`export_checkpoint`, :func:`compare_with_torch`,
  :class:`InferenceWrapper` live in :mod:`anomalykit.export.onnx` (torch).
- :class:`OnnxDetector`, :func:`available_providers`, :func:`overlay_heatmap`,
  :func:`read_image` live in :mod:`anomalykit.export.runtime` (numpy, onnxruntime, OpenCV).
- :func:`quantize_onnx`, :func:`quantize_checkpoint` (INT8 static quantisation guarded by AUROC),
  :class:`QuantizeResult`, :class:`QuantizationRefused` live in
  :mod:`anomalykit.export.quantize` (onnxruntime.quantization, onnx).
- :class:`TorchPredictor` (a checkpoint behind ``OnnxDetector``'s interface) and
  :func:`load_predictor` (``.ckpt`` or ``.onnx`` -> a predictor) live in
  :mod:`anomalykit.export.torch_predictor` (torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "InferenceWrapper": "anomalykit.export.onnx",
    "ExportError": "anomalykit.export.onnx",
    "compare_with_torch": "anomalykit.export.onnx",
    "export_checkpoint": "anomalykit.export.onnx",
    "export_onnx": "anomalykit.export.onnx",
    "OnnxDetector": "anomalykit.export.runtime",
    "available_providers": "anomalykit.export.runtime",
    "overlay_heatmap": "anomalykit.export.runtime",
    "heatmap_range": "anomalykit.export.runtime",
    "read_image": "anomalykit.export.runtime",
    "QuantizationRefused": "anomalykit.export.quantize",
    "QuantizeResult": "anomalykit.export.quantize",
    "quantize_checkpoint": "anomalykit.export.quantize",
    "quantize_onnx": "anomalykit.export.quantize",
    "TorchPredictor": "anomalykit.export.torch_predictor",
    "load_predictor": "anomalykit.export.torch_predictor",
}

__all__ = [
    "ExportError",
    "InferenceWrapper",
    "OnnxDetector",
    "QuantizationRefused",
    "QuantizeResult",
    "TorchPredictor",
    "available_providers",
    "compare_with_torch",
    "export_checkpoint",
    "export_onnx",
    "heatmap_range",
    "load_predictor",
    "overlay_heatmap",
    "quantize_checkpoint",
    "quantize_onnx",
    "read_image",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
