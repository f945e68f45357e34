"""Reader for BTAD (beanTech Anomaly Detection, Mishra et al., 2021) in its published layout.

::

    <root>/<NN>/train/ok/*.{bmp,png}          -> good training images
    <root>/<NN>/test/ok/*.{bmp,png}           -> good test images (label 0)
    <root>/<NN>/test/ko/*.{bmp,png}           -> defective test images (label 1, type "ko")
    <root>/<NN>/ground_truth/ko/<stem>.{png,bmp}

The categories are the numbered product folders (``01``, ``02``, ``03``). Assumed from the
published archive (``BTech_Dataset_transformed``): ``ok``/``ko`` instead of MVTec's
``good``/``<defect>``, images ``.bmp`` (01, 03) or ``.png`` (02), masks named with the image's
stem (no ``_mask`` suffix; ``<stem>_mask.*`` is accepted too) and stored as ``.png`` or
``.bmp``. BTAD has no validation split: it is carved from ``train/ok`` as for MVTec AD.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from anomalykit.data.mvtec import require_category, require_split_dir, scan_labelled_folders
from anomalykit.data.records import ImageRecord, list_subfolders, require_images
from anomalykit.errors import DataError

__all__ = ["list_btad_categories", "scan_btad"]


def list_btad_categories(root: str | os.PathLike[str]) -> list[str]:
    """Product folders under ``root`` that contain ``train/ok``, sorted."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset root {path} does not exist or is not a folder")
    return sorted(p.name for p in list_subfolders(path) if (p / "train" / "ok").is_dir())


def scan_btad(root: str | os.PathLike[str], category: str,
              split: Literal["train", "test"]) -> list[ImageRecord]:
    """List the images of one BTAD product and split (``train``: ``train/ok``; ``test``:
    ``test/ok`` then ``test/ko`` with masks from ``ground_truth/ko``).

    Raises:
        DataError: missing root/product (lists the available ones)/split folder, an empty
            folder, a defect image without its mask or a mask matching no image.
    """
    if split not in ("train", "test"):
        raise DataError(f"split is {split!r}; expected 'train' or 'test' (BTAD has no "
                        "validation split)")
    category_dir = require_category(root, category, list_btad_categories)
    if split == "train":
        good = require_split_dir(category_dir / "train" / "ok")
        return [ImageRecord(p, 0, "good", None) for p in require_images(good)]
    test_dir = require_split_dir(category_dir / "test")
    return scan_labelled_folders(test_dir, category_dir / "ground_truth", good="ok")
