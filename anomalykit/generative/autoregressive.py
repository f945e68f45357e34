"""Autoregressive image models: PixelCNN, Gated PixelCNN, PixelRNN (Row LSTM), and a PixelCNN
over VQ-VAE code maps.

All three image models factorise p(x) = prod_i p(x_i | x_<i) over sub-pixels in raster order,
colour by colour (R, G, B), with a ``num_levels``-way softmax per sub-pixel (256 in the
papers, 17 for scikit-learn's digits). Images in [0, 1] are quantised to
``round(x * (L - 1))`` and fed to the network as ``2 * level / (L - 1) - 1``.

* :class:`PixelCNN` (van den Oord et al. 2016a): a 7x7 mask-A convolution, residual blocks of
  3x3 mask-B convolutions, a 1x1 head. Its receptive field has a blind spot up-right.
* :class:`GatedPixelCNN` (van den Oord et al. 2016b): vertical + horizontal stacks, no blind
  spot, gated tanh x sigmoid units, optional class conditioning (``num_classes``).
* :class:`PixelRNN` with Row LSTM layers (van den Oord et al. 2016a, section 3.1). The
  Diagonal BiLSTM is not implemented.
* :class:`CodePixelCNN`: a PixelCNN over categorical maps (B, h, w) of K codes (an
  embedding, then mask A), the spatial prior :class:`~anomalykit.generative.vqvae.VQVAE` uses
  with ``code_prior="pixelcnn"``.

Training minimises the mean negative log-likelihood per sub-pixel in nats (the loop's
``loss``; ``bpd`` = loss / ln 2 is logged beside it). ``log_prob`` is exact (nats per image);
``sample`` is ancestral, one network pass per sub-pixel (H * W * C passes), each on a crop
around the current pixel as large as the receptive field (the PixelRNN: the current row, with
the LSTM states of the rows above cached), which gives the full pass's logits (tested) at a
fraction of the cost.
Masks and the colour ordering live in :mod:`anomalykit.nn.masked`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.base import GenerativeModel
from anomalykit.errors import ConfigError
from anomalykit.nn.masked import GatedBlock, MaskedConv2d, MaskedResidualBlock, RowLSTM, output_head
from anomalykit.registry import register_generative


def quantize(x: Tensor, num_levels: int) -> Tensor:
    """(B, C, H, W) in [0, 1] -> int64 levels in [0, num_levels)."""
    return torch.round(x.clamp(0.0, 1.0) * (num_levels - 1)).long()


def levels_to_input(levels: Tensor, num_levels: int) -> Tensor:
    """int levels (or continuous level values) -> the network's input range [-1, 1]."""
    return levels.float() * (2.0 / (num_levels - 1)) - 1.0


PixelLogits = Callable[[Tensor, int, int], Tensor]


