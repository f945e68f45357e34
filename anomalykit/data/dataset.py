"""PyTorch dataset over :class:`~anomalykit.data.records.ImageRecord` lists."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from anomalykit.data.cache import DEFAULT_CACHE_BYTES, Entry, ImageCache, file_stamp
from anomalykit.data.io import read_image, read_mask
from anomalykit.data.records import ImageRecord
from anomalykit.data.transforms import build_transform, resize_image, resize_mask
from anomalykit.errors import DataError

__all__ = ["AnomalyDataset"]


def _decode_resized(record: ImageRecord, size: int) -> Entry:
    """Decode a record's image (and mask) at full resolution and resize to ``size``.

    Returns ``{"image": (S, S, 3) uint8}`` plus ``"mask": (S, S) uint8`` when the record
    has a mask file.
    """
    image = read_image(record.path)
    height, width = image.shape[:2]
    entry = {"image": resize_image(image, size)}
    if record.mask_path is not None:
        mask = read_mask(record.mask_path)
        if mask.shape != (height, width):
            raise DataError(
                f"mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{record.path} is {width}x{height}"
            )
        entry["mask"] = resize_mask(mask, size)
    return entry


class AnomalyDataset(Dataset):
    """Images, masks and labels, resized to ``image_size`` and scaled to ``[0, 1]``.

    Each item is a dict::

        {"image": float32 Tensor (3, S, S) in [0, 1],
         "mask": float32 Tensor (1, S, S) in {0, 1}   (zeros when the record has no mask),
         "label": int64 scalar Tensor (0 good, 1 anomalous),
         "path": str, "defect_type": str}

    Each file is decoded once: the image (and mask) is resized to ``S`` and kept as
    ``uint8`` in an :class:`~anomalykit.data.cache.ImageCache`; the augmentation then runs on
    that copy. The resize is the transform's own (same OpenCV interpolation), so the items
    are exactly those of decoding and transforming the full-resolution file every time. A
    file whose modification time or size changes is decoded again.

    With ``DataLoader(num_workers > 0)`` each worker process holds its own copy of the
    memory cache (acceptable: images at ``S`` are small). Workers start from what this
    process has cached, but what they add is lost when they exit, i.e. after every epoch
    unless ``persistent_workers=True``; call :meth:`preload` first, or set ``cache_dir``.

    Args:
        records: Records to serve, in order.
        image_size: Output side ``S``.
        augment: Apply the mild train-time augmentation of
            :func:`~anomalykit.data.transforms.build_transform`.
        seed: Seed of the augmentation. In ``DataLoader`` workers the augmentation is
            reseeded from the worker's torch seed, so workers do not repeat one another and
            runs are reproducible under ``torch.manual_seed``.
        cache: Keep decoded, resized copies (``False``: decode on every access). An
            :class:`~anomalykit.data.cache.ImageCache` instance is used as given, e.g. to
            share one between datasets; ``cache_bytes`` and ``cache_dir`` are then ignored.
        cache_bytes: Memory budget of the cache in bytes (default 1 GiB; a full MVTec AD
            category at 256 px takes about 200 MB). Items beyond it are decoded every time.
        cache_dir: Also keep the copies as ``.npz`` files in this folder, so a new process or
            a new dataset over the same files skips the decode. ``None``: memory only.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        *,
        augment: bool = False,
        seed: int | None = None,
        cache: bool | ImageCache = True,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.augment = augment
        # The resize happens before the cache; the transform only augments and scales.
        self.transform = build_transform(image_size, augment=augment, seed=seed, resize=False)
        if isinstance(cache, ImageCache):
            self.cache: ImageCache | None = cache
        else:
            self.cache = ImageCache(cache_bytes, cache_dir=cache_dir) if cache else None
        # Worker id whose seed the transform carries; forked workers inherit the parent's
        # generator state and would otherwise draw identical augmentations.
        self._seeded_worker: int | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_masks(self) -> bool:
        """Whether any anomalous record has a ground-truth mask (pixel metrics possible)."""
        return any(r.label == 1 and r.mask_path is not None for r in self.records)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream from ``seed`` (the training loop calls it per epoch).

        The transform has its own generator: without this, an uninterrupted run continues
        its stream while a resumed one restarts it, and the two see different augmentations.
        DataLoader workers reseed from their own per-epoch seed (see ``seed`` above).
        """
        self.transform.set_random_seed(seed % 2**32)
        self._seeded_worker = None

    def _reseed_for_worker(self) -> None:
        info = get_worker_info()
        if info is not None and self._seeded_worker != info.id:
            self.transform.set_random_seed(info.seed % 2**32)
            self._seeded_worker = info.id

    def _arrays(self, record: ImageRecord) -> Entry:
        """The record's resized ``uint8`` image (and mask), from the cache when possible."""
        if self.cache is None:
            return _decode_resized(record, self.image_size)
        files = [record.path] if record.mask_path is None else [record.path, record.mask_path]
        try:
            stamp = tuple(value for file in files for value in file_stamp(file))
            key = ("AnomalyDataset", *(str(Path(f).resolve()) for f in files), self.image_size)
        except OSError:
            return _decode_resized(record, self.image_size)  # raises the DataError naming it
        return self.cache.get(key, stamp, lambda: _decode_resized(record, self.image_size))

    def preload(self, threads: int | None = None) -> None:
        """Decode every record into the cache now, on ``threads`` threads (OpenCV releases
        the GIL; default: up to 4). Useful before a ``DataLoader`` with workers, which then
        start with every item cached. Does nothing without a cache."""
        if self.cache is None or not self.records:
            return
        threads = threads or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(self._arrays, self.records):
                pass

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        arrays = self._arrays(record)
        image = arrays["image"]
        mask = arrays.get("mask")
        if mask is None:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
        if self.augment:
            self._reseed_for_worker()
        out = self.transform(image=image, mask=mask)
        # HWC float32 -> CHW; the copy makes the tensor own contiguous memory.
        image_t = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        mask_t = torch.from_numpy(out["mask"].astype(np.float32)[None])
        return {
            "image": image_t,
            "mask": mask_t,
            "label": torch.tensor(record.label, dtype=torch.int64),
            "path": str(record.path),
            "defect_type": record.defect_type,
        }
