"""Masked convolutions for autoregressive image models (van den Oord et al. 2016).

An autoregressive model orders the sub-pixels raster-scan, row by row, and within a pixel by
colour: R, then G, then B. The output at position (i, j), colour c may depend on every pixel
above row i, on the pixels left of j in row i, and at (i, j) itself only on the colours before
c. Convolutions keep that order by zeroing kernel weights:

* spatially: kernel rows below the centre and, in the centre row, columns right of the centre;
* at the centre tap, by colour group: the channels of a layer are split into ``groups``
  contiguous groups (3 for RGB, 1 for grey or for code maps), group g standing for colour g.
  Mask **A** (first layer, it sees the image) lets output group g see input groups < g only
  (a sub-pixel never sees itself); mask **B** (every later layer) also lets it see group g,
  which by then carries only information from before colour g.

:class:`MaskedConv2d` is that convolution. :class:`GatedBlock` is the Gated PixelCNN layer
(van den Oord et al. 2016b, "Conditional Image Generation with PixelCNN Decoders"): a
vertical stack (everything above the current row, no blind spot) and a horizontal stack
(the current row up to the current pixel), gated ``tanh(f) * sigmoid(g)`` units, an optional
class embedding added to both gates, and a residual connection on the horizontal stack.

Plain modules: nothing here imports the toolkit's contracts.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice

MaskType = Literal["A", "B"]
MASK_TYPES = ("A", "B")


def channel_groups(channels: int, groups: int, chunks: int = 1) -> Tensor:
    """(channels,) colour group of each channel: ``chunks`` equal blocks, each split into
    ``groups`` contiguous groups.

    ``chunks`` > 1 is for layers whose output is cut into parts that are later combined
    element-wise (the two halves of a gated unit, the four LSTM gates): channel k of every
    part must stand for the same colour.
    """
    if channels % chunks:
        raise ConfigError(f"{channels} channels do not split into {chunks} equal chunks")
    per_chunk = channels // chunks
    if per_chunk < groups:
        raise ConfigError(f"{per_chunk} channels per chunk cannot hold {groups} colour groups")
    return (torch.arange(per_chunk) * groups // per_chunk).repeat(chunks)


def causal_mask(out_channels: int, in_channels: int, kernel_size: tuple[int, int],
                mask_type: MaskType, *, groups: int = 1, out_chunks: int = 1,
                center: tuple[int, int] | None = None) -> Tensor:
    """(out, in, kh, kw) 0/1 mask of a causal convolution whose output pixel sits at ``center``
    (default: the kernel's centre) of the kernel window; see the module docstring."""
    check_choice("mask_type", mask_type, MASK_TYPES)
    kh, kw = kernel_size
    ci, cj = center if center is not None else (kh // 2, kw // 2)
    mask = torch.zeros(out_channels, in_channels, kh, kw)
    mask[:, :, :ci] = 1.0  # rows above
    mask[:, :, ci, :cj] = 1.0  # left in the current row
    out_group = channel_groups(out_channels, groups, out_chunks)[:, None]
    in_group = channel_groups(in_channels, groups)[None, :]
    allowed = in_group < out_group if mask_type == "A" else in_group <= out_group
    mask[:, :, ci, cj] = allowed.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """Causal 2-D convolution, (B, in, H, W) -> (B, out, H, W) ("same" zero padding).

    Args:
        in_channels, out_channels: as nn.Conv2d.
        kernel_size: int or (kh, kw), odd sizes; the output pixel is the kernel's centre.
        mask_type: "A" (first layer: a sub-pixel does not see itself) or "B" (later layers).
        groups: colour groups (3 for RGB, 1 for one channel or categorical codes). Not
            nn.Conv2d's ``groups``: the convolution is dense, only masked.
        out_chunks: the output is ``out_chunks`` parts combined element-wise later (gates).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 mask_type: MaskType = "B", *, groups: int = 1, out_chunks: int = 1,
                 bias: bool = True) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ConfigError(f"masked convolutions need odd kernel sizes; got {(kh, kw)}")
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2), bias=bias)
        self.mask_type = mask_type
        # Not learned and rebuilt from the arguments: no need to store it in checkpoints.
        self.register_buffer("mask", causal_mask(out_channels, in_channels, (kh, kw), mask_type,
                                                 groups=groups, out_chunks=out_chunks),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def gate(x: Tensor) -> Tensor:
    """(B, 2C, H, W) -> (B, C, H, W): tanh of the first half times sigmoid of the second."""
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedBlock(nn.Module):
    """One Gated PixelCNN layer: (v, h) (B, C_in, H, W) each -> (v', h') (B, C, H, W) each.

    Vertical stack: a (k//2 + 1, k) convolution padded so that row i sees rows i - k//2 .. i
    (all colours: it never feeds a sub-pixel of its own row directly). Before the vertical
    features reach the horizontal stack they are shifted down one row, so the horizontal stack
    at row i only gets rows < i from them; stacked layers then cover the whole region above,
    up-right included, which plain 3x3 masked layers never reach (the "blind spot").

    Horizontal stack: a (1, k//2 + 1) convolution over the current row up to the current
    pixel, the current pixel masked by colour group (type A in the first layer, B after),
    plus the shifted vertical features through a 1x1 convolution; gated; then a 1x1 (mask B)
    convolution and, except in the first layer, a residual connection.

    Args:
        in_channels: C_in (the image channels in the first layer).
        channels: C.
        kernel_size: k, odd.
        mask_type: "A" for the first layer, "B" after.
        groups: colour groups (see :class:`MaskedConv2d`).
        num_classes: > 0 adds a learned per-class bias to both stacks' gates (conditioning).
        residual: add the input to the horizontal output (needs in_channels == channels).
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3,
                 mask_type: MaskType = "B", *, groups: int = 1, num_classes: int = 0,
                 residual: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd; got {kernel_size}")
        if residual and in_channels != channels:
            raise ConfigError(f"a residual block needs in_channels == channels; got {in_channels}, "
                              f"{channels}")
        self.kernel_size, self.residual = kernel_size, residual
        half = kernel_size // 2
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (half + 1, kernel_size))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal = nn.Conv2d(in_channels, 2 * channels, (1, half + 1))
        # The current pixel is the horizontal kernel's last column: masked by colour group.
        self.register_buffer("horizontal_mask",
                             causal_mask(2 * channels, in_channels, (1, half + 1), mask_type,
                                         groups=groups, out_chunks=2, center=(0, half)),
                             persistent=False)
        self.horizontal_out = MaskedConv2d(channels, channels, 1, "B", groups=groups)
        self.class_bias = nn.Embedding(num_classes, 4 * channels) if num_classes > 0 else None

    def forward(self, v: Tensor, h: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """v, h: (B, C_in, H, W); labels: (B,) int64 class indices when conditioned."""
        half = self.kernel_size // 2
        v_pre = self.vertical(F.pad(v, (half, half, half, 0)))
        # Shift down one row: row i of the horizontal stack gets vertical features of rows < i.
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]
        h_pre = F.conv2d(F.pad(h, (half, 0, 0, 0)), self.horizontal.weight * self.horizontal_mask,
                         self.horizontal.bias) + self.vertical_to_horizontal(v_down)
        if self.class_bias is not None:
            if labels is None:
                raise ConfigError("this block is class-conditioned: pass labels")
            bias_v, bias_h = self.class_bias(labels)[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + bias_v, h_pre + bias_h
        h_out = self.horizontal_out(gate(h_pre))
        return gate(v_pre), h + h_out if self.residual else h_out


class MaskedResidualBlock(nn.Module):
    """PixelCNN residual block (van den Oord et al. 2016, fig. 5, one width throughout):
    x + conv1x1_B(relu(conv_kxk_B(relu(x)))), (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, kernel_size: int = 3, *, groups: int = 1) -> None:
        super().__init__()
        self.conv = MaskedConv2d(channels, channels, kernel_size, "B", groups=groups)
        self.project = MaskedConv2d(channels, channels, 1, "B", groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(F.relu(self.conv(F.relu(x))))


def output_head(channels: int, hidden: int, out_channels: int, *, groups: int = 1) -> nn.Sequential:
    """(B, channels, H, W) -> (B, out_channels, H, W): relu, 1x1 mask B, relu, 1x1 mask B.

    With ``out_channels = C * L`` and ``groups = C`` the output's channel block c (L logits)
    belongs to colour c, so ``view(B, C, L, H, W)`` gives each sub-pixel its L logits.
    """
    return nn.Sequential(nn.ReLU(), MaskedConv2d(channels, hidden, 1, "B", groups=groups), nn.ReLU(),
                         MaskedConv2d(hidden, out_channels, 1, "B", groups=groups))


class RowLSTM(nn.Module):
    """Row LSTM layer of PixelRNN (van den Oord et al. 2016, section 3.1):
    (B, C, H, W) -> (B, C, H, W), processing the image one row at a time, top to bottom.

    Gates of row i: ``K_is * x_i + K_ss * h_{i-1}`` with K_is a masked (mask B, by colour
    group) 1x3 convolution of the input row (computed for all rows at once) and K_ss an
    unmasked 1-D convolution (k = 3) of the previous row's hidden state; then
    ``c_i = sig(f) c_{i-1} + sig(i) tanh(g)``, ``h_i = sig(o) tanh(c_i)``. The output adds
    a 1x1 (mask B) projection of h to the input (residual). The four gates are computed in
    chunks with the same colour-group layout so the element-wise LSTM keeps the colour order.
    The receptive field is a triangle above the pixel (the paper's stated limitation).
    """

    def __init__(self, channels: int, *, groups: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        self.input_to_state = MaskedConv2d(channels, 4 * channels, (1, kernel_size), "B",
                                           groups=groups, out_chunks=4)
        self.state_to_state = nn.Conv1d(channels, 4 * channels, kernel_size, padding=kernel_size // 2)
        self.project = MaskedConv2d(channels, channels, 1, "B", groups=groups)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None,
                return_state: bool = False):
        """x (B, C, H, W) -> (B, C, H, W); with ``return_state`` also the last row's (h, c),
        each (B, C, W). ``state``: the (h, c) of the row above x's first row (zeros if None),
        so an image can be processed a few rows at a time (ancestral sampling)."""
        b, c, height, width = x.shape
        from_input = self.input_to_state(x)  # (B, 4C, H, W)
        if state is None:
            h, cell = x.new_zeros(b, c, width), x.new_zeros(b, c, width)
        else:
            h, cell = state
        rows = []
        for i in range(height):
            gates = from_input[:, :, i] + self.state_to_state(h)
            o, f, g_in, g = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(g_in) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(cell)
            rows.append(h)
        out = x + self.project(torch.stack(rows, dim=2))
        return (out, (h, cell)) if return_state else out
