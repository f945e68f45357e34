"""A plain U-Net (Ronneberger et al. 2015), shared by RIAD and DRAEM, and the time-conditioned
U-Net of diffusion models (:class:`DiffusionUNet`, at the end of the file).

Encoder: ``len(widths)`` blocks of ``convs_per_block`` x (3x3 conv -> norm ->
ReLU), a 2x2 max-pool between consecutive blocks. Decoder: per level an x2
upsampling (2x2 stride-2 transposed conv, or bilinear x2 followed by a 3x3
conv), concatenation with the encoder feature of the same resolution when
``skip=True``, and a conv block. A 1x1 conv and the output activation close it.

Everything is static-shape convolution / pooling / interpolation, so the module
exports with the dynamo ONNX exporter.
"""

from __future__ import annotations

import math
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


# -- time-conditioned U-Net for diffusion models (Ho et al. 2020, Nichol & Dhariwal 2021) ------


def timestep_embedding(t: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (Transformer positions; DDPM sec. B).

    Half the channels are cos(t * f_i), half sin(t * f_i), with frequencies f_i geometric from
    1 down to 1 / max_period; an odd ``dim`` gets one zero channel.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class TimeResBlock(nn.Module):
    """Residual block with the time (and class) embedding added between its two convs.

    (B, in, H, W), (B, emb_dim) -> (B, out, H, W):
    h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv(dropout(SiLU(GN(h)))); x' + h with a
    1x1 conv on the skip when the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, groups: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; (B, C, H, W) -> same.

    Written with matmul + softmax (no fused kernel) so it exports to ONNX as plain ops. Its
    cost is quadratic in H*W: use it at low resolution only.
    """

    def __init__(self, channels: int, *, heads: int = 1, groups: int = 32) -> None:
        super().__init__()
        if channels % heads:
            raise ConfigError(f"attention channels {channels} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, 1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c // self.heads), dim=-1)
        out = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class TimeLevel(nn.Module):
    """``blocks`` x (TimeResBlock, then self-attention if ``attention``) at one resolution."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, blocks: int,
                 attention: bool, heads: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TimeResBlock(in_channels if i == 0 else out_channels, out_channels, emb_dim,
                         groups=groups, dropout=dropout) for i in range(blocks))
        self.attention = nn.ModuleList(
            SelfAttention2d(out_channels, heads=heads, groups=groups) if attention else nn.Identity()
            for _ in range(blocks))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block, attention in zip(self.blocks, self.attention, strict=True):
            x = attention(block(x, emb))
        return x


class DiffusionUNet(nn.Module):
    """Time-conditioned U-Net that predicts noise (or v) from a noisy image and its timestep.

    Layout (DDPM's, in the style of the plain :class:`UNet` above): a 3x3 input conv; per
    level ``blocks_per_level`` residual blocks with the time embedding added, self-attention
    at the levels in ``attention_levels``, its output kept as the skip, then a stride-2 3x3
    conv down (not after the last level); a middle of residual block, attention, residual
    block; per level up (deepest first) the x2 :class:`Upsample` ("bilinear": bilinear x2 then
    a 3x3 conv), concatenation with the skip and ``blocks_per_level`` residual blocks; then
    GroupNorm, SiLU and a 3x3 output conv. It never sees betas: the schedule's math lives in
    :class:`anomalykit.generative.diffusion.NoiseSchedule`.

    Conditioning: timestep t (B,) -> sinusoidal embedding -> Linear, SiLU, Linear (width
    ``4 * widths[0]``), plus, with ``num_classes``, a learned class embedding added to it; the
    extra index ``num_classes`` is the null class ("no label") that classifier-free guidance
    trains with label dropout and samples with.

    Args:
        in_channels, out_channels: image channels in and prediction channels out.
        widths: channels per level, shallow to deep; H and W must be divisible by
            ``2 ** (len(widths) - 1)`` (one level: no down-sampling, e.g. for 1x1 latents).
        blocks_per_level: residual blocks per level on each side.
        attention_levels: levels (indices into ``widths``) with self-attention.
        mid_attention: self-attention in the middle block.
        heads: attention heads.
        num_classes: class-conditional when set (labels in [0, num_classes]; num_classes = null).
        groups: GroupNorm groups (reduced to a divisor of each width).
        dropout: dropout inside the residual blocks.

    ``forward(x, t, class_labels=None)``: x (B, in, H, W), t (B,) integer timesteps ->
    (B, out, H, W). A class-conditional network given no labels uses the null class.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256), *, blocks_per_level: int = 2,
                 attention_levels: Sequence[int] = (2,), mid_attention: bool = True,
                 heads: int = 1, num_classes: int | None = None, groups: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or blocks_per_level < 1:
            raise ConfigError(f"DiffusionUNet needs widths and blocks_per_level >= 1; got "
                              f"widths={widths}, blocks_per_level={blocks_per_level}")
        bad = [level for level in attention_levels if not 0 <= level < len(widths)]
        if bad:
            raise ConfigError(f"attention_levels {bad} are not levels of widths {widths}")
        self.num_classes = num_classes
        self.downsampling = 2 ** (len(widths) - 1)
        emb_dim = 4 * widths[0]
        self.time_channels = widths[0]
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_embedding = (nn.Embedding(num_classes + 1, emb_dim) if num_classes else None)
        options = {"heads": heads, "groups": groups, "dropout": dropout}

        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c_in = widths[0]
        for level, w in enumerate(widths):
            self.down.append(TimeLevel(c_in, w, emb_dim, blocks=blocks_per_level,
                                       attention=level in attention_levels, **options))
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            c_in = w
        self.mid = nn.ModuleList([
            TimeResBlock(c_in, c_in, emb_dim, groups=groups, dropout=dropout),
            SelfAttention2d(c_in, heads=heads, groups=groups) if mid_attention else nn.Identity(),
            TimeResBlock(c_in, c_in, emb_dim, groups=groups, dropout=dropout)])
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            w = widths[level]
            self.upsample.append(Upsample(c_in, w, "bilinear"))
            self.up.append(TimeLevel(2 * w, w, emb_dim, blocks=blocks_per_level,
                                     attention=level in attention_levels, **options))
            c_in = w
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def embed(self, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """(B,) timesteps (and labels) -> (B, emb_dim) conditioning vector."""
        emb = self.time_mlp(timestep_embedding(t, self.time_channels))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.class_embedding(class_labels.long())
        return emb

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x (B, in, H, W), t (B,) -> (B, out, H, W)."""
        h, w = x.shape[-2:]
        if isinstance(h, int) and isinstance(w, int) and (h % self.downsampling
                                                          or w % self.downsampling):
            raise ConfigError(f"DiffusionUNet input {h}x{w} must be divisible by "
                              f"{self.downsampling} (2 ** (len(widths) - 1))")
        emb = self.embed(t, class_labels)
        x = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.down):
            x = level(x, emb)
            skips.append(x)
            if i < len(self.downsample):
                x = self.downsample[i](x)
        x = self.mid[2](self.mid[1](self.mid[0](x, emb)), emb)
        for upsample, level, skip in zip(self.upsample, self.up, reversed(skips[:-1]), strict=True):
            x = level(torch.cat([upsample(x), skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(x)))
