"""Normalizing flows with exact log-likelihood: NICE and RealNVP for vectors, Glow for images.

All map data x to latents z with an invertible network f and score by the change of
variables (Dinh et al. 2015, eq. 2; Dinh et al. 2017, eq. 3):

    log p(x) = log p_Z(f(x)) + log |det df/dx|

with p_Z = N(0, I), or for NICE optionally the standard logistic (NICE sec. 3.4).

Discrete data (8-bit images, scikit-learn digits) is dequantised (Theis et al. 2016;
Glow sec. 5): with ``dequantize=True`` inputs live in [0, 1] on ``num_bins`` levels
``k / (num_bins - 1)``, the flow sees ``y = (k + u) / num_bins`` with ``u ~ U(0, 1)`` in
training mode (``u = 0.5``, the bin centre, in eval mode so scores are deterministic), and
``log_prob`` is the log-probability of the discrete value, ``log p(y) - D log(num_bins)``.
``bits_per_dim = -log_prob / (D ln 2)`` is then the usual figure (Glow reports it for
``num_bins=256``; a uniform model scores ``log2(num_bins)``).

The layers live in :mod:`anomalykit.nn.coupling`; the FastFlow and DifferNet detectors
build on the same ones.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError, DataError
from anomalykit.nn.coupling import (
    PERMUTATIONS,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    DiagonalScaling,
    FlowSequential,
    InvertibleConv1x1,
    Permutation,
    Squeeze,
    normal_log_prob,
    standard_logistic_log_prob,
    standard_normal_log_prob,
    subnet_conv,
    subnet_fc,
)
from anomalykit.registry import register_generative


def _check_dequantization(dequantize: bool, num_bins: int) -> None:
    if dequantize and num_bins < 2:
        raise ConfigError(f"num_bins must be >= 2 to dequantize; got {num_bins}")


def _check_temperature(temperature: float) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0; got {temperature}")


class _DequantizingFlow(GenerativeModel):
    """What NICE, RealNVP and Glow share: dequantisation, log_prob, bits/dim, NLL training."""

    dequantize: bool
    num_bins: int
    lr: float
    weight_decay: float

    def forward(self, x: Tensor):  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _log_prob_continuous(self, y: Tensor) -> Tensor:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def preprocess(self, x: Tensor) -> Tensor:
        """Data x -> the continuous input y of the flow (dequantised when ``dequantize``)."""
        if not self.dequantize:
            return x
        # Noise while training; the bin centre otherwise, so eval scores are reproducible.
        u = torch.rand_like(x) if self.training else torch.full_like(x, 0.5)
        return (x * (self.num_bins - 1) + u) / self.num_bins

    def postprocess(self, y: Tensor) -> Tensor:
        """Flow output y -> data space: the inverse of :meth:`preprocess` at the bin centre."""
        if not self.dequantize:
            return y
        return ((y * self.num_bins - 0.5) / (self.num_bins - 1)).clamp(0.0, 1.0)

    def log_prob(self, x: Tensor) -> Tensor:
        """(B,) exact log-likelihood in nats (of the discrete value when ``dequantize``)."""
        self._check_input(x)
        log_p = self._log_prob_continuous(self.preprocess(x))
        if self.dequantize:
            # Density on [0, 1)^D -> probability of one bin of volume num_bins^-D.
            log_p = log_p - x[0].numel() * math.log(self.num_bins)
        return log_p

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """(B,) negative log-likelihood in bits per dimension, ``-log_prob / (D ln 2)``."""
        return -self.log_prob(x) / (x[0].numel() * math.log(2.0))

    def score(self, x: Tensor) -> Tensor:
        """(B,) negative log-likelihood; higher = less like the training data."""
        return -self.log_prob(x)

    def training_step(self, batch) -> dict[str, Tensor]:
        x = batch["image"]
        log_p = self.log_prob(x)
        return {"loss": -log_p.mean(),
                "bits_per_dim": (-log_p.mean() / (x[0].numel() * math.log(2.0))).detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class _VectorFlow(_DequantizingFlow):
    """What the flows of vectors (NICE, RealNVP) share: ``self.flow`` on (B, ``self.dim``)."""

    dim: int
    flow: FlowSequential

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise DataError(f"{type(self).__name__}(dim={self.dim}) expects (B, {self.dim}); "
                            f"got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D) flow input -> (z (B, D), log_det_jacobian (B,))."""
        return self.flow(x)

    def inverse(self, z: Tensor) -> Tensor:
        """(B, D) latent -> (B, D) flow input."""
        return self.flow.inverse(z)