@torch.no_grad()
def ancestral_sample(pixel_logits: PixelLogits, shape: tuple[int, int, int, int],
                     generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Draw int64 levels of ``shape`` (n, C, H, W) one sub-pixel at a time, raster order,
    colour by colour.

    pixel_logits: (levels (n, C, H, W) drawn so far, i, j) -> logits (n, C, L) of pixel (i, j).
    Draws use ``torch.multinomial`` on the CPU with ``generator``, so a seed gives the same
    samples on any device.
    """
    n, channels, height, width = shape
    levels = torch.zeros(shape, dtype=torch.long, device=device)
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                logits = pixel_logits(levels, i, j)[:, c]
                probs = torch.softmax(logits.double(), dim=-1).cpu()
                levels[:, c, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
    return levels


def window(i: int, j: int, reach: int, width: int) -> tuple[int, int, int]:
    """First row, first and end column of the window a pixel (i, j) with ``reach`` needs."""
    return max(0, i - reach), max(0, j - reach), min(width, j + reach + 1)


def windowed_pixel_logits(features: Callable[[Tensor], Tensor], head: nn.Module, reach: int,
                          to_input: Callable[[Tensor], Tensor]) -> PixelLogits:
    """Pixel logits from a crop around the pixel: a causal convolutional network's output at
    (i, j) depends on rows i - reach .. i and columns j - reach .. j + reach only, and every
    intermediate value it needs inside that crop has its own receptive field inside it too,
    so cropping gives the full pass's numbers (the tests check it) at a fraction of the cost.

    features: network input of a crop -> (n, F, r, w); head: 1x1 convolutions to (n, C * L, ., .).
    to_input: levels (n, C, r, w) -> the network input.
    """
    def pixel_logits(levels: Tensor, i: int, j: int) -> Tensor:
        top, left, right = window(i, j, reach, levels.shape[-1])
        crop = features(to_input(levels[:, :, top:i + 1, left:right]))
        out = head(crop[:, :, -1:, j - left:j - left + 1])
        return out.view(levels.shape[0], levels.shape[1], -1)

    return pixel_logits


class _AutoregressiveImageModel(GenerativeModel):
    """What the three image models share: quantisation, likelihood, training, sampling.

    Subclasses build their network (ending in ``self.head``, 1x1 convolutions) and implement
    :meth:`features` and :attr:`receptive_rows` (or their own :meth:`pixel_logits_fn`).
    """

    image_size: int
    in_channels: int
    num_levels: int
    lr: float
    num_classes: int = 0

    def _check(self, image_size: int, in_channels: int, num_levels: int, hidden: int) -> None:
        if num_levels < 2:
            raise ConfigError(f"num_levels must be >= 2; got {num_levels}")
        if in_channels < 1 or image_size < 1:
            raise ConfigError(f"in_channels and image_size must be >= 1; got {in_channels}, "
                              f"{image_size}")
        if hidden < in_channels:
            raise ConfigError(f"hidden ({hidden}) must be >= in_channels ({in_channels}): each "
                              "colour needs its own group of channels")

    def features(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, hidden, H, W), the input of the 1x1 output head."""
        raise NotImplementedError

    @property
    def receptive_rows(self) -> int:
        """How many rows above (and columns beside) a pixel its logits can depend on."""
        raise NotImplementedError

    def logits_from_input(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, C * L, H, W) raw logits, colour-major."""
        return self.head(self.features(x, labels))

    def pixel_logits_fn(self, labels: Tensor | None = None) -> PixelLogits:
        """The ``pixel_logits`` callable :func:`ancestral_sample` draws with."""
        return windowed_pixel_logits(lambda x: self.features(x, labels), self.head,
                                     self.receptive_rows,
                                     lambda lv: levels_to_input(lv, self.num_levels))

    def logits(self, levels: Tensor, labels: Tensor | None = None) -> Tensor:
        """int levels (B, C, H, W) -> logits (B, C, L, H, W) of every sub-pixel given its past."""
        b, c, h, w = levels.shape
        out = self.logits_from_input(levels_to_input(levels, self.num_levels), labels)
        return out.view(b, c, self.num_levels, h, w)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, C, H, W) in [0, 1] -> logits (B, C, L, H, W)."""
        return self.logits(quantize(x, self.num_levels), labels)

    def nll_map(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C, H, W) negative log-likelihood of each sub-pixel, nats."""
        levels = quantize(x, self.num_levels)
        # cross_entropy wants the classes in dim 1: (B, L, C, H, W).
        return F.cross_entropy(self.logits(levels, labels).transpose(1, 2), levels, reduction="none")

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B,) exact log-likelihood of the quantised image, nats."""
        return -self.nll_map(x, labels).flatten(1).sum(1)

    def bits_per_dim(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B,) negative log2-likelihood per sub-pixel (uniform: log2(num_levels))."""
        return -self.log_prob(x, labels) / (x[0].numel() * math.log(2.0))

    def _labels(self, batch) -> Tensor | None:
        if not self.num_classes:
            return None
        if "label" not in batch:
            raise ConfigError(f"{type(self).__name__} has num_classes={self.num_classes}: the "
                              "batches need a 'label' entry")
        return batch["label"].long()

    def training_step(self, batch) -> dict[str, Tensor]:
        nats = self.nll_map(batch["image"], self._labels(batch)).mean()
        return {"loss": nats, "bpd": nats.detach() / math.log(2.0)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               labels: Tensor | None = None) -> Tensor:
        """(n, C, S, S) images in [0, 1] (on the quantisation grid), drawn ancestrally.

        labels: (n,) class indices, required when the model is class-conditioned.
        """
        if self.num_classes:
            if labels is None or len(labels) != n:
                raise ConfigError(f"a class-conditioned model needs labels of length {n}")
            labels = labels.long().to(self.device)
        shape = (n, self.in_channels, self.image_size, self.image_size)
        levels = ancestral_sample(self.pixel_logits_fn(labels), shape, generator, self.device)
        return levels.float() / (self.num_levels - 1)


@register_generative("pixelcnn")
class PixelCNN(_AutoregressiveImageModel):
    """PixelCNN on (B, C, S, S) images in [0, 1].

    Args:
        image_size: S (the network is fully convolutional; S sets the sample size).
        in_channels: C; the colour groups of the masks (3: R, G, B ordering).
        num_levels: L, softmax size per sub-pixel.
        hidden: channels of the residual stream (>= C).
        layers: residual blocks of 3x3 mask-B convolutions after the 7x7 mask-A one.
        first_kernel, kernel_size: the mask-A and mask-B kernel sizes (7 and 3 in the paper).
        head_hidden: channels of the 1x1 output head.
        lr: Adam.
    """

    def __init__(self, image_size: int = 32, *, in_channels: int = 3, num_levels: int = 256,
                 hidden: int = 64, layers: int = 5, first_kernel: int = 7, kernel_size: int = 3,
                 head_hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self._check(image_size, in_channels, num_levels, hidden)
        self.image_size, self.in_channels, self.num_levels, self.lr = (image_size, in_channels,
                                                                       num_levels, lr)
        groups = in_channels
        self.input_conv = MaskedConv2d(in_channels, hidden, first_kernel, "A", groups=groups)
        self.blocks = nn.Sequential(*[MaskedResidualBlock(hidden, kernel_size, groups=groups)
                                      for _ in range(layers)])
        self.head = output_head(hidden, head_hidden, in_channels * num_levels, groups=groups)

    @property
    def receptive_rows(self) -> int:
        return self.input_conv.kernel_size[0] // 2 + sum(block.conv.kernel_size[0] // 2
                                                         for block in self.blocks)

    def features(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.blocks(self.input_conv(x))


@register_generative("gated_pixelcnn")
class GatedPixelCNN(_AutoregressiveImageModel):
    """Gated PixelCNN (no blind spot), optionally class-conditional, on (B, C, S, S) in [0, 1].

    Args:
        image_size, in_channels, num_levels, hidden, head_hidden, lr: as :class:`PixelCNN`.
        layers: gated layers, the first one (mask A, ``first_kernel``) included.
        first_kernel, kernel_size: kernel sizes of the first and later gated layers.
        num_classes: > 0 conditions every layer on a class label (batches carry ``"label"``;
            ``sample`` and ``log_prob`` take ``labels``).
    """

    def __init__(self, image_size: int = 32, *, in_channels: int = 3, num_levels: int = 256,
                 hidden: int = 64, layers: int = 6, first_kernel: int = 7, kernel_size: int = 3,
                 head_hidden: int = 128, num_classes: int = 0, lr: float = 1e-3) -> None:
        super().__init__()
        self._check(image_size, in_channels, num_levels, hidden)
        if layers < 1:
            raise ConfigError(f"layers must be >= 1; got {layers}")
        self.image_size, self.in_channels, self.num_levels, self.lr = (image_size, in_channels,
                                                                       num_levels, lr)
        self.num_classes = num_classes
        groups = in_channels
        self.layers = nn.ModuleList(
            [GatedBlock(in_channels, hidden, first_kernel, "A", groups=groups,
                        num_classes=num_classes, residual=False)]
            + [GatedBlock(hidden, hidden, kernel_size, "B", groups=groups, num_classes=num_classes)
               for _ in range(layers - 1)])
        self.head = output_head(hidden, head_hidden, in_channels * num_levels, groups=groups)

    @property
    def receptive_rows(self) -> int:
        # The horizontal stack of row i gets the vertical stacks' row i - 1 (the shift), and
        # each vertical layer looks kernel // 2 rows further up.
        return 1 + sum(layer.kernel_size // 2 for layer in self.layers)

    def features(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.num_classes and labels is None:
            raise ConfigError(f"{type(self).__name__} is class-conditioned: pass labels")
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return h


@register_generative("pixelrnn")
class PixelRNN(_AutoregressiveImageModel):
    """PixelRNN with Row LSTM layers on (B, C, S, S) in [0, 1] (small scale, CPU-sized).

    A 7x7 mask-A convolution, ``layers`` :class:`~anomalykit.nn.masked.RowLSTM` layers with
    residual connections, the 1x1 output head. The Diagonal BiLSTM is not implemented.

    Args: as :class:`PixelCNN` (``hidden`` is the LSTM state size).
    """

    def __init__(self, image_size: int = 32, *, in_channels: int = 3, num_levels: int = 256,
                 hidden: int = 32, layers: int = 2, first_kernel: int = 7, head_hidden: int = 64,
                 lr: float = 1e-3) -> None:
        super().__init__()
        self._check(image_size, in_channels, num_levels, hidden)
        self.image_size, self.in_channels, self.num_levels, self.lr = (image_size, in_channels,
                                                                       num_levels, lr)
        groups = in_channels
        self.input_conv = MaskedConv2d(in_channels, hidden, first_kernel, "A", groups=groups)
        self.rows = nn.ModuleList([RowLSTM(hidden, groups=groups) for _ in range(layers)])
        self.head = output_head(hidden, head_hidden, in_channels * num_levels, groups=groups)

    def features(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        x = self.input_conv(x)
        for layer in self.rows:
            x = layer(x)
        return x

    def pixel_logits_fn(self, labels: Tensor | None = None) -> PixelLogits:
        """Pixel logits with the LSTM states of the finished rows cached (the recurrence reaches
        every row above, so no window of rows would do); within the current row a crop of
        columns around the pixel (the input convolution reaches ``first_kernel // 2`` columns,
        each Row LSTM layer one more)."""
        rows_up = self.input_conv.kernel_size[0] // 2
        reach = rows_up + len(self.rows)
        cache: dict[str, object] = {"row": 0, "states": [None] * len(self.rows)}

        def run(levels: Tensor, i: int, left: int, right: int) -> tuple[Tensor, list]:
            crop = levels[:, :, max(0, i - rows_up):i + 1, left:right]
            x = self.input_conv(levels_to_input(crop, self.num_levels))[:, :, -1:]
            states = []
            for layer, state in zip(self.rows, cache["states"], strict=True):
                if state is not None:
                    state = (state[0][..., left:right], state[1][..., left:right])
                x, new_state = layer(x, state, return_state=True)
                states.append(new_state)
            return x, states

        def pixel_logits(levels: Tensor, i: int, j: int) -> Tensor:
            while cache["row"] < i:  # that row is finished: keep its states, on all columns
                _, cache["states"] = run(levels, cache["row"], 0, levels.shape[-1])
                cache["row"] += 1
            _, left, right = window(i, j, reach, levels.shape[-1])
            x, _ = run(levels, i, left, right)
            return self.head(x[..., j - left:j - left + 1]).view(levels.shape[0], levels.shape[1], -1)

        return pixel_logits


class CodePixelCNN(GenerativeModel):
    """PixelCNN prior over (B, h, w) maps of ``num_embeddings`` categorical codes.

    The codes enter through an embedding (a code index has no order, unlike a grey level),
    then a mask-A convolution (one group: a position never sees its own code), residual
    mask-B blocks and a ``num_embeddings``-way head. Trained by the loop on a (N, h, w) int64
    tensor of code maps, which the loop hands over as ``{"image": codes}`` batches (see :meth:`VQVAE.fit_prior
    <anomalykit.generative.vqvae.VQVAE.fit_prior>`). Not registered: it models codes, not
    images, and lives inside a VQ-VAE.

    Args:
        num_embeddings: K, the number of codes.
        grid_size: h = w of the code maps ``sample`` draws.
        hidden, layers, first_kernel, kernel_size, head_hidden, lr: as :class:`PixelCNN`.
    """

    def __init__(self, num_embeddings: int, grid_size: int, *, hidden: int = 64, layers: int = 5,
                 first_kernel: int = 7, kernel_size: int = 3, head_hidden: int = 128,
                 lr: float = 1e-3) -> None:
        super().__init__()
        if num_embeddings < 2:
            raise ConfigError(f"num_embeddings must be >= 2; got {num_embeddings}")
        self.num_embeddings, self.grid_size, self.lr = num_embeddings, grid_size, lr
        self.embedding = nn.Embedding(num_embeddings, hidden)
        self.input_conv = MaskedConv2d(hidden, hidden, first_kernel, "A")
        self.blocks = nn.Sequential(*[MaskedResidualBlock(hidden, kernel_size)
                                      for _ in range(layers)])
        self.head = output_head(hidden, head_hidden, num_embeddings)

    def features(self, codes: Tensor) -> Tensor:
        """(B, h, w) int64 -> (B, hidden, h, w)."""
        return self.blocks(self.input_conv(self.embedding(codes).permute(0, 3, 1, 2)))

    def logits(self, codes: Tensor) -> Tensor:
        """(B, h, w) int64 -> (B, K, h, w) logits of each code given the codes before it."""
        return self.head(self.features(codes))

    def forward(self, codes: Tensor) -> Tensor:
        return self.logits(codes)

    def log_prob(self, codes: Tensor) -> Tensor:
        """(B, h, w) int64 -> (B,) log-likelihood of the code map, nats."""
        return -F.cross_entropy(self.logits(codes), codes, reduction="none").flatten(1).sum(1)

    def training_step(self, batch) -> dict[str, Tensor]:
        codes = batch["image"].long()
        nats = F.cross_entropy(self.logits(codes), codes)
        return {"loss": nats}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, h, w) int64 code maps drawn ancestrally, position by position."""
        reach = self.input_conv.kernel_size[0] // 2 + sum(block.conv.kernel_size[0] // 2
                                                          for block in self.blocks)
        # Code maps as (n, 1, h, w) "levels": one channel, K categories.
        pixel_logits = windowed_pixel_logits(self.features, self.head, reach, lambda c: c[:, 0])
        shape = (n, 1, self.grid_size, self.grid_size)
        return ancestral_sample(pixel_logits, shape, generator, self.device)[:, 0]
