"""Reader for MVTec LOCO AD (Bergmann et al., 2022) in its published layout.

::

    <root>/<category>/train/good/*.png
    <root>/<category>/validation/good/*.png          -> the dataset's own validation split
    <root>/<category>/test/good/*.png                -> good test images (label 0)
    <root>/<category>/test/logical_anomalies/*.png   -> label 1, type "logical_anomalies"
    <root>/<category>/test/structural_anomalies/*.png
    <root>/<category>/ground_truth/<defect>/<image stem>/000.png, 001.png, ...

Ground truth is one folder per defective image holding one mask file per annotated defect
region (LOCO annotates e.g. a missing and an extra object separately); the image's mask is
their union (any non-zero pixel of any file is a defect). A record's ``mask_path`` is that
folder, and :func:`anomalykit.data.io.read_mask` reads a folder as the union of its files,
so nothing is written anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from anomalykit.data.io import mask_files
from anomalykit.data.mvtec import own_validation_split, require_category, require_split_dir
from anomalykit.data.records import ImageRecord, list_subfolders, require_images
from anomalykit.errors import DataError

__all__ = ["list_loco_categories", "scan_loco"]

def list_loco_categories(root: str | os.PathLike[str]) -> list[str]:
    """Categories under ``root`` with ``train/good`` and ``validation/good``, sorted."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset root {path} does not exist or is not a folder")
    return sorted(p.name for p in list_subfolders(path)
                  if (p / "train" / "good").is_dir() and (p / "validation" / "good").is_dir())


def _defect_records(images: list[Path], defect: str, gt_dir: Path) -> list[ImageRecord]:
    """Records of one defect folder, each with its mask folder ``gt_dir/<stem>/``."""
    by_stem = {p.stem: p for p in images}
    for folder in list_subfolders(gt_dir):
        if folder.name not in by_stem:
            raise DataError(f"ground-truth folder {folder} matches no image (expected an image "
                            f"named '{folder.name}.*' in {images[0].parent})")
    records = []
    for image in images:
        folder = gt_dir / image.stem
        if not folder.is_dir():
            raise DataError(f"image {image} has no mask (expected the folder {folder} holding "
                            "000.png, ...)")
        if not mask_files(folder):
            raise DataError(f"ground-truth folder {folder} holds no mask file")
        records.append(ImageRecord(image, 1, defect, folder))  # read_mask merges its files
    return records


def scan_loco(root: str | os.PathLike[str], category: str,
              split: Literal["train", "val", "test"]) -> list[ImageRecord]:
    """List the images of one MVTec LOCO AD category and split.

    ``train``: ``train/good``; ``val``: ``validation/good``; ``test``: ``test/good``, then
    each defect folder (``logical_anomalies``, ``structural_anomalies``) in name order, each
    image with the union of its ground-truth folder's masks (``mask_path=None`` for a defect
    folder without any ground truth folder).

    Raises:
        DataError: missing root/category (lists the available ones)/split folder, an empty
            folder, a defect image without its ground-truth folder, an empty or orphaned
            ground-truth folder, masks of different sizes.
    """
    category_dir = require_category(root, category, list_loco_categories)
    good = own_validation_split(category_dir, split)
    if good is not None:
        return good
    test_dir = require_split_dir(category_dir / "test")
    folders = list_subfolders(test_dir)
    if not folders:
        raise DataError(f"no images in {test_dir}")
    folders.sort(key=lambda p: p.name != "good")
    records: list[ImageRecord] = []
    for folder in folders:
        images = require_images(folder)
        if folder.name == "good":
            records.extend(ImageRecord(p, 0, "good", None) for p in images)
            continue
        gt_dir = category_dir / "ground_truth" / folder.name
        if gt_dir.is_dir():
            records.extend(_defect_records(images, folder.name, gt_dir))
        else:
            records.extend(ImageRecord(p, 1, folder.name, None) for p in images)
    return records
