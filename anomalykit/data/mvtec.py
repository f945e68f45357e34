"""Reader for the MVTec AD folder layout, which MPDD shares.

::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Any extension in :data:`~anomalykit.data.io.IMAGE_EXTENSIONS` is accepted for images and
masks, in any case (``.png``, ``.PNG``, ``.jpg``). Only paths are collected here;
:func:`~anomalykit.data.records.validate_records` decodes the files.

MPDD (Jezek et al., 2021: ``<category>/{train/good, test/good, test/<defect>,
ground_truth/<defect>}``) is read by this same reader. What differs between copies of it in
the wild, and is handled here: images stored as ``.png`` or ``.jpg``, masks named
``<stem>_mask.png`` or plainly ``<stem>.png`` (both matched by stem), and a stray
``ground_truth/good`` folder of empty masks (ignored: good images have no mask).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from anomalykit.data.records import (
    ImageRecord,
    list_subfolders,
    match_masks,
    require_images,
)
from anomalykit.errors import DataError

__all__ = ["list_mvtec_categories", "scan_labelled_folders", "scan_mvtec"]


def _require_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset root {path} does not exist or is not a folder")
    return path


def require_category(root: str | os.PathLike[str], category: str,
                     available: Callable[[Path], list[str]]) -> Path:
    """The folder ``root/category``; DataError listing ``available(root)`` when it is not one."""
    base = _require_root(root)
    category_dir = base / category
    if not category or not category_dir.is_dir():
        names = ", ".join(available(base)) or "none"
        raise DataError(f"category '{category}' not found in {base}; available: {names}")
    return category_dir


def require_split_dir(folder: Path) -> Path:
    """``folder`` itself; DataError naming it when it is not an existing folder."""
    if not folder.is_dir():
        raise DataError(f"split folder {folder} does not exist")
    return folder


def own_validation_split(category_dir: Path, split: str) -> list[ImageRecord] | None:
    """Good records of ``train/good`` or ``validation/good`` for layouts with their own
    validation split (MVTec LOCO AD, MVTec AD 2); ``None`` for the test split, and DataError
    for an unknown one."""
    if split in ("train", "val"):
        good = require_split_dir(category_dir / ("train" if split == "train" else "validation")
                                 / "good")
        return [ImageRecord(p, 0, "good", None) for p in require_images(good)]
    if split != "test":
        raise DataError(f"split is {split!r}; expected 'train', 'val' or 'test'")
    return None


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
    category_dir = require_category(root, category, list_mvtec_categories)
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise DataError(f"split folder {split_dir} does not exist")

    good_dir = split_dir / "good"
    if split == "train":
        if not good_dir.is_dir():
            raise DataError(f"split folder {good_dir} does not exist")
        return [ImageRecord(p, 0, "good", None) for p in require_images(good_dir)]

    return scan_labelled_folders(split_dir, category_dir / "ground_truth")


def scan_labelled_folders(test_dir: Path, ground_truth_dir: Path, *, good: str = "good",
                          skip: tuple[str, ...] = (), mask_suffix: str = "_mask"
                          ) -> list[ImageRecord]:
    """The records of a test folder holding one subfolder per class (MVTec-like layouts).

    ``test_dir/<good>/`` images are good (label 0, ``defect_type="good"``); every other
    subfolder not in ``skip`` is a defect class (label 1, ``defect_type=<folder name>``)
    whose masks are in ``ground_truth_dir/<folder name>/``, matched by stem
    (``<stem><mask_suffix>.*`` or ``<stem>.*``). A defect class without a ground-truth
    folder gets ``mask_path=None``. Good first, then defects in natural name order.

    Raises:
        DataError: no class folder, an empty class folder, or (with a ground-truth folder)
            a defect image without its mask or a mask matching no image; messages name it.
    """
    records: list[ImageRecord] = []
    subfolders = [p for p in list_subfolders(test_dir) if p.name not in skip]
    if not subfolders:
        raise DataError(f"no images in {test_dir}")
    # good first, so that test records always open with the normal images.
    subfolders.sort(key=lambda p: p.name != good)
    for folder in subfolders:
        images = require_images(folder)
        if folder.name == good:
            records.extend(ImageRecord(p, 0, "good", None) for p in images)
            continue
        mask_dir = ground_truth_dir / folder.name
        if mask_dir.is_dir():
            masks = match_masks(images, [mask_dir], mask_suffix)
            records.extend(ImageRecord(p, 1, folder.name, masks[p]) for p in images)
        else:
            records.extend(ImageRecord(p, 1, folder.name, None) for p in images)
    return records
