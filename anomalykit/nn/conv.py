"""Convolutional encoder / decoder stacks shared by the autoencoder family (and GAN nets).

:func:`conv_stack`: 4x4 stride-2 and 3x3 stride-1 convolutions with LeakyReLU 0.2 (the
layout of Bergmann et al. 2019's AE-SSIM); :func:`deconv_stack` mirrors it with transposed
convolutions. :class:`ConvEncoder` / :class:`ConvDecoder` add the "dense" bottleneck to a
(B, latent_dim) code. Used by :mod:`anomalykit.generative.ae`, ``vae`` and ``vqvae``.
Plain modules: nothing here imports the toolkit's contracts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomalykit.errors import ConfigError


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


def conv_stack(in_channels: int, widths, strides, batch_norm: bool) -> nn.Sequential:
    """(B, in_channels, S, S) -> (B, widths[-1], S / 2**n2, S / 2**n2), n2 = stride-2 layers.

    Stride 2 -> 4x4 conv, stride 1 -> 3x3 conv, each followed by [BatchNorm] and LeakyReLU 0.2.
    The feature extractor of :class:`ConvEncoder` and of the VAE / VQ-VAE encoders.
    """
    layers: list[nn.Module] = []
    c_in = in_channels
    for width, stride in zip(widths, strides, strict=True):
        kernel = 4 if stride == 2 else 3
        layers.append(nn.Conv2d(c_in, width, kernel, stride, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(_act())
        c_in = width
    return nn.Sequential(*layers)


def deconv_stack(out_channels: int, widths, strides, batch_norm: bool) -> nn.Sequential:
    """The mirror of :func:`conv_stack`: (B, widths[-1], s, s) -> (B, out_channels, S, S) logits.

    The last layer has no activation (decoders add their own sigmoid).
    """
    layers: list[nn.Module] = []
    outs = [out_channels, *widths[:-1]]
    for i in reversed(range(len(widths))):
        c_in, c_out, last = widths[i], outs[i], i == 0
        if strides[i] == 2:
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, padding=1, bias=last or not batch_norm))
        else:
            layers.append(nn.Conv2d(c_in, c_out, 3, 1, padding=1, bias=last or not batch_norm))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(_act())
    return nn.Sequential(*layers)


def check_layout(image_size: int, widths, strides) -> None:
    """ConfigError unless widths/strides match and image_size is a multiple of 2**(stride-2 layers)."""
    if len(widths) != len(strides) or any(s not in (1, 2) for s in strides):
        raise ConfigError(f"widths {list(widths)} and strides {list(strides)} must have the same "
                          "length and strides must be 1 or 2")
    factor = 2 ** sum(s == 2 for s in strides)
    if image_size % factor or image_size < factor:
        raise ConfigError(f"image_size {image_size} must be a multiple of {factor} "
                          f"(2 ** number of stride-2 layers)")


class ConvEncoder(nn.Module):
    """(B, C, S, S) -> (B, latent_dim). S must be divisible by 2**(number of stride-2 layers)."""

    def __init__(self, image_size: int, in_channels: int, widths, strides, latent_dim: int,
                 batch_norm: bool) -> None:
        super().__init__()
        self.features = conv_stack(in_channels, widths, strides, batch_norm)
        self.bottom = image_size // 2 ** sum(s == 2 for s in strides)
        # The "dense" bottleneck: a kernel covering the whole map is a fully connected layer
        # that stays a convolution (cheap to export, no reshape of dynamic batch sizes).
        self.to_latent = nn.Conv2d(widths[-1], latent_dim, self.bottom)

    def forward(self, x: Tensor) -> Tensor:
        return self.to_latent(self.features(x)).flatten(1)


class ConvDecoder(nn.Module):
    """(B, latent_dim) -> (B, C, S, S) in [0, 1]: the mirror of :class:`ConvEncoder`."""

    def __init__(self, bottom: int, out_channels: int, widths, strides, latent_dim: int,
                 batch_norm: bool) -> None:
        super().__init__()
        self.from_latent = nn.Sequential(nn.ConvTranspose2d(latent_dim, widths[-1], bottom), _act())
        self.features = deconv_stack(out_channels, widths, strides, batch_norm)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.features(self.from_latent(z[:, :, None, None])))
