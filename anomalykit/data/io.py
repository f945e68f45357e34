"""Reading images and ground-truth masks from disk.

Every reader returns plain numpy arrays in one canonical form, whatever the file holds:
images are ``(H, W, 3) uint8`` RGB and masks are ``(H, W) uint8`` in ``{0, 1}``. Failures
raise :class:`~anomalykit.errors.DataError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from anomalykit.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "read_image", "read_mask"]

#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a visible regular file with an image extension.

    Hidden files (``.DS_Store``, ``._000.png`` from macOS copies) are never images, so a
    dataset copied from a Mac does not fail on AppleDouble junk.
    """
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _decode(path: str | os.PathLike[str], what: str) -> np.ndarray:
    """Decode ``path`` with OpenCV, keeping bit depth and channels as stored.

    Returns:
        ``(H, W)`` or ``(H, W, C)`` array of the file's own dtype, channels in BGR(A) order.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} {p} does not exist")
    if not p.is_file():
        raise DataError(f"{what} {p} is not a file")
    try:
        # np.fromfile + imdecode rather than cv2.imread: imread cannot open non-ASCII paths on
        # Windows, and decoding from memory behaves the same everywhere.
        buffer = np.fromfile(p, dtype=np.uint8)
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    except (cv2.error, OSError):
        image = None
    if image is None or image.size == 0:
        raise DataError(f"cannot read {what} {p}: corrupt or unsupported file")
    return image


def _to_uint8(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Bring an 8- or 16-bit array to uint8 (16-bit scaled so 65535 maps to 255)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # v * 255 / 65535 == v / 257, rounded; exact for values that came from 8-bit data.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise DataError(f"cannot read {what} {path}: unsupported pixel type {array.dtype}")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB.

    Grayscale is repeated to three channels, an alpha channel (RGBA or gray+alpha) is
    dropped, and 16-bit data is scaled to 8 bits.

    Args:
        path: Image file; any format OpenCV decodes (see :data:`IMAGE_EXTENSIONS`).

    Returns:
        ``(H, W, 3) uint8`` RGB array.

    Raises:
        DataError: the file is missing, cannot be decoded, has a pixel type other than
            8/16-bit unsigned, or has a channel count other than 1, 2, 3 or 4.
    """
    p = Path(path)
    image = _to_uint8(_decode(p, "image"), p, "image")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.ndim == 3 and channels in (1, 2):
        # Gray (+ alpha): keep the gray plane only.
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise DataError(f"image {p} has {channels} channels; expected 1, 2, 3 or 4")


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ground-truth mask as a binary array.

    Any non-zero value is a defect pixel, whatever the bit depth. Multi-channel masks are
    reduced with ``max`` over their colour channels; an alpha channel (gray+alpha, RGBA) is
    dropped first, because an opaque alpha plane would otherwise mark every pixel as defective.

    Args:
        path: Mask file, usually a 0/255 PNG.

    Returns:
        ``(H, W) uint8`` array with values in ``{0, 1}``.

    Raises:
        DataError: the file is missing, cannot be decoded, or has more than 4 channels.
    """
    p = Path(path)
    # No 16-bit -> 8-bit scaling here: it would turn small non-zero labels (1, 2, ...) into 0.
    mask = _decode(p, "mask")
    if mask.ndim == 3:
        channels = mask.shape[2]
        if channels in (2, 4):
            mask = mask[:, :, : channels - 1]
        elif channels not in (1, 3):
            raise DataError(f"mask {p} has {channels} channels; expected 1, 2, 3 or 4")
        mask = mask.max(axis=2)
    return (mask > 0).astype(np.uint8)
