"""Albumentations pipelines shared by training and inference.

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

from anomalykit.errors import ConfigError  # noqa: E402

__all__ = ["build_transform"]


def build_transform(
    image_size: int, *, augment: bool = False, seed: int | None = None
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

    Raises:
        ConfigError: ``image_size`` is not a positive integer.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image_size is {image_size!r}; expected a positive integer")
    steps: list[A.BasicTransform] = [
        A.Resize(
            image_size,
            image_size,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
        )
    ]
    if augment:
        steps += [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    steps.append(A.Normalize(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_pixel_value=255.0))
    return A.Compose(steps, seed=seed)
