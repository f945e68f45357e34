"""Small tensor functions shared by detectors and generative models.

Everything here is ONNX-exportable (convolutions, padding, pooling only) so
detectors can use it inside ``forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
