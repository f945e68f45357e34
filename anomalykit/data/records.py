"""The record type shared by every dataset reader, plus splitting and validation.

A record only points at files; pixels are read later by :class:`~anomalykit.data.dataset.
AnomalyDataset`. :func:`validate_records` decodes everything once up front so that a corrupt
file stops a run before training starts, not hours into it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalykit.data.io import is_image_file, read_image, read_mask
from anomalykit.errors import ConfigError, DataError

__all__ = ["ImageRecord", "split_train_val", "validate_records"]


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    Attributes:
        path: Image file.
        label: 0 for a good image, 1 for an anomalous one.
        defect_type: ``"good"`` for good images, else the defect class (e.g. ``"scratch"``).
        mask_path: Binary ground-truth mask of the same size as the image, or ``None`` for an
            empty mask (good images, or anomalous images without pixel annotation).
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None

    def __post_init__(self) -> None:
        # Accept str paths from callers but always store Path, so records compare and hash
        # the same however they were built.
        object.__setattr__(self, "path", Path(self.path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", Path(self.mask_path))
        if self.label not in (0, 1):
            raise DataError(f"label of {self.path} is {self.label!r}; expected 0 or 1")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``2.png`` before ``10.png`` and is total over all names."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, in natural name order (no recursion)."""
    return sorted(
        (p for p in folder.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name)
    )


def list_subfolders(folder: Path) -> list[Path]:
    """Visible subfolders of ``folder``, in natural name order."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def require_images(folder: Path) -> list[Path]:
    """:func:`list_images`, raising :class:`DataError` when the folder holds no image."""
    images = list_images(folder)
    if not images:
        raise DataError(f"no images in {folder}")
    return images


def match_masks(
    images: Sequence[Path], mask_dirs: Sequence[Path], mask_suffix: str = "_mask"
) -> dict[Path, Path]:
    """Pair every image with its mask by file stem.

    A mask for image ``<stem>.<ext>`` is named ``<stem><mask_suffix>.<any ext>`` or
    ``<stem>.<any ext>``, inside any of ``mask_dirs``.

    Returns:
        ``{image path: mask path}`` with one entry per image.

    Raises:
        DataError: two images share a stem, two masks claim one image, an image has no mask
            (names the expected mask path), or a mask matches no image (names the mask).
    """
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise DataError(
                f"images {by_stem[image.stem]} and {image} share the stem '{image.stem}'; "
                "masks cannot be matched unambiguously"
            )
        by_stem[image.stem] = image

    found: dict[Path, Path] = {}
    for mask_dir in mask_dirs:
        for mask in list_images(mask_dir):
            stem = mask.stem
            base = stem[: -len(mask_suffix)] if mask_suffix and stem.endswith(mask_suffix) else stem
            image = by_stem.get(base, by_stem.get(stem))
            if image is None:
                raise DataError(
                    f"mask {mask} matches no image (expected an image named '{base}.*')"
                )
            if image in found:
                raise DataError(f"masks {found[image]} and {mask} both match image {image}")
            found[image] = mask

    for image in images:
        if image not in found:
            expected = mask_dirs[0] / f"{image.stem}{mask_suffix}.png"
            raise DataError(f"image {image} has no mask (expected {expected})")
    return found


def split_train_val(
    records: Sequence[ImageRecord], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split good training records into train and validation parts.

    The split is a seeded random permutation, so the same ``(records, val_fraction, seed)``
    always gives the same parts; both parts keep the input order.

    Args:
        records: Good records only (label 0); validation images calibrate thresholds, and an
            anomalous image there would silently bias them.
        val_fraction: Share of records held out, in ``[0, 1)``. At least one record goes to
            validation when ``val_fraction > 0`` and there are two or more records, and at
            least one always stays in train.
        seed: Seed of the permutation.

    Returns:
        ``(train, val)``, disjoint, together equal to ``records``.

    Raises:
        DataError: ``records`` is empty or contains an anomalous record.
        ConfigError: ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction is {val_fraction!r}; expected a value in [0, 1)")
    if not records:
        raise DataError("cannot split an empty list of records")
    for record in records:
        if record.label != 0:
            raise DataError(
                f"split_train_val expects good images only, got {record.path} "
                f"(label {record.label}, defect '{record.defect_type}')"
            )
    n = len(records)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, round(n * val_fraction)), n - 1)
    permutation = np.random.default_rng(seed).permutation(n)
    val_index = set(permutation[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in val_index]
    val = [r for i, r in enumerate(records) if i in val_index]
    return train, val


def _check_record(record: ImageRecord, check_masks: bool) -> None:
    """Decode one record's files and compare sizes; raises DataError on the first problem."""
    height, width = read_image(record.path).shape[:2]
    if check_masks and record.mask_path is not None:
        mask_height, mask_width = read_mask(record.mask_path).shape
        if (mask_height, mask_width) != (height, width):
            raise DataError(
                f"mask {record.mask_path} is {mask_width}x{mask_height} but image "
                f"{record.path} is {width}x{height}"
            )


def validate_records(records: Iterable[ImageRecord], *, check_masks: bool = True) -> None:
    """Decode every image (and mask) once and fail on the first bad file.

    Checks that each image decodes to 1-4 channels of 8/16-bit data and, with
    ``check_masks``, that each mask decodes and has its image's size (sizes in messages are
    width x height). Pixels are dropped right after the check, so memory stays flat.

    Files are decoded on a few threads (OpenCV releases the GIL), but the error raised is
    always the one of the first bad record in input order, so messages are reproducible.

    Raises:
        DataError: naming the first bad file, or when ``records`` is empty.
    """
    records = list(records)
    if not records:
        raise DataError("no records to validate")
    workers = max(1, min(8, os.cpu_count() or 1, len(records)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_check_record, record, check_masks) for record in records]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # Stop queued decodes; the pool's __exit__ then only waits for running ones.
            for future in futures:
                future.cancel()
            raise
