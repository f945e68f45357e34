"""Albumentations pipelines shared by training and inference, and the resize they use.

The pipeline only resizes, optionally augments, and scales to ``[0, 1]``. ImageNet-style
normalisation is deliberately absent: every detector normalises inside its own ``forward``,
so an exported ONNX graph takes the same ``[0, 1]`` input as the PyTorch model.
"""

from __future__ import annotations

import os

# albumentations >= 1.4 asks PyPI for a newer version on import (a 2 s network call that
# also fails offline). The toolkit never goes online at run time; set before the import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from anomalykit.errors import ConfigError  # noqa: E402

__all__ = ["IMAGE_INTERPOLATION", "MASK_INTERPOLATION", "build_transform", "resize_image",
           "resize_mask"]

#: OpenCV interpolation of images (bilinear) and masks (nearest, so a mask stays binary).
IMAGE_INTERPOLATION = cv2.INTER_LINEAR
MASK_INTERPOLATION = cv2.INTER_NEAREST


def _resize(array: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    # As albumentations' Resize: an array already at the target size is returned unchanged.
    if array.shape[:2] == (size, size):
        return array
    return cv2.resize(array, (size, size), interpolation=interpolation)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(size, size, 3) uint8``, the same pixels as the Resize step of
    :func:`build_transform` (so a decode-once cache can resize ahead of the transform)."""
    return _resize(image, size, IMAGE_INTERPOLATION)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``(H, W) uint8`` -> ``(size, size) uint8``, nearest, as :func:`build_transform` does."""
    return _resize(mask, size, MASK_INTERPOLATION)


def build_transform(
    image_size: int, *, augment: bool = False, seed: int | None = None, resize: bool = True
) -> A.Compose:
    """Build the image/mask pipeline.

    Steps: resize to ``image_size x image_size`` (bilinear for the image, nearest for the
    mask, so the mask stays binary), then with ``augment`` mild train-time augmentation
    (horizontal/vertical flips, +-10 % brightness/contrast; flips move image and mask
    together), then scale the image to float32 ``[0, 1]``.

    Call as ``out = transform(image=image, mask=mask)``, with ``image`` ``(H, W, 3) uint8``
    and ``mask`` ``(H, W) uint8``; ``out["image"]`` is ``(S, S, 3) float32`` in ``[0, 1]``
    and ``out["mask"]`` is ``(S, S) uint8`` with the input's values.

    Args:
        image_size: Output side ``S`` in pixels.
        augment: Add the random train-time augmentation.
        seed: Seed of the augmentation's random generator; ``None`` draws fresh entropy.
        resize: Start with the resize step. ``False`` for inputs already resized with
            :func:`resize_image` / :func:`resize_mask` (the same pixels), as
            :class:`~anomalykit.data.AnomalyDataset` passes its cached copies.

    Raises:
        ConfigError: ``image_size`` is not a positive integer.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image_size is {image_size!r}; expected a positive integer")
    steps: list[A.BasicTransform] = []
    if resize:
        steps.append(
            A.Resize(
                image_size,
                image_size,
                interpolation=IMAGE_INTERPOLATION,
                mask_interpolation=MASK_INTERPOLATION,
            )
        )
    if augment:
        steps += [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    steps.append(A.Normalize(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_pixel_value=255.0))
    return A.Compose(steps, seed=seed)
