"""Reader for VisA (Visual Anomaly, Zou et al., 2022) in its published layout.

::

    <root>/split_csv/1cls.csv                         -> the split: object,split,label,image,mask
    <root>/<object>/Data/Images/Normal/*.JPG
    <root>/<object>/Data/Images/Anomaly/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png

The split comes from ``split_csv/1cls.csv`` (the one-class protocol of the VisA paper), not
from the folders: ``split`` is ``train`` or ``test``, ``label`` is ``normal`` or ``anomaly``,
``image`` and ``mask`` are paths relative to ``<root>`` (``mask`` empty for normal images).
Masks hold small per-region class values (0, 1, 2, ...) rather than 0/255; any non-zero value
is a defect (:func:`~anomalykit.data.io.read_mask`). VisA names no defect class per image in
this split, so every anomaly has ``defect_type="anomaly"``. VisA has no validation split: it
is carved from the train rows as for MVTec AD. Assumed from the published archive
(``VisA_20220922.tar``) and its ``split_csv`` folder.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

from anomalykit.data.records import ImageRecord
from anomalykit.errors import DataError

__all__ = ["SPLIT_CSV", "list_visa_categories", "scan_visa"]

#: The split file, relative to the VisA root.
SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def _rows(root: str | os.PathLike[str]) -> tuple[Path, list[tuple[int, dict[str, str]]]]:
    """(csv path, [(line number, row)]) of the split file; DataError when it is unusable."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"dataset root {base} does not exist or is not a folder")
    path = base / SPLIT_CSV
    if not path.is_file():
        raise DataError(f"VisA split file {path} does not exist (the VisA layout keeps its "
                        "split in split_csv/1cls.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"VisA split file {path} lacks the column(s) {', '.join(missing)}; "
                            f"expected {', '.join(COLUMNS)}")
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k})
                for row in reader]
    return path, rows


def list_visa_categories(root: str | os.PathLike[str]) -> list[str]:
    """The objects named in ``split_csv/1cls.csv``, sorted."""
    _, rows = _rows(root)
    return sorted({row["object"] for _, row in rows if row["object"]})


def scan_visa(root: str | os.PathLike[str], category: str,
              split: Literal["train", "test"]) -> list[ImageRecord]:
    """List the images of one VisA object and split: normal then anomalous images, each in
    the split file's order.

    Raises:
        DataError: the split file is missing or lacks a column, the object is not in it
            (lists the available ones), a row has an unknown split or label, a training row
            is an anomaly, a listed image or mask file does not exist, an anomaly has no
            mask; messages name the file and the line.
    """
    if split not in ("train", "test"):
        raise DataError(f"split is {split!r}; expected 'train' or 'test' (VisA has no "
                        "validation split)")
    csv_path, rows = _rows(root)
    base = Path(root)
    objects = sorted({row["object"] for _, row in rows if row["object"]})
    if category not in objects:
        raise DataError(f"category '{category}' not found in {csv_path}; available: "
                        f"{', '.join(objects) or 'none'}")
    records = []
    for line, row in rows:
        if row["object"] != category:
            continue
        where = f"{csv_path} line {line}"
        if row["split"] not in ("train", "test"):
            raise DataError(f"{where}: unknown split {row['split']!r}; expected 'train' or "
                            "'test'")
        if row["label"] not in LABELS:
            raise DataError(f"{where}: unknown label {row['label']!r}; expected 'normal' or "
                            "'anomaly'")
        if row["split"] != split:
            continue
        label = LABELS[row["label"]]
        if split == "train" and label == 1:
            raise DataError(f"{where}: an anomaly in the train split; training images must be "
                            "normal")
        image = base / row["image"]
        if not row["image"] or not image.is_file():
            raise DataError(f"image {image} listed in {where} does not exist")
        mask = None
        if label == 1:
            if not row["mask"]:
                raise DataError(f"anomaly image {image} ({where}) has no mask")
            mask = base / row["mask"]
            if not mask.is_file():
                raise DataError(f"mask {mask} of image {image} ({where}) does not exist")
        records.append(ImageRecord(image, label, "anomaly" if label else "good", mask))
    if not records:
        raise DataError(f"no {split} images of '{category}' in {csv_path}")
    records.sort(key=lambda r: r.label)  # stable: normal images first, as the other readers
    return records
