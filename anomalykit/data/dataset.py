"""PyTorch dataset over :class:`~anomalykit.data.records.ImageRecord` lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from anomalykit.data.io import read_image, read_mask
from anomalykit.data.records import ImageRecord
from anomalykit.data.transforms import build_transform
from anomalykit.errors import DataError

__all__ = ["AnomalyDataset"]


class AnomalyDataset(Dataset):
    """Images, masks and labels, resized to ``image_size`` and scaled to ``[0, 1]``.

    Each item is a dict::

        {"image": float32 Tensor (3, S, S) in [0, 1],
         "mask": float32 Tensor (1, S, S) in {0, 1}   (zeros when the record has no mask),
         "label": int64 scalar Tensor (0 good, 1 anomalous),
         "path": str, "defect_type": str}

    Args:
        records: Records to serve, in order.
        image_size: Output side ``S``.
        augment: Apply the mild train-time augmentation of
            :func:`~anomalykit.data.transforms.build_transform`.
        seed: Seed of the augmentation. In ``DataLoader`` workers the augmentation is
            reseeded from the worker's torch seed, so workers do not repeat one another and
            runs are reproducible under ``torch.manual_seed``.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        *,
        augment: bool = False,
        seed: int | None = None,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.augment = augment
        self.transform = build_transform(image_size, augment=augment, seed=seed)
        # Worker id whose seed the transform carries; forked workers inherit the parent's
        # generator state and would otherwise draw identical augmentations.
        self._seeded_worker: int | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_masks(self) -> bool:
        """Whether any anomalous record has a ground-truth mask (pixel metrics possible)."""
        return any(r.label == 1 and r.mask_path is not None for r in self.records)

    def _reseed_for_worker(self) -> None:
        info = get_worker_info()
        if info is not None and self._seeded_worker != info.id:
            self.transform.set_random_seed(info.seed % 2**32)
            self._seeded_worker = info.id

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = read_image(record.path)
        height, width = image.shape[:2]
        if record.mask_path is None:
            mask = np.zeros((height, width), dtype=np.uint8)
        else:
            mask = read_mask(record.mask_path)
            if mask.shape != (height, width):
                raise DataError(
                    f"mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                    f"{record.path} is {width}x{height}"
                )
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
