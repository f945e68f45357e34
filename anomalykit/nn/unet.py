"""A plain U-Net (Ronneberger et al. 2015), shared by RIAD and DRAEM.

Encoder: ``len(widths)`` blocks of ``convs_per_block`` x (3x3 conv -> norm ->
ReLU), a 2x2 max-pool between consecutive blocks. Decoder: per level an x2
upsampling (2x2 stride-2 transposed conv, or bilinear x2 followed by a 3x3
conv), concatenation with the encoder feature of the same resolution when
``skip=True``, and a conv block. A 1x1 conv and the output activation close it.

Everything is static-shape convolution / pooling / interpolation, so the module
exports with the dynamo ONNX exporter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice

UPSAMPLES = ("transpose", "bilinear")
NORMS = ("batch", "none")
OUT_ACTIVATIONS = ("tanh", "sigmoid", None)


def conv_block(in_channels: int, out_channels: int, *, norm: str = "batch",
               convs: int = 2) -> nn.Sequential:
    """``convs`` x (3x3 conv, padding 1 -> norm -> ReLU); (B, in, H, W) -> (B, out, H, W)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        c_in = in_channels if i == 0 else out_channels
        layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Upsample(nn.Module):
    """x2 upsampling, (B, in, H, W) -> (B, out, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "transpose") -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.conv = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "bilinear":
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv(x)


class UNet(nn.Module):
    """U-Net image-to-image network.

    Args:
        in_channels, out_channels: channels of input and output.
        widths: channels of the encoder blocks, shallow to deep; the input is
            pooled ``len(widths) - 1`` times, so H and W must be divisible by
            ``2 ** (len(widths) - 1)``.
        skip: concatenate encoder features into the decoder (False = a plain
            encoder-decoder with the same layout).
        upsample: "transpose" (2x2 stride-2 transposed conv) or "bilinear"
            (bilinear x2, then a 3x3 conv).
        norm: "batch" (BatchNorm after each 3x3 conv) or "none".
        convs_per_block: 3x3 convs per encoder / decoder block.
        out_activation: "tanh", "sigmoid" or None (raw 1x1 conv output).

    ``forward``: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512, 512), *, skip: bool = True,
                 upsample: str = "transpose", norm: str = "batch",
                 convs_per_block: int = 2, out_activation: str | None = "tanh") -> None:
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLES)
        check_choice("norm", norm, NORMS)
        check_choice("out_activation", out_activation, OUT_ACTIVATIONS)
        widths = [int(w) for w in widths]
        if not widths:
            raise ConfigError("UNet widths must not be empty")
        if convs_per_block < 1:
            raise ConfigError(f"convs_per_block must be >= 1; got {convs_per_block}")
        self.skip, self.out_activation = skip, out_activation
        self.downsampling = 2 ** (len(widths) - 1)

        self.encoder = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            self.encoder.append(conv_block(c_in, w, norm=norm, convs=convs_per_block))
            c_in = w
        self.pool = nn.MaxPool2d(2)

        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        c_in = widths[-1]
        for w in reversed(widths[:-1]):
            self.up.append(Upsample(c_in, w, upsample))
            self.decoder.append(conv_block(2 * w if skip else w, w, norm=norm,
                                           convs=convs_per_block))
            c_in = w
        self.head = nn.Conv2d(c_in, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, out, H, W); H, W divisible by ``2 ** (len(widths) - 1)``."""
        h, w = x.shape[-2:]
        # Only checked on concrete sizes: a symbolic (exported, dynamic) size would specialise.
        if isinstance(h, int) and isinstance(w, int) and (h % self.downsampling
                                                          or w % self.downsampling):
            raise ConfigError(f"UNet input {h}x{w} must be divisible by {self.downsampling} "
                              f"(2 ** (len(widths) - 1))")
        features = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            features.append(x)
        for up, block, feature in zip(self.up, self.decoder, reversed(features[:-1]), strict=True):
            x = up(x)
            if self.skip:
                x = torch.cat([x, feature], dim=1)
            x = block(x)
        x = self.head(x)
        if self.out_activation == "tanh":
            return torch.tanh(x)
        if self.out_activation == "sigmoid":
            return torch.sigmoid(x)
        return x
