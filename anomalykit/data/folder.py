"""Reader for a generic folder layout (your own images, no MVTec structure).

::

    good_dir/*.png                      -> label 0, defect_type "good"
    defect_dir/*.png                    -> label 1, defect_type "defect"
    defect_dir/<type>/*.png             -> label 1, defect_type "<type>"
    mask_dir/<stem><mask_suffix>.png    -> mask of defect image <stem>  (or mask_dir/<stem>.png)
    mask_dir/<type>/...                 -> masks of defect_dir/<type>/ when that subfolder exists
"""

from __future__ import annotations

import os
from pathlib import Path

from anomalykit.data.records import (
    ImageRecord,
    list_images,
    list_subfolders,
    match_masks,
    require_images,
)
from anomalykit.errors import DataError

__all__ = ["scan_folder"]


def _require_dir(path: str | os.PathLike[str], what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist or is not a folder")
    return folder


def scan_folder(
    good_dir: str | os.PathLike[str],
    defect_dir: str | os.PathLike[str] | None = None,
    mask_dir: str | os.PathLike[str] | None = None,
    *,
    mask_suffix: str = "_mask",
) -> list[ImageRecord]:
    """List good images and, optionally, defect images with their masks.

    Args:
        good_dir: Folder of good images (not searched recursively).
        defect_dir: Folder of anomalous images. Images directly inside get
            ``defect_type="defect"``; images in a subfolder get the subfolder's name.
        mask_dir: Folder of binary masks for the defect images, matched by stem
            (``<stem><mask_suffix>.*`` or ``<stem>.*``). For ``defect_dir/<type>/`` images,
            ``mask_dir/<type>/`` is used when it exists, else ``mask_dir`` itself. Without
            ``mask_dir`` defect records get ``mask_path=None``.
        mask_suffix: Suffix of mask stems.

    Returns:
        Good records (natural name order), then defect records (loose images first, then
        subfolders in name order).

    Raises:
        DataError: a folder is missing or holds no images; ``mask_dir`` is given without
            ``defect_dir``; with ``mask_dir``, a defect image lacks a mask, a mask matches no
            image, or stems are ambiguous.
    """
    good = _require_dir(good_dir, "good image folder")
    records = [ImageRecord(p, 0, "good", None) for p in require_images(good)]
    if defect_dir is None:
        if mask_dir is not None:
            raise DataError(f"mask folder {mask_dir} given without a defect image folder")
        return records

    defects = _require_dir(defect_dir, "defect image folder")
    masks_root = _require_dir(mask_dir, "mask folder") if mask_dir is not None else None
    groups: list[tuple[str, list[Path], Path | None]] = []
    loose = list_images(defects)
    if loose:
        groups.append(("defect", loose, masks_root))
    for folder in list_subfolders(defects):
        images = require_images(folder)
        masks_here = None
        if masks_root is not None:
            masks_here = (
                masks_root / folder.name if (masks_root / folder.name).is_dir() else masks_root
            )
        groups.append((folder.name, images, masks_here))
    if not groups:
        raise DataError(f"no images in {defects}")

    if masks_root is not None:
        # Match per mask folder: every image sharing a folder is matched together, so a mask
        # is reported as orphaned only if no image of any type that uses that folder has its stem.
        by_folder: dict[Path, list[Path]] = {}
        for _, images, folder in groups:
            assert folder is not None
            by_folder.setdefault(folder, []).extend(images)
        mask_of: dict[Path, Path] = {}
        for folder, images in by_folder.items():
            mask_of.update(match_masks(images, [folder], mask_suffix))
        for defect_type, images, _ in groups:
            records.extend(ImageRecord(p, 1, defect_type, mask_of[p]) for p in images)
    else:
        for defect_type, images, _ in groups:
            records.extend(ImageRecord(p, 1, defect_type, None) for p in images)
    return records
