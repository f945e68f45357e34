"""Reading images and ground-truth masks from disk.

Every reader returns plain numpy arrays in one canonical form, whatever the file holds:
images are ``(H, W, 3) uint8`` RGB and masks are ``(H, W) uint8`` in ``{0, 1}``. Failures
raise :class:`~anomalykit.errors.DataError` with a one-line message naming the file.

Images are decoded by :func:`anomalykit.export.runtime.decode_image`, the one decoder that
training, ``predict`` and the torch-free deploy runtime share. It lives in ``runtime.py``
because that file must also work copied alone onto a line PC; importing it loads numpy,
OpenCV and onnxruntime, never torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from anomalykit.errors import DataError
from anomalykit.export.runtime import decode_image

__all__ = ["IMAGE_EXTENSIONS", "decode_image", "image_grid", "is_image_file", "read_image", "read_mask",
           "write_epoch_picture", "write_png"]

#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a visible regular file with an image extension.

    Hidden files (``.DS_Store``, ``._000.png`` from macOS copies) are never images, so a
    dataset copied from a Mac does not fail on AppleDouble junk.
    """
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _read_bytes(path: Path, what: str) -> np.ndarray:
    """The raw bytes of ``path`` as a uint8 array; DataError when it is missing or unreadable."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file")
    try:
        # np.fromfile + imdecode rather than cv2.imread: imread cannot open non-ASCII paths on
        # Windows, and decoding from memory behaves the same everywhere.
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        raise DataError(f"cannot read {what} {path}: corrupt or unsupported file") from None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB with :func:`~anomalykit.export.runtime.decode_image`.

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
    buffer = _read_bytes(p, "image")
    try:
        return decode_image(buffer, source=f"image {p}")
    except ValueError as exc:  # the runtime stays free of anomalykit's error classes
        raise DataError(str(exc)) from None


def _decode_mask(path: Path) -> np.ndarray:
    """Decode a mask file keeping bit depth and channels as stored (BGR(A) order)."""
    buffer = _read_bytes(path, "mask")
    try:
        mask = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    except cv2.error:
        mask = None
    if mask is None or mask.size == 0:
        raise DataError(f"cannot read mask {path}: corrupt or unsupported file")
    return mask


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ground-truth mask as a binary array.

    Any non-zero value is a defect pixel, whatever the bit depth. Multi-channel masks are
    reduced with ``max`` over their colour channels; an alpha channel (gray+alpha, RGBA) is
    dropped first, because an opaque alpha plane would otherwise mark every pixel as defective.
    A folder is the union of the mask files in it (MVTec LOCO AD annotates each defect region
    of an image in its own file, ``ground_truth/<defect>/<stem>/000.png, 001.png, ...``).

    Args:
        path: Mask file, usually a 0/255 PNG, or a folder of mask files of one size.

    Returns:
        ``(H, W) uint8`` array with values in ``{0, 1}``.

    Raises:
        DataError: the file is missing, cannot be decoded, or has more than 4 channels.
    """
    p = Path(path)
    if p.is_dir():
        return _read_mask_folder(p)
    # No 16-bit -> 8-bit scaling here: it would turn small non-zero labels (1, 2, ...) into 0.
    mask = _decode_mask(p)
    if mask.ndim == 3:
        channels = mask.shape[2]
        if channels in (2, 4):
            mask = mask[:, :, : channels - 1]
        elif channels not in (1, 3):
            raise DataError(f"mask {p} has {channels} channels; expected 1, 2, 3 or 4")
        mask = mask.max(axis=2)
    return (mask > 0).astype(np.uint8)


def mask_files(folder: Path) -> list[Path]:
    """The mask files of a ground-truth folder, in name order (hidden files skipped)."""
    return sorted(f for f in folder.iterdir() if is_image_file(f))


def _read_mask_folder(folder: Path) -> np.ndarray:
    """Union of the masks in ``folder``; DataError for an empty folder or files of two sizes."""
    files = mask_files(folder)
    if not files:
        raise DataError(f"ground-truth folder {folder} holds no mask file")
    union = read_mask(files[0])
    for file in files[1:]:
        part = read_mask(file)
        if part.shape != union.shape:
            raise DataError(f"mask {file} is {part.shape[1]}x{part.shape[0]} but {files[0]} in "
                            f"the same ground-truth folder is {union.shape[1]}x{union.shape[0]}")
        np.maximum(union, part, out=union)
    return union


def write_png(path: str | os.PathLike[str], image_rgb: np.ndarray) -> Path:
    """Encode an (H, W, 3) uint8 RGB image (or an (H, W) uint8 grey one, e.g. a 0/255 mask) as
    PNG and write it atomically (non-ASCII paths work too)."""
    from anomalykit.atomic import atomic_write

    path = Path(path)
    bgr = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise DataError(f"cannot encode {path.name} as PNG")
    return atomic_write(path, encoded.tofile)


def image_grid(images, nrow: int = 8, *, pad: int = 2, background: int = 255) -> np.ndarray:
    """(N, C, H, W) or (N, H, W, C) images in [0, 1] (C = 1 or 3; numpy or torch) -> one
    (rows * (H + pad) + pad, nrow * (W + pad) + pad, 3) uint8 RGB picture, row-major."""
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(f"image_grid needs (N, C, H, W) or (N, H, W, C) images; got shape {array.shape}")
    if array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(0, 2, 3, 1)  # channels last
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    n, h, w, _ = array.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), background, np.uint8)
    pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    for i in range(n):
        y, x = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def write_epoch_picture(out_dir: str | os.PathLike[str] | None, epoch: int, epochs: int,
                        every: int, picture) -> Path | None:
    """A generative model's picture of one epoch: ``out_dir/samples/epoch_{epoch+1:03d}.png``.

    Written every ``every`` epochs and after the last one (``every`` <= 0: never), only with an
    ``out_dir``. ``picture``: a callable returning the (H, W, 3) uint8 image (e.g. an
    :func:`image_grid` of samples), called only when something is written. Returns the path
    written, or None.
    """
    last = epoch + 1 == epochs
    if out_dir is None or every <= 0 or not (last or (epoch + 1) % every == 0):
        return None
    return write_png(Path(out_dir) / "samples" / f"epoch_{epoch + 1:03d}.png", picture())
