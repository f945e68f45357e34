"""Reader for the MVTec AD folder layout.

::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Any extension in :data:`~anomalykit.data.io.IMAGE_EXTENSIONS` is accepted for images and
masks. Only paths are collected here; :func:`~anomalykit.data.records.validate_records`
decodes the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from anomalykit.data.records import (
    ImageRecord,
    list_subfolders,
    match_masks,
    require_images,
)
from anomalykit.errors import DataError

__all__ = ["list_mvtec_categories", "scan_mvtec"]


def _require_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset root {path} does not exist or is not a folder")
    return path


def list_mvtec_categories(root: str | os.PathLike[str]) -> list[str]:
    """Categories under an MVTec-style root: the subfolders that contain ``train/good``.

    Returns:
        Category names in sorted order (possibly empty).

    Raises:
        DataError: ``root`` is not an existing folder.
    """
    path = _require_root(root)
    return sorted(p.name for p in list_subfolders(path) if (p / "train" / "good").is_dir())


def scan_mvtec(
    root: str | os.PathLike[str], category: str, split: Literal["train", "test"]
) -> list[ImageRecord]:
    """List the images of one MVTec category and split.

    The train split is ``train/good`` only. The test split is ``test/good`` (label 0) then
    every other ``test/<defect>`` folder in name order (label 1, ``defect_type=<defect>``).
    A defect image gets its mask from ``ground_truth/<defect>/`` matched by stem; when that
    folder does not exist at all its images get ``mask_path=None`` (callers then skip pixel
    metrics). Records are sorted deterministically (folder, then natural file-name order).

    Raises:
        DataError: root, category or split folder missing (the category message lists the
            available ones); a split or defect folder with no images; with a ground-truth
            folder present, a defect image without a mask or a mask matching no image.
    """
    if split not in ("train", "test"):
        raise DataError(f"split is {split!r}; expected 'train' or 'test'")
    base = _require_root(root)
    category_dir = base / category
    if not category or not category_dir.is_dir():
        available = ", ".join(list_mvtec_categories(base)) or "none"
        raise DataError(f"category '{category}' not found in {base}; available: {available}")
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise DataError(f"split folder {split_dir} does not exist")

    good_dir = split_dir / "good"
    if split == "train":
        if not good_dir.is_dir():
            raise DataError(f"split folder {good_dir} does not exist")
        return [ImageRecord(p, 0, "good", None) for p in require_images(good_dir)]

    records: list[ImageRecord] = []
    subfolders = list_subfolders(split_dir)
    if not subfolders:
        raise DataError(f"no images in {split_dir}")
    # good first, so that test records always open with the normal images.
    subfolders.sort(key=lambda p: p.name != "good")
    for folder in subfolders:
        images = require_images(folder)
        if folder.name == "good":
            records.extend(ImageRecord(p, 0, "good", None) for p in images)
            continue
        mask_dir = category_dir / "ground_truth" / folder.name
        if mask_dir.is_dir():
            masks = match_masks(images, [mask_dir], "_mask")
            records.extend(ImageRecord(p, 1, folder.name, masks[p]) for p in images)
        else:
            records.extend(ImageRecord(p, 1, folder.name, None) for p in images)
    return records
