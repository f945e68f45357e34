"""Synthetic anomalies for training DRAEM-style detectors (Zavrtanik et al. 2021).

Three parts, all driven by a :class:`numpy.random.Generator` passed in, so the same
seed gives the same noise, mask, texture and blend:

* :func:`perlin_noise_2d` -- 2-D gradient (Perlin) noise, vectorised numpy, in [-1, 1];
* :func:`perlin_mask` -- DRAEM's anomaly shape: Perlin noise with a random scale
  ``2**k`` per axis (k in ``[min_scale, max_scale)``, 2^0..2^5 by default), rotated by
  a random angle in (-90, 90) degrees, thresholded at 0.5, giving a {0, 1} mask;
* :class:`AnomalySource` -- where the anomalous appearance comes from: a folder of
  texture images (DTD in the paper, any images work) or an offline default made of
  scikit-image's bundled photos plus procedural noise / stripe / checker / flat-colour
  textures. The paper reports that other sources cost little: ImageNet images or
  flat colours instead of DTD lose only about 0.1-2 AUROC points (DRAEM, Sec. 4.4), so
  the offline default is a sound choice when DTD is not at hand;
* :class:`AnomalySynthesizer` -- with probability ``1 - anomaly_prob`` returns the image
  clean; otherwise augments a texture with 3 random colour / geometry ops (DRAEM picks 3
  of its list the same way) and blends it into the mask region with
  ``beta ~ U[0, beta_max)``: ``I (1 - M) + (1 - beta) A M + beta I M``.

The colour ops are written with numpy / OpenCV rather than albumentations so that
every random draw comes from the one Generator handed in (albumentations keeps its own
random state), which makes a run reproducible from its seed alone.

scikit-image's ``brick``, ``grass`` and ``gravel`` photos are left out of the default
source on purpose: the toolkit's synthetic dataset (:mod:`anomalykit.data.synthetic`)
builds its normal images from them, and a detector must not learn its own normal
appearance as "anomalous".
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from anomalykit.data.io import is_image_file, read_image
from anomalykit.errors import ConfigError, DataError

__all__ = [
    "ANOMALY_SOURCES",
    "DEFAULT_PHOTOS",
    "AnomalySource",
    "AnomalySynthesizer",
    "augment_texture",
    "blend_anomaly",
    "perlin_mask",
    "perlin_noise_2d",
]

#: Where DRAEM's anomalies come from: "perlin" (a Perlin-shaped region filled with an augmented
#: texture, the paper's), "pix2pix" (the same region painted by a trained pix2pix model,
#: :mod:`anomalykit.generative.pix2pix`), "both" (each anomaly from one of them, half and half).
ANOMALY_SOURCES: tuple[str, ...] = ("perlin", "pix2pix", "both")

#: scikit-image photos bundled in its wheel (no download) used by the default source.
DEFAULT_PHOTOS: tuple[str, ...] = (
    "astronaut", "camera", "cell", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "text", "retina", "rocket", "colorwheel",
    "clock", "checkerboard",
)

Rng = np.random.Generator


def _as_rng(rng: Rng | int | None) -> Rng:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    a, b = value
    return int(a), int(b)


# --------------------------------------------------------------------------- Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # 6t^5 - 15t^4 + 10t^3


def perlin_noise_2d(shape: int | Sequence[int], res: int | Sequence[int],
                    rng: Rng | int | None = None) -> np.ndarray:
    """2-D Perlin gradient noise, ``(H, W) float32`` in [-1, 1].

    Args:
        shape: ``(H, W)`` (or one int for a square).
        res: number of noise cells ``(ry, rx)`` along each axis (>= 1); a cell spans
            ``H / ry`` pixels. Shapes that ``res`` does not divide are generated on the
            next multiple and cropped, so any shape works.
        rng: a :class:`numpy.random.Generator` or a seed.

    One random unit gradient per lattice corner, the quintic fade, bilinear blend of
    the four corner dot products, scaled by sqrt(2) (the 2-D range is then [-1, 1]).
    """
    h, w = _pair(shape)
    ry, rx = _pair(res)
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ConfigError(f"perlin_noise_2d needs positive shape and res; got {shape}, {res}")
    rng = _as_rng(rng)
    hp, wp = -(-h // ry) * ry, -(-w // rx) * rx
    angles = 2.0 * np.pi * rng.random((ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (ry+1, rx+1, 2): (gy, gx)
    y = np.arange(hp) * (ry / hp)
    x = np.arange(wp) * (rx / wp)
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[iy + dy, ix + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    top = dot(0, 0) * (1 - v) + dot(0, 1) * v
    bottom = dot(1, 0) * (1 - v) + dot(1, 1) * v
    noise = math.sqrt(2.0) * (top * (1 - u) + bottom * u)
    return np.clip(noise[:h, :w], -1.0, 1.0).astype(np.float32)


def _rotate(array: np.ndarray, angle: float, border: int = cv2.BORDER_REFLECT_101) -> np.ndarray:
    h, w = array.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    return cv2.warpAffine(array, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)


def perlin_mask(size: int | Sequence[int], rng: Rng | int | None = None, *, min_scale: int = 0,
                max_scale: int = 6, threshold: float = 0.5, rotate: bool = True) -> np.ndarray:
    """DRAEM's anomaly shape: ``(H, W) float32`` with values in {0, 1}.

    The noise has ``2**k`` cells per axis, ``k`` drawn independently per axis from
    ``[min_scale, max_scale)`` (2^0..2^5 with the defaults, as in the paper); it is
    rotated by an angle from U(-90, 90) degrees (reflected at the border, so corners
    can be anomalous too) and thresholded: ``M = noise > threshold``. The mask can be
    empty (low-frequency noise that never crosses the threshold); callers treat that as
    a clean sample, as DRAEM does.
    """
    if not 0 <= min_scale < max_scale:
        raise ConfigError(f"need 0 <= min_scale < max_scale; got {min_scale}, {max_scale}")
    rng = _as_rng(rng)
    h, w = _pair(size)
    scale_y, scale_x = (2 ** int(k) for k in rng.integers(min_scale, max_scale, size=2))
    noise = perlin_noise_2d((h, w), (scale_y, scale_x), rng)
    if rotate:
        noise = _rotate(noise, float(rng.uniform(-90.0, 90.0)))
    return (noise > threshold).astype(np.float32)


# --------------------------------------------------------------------------- texture augmentation
# Each op: (H, W, 3) uint8 RGB + rng -> (H, W, 3) uint8 RGB. DRAEM's list (imgaug):
# gamma contrast, multiply-and-add brightness, sharpness, hue/saturation, solarize,
# posterize, invert, autocontrast, equalize, affine rotation.


def _gamma(img: np.ndarray, rng: Rng) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0)
    table = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    return table[img]


def _brightness(img: np.ndarray, rng: Rng) -> np.ndarray:
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30.0, 30.0)
    return np.clip(img.astype(np.float32) * mul + add + 0.5, 0, 255).astype(np.uint8)


def _sharpness(img: np.ndarray, rng: Rng) -> np.ndarray:
    # PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image by a factor in [0, 2].
    factor = rng.uniform(0.0, 2.0)
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    smooth = cv2.filter2D(img.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REPLICATE)
    out = smooth + factor * (img.astype(np.float32) - smooth)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _hue_saturation(img: np.ndarray, rng: Rng) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)  # H in [0, 180)
    hue, sat = rng.integers(-50, 51, size=2)
    hsv[..., 0] = (hsv[..., 0] + int(round(hue * 180 / 255))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + sat, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(img: np.ndarray, rng: Rng) -> np.ndarray:
    threshold = rng.integers(32, 129)
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def _posterize(img: np.ndarray, rng: Rng) -> np.ndarray:
    bits = int(rng.integers(1, 8))
    return (img & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.uint8)


def _invert(img: np.ndarray, rng: Rng) -> np.ndarray:
    return (255 - img).astype(np.uint8)


def _autocontrast(img: np.ndarray, rng: Rng) -> np.ndarray:
    lo = img.reshape(-1, 3).min(0).astype(np.float32)
    hi = img.reshape(-1, 3).max(0).astype(np.float32)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (img.astype(np.float32) - lo) * (255.0 / span)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _equalize(img: np.ndarray, rng: Rng) -> np.ndarray:
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)], -1)


def _rotation(img: np.ndarray, rng: Rng) -> np.ndarray:
    return _rotate(img, float(rng.uniform(-45.0, 45.0)))


TEXTURE_OPS: tuple[Callable[[np.ndarray, Rng], np.ndarray], ...] = (
    _gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize, _invert,
    _autocontrast, _equalize, _rotation,
)


def augment_texture(texture: np.ndarray, rng: Rng | int | None = None, n_ops: int = 3) -> np.ndarray:
    """Apply ``n_ops`` distinct ops drawn at random from :data:`TEXTURE_OPS` (uint8 RGB in/out)."""
    rng = _as_rng(rng)
    out = np.ascontiguousarray(texture)
    for i in rng.choice(len(TEXTURE_OPS), size=min(n_ops, len(TEXTURE_OPS)), replace=False):
        out = np.ascontiguousarray(TEXTURE_OPS[int(i)](out, rng))
    return out


# --------------------------------------------------------------------------- anomaly sources


@functools.cache
def _default_photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photos as ``(H, W, 3) uint8`` RGB, at most 512 px on a side."""
    import skimage.data  # local: only training DRAEM needs it

    photos = []
    for name in DEFAULT_PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.dtype != np.uint8:
            img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.ascontiguousarray(img[:, :, :3])
        side = max(img.shape[:2])
        if side > 512:
            scale = 512 / side
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                             interpolation=cv2.INTER_AREA)
        photos.append(img)
    return tuple(photos)


