"""Small tensor functions shared by detectors and generative models.

Everything here is ONNX-exportable (convolutions, padding, pooling only) so
detectors can use it inside ``forward``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.errors import check_choice

MapReduction = Literal["max", "mean"]
MAP_REDUCTIONS = ("max", "mean")


def reduce_map(amap: Tensor, how: MapReduction = "max") -> Tensor:
    """(B, ...) per-pixel map -> (B,) its max or mean over everything but the batch.

    The image score of map-based detectors (``score_reduction``) and the per-image mean of
    error maps. ``how`` outside :data:`MAP_REDUCTIONS` is a ConfigError listing them.
    """
    check_choice("score reduction", how, MAP_REDUCTIONS)
    flat = amap.flatten(1)
    return flat.amax(1) if how == "max" else flat.mean(1)


def concat_on_grid(maps: list[Tensor], size: tuple[int, int] | None = None, *,
                   mode: Literal["bilinear", "nearest"] = "bilinear") -> Tensor:
    """Feature maps of several backbone stages -> one (B, sum C_i, H, W) map on one grid.

    maps: (B, C_i, H_i, W_i); ``size`` (H, W) defaults to the finest (largest) map's. Maps of
    another size are resized (bilinear without corner alignment, or nearest), others are kept
    as they are. PaDiM's embedding, PatchCore's patches, DifferNet's density cells.
    """
    if size is None:
        size = (max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps))
    check_choice("mode", mode, ("bilinear", "nearest"))
    options = {"align_corners": False} if mode == "bilinear" else {}
    return torch.cat([m if tuple(m.shape[-2:]) == tuple(size) else
                      F.interpolate(m, size=tuple(size), mode=mode, **options) for m in maps], dim=1)


def shrink_to(x: Tensor, size: int) -> Tensor:
    """(B, C, S, S) -> (B, C, size, size) for a detector that models a downsized image.

    Box average when S is a multiple of ``size`` (no aliasing, and exactly ONNX's AveragePool),
    bilinear otherwise; unchanged when S == size.
    """
    s = x.shape[-1]
    if s == size:
        return x
    if s > size and s % size == 0:
        return F.avg_pool2d(x, s // size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def gaussian_kernel1d(sigma: float, *, radius: int | None = None, dtype=torch.float32) -> Tensor:
    """(2r+1,) normalised Gaussian; r defaults to ceil(4 sigma) like scipy.ndimage."""
    if radius is None:
        radius = max(1, math.ceil(4.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _separable(x: Tensor, kernel: Tensor, padding_mode: str) -> Tensor:
    """Filter (B, C, H, W) with a 1-D kernel along H then W, same size out."""
    c = x.shape[1]
    r = kernel.numel() // 2
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    kh = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    if padding_mode == "zeros":
        x = F.conv2d(x, kh, padding=(r, 0), groups=c)
        return F.conv2d(x, kw, padding=(0, r), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=padding_mode), kh, groups=c)
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode=padding_mode), kw, groups=c)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of (B, C, H, W) with reflect padding; sigma <= 0 returns x.

    Reflect padding needs radius < size, so the radius is capped by the image.
    """
    if sigma <= 0:
        return x
    radius = min(max(1, math.ceil(4.0 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1)
    return _separable(x, gaussian_kernel1d(sigma, radius=radius), "reflect")


def mean_filter(x: Tensor, size: int) -> Tensor:
    """Box filter (B, C, H, W), odd ``size``, same size out (zero padding counted out)."""
    if size <= 1:
        return x
    return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)


def ssim_map(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5,
             data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Local SSIM (Wang et al. 2004, eq. 13) of (B, C, H, W) images -> (B, C, H, W).

    Gaussian window ``window_size`` with ``sigma``; reflect padding so the map
    keeps the image size (the detectors need a per-pixel map).
    """
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    kernel = gaussian_kernel1d(sigma, radius=window_size // 2)

    def blur(t: Tensor) -> Tensor:
        return _separable(t, kernel, "reflect")

    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x**2
    sigma_yy = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2)
    return num / den


def ssim_loss(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """Scalar 1 - mean SSIM."""
    return 1.0 - ssim_map(x, y, **kwargs).mean()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean focal loss (Lin et al. 2017) of (B, K, H, W) logits against integer labels.

    target: (B, 1, H, W) or (B, H, W) with values in [0, K). ``gamma = 0`` is cross-entropy.
    """
    if target.dim() == logits.dim():
        target = target[:, 0]
    log_p = F.log_softmax(logits, dim=1)
    log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
    if gamma == 0:
        return -log_pt.mean()
    pt = log_pt.exp()
    return -((1.0 - pt).clamp_min(0.0) ** gamma * log_pt).mean()


# -- gradient magnitude similarity (GMSD, Xue et al. 2014; MSGMS as in RIAD) ---------------------

# Prewitt kernels with the 1/3 normalisation of GMSD, so that c = 0.0026 (= 170 / 255^2)
# is meant for intensities in [0, 1].
_PREWITT_X = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]) / 3.0


def gradient_magnitude(x: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Prewitt gradient magnitude of the luminance: (B, C, H, W) -> (B, 1, H, W).

    Colour images are reduced to grayscale by the channel mean first, as GMSD
    and the public RIAD implementations do (structure, not hue). Reflect
    padding keeps the size without inventing edges at the border. ``eps``
    keeps the square root differentiable where the gradient is zero.
    """
    gray = x.mean(dim=1, keepdim=True)
    kx = _PREWITT_X.to(device=x.device, dtype=x.dtype).view(1, 1, 3, 3)
    ky = kx.transpose(2, 3)
    padded = F.pad(gray, (1, 1, 1, 1), mode="reflect")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, ky)
    return torch.sqrt(gx * gx + gy * gy + eps)


def gms_map(x: Tensor, y: Tensor, *, c: float = 0.0026) -> Tensor:
    """Gradient magnitude similarity (2 g_x g_y + c) / (g_x^2 + g_y^2 + c): (B, 1, H, W) in (0, 1].

    x, y: (B, C, H, W) with intensities in [0, 1] (``c`` assumes that range).
    """
    gx, gy = gradient_magnitude(x), gradient_magnitude(y)
    return (2 * gx * gy + c) / (gx * gx + gy * gy + c)


def msgms_map(x: Tensor, y: Tensor, *, scales: int = 4, c: float = 0.0026) -> Tensor:
    """Multi-scale GMS distance map (as in RIAD): (B, C, H, W) x2 -> (B, 1, H, W) in [0, 1).

    GMS at ``scales`` scales (each a 2x2 average pooling of the previous), each
    map upsampled bilinearly back to H x W; the map is 1 - their mean, so 0
    where the two images have the same local structure. Images in [0, 1].
    """
    size = x.shape[-2:]
    total = x.new_zeros(x.shape[0], 1, *size)
    for scale in range(scales):
        if scale > 0:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        gms = gms_map(x, y, c=c)
        if scale > 0:
            gms = F.interpolate(gms, size=size, mode="bilinear", align_corners=False)
        total = total + gms
    return 1.0 - total / scales


def msgms_loss(x: Tensor, y: Tensor, *, scales: int = 4, c: float = 0.0026) -> Tensor:
    """Scalar MSGMS loss: mean over scales of mean(1 - GMS) at each scale's own resolution."""
    total = x.new_zeros(())
    for scale in range(scales):
        if scale > 0:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        total = total + (1.0 - gms_map(x, y, c=c)).mean()
    return total / scales
