"""Reader for MVTec AD 2 (Heckler-Kram et al., 2025) in its published layout.

::

    <root>/<object>/train/good/*.png
    <root>/<object>/validation/good/*.png               -> the dataset's own validation split
    <root>/<object>/test_public/good/*.png              -> good test images (label 0)
    <root>/<object>/test_public/bad/*.png               -> defective test images (label 1)
    <root>/<object>/test_public/ground_truth/bad/<stem>_mask.png
    <root>/<object>/test_private/, test_private_mixed/  -> ignored (no public labels)

Assumed from the dataset's published folder tree and MVTec's own loader: image names such as
``000_regular.png`` with masks ``000_regular_mask.png`` (``<stem>.png`` is accepted too); the
test set is ``test_public`` only, because the private test sets' labels live on MVTec's
evaluation server. A ``test_public/ground_truth/good`` folder, if a copy has one, is ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from anomalykit.data.mvtec import (
    own_validation_split,
    require_category,
    require_split_dir,
    scan_labelled_folders,
)
from anomalykit.data.records import ImageRecord, list_subfolders
from anomalykit.errors import DataError

__all__ = ["list_mvtec2_categories", "scan_mvtec2"]

#: The labelled test set of MVTec AD 2 (the private ones have no public ground truth).
TEST_FOLDER = "test_public"


def list_mvtec2_categories(root: str | os.PathLike[str]) -> list[str]:
    """Objects under ``root`` that contain ``train/good`` and ``test_public``, sorted."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset root {path} does not exist or is not a folder")
    return sorted(p.name for p in list_subfolders(path)
                  if (p / "train" / "good").is_dir() and (p / TEST_FOLDER).is_dir())


def scan_mvtec2(root: str | os.PathLike[str], category: str,
                split: Literal["train", "val", "test"]) -> list[ImageRecord]:
    """List the images of one MVTec AD 2 object and split.

    ``train``: ``train/good``; ``val``: ``validation/good`` (good images that calibrate the
    threshold); ``test``: ``test_public/good`` then ``test_public/bad`` (and any other
    defect folder) with masks from ``test_public/ground_truth/<folder>/``.

    Raises:
        DataError: missing root/object (lists the available ones)/split folder, an empty
            folder, a defect image without its mask or a mask matching no image.
    """
    category_dir = require_category(root, category, list_mvtec2_categories)
    good = own_validation_split(category_dir, split)
    if good is not None:
        return good
    test_dir = require_split_dir(category_dir / TEST_FOLDER)
    return scan_labelled_folders(test_dir, test_dir / "ground_truth", skip=("ground_truth",))
