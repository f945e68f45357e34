"""Data layer: readers (MVTec AD/MPDD, VisA, MVTec LOCO AD, MVTec AD 2, BTAD, generic folders;
:mod:`anomalykit.data.formats` names and detects them), records, transforms, dataset, synthetic data.

Images are always ``(H, W, 3) uint8`` RGB once read and ``(3, S, S) float32`` in ``[0, 1]``
once served by :class:`AnomalyDataset`; normalisation is left to each detector.

Names are imported lazily (PEP 562): ``from anomalykit.data import read_image`` loads only
OpenCV, numpy and the torch-free ONNX runtime module (whose ``decode_image`` is the one image
decoder), so ONNX deployment code can read images on a machine without PyTorch or
albumentations. Only :class:`AnomalyDataset` needs torch, only :func:`build_transform`
albumentations.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalykit.data.cache import DEFAULT_CACHE_BYTES, ImageCache
    from anomalykit.data.dataset import AnomalyDataset
    from anomalykit.data.folder import scan_folder
    from anomalykit.data.formats import (
        FORMAT_CHOICES,
        FORMATS,
        detect_format,
        list_categories,
        resolve_format,
        scan_split,
    )
    from anomalykit.data.io import IMAGE_EXTENSIONS, decode_image, read_image, read_mask
    from anomalykit.data.mvtec import list_mvtec_categories, scan_mvtec
    from anomalykit.data.records import ImageRecord, split_train_val, validate_records
    from anomalykit.data.synthetic import (
        DEFECTS,
        EASY_CATEGORY,
        SYNTHETIC_CATEGORIES,
        ensure_synthetic,
        generate_synthetic,
    )
    from anomalykit.data.transforms import build_transform

_EXPORTS: dict[str, str] = {
    "AnomalyDataset": "dataset",
    "scan_folder": "folder",
    "FORMAT_CHOICES": "formats",
    "FORMATS": "formats",
    "detect_format": "formats",
    "list_categories": "formats",
    "resolve_format": "formats",
    "scan_split": "formats",
    "DEFAULT_CACHE_BYTES": "cache",
    "ImageCache": "cache",
    "IMAGE_EXTENSIONS": "io",
    "decode_image": "io",
    "read_image": "io",
    "read_mask": "io",
    "list_mvtec_categories": "mvtec",
    "scan_mvtec": "mvtec",
    "ImageRecord": "records",
    "split_train_val": "records",
    "validate_records": "records",
    "DEFECTS": "synthetic",
    "EASY_CATEGORY": "synthetic",
    "SYNTHETIC_CATEGORIES": "synthetic",
    "ensure_synthetic": "synthetic",
    "generate_synthetic": "synthetic",
    "build_transform": "transforms",
}

# A literal list (not sorted(_EXPORTS)) so linters and IDEs see the public names.
__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFECTS",
    "EASY_CATEGORY",
    "FORMATS",
    "FORMAT_CHOICES",
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_CATEGORIES",
    "AnomalyDataset",
    "ImageCache",
    "ImageRecord",
    "build_transform",
    "decode_image",
    "detect_format",
    "ensure_synthetic",
    "generate_synthetic",
    "list_categories",
    "list_mvtec_categories",
    "read_image",
    "read_mask",
    "resolve_format",
    "scan_folder",
    "scan_mvtec",
    "scan_split",
    "split_train_val",
    "validate_records",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # Submodules (anomalykit.data.io, ...) are found by the import system, not here.
        raise AttributeError(f"module 'anomalykit.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"anomalykit.data.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