@register_generative("realnvp")
class RealNVP(_VectorFlow):
    """RealNVP (Dinh et al. 2017) for vectors (B, D): affine couplings with fc subnets.

    Each of ``num_layers`` steps is [ActNorm (optional), AffineCoupling, Permutation]; the
    base distribution is N(0, I). ``forward(x) -> (z, log_det_jacobian)`` is the bijection
    on the flow's input, ``inverse(z) -> x`` its inverse.

    Args:
        dim: D.
        num_layers: coupling steps.
        hidden / num_hidden_layers: width and depth of each coupling's subnet.
        clamp: soft clamp of the coupling log-scales.
        actnorm: an ActNorm before every coupling (Glow sec. 3.1; stands in for RealNVP's
            batch norm, sec. 3.7).
        permutation: "reverse" (alternate halves, RealNVP's masks) or "random" (fixed random
            permutations drawn from ``seed + step``).
        seed: seed of the random permutations.
        dequantize / num_bins: treat inputs as discrete, ``num_bins`` levels in [0, 1].
        lr / weight_decay: Adam.
    """

    def __init__(self, dim: int = 2, *, num_layers: int = 8, hidden: int = 64, num_hidden_layers: int = 2,
                 clamp: float = 2.0, actnorm: bool = True, permutation: str = "reverse", seed: int = 0,
                 dequantize: bool = False, num_bins: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        check_choice("permutation", permutation, PERMUTATIONS)
        if dim < 2:
            raise ConfigError(f"RealNVP needs dim >= 2 (a coupling splits the features); got {dim}")
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1; got {num_layers}")
        _check_dequantization(dequantize, num_bins)
        self.dim, self.dequantize, self.num_bins = dim, dequantize, num_bins
        self.lr, self.weight_decay = lr, weight_decay
        subnet = subnet_fc(hidden, num_hidden_layers)
        layers: list[nn.Module] = []
        for i in range(num_layers):
            if actnorm:
                layers.append(ActNorm(dim))
            layers.append(AffineCoupling(dim, subnet, clamp=clamp))
            layers.append(Permutation(dim, seed=seed + i, kind=permutation))
        self.flow = FlowSequential(*layers)

    def _log_prob_continuous(self, y: Tensor) -> Tensor:
        z, log_det = self.flow(y)
        return standard_normal_log_prob(z) + log_det

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *,
               generator: torch.Generator | None = None) -> Tensor:
        """(n, D) samples from z ~ N(0, temperature^2 I); temperature 0 gives f^-1(0) n times."""
        _check_temperature(temperature)
        dtype = next(self.parameters()).dtype
        z = torch.randn(n, self.dim, generator=generator).to(self.device, dtype) * temperature
        return self.postprocess(self.inverse(z))


Prior = Literal["logistic", "gaussian"]
PRIORS = ("logistic", "gaussian")
Partition = Literal["odd_even", "halves"]
PARTITIONS = ("odd_even", "halves")