def _random_colour(rng: Rng) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


def _procedural(kind: str, h: int, w: int, rng: Rng) -> np.ndarray:
    """One procedural texture ``(h, w, 3) uint8``: fractal noise, stripes, checker or flat."""
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind == "noise":
        t = np.zeros((h, w), np.float32)
        amp, total = 1.0, 0.0
        base = int(rng.integers(0, 4))
        for octave in range(int(rng.integers(1, 5))):
            t += amp * perlin_noise_2d((h, w), 2 ** (base + octave), rng)
            total += amp
            amp *= 0.5
        t = np.clip(t / total * 0.5 + 0.5, 0.0, 1.0)
    elif kind == "stripes":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0.0, np.pi)
        period = rng.uniform(3.0, max(4.0, min(h, w) / 2.0))
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == "checker":
        yy, xx = np.mgrid[0:h, 0:w]
        cell = int(rng.integers(2, max(3, min(h, w) // 4)))
        t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    else:  # flat colour with a little grain
        t = np.zeros((h, w), np.float32)
    img = c0 + (c1 - c0) * t[:, :, None] + rng.normal(0.0, 4.0, (h, w, 1)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


PROCEDURAL_KINDS: tuple[str, ...] = ("noise", "stripes", "checker", "flat")


class AnomalySource:
    """Images whose appearance is pasted into the anomaly region.

    Args:
        texture_dir: folder searched recursively for images (DTD's ``images/`` works as
            is); files are read on demand with :func:`anomalykit.data.io.read_image`.
            ``None`` = the offline default: scikit-image's bundled photos
            (:data:`DEFAULT_PHOTOS`) half of the time, procedural textures
            (:data:`PROCEDURAL_KINDS`) the other half.
        procedural_fraction: share of procedural textures (default source only).

    :meth:`sample` returns ``(H, W, 3) uint8`` RGB: a random square-ish crop (half to
    all of the shorter side) resized to the requested size.

    Raises:
        DataError: ``texture_dir`` is missing, not a folder or holds no image; a
            corrupt texture file is reported (by path) when it is drawn.
    """

    def __init__(self, texture_dir: str | os.PathLike[str] | None = None, *,
                 procedural_fraction: float = 0.5) -> None:
        self.texture_dir = None if texture_dir is None else Path(texture_dir)
        self.procedural_fraction = float(procedural_fraction)
        self.paths: list[Path] = []
        if self.texture_dir is not None:
            if not self.texture_dir.is_dir():
                raise DataError(f"texture folder {self.texture_dir} does not exist or is not a folder")
            self.paths = sorted(p for p in self.texture_dir.rglob("*") if is_image_file(p))
            if not self.paths:
                raise DataError(f"texture folder {self.texture_dir} holds no image files")

    def __len__(self) -> int:
        return len(self.paths) if self.paths else len(DEFAULT_PHOTOS) + len(PROCEDURAL_KINDS)

    def __repr__(self) -> str:
        where = str(self.texture_dir) if self.texture_dir else "default (scikit-image + procedural)"
        return f"AnomalySource({where}, {len(self)} sources)"

    def sample(self, size: int | Sequence[int], rng: Rng | int | None = None) -> np.ndarray:
        """A texture ``(H, W, 3) uint8`` RGB for an image of ``size``."""
        rng = _as_rng(rng)
        h, w = _pair(size)
        if self.paths:
            image = read_image(self.paths[int(rng.integers(len(self.paths)))])
        elif rng.random() < self.procedural_fraction:
            return _procedural(PROCEDURAL_KINDS[int(rng.integers(len(PROCEDURAL_KINDS)))], h, w, rng)
        else:
            photos = _default_photos()
            image = photos[int(rng.integers(len(photos)))]
        side = min(image.shape[:2])
        crop = max(1, int(round(side * rng.uniform(0.5, 1.0))))
        y = int(rng.integers(0, image.shape[0] - crop + 1))
        x = int(rng.integers(0, image.shape[1] - crop + 1))
        patch = np.ascontiguousarray(image[y:y + crop, x:x + crop])
        interp = cv2.INTER_AREA if crop > max(h, w) else cv2.INTER_LINEAR
        return cv2.resize(patch, (w, h), interpolation=interp)


# --------------------------------------------------------------------------- the synthesizer


def blend_anomaly(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """``I (1 - M) + (1 - beta) A M + beta I M``; image/texture (C, H, W), mask (1, H, W)."""
    return image * (1.0 - mask) + (1.0 - beta) * texture * mask + beta * image * mask


class AnomalySynthesizer:
    """DRAEM's on-the-fly anomaly generator.

    ``synth(image, rng) -> (augmented, mask, has_anomaly)`` with ``image`` (3, H, W)
    float in [0, 1] (numpy or torch; the outputs have the same type, dtype and device),
    ``mask`` (1, H, W) in {0, 1}, ``has_anomaly`` a bool (False for a clean sample or
    an empty Perlin mask, then ``augmented`` equals ``image``).

    Args:
        source: an :class:`AnomalySource` (default: the offline default source).
        anomaly_prob: share of samples that get an anomaly (0.5 in the paper).
        beta_max: opacity draw ``beta ~ U[0, beta_max)`` (0.8 in the paper).
        min_scale, max_scale, threshold: :func:`perlin_mask`'s.
        n_ops: texture augmentation ops per sample (3 in the paper).
    """

    def __init__(self, source: AnomalySource | None = None, *, anomaly_prob: float = 0.5,
                 beta_max: float = 0.8, min_scale: int = 0, max_scale: int = 6,
                 threshold: float = 0.5, n_ops: int = 3) -> None:
        if not 0.0 <= anomaly_prob <= 1.0:
            raise ConfigError(f"anomaly_prob must be in [0, 1]; got {anomaly_prob}")
        if not 0.0 <= beta_max <= 1.0:
            raise ConfigError(f"beta_max must be in [0, 1]; got {beta_max}")
        self.source = source if source is not None else AnomalySource()
        self.anomaly_prob, self.beta_max = float(anomaly_prob), float(beta_max)
        self.min_scale, self.max_scale, self.threshold = min_scale, max_scale, threshold
        self.n_ops = n_ops

    def make(self, image: np.ndarray, rng: Rng, *, force: bool = False
             ) -> tuple[np.ndarray, np.ndarray, bool, dict[str, Any]]:
        """numpy core: (3, H, W) float32 -> (augmented, mask (1, H, W), has_anomaly, info).

        ``force=True`` skips the clean draw (for figures); ``info`` holds ``beta`` and
        the augmented ``texture`` (3, H, W) when an anomaly was made.
        """
        _, h, w = image.shape
        mask = np.zeros((1, h, w), np.float32)
        if not force and rng.random() >= self.anomaly_prob:
            return image.copy(), mask, False, {}
        mask[0] = perlin_mask((h, w), rng, min_scale=self.min_scale, max_scale=self.max_scale,
                              threshold=self.threshold)
        texture = augment_texture(self.source.sample((h, w), rng), rng, self.n_ops)
        texture = texture.transpose(2, 0, 1).astype(np.float32) / 255.0
        beta = float(rng.uniform(0.0, self.beta_max))
        if not mask.any():
            return image.copy(), mask, False, {"beta": beta, "texture": texture}
        out = blend_anomaly(image, texture, mask, beta).astype(np.float32)
        return out, mask, True, {"beta": beta, "texture": texture}

    def anomaly_mask(self, size: int | Sequence[int], rng: Rng | int | None = None, *,
                     force: bool = False) -> np.ndarray:
        """The anomaly region alone, ``(1, H, W) float32`` in {0, 1}: all zeros for a clean
        draw (probability ``1 - anomaly_prob``, skipped with ``force``), else a Perlin mask
        (possibly empty). For anomaly sources that paint the region themselves (DRAEM's
        ``anomaly_source="pix2pix"``: a pix2pix model renders a defect under this mask)."""
        rng = _as_rng(rng)
        h, w = _pair(size)
        mask = np.zeros((1, h, w), np.float32)
        if force or rng.random() < self.anomaly_prob:
            mask[0] = perlin_mask((h, w), rng, min_scale=self.min_scale, max_scale=self.max_scale,
                                  threshold=self.threshold)
        return mask

    def __call__(self, image: Any, rng: Rng | int | None = None, *, force: bool = False):
        rng = _as_rng(rng)
        if isinstance(image, np.ndarray):
            out, mask, has, _ = self.make(image.astype(np.float32, copy=False), rng, force=force)
            return out, mask, has
        import torch  # a torch tensor in, torch tensors out

        array = image.detach().to("cpu", torch.float32).numpy()
        out, mask, has, _ = self.make(array, rng, force=force)
        return (torch.from_numpy(out).to(image.device, image.dtype),
                torch.from_numpy(mask).to(image.device, image.dtype), has)
