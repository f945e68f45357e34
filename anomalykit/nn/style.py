"""Layers of ProGAN and StyleGAN (Karras et al. 2018, 2019, 2020) for :mod:`anomalykit.generative.stylegan`.

- Equalized learning rate (ProGAN sec. 4.1): weights are stored N(0, 1) and scaled at run time
  by He's constant ``gain / sqrt(fan_in)``, so Adam's per-parameter step size is the same for
  every layer whatever its fan-in. ``lr_mul`` scales a layer's effective learning rate (the
  mapping network runs at 0.01, StyleGAN sec. C).
- :func:`pixel_norm` (ProGAN sec. 4.2): each pixel's feature vector scaled to unit RMS.
- :class:`MappingNetwork`: z -> w, an MLP on the pixel-normalised code (StyleGAN sec. 2).
- :class:`ModulatedConv2d` (StyleGAN2 sec. 2.2, eq. 1-3): the style s = A(w) scales the
  convolution's input channels (modulation), then each output filter is rescaled to unit
  norm (demodulation). It replaces StyleGAN's AdaIN (instance norm + per-channel scale and
  bias) with the same effect on the statistics and without its "droplet" artefacts.
- :class:`NoiseInjection` (StyleGAN sec. 3.2): per-pixel Gaussian noise times a learned
  per-channel strength (zero at start).
- :class:`StyledConv`: modulated 3x3 conv + noise + bias + LeakyReLU(0.2), one style layer.
- :class:`MinibatchStdDev` (ProGAN sec. 3): the standard deviation across a group of samples,
  averaged to one number and appended as a feature map, so D sees the batch's variety.

Plain modules: nothing here imports the toolkit's contracts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HE_GAIN = math.sqrt(2.0)  # He et al.'s gain for a layer followed by a (leaky) ReLU
LEAK = 0.2


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """(B, C, ...) -> each position's C-vector divided by its root mean square over C."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


class EqualLinear(nn.Module):
    """Linear layer with an equalized learning rate: y = x (gain lr_mul / sqrt(in) W)^T + lr_mul b.

    (B, in_features) -> (B, out_features). W is stored N(0, 1) / lr_mul, so ``lr_mul`` < 1
    slows the layer down by that factor under Adam. ``bias_init`` sets the bias' starting value
    (1 for a style affine: styles start as the identity modulation).
    """

    def __init__(self, in_features: int, out_features: int, *, gain: float = 1.0,
                 lr_mul: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.scale = gain * lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Conv2d with an equalized learning rate (stride 1, 'same' padding): (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 gain: float = HE_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size ** 2)
        self.padding = kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class MappingNetwork(nn.Module):
    """z (B, latent_dim) -> w (B, w_dim): pixel norm, then ``layers`` equalized linear layers
    with LeakyReLU(0.2) (8 layers of 512 in StyleGAN; ``lr_mul`` 0.01 there)."""

    def __init__(self, latent_dim: int, w_dim: int, layers: int, *, lr_mul: float = 0.01) -> None:
        super().__init__()
        dims = [latent_dim] + [w_dim] * layers
        self.layers = nn.ModuleList(EqualLinear(a, b, gain=HE_GAIN, lr_mul=lr_mul)
                                    for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, z: Tensor) -> Tensor:
        x = pixel_norm(z)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), LEAK)
        return x


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution (Karras et al. 2020, sec. 2.2).

    x (B, in, H, W), w (B, w_dim) -> (B, out, H, W). s = A(w) (B, in) (an equalized affine,
    bias 1); w'_ijk = s_i w_ijk (eq. 1); with ``demodulate`` w''_ijk = w'_ijk / sqrt(sum_ik
    w'_ijk^2 + eps) (eq. 3), so each output map has unit expected variance, which is what
    AdaIN's instance normalisation did explicitly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, *,
                 demodulate: bool = True) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.demodulate, self.padding = demodulate, kernel_size // 2

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        # Modulating the input and demodulating the output around one shared-weight convolution
        # is the same operation as convolving with the per-sample weights w''_ijk, and much
        # faster on CPUs than a grouped convolution (StyleGAN2's "non-fused" path).
        style = self.affine(w)  # (B, in)
        weight = self.weight * self.scale
        out = F.conv2d(x * style[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:  # 1 / sqrt(sum_ik (s_i w_ijk)^2) per sample and output channel j
            norms = style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t()  # (B, out)
            out = out * torch.rsqrt(norms + 1e-8)[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    """x (B, C, H, W) + strength (C,) * noise (B or 1, 1, H, W); strength starts at 0 (StyleGAN
    sec. 3.2: "per-channel scaling factors"), so noise only enters as training finds it useful."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, noise: Tensor) -> Tensor:
        return x + self.strength.view(1, -1, 1, 1) * noise


class StyledConv(nn.Module):
    """One style layer: modulated 3x3 conv, noise, bias, LeakyReLU(0.2) (times sqrt 2, so the
    activations keep unit variance as the equalized layers assume).

    x (B, in, H, W), w (B, w_dim), noise (B or 1, 1, H, W) -> (B, out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim)
        self.noise = NoiseInjection(out_channels)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        x = self.noise(self.conv(x, w), noise) + self.bias.view(1, -1, 1, 1)
        return F.leaky_relu(x, LEAK) * HE_GAIN


class MinibatchStdDev(nn.Module):
    """(B, C, H, W) -> (B, C + 1, H, W): appends the std over groups of ``group_size`` samples,
    averaged over channels and pixels (ProGAN sec. 3). The group is the largest divisor of B
    not above ``group_size``, so any batch size works (B = 1: the feature is 0)."""

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = max(d for d in range(1, min(self.group_size, b) + 1) if b % d == 0)
        grouped = x.reshape(g, b // g, c, h, w)
        std = (grouped.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (B/g, C, H, W)
        feature = std.mean(dim=(1, 2, 3)).view(1, b // g, 1, 1, 1).expand(g, -1, 1, h, w)
        return torch.cat([x, feature.reshape(b, 1, h, w)], dim=1)