@register_generative("nice")
class NICE(_VectorFlow):
    """NICE (Dinh et al. 2015) for vectors (B, D): additive couplings and a diagonal scaling.

    f = [Permutation "odd_even" (``partition="odd_even"``)] -> ``num_layers`` x
    AdditiveCoupling, with a reversal between consecutive couplings so that they shift the
    two halves in turn (sec. 5.1's alternating partitions) -> DiagonalScaling. Each coupling
    function m is an MLP of ``num_hidden_layers`` ReLU layers of width ``hidden``
    (:func:`subnet_fc`, its last layer zero-initialised so f starts as the identity). The
    couplings preserve volume, so ``log_det_jacobian = sum(log_scale)`` of the scaling layer
    alone (sec. 3.3). ``forward(x) -> (z, log_det_jacobian)`` is the bijection on the flow's
    input, ``inverse(z) -> x`` its inverse.

    Defaults are the paper's MNIST model (D = 784, four couplings, five hidden layers of
    1000 units, logistic prior, inputs dequantised to [0, 1]); the paper trains with Adam,
    lr 1e-3.

    Args:
        dim: D, at least 2.
        num_layers: additive couplings (the paper's 4).
        hidden / num_hidden_layers: width and depth of each coupling function m.
        partition: "odd_even" (couplings split even from odd components, the paper's) or
            "halves" (first D // 2 components from the rest).
        prior: "logistic" (the paper's choice for MNIST) or "gaussian" (N(0, I)).
        dequantize / num_bins: treat inputs as discrete, ``num_bins`` levels in [0, 1].
        lr / weight_decay: Adam.
    """

    def __init__(self, dim: int = 784, *, num_layers: int = 4, hidden: int = 1000,
                 num_hidden_layers: int = 5, partition: Partition = "odd_even",
                 prior: Prior = "logistic",
                 dequantize: bool = True, num_bins: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        check_choice("partition", partition, PARTITIONS)
        check_choice("prior", prior, PRIORS)
        if dim < 2:
            raise ConfigError(f"NICE needs dim >= 2 (a coupling splits the features); got {dim}")
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1; got {num_layers}")
        _check_dequantization(dequantize, num_bins)
        self.dim, self.prior, self.dequantize, self.num_bins = dim, prior, dequantize, num_bins
        self.lr, self.weight_decay = lr, weight_decay
        subnet = subnet_fc(hidden, num_hidden_layers)
        layers: list[nn.Module] = [Permutation(dim, kind="odd_even")] if partition == "odd_even" else []
        for i in range(num_layers):
            if i:
                layers.append(Permutation(dim, kind="reverse"))
            layers.append(AdditiveCoupling(dim, subnet))
        layers.append(DiagonalScaling(dim))
        self.flow = FlowSequential(*layers)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """(B, D) -> (B,) log p_Z(z) under the factorised prior."""
        if self.prior == "logistic":
            return standard_logistic_log_prob(z)
        return standard_normal_log_prob(z)

    def _log_prob_continuous(self, y: Tensor) -> Tensor:
        z, log_det = self.flow(y)
        return self.prior_log_prob(z) + log_det

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *,
               generator: torch.Generator | None = None) -> Tensor:
        """(n, D) samples f^-1(temperature * z), z from the prior; temperature 0 gives f^-1(0).

        A logistic z is drawn by inverting its CDF, log u - log(1 - u) with u ~ U(0, 1).
        """
        _check_temperature(temperature)
        dtype = next(self.parameters()).dtype
        if self.prior == "logistic":
            # u away from 0 and 1 so the logit stays finite in float32
            u = torch.rand(n, self.dim, generator=generator, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
            z = torch.log(u) - torch.log1p(-u)
        else:
            z = torch.randn(n, self.dim, generator=generator)
        return self.postprocess(self.inverse(z.to(self.device, dtype) * temperature))


@register_generative("glow")
class Glow(_DequantizingFlow):
    """Glow (Kingma & Dhariwal 2018): a multi-scale flow for images (B, C, S, S) in [0, 1].

    L = ``levels`` levels, each [Squeeze, K = ``steps`` x (ActNorm, InvertibleConv1x1,
    AffineCoupling with a conv subnet)]; after every level but the last, half the channels
    are factored out as latents (RealNVP sec. 3.6, Glow fig. 2b) with a N(0, I) prior, or with
    ``learned_prior`` a diagonal Gaussian whose mean and log-std a zero-initialised 3x3 conv
    predicts from the kept half (Glow's split prior). The top latent has a N(0, I) prior.
    Inputs are centred (x - 0.5) inside ``forward``, which is volume preserving.

    ``forward(x) -> (zs, log_det_jacobian)`` with ``zs`` the per-level latents, finest first
    (z_1 (B, 2C, S/2, S/2), ..., z_L (B, 2^(L+1) C, S/2^L, S/2^L)); ``inverse(zs) -> x``.

    Args:
        image_size: S, a multiple of 2**levels.
        in_channels: C.
        levels / steps: L and K of the paper.
        hidden_channels / kernel_size: the coupling subnets (conv k -> ReLU -> conv k).
        clamp: soft clamp of the coupling log-scales.
        lu: LU-decomposed 1x1 convolutions (Glow eq. 10).
        learned_prior: learned conditional prior for the factored-out latents.
        dequantize / num_bins: discrete inputs, ``num_bins`` levels in [0, 1] (256 for 8-bit
            images, 17 for scikit-learn's digits / 16).
        lr / weight_decay: Adam.
    """

    def __init__(self, image_size: int = 8, *, in_channels: int = 1, levels: int = 2, steps: int = 4,
                 hidden_channels: int = 32, kernel_size: int = 3, clamp: float = 2.0, lu: bool = True,
                 learned_prior: bool = False, dequantize: bool = True, num_bins: int = 256,
                 lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        if levels < 1 or steps < 1 or in_channels < 1:
            raise ConfigError(f"Glow needs levels, steps and in_channels >= 1; got levels={levels}, "
                              f"steps={steps}, in_channels={in_channels}")
        factor = 2 ** levels
        if image_size % factor or image_size < factor:
            raise ConfigError(f"image_size {image_size} must be a multiple of {factor} (2 ** levels)")
        _check_dequantization(dequantize, num_bins)
        self.image_size, self.in_channels = image_size, in_channels
        self.dequantize, self.num_bins = dequantize, num_bins
        self.lr, self.weight_decay = lr, weight_decay
        subnet = subnet_conv(kernel_size, hidden_channels=hidden_channels)

        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        channels, size = in_channels, image_size
        for level in range(levels):
            channels, size = channels * 4, size // 2
            layers: list[nn.Module] = [Squeeze()]
            for _ in range(steps):
                layers += [ActNorm(channels), InvertibleConv1x1(channels, lu=lu),
                           AffineCoupling(channels, subnet, clamp=clamp)]
            self.levels.append(FlowSequential(*layers))
            if level < levels - 1:
                out = channels // 2
                self.latent_shapes.append((out, size, size))
                if learned_prior:
                    self.priors.append(_zero_conv(channels - out, 2 * out))
                channels -= out
        self.latent_shapes.append((channels, size, size))
        self.learned_prior = learned_prior

    def _check_input(self, x: Tensor) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise DataError(f"Glow expects (B, {', '.join(map(str, want))}); got {tuple(x.shape)}")

    def _split_prior(self, level: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-std of the latent factored out at ``level``, given the kept half h."""
        if not self.learned_prior:
            zeros = h.new_zeros(h.shape[0], *self.latent_shapes[level])
            return zeros, zeros
        return self.priors[level](h).chunk(2, dim=1)

    def _encode(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """x -> (zs, log_det_jacobian (B,), log p(zs) (B,))."""
        h = x - 0.5
        log_det = x.new_zeros(x.shape[0])
        log_pz = x.new_zeros(x.shape[0])
        zs: list[Tensor] = []
        for i, level in enumerate(self.levels):
            h, level_log_det = level(h)
            log_det = log_det + level_log_det
            if i < len(self.levels) - 1:
                # Factor-out: a split is a coordinate projection, so it adds nothing to the log-det.
                z, h = h[:, :self.latent_shapes[i][0]], h[:, self.latent_shapes[i][0]:]
                log_pz = log_pz + normal_log_prob(z, *self._split_prior(i, h))
                zs.append(z)
        zs.append(h)
        return zs, log_det, log_pz + standard_normal_log_prob(h)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(B, C, S, S) flow input -> (per-level latents, log_det_jacobian (B,))."""
        zs, log_det, _ = self._encode(x)
        return zs, log_det

    def inverse(self, zs: list[Tensor]) -> Tensor:
        """Per-level latents, finest first -> (B, C, S, S) flow input."""
        h = self.levels[-1].inverse(zs[-1])
        for i in range(len(self.levels) - 2, -1, -1):
            h = self.levels[i].inverse(torch.cat([zs[i], h], dim=1))
        return h + 0.5

    def _log_prob_continuous(self, y: Tensor) -> Tensor:
        _, log_det, log_pz = self._encode(y)
        return log_pz + log_det

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *,
               generator: torch.Generator | None = None) -> Tensor:
        """(n, C, S, S) samples in [0, 1] (clamped when ``dequantize``).

        Every latent is drawn as mean + temperature * std * eps (Glow sec. 6's temperature);
        temperature 0 takes the prior means, a deterministic image.
        """
        _check_temperature(temperature)
        dtype = next(self.parameters()).dtype

        def eps(shape: tuple[int, int, int]) -> Tensor:
            return torch.randn(n, *shape, generator=generator).to(self.device, dtype) * temperature

        h = self.levels[-1].inverse(eps(self.latent_shapes[-1]))
        # Coarse to fine, since a learned prior of z_i depends on the level above it.
        for i in range(len(self.levels) - 2, -1, -1):
            mean, log_std = self._split_prior(i, h)
            z = mean + torch.exp(log_std) * eps(self.latent_shapes[i])
            h = self.levels[i].inverse(torch.cat([z, h], dim=1))
        return self.postprocess(h + 0.5)


def _zero_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    """3x3 conv initialised to zero, so a learned prior starts as N(0, I) (Glow sec. 3.3)."""
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv
