"""BigGAN's ingredients (Brock et al. 2019) on a class-conditional DCGAN-sized model.

BigGAN is a class-conditional GAN made to scale by a handful of ingredients. Here each one is
a SWITCH of one class, :class:`BigGAN` (registered ``"biggan"``), so that an ablation is the
same model with an option turned off, never a copy of it:

- ``conditional_bn``: class-conditional BatchNorm in G (de Vries et al. 2017; BigGAN sec. 3).
  Every BatchNorm of G has no affine parameters of its own; its per-channel gain and bias are
  linear maps of ``[shared class embedding, z chunk]``: gain = 1 + W_g c, bias = W_b c. The
  latent z is split into one chunk per resolution ("skip-z", the hierarchical latent of BigGAN
  sec. 3 / appendix B): the first chunk feeds G's first (linear) layer, chunk i + 1 the i-th
  BatchNorm. Off: plain BatchNorm, and the class embedding is concatenated to the whole z at
  G's input (as ``cgan`` does).
- ``projection``: the projection discriminator (Miyato & Koyama 2018), D(x, y) = psi(phi(x)) +
  <embed(y), phi(x)>, :class:`~anomalykit.generative.gan.ProjectionDiscriminator` reused as is.
  Off: the class enters D as K one-hot channels concatenated to the image
  (:class:`ConcatDiscriminator`).
- ``loss``: "hinge" (BigGAN, after Lim & Ye 2017 / Miyato et al. 2018) or "non_saturating",
  from :mod:`anomalykit.nn.adversarial`.
- ``spectral_norm``: spectral normalisation (Miyato et al. 2018) of every convolution and
  linear layer of G and D and of D's class embedding (BigGAN keeps G's shared embedding
  plain), with ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration per
  forward pass in training mode). Off: no normalisation at all in D (as ``cgan``'s default).
- truncation at sampling: ``sample(..., truncation=t)`` draws z from N(0, I) truncated to
  [-t, t], values outside resampled (BigGAN sec. 4.1): lower t trades variety for fidelity.
- TTUR (Heusel et al. 2017) as BigGAN uses it: D's learning rate 4x G's, Adam betas (0, 0.999).
  The paper's 5e-5 / 2e-4 are for batch 2048 and ~10^5 steps; the CPU default here is 2e-4 /
  8e-4 (same ratio) for batches of 32-64 and a few hundred steps. Chosen on the digits of
  ``benchmarks/biggan_ablation.py`` (width 32, latent 64, batch 64, seed 0; a probe that refit
  every 5 epochs, so Adam restarted): the share of samples read as the asked class was 0.31 after
  15 epochs and 0.88 after 30 with 1e-4 / 4e-4, 0.92 after 15 with 2e-4 / 8e-4.
- ``ema_decay``: optionally an exponential moving average of G's weights
  (:class:`~anomalykit.nn.ema.ExponentialMovingAverage`, updated after each generator step);
  :meth:`BigGAN.sample` then uses the average. Off by default.

Left out: orthogonal regularisation, residual blocks, self-attention, shared embeddings of a
hierarchical size, BigGAN's 2 D steps per G step (``n_critic`` 2 is an option) and its
batch sizes. The networks are DCGAN's (4x4 (transposed) convolutions, stride 2), not BigGAN's
ResNets: the point is the ingredients, at a size that trains in minutes on a CPU.

Training, scoring and the per-epoch grid are :class:`~anomalykit.generative.gan.ConditionalGAN`'s
(batches ``{"image", "class"}``; ``score(x)`` = -max over classes of D; one grid column per
class); this module supplies the networks, the optimisers and the truncated sampling.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from anomalykit.errors import ConfigError, check_choice
from anomalykit.generative.gan import (
    AdversarialModel,
    ConditionalGAN,
    ProjectionDiscriminator,
    _store_adversarial,
    check_adversarial_options,
    normal_codes,
)
from anomalykit.nn.dcgan import DCGANEncoder, _widths, dcgan_depth, from_tanh_range, init_dcgan_weights
from anomalykit.nn.ema import ExponentialMovingAverage
from anomalykit.registry import register_generative
from anomalykit.training.inference import evaluating

BigGANLoss = Literal["hinge", "non_saturating"]
BIGGAN_LOSSES = ("hinge", "non_saturating")


# -- helpers -----------------------------------------------------------------------------------


def truncated_normal_codes(n: int, dim: int, like: Tensor, generator: torch.Generator | None,
                           threshold: float) -> Tensor:
    """(n, dim) N(0, I) codes with every value in [-threshold, threshold] (BigGAN's truncation
    trick): values outside are redrawn until none is left. Drawn on the CPU from ``generator``
    (or the global RNG), then moved to ``like``'s device and dtype, so a seed gives the same
    codes anywhere."""
    if threshold <= 0:
        raise ConfigError(f"truncation must be > 0 or None; got {threshold}")
    z = torch.randn(n, dim, generator=generator)
    outside = z.abs() > threshold
    while outside.any():  # each pass keeps P(|z| <= t) of the redrawn values: few passes
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
        outside = z.abs() > threshold
    return z.to(like.device, like.dtype)


def spectral_normalise(module: nn.Module, *, embeddings: bool = True) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) of every Conv2d, ConvTranspose2d and Linear
    in ``module`` (and nn.Embedding with ``embeddings``), in place; returns ``module``.

    The weight W becomes W / sigma(W), sigma estimated by power iteration on W reshaped to a
    matrix (dim 1 first for transposed convolutions: torch's choice). Apply after initialising
    the weights: the initial scale is then irrelevant.
    """
    kinds: tuple[type, ...] = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    kinds += (nn.Embedding,) if embeddings else ()
    for layer in [m for m in module.modules() if isinstance(m, kinds)]:
        _spectral_norm(layer)
    return module


def spectral_norm_matrix(layer: nn.Module) -> Tensor:
    """The weight of a (spectrally normalised) layer as the matrix the power iteration sees:
    (out, in * k * k) for convolutions and linear maps, the transposed convolution's
    (in, out, k, k) weight with dim 1 first."""
    weight = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` cut into ``parts`` sizes as equal as possible (the larger ones first)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- blocks ------------------------------------------------------------------------------------


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose per-sample gain and bias are linear maps of a condition c (B, cond_dim):
    out = BN(x) * (1 + W_g c) + W_b c (de Vries et al. 2017; BigGAN: c = [class embedding,
    z chunk]). x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.to_gain = nn.Linear(cond_dim, channels, bias=False)
        self.to_bias = nn.Linear(cond_dim, channels, bias=False)
        # Gains start near 1, a plain BN (spectral norm, if applied later, rescales W_g to sigma 1).
        init_dcgan_weights(self.to_gain)
        init_dcgan_weights(self.to_bias)

    def gain_and_bias(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """(B, cond_dim) -> the gains (B, C) (1 + W_g c) and biases (B, C)."""
        return 1.0 + self.to_gain(cond), self.to_bias(cond)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gain, bias = self.gain_and_bias(cond)
        return self.norm(x) * gain[:, :, None, None] + bias[:, :, None, None]


class BigGANGenerator(nn.Module):
    """G(z, y): (B, latent_dim) codes and (B,) int64 classes -> (B, C, S, S) in [-1, 1].

    DCGAN's layout: a linear layer to a 4x4 map, 4x4 stride-2 transposed convolutions doubling
    the side, each followed by a (conditional) BatchNorm and ReLU, a last transposed convolution
    to C channels and tanh. Widths: width * 2^i from the output side, capped at ``max_width``.

    conditional_bn True: z is split into ``num_norms + 1`` chunks (:meth:`conditions`); chunk 0 feeds
    the linear layer, chunk i + 1 and the shared class embedding the i-th conditional BatchNorm.
    False: the linear layer sees [z, embed(y)] and the BatchNorms are plain.
    """

    def __init__(self, image_size: int, latent_dim: int, out_channels: int, num_classes: int, *,
                 embed_dim: int, width: int, max_width: int = 512, conditional_bn: bool = True) -> None:
        super().__init__()
        widths = _widths(dcgan_depth(image_size), width, max_width)[::-1]  # 4x4 first
        self.latent_dim, self.conditional_bn, self.first_width = latent_dim, conditional_bn, widths[0]
        self.num_norms = len(widths)
        if conditional_bn and latent_dim < self.num_norms + 1:
            raise ConfigError(f"latent_dim must be >= {self.num_norms + 1} to give each of G's "
                              f"{self.num_norms} conditional BatchNorms a chunk of z; got {latent_dim}")
        self.z_sizes = split_sizes(latent_dim, self.num_norms + 1) if conditional_bn else [latent_dim]
        self.embed = nn.Embedding(num_classes, embed_dim)  # shared by all the conditional BatchNorms
        in_dim = self.z_sizes[0] if conditional_bn else latent_dim + embed_dim
        self.fc = nn.Linear(in_dim, widths[0] * 16)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)
                                 for c_in, c_out in zip(widths[:-1], widths[1:], strict=True))
        if conditional_bn:
            self.norms = nn.ModuleList(ConditionalBatchNorm2d(c, embed_dim + size)
                                       for c, size in zip(widths, self.z_sizes[1:], strict=True))
        else:
            self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        self.out = nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1)
        # Not the whole module: the conditional BatchNorms have no affine weights to initialise.
        for part in (self.fc, self.ups, self.out, *([] if conditional_bn else [self.norms])):
            init_dcgan_weights(part)

    def conditions(self, z: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(z chunk 0 (B, z_sizes[0]), the conditions [embed(y), z chunk i + 1] (B, embed_dim +
        z_sizes[i + 1]) of the conditional BatchNorms); conditional_bn only."""
        chunks = z.split(self.z_sizes, dim=1)
        e = self.embed(y)
        return chunks[0], [torch.cat([e, chunk], dim=1) for chunk in chunks[1:]]

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        if self.conditional_bn:
            first, conds = self.conditions(z, y)
        else:
            first, conds = torch.cat([z, self.embed(y)], dim=1), [None] * self.num_norms
        h = self.fc(first).reshape(len(z), self.first_width, 4, 4)
        for i, norm in enumerate(self.norms):
            if i > 0:
                h = self.ups[i - 1](h)
            h = F.relu(norm(h, conds[i]) if self.conditional_bn else norm(h))
        return torch.tanh(self.out(h))


class ConcatDiscriminator(nn.Module):
    """D(x, y) without projection: the class as K one-hot channels concatenated to the image
    (the plain conditional GAN's way, Mirza & Osindero 2014), then the DCGAN encoder.

    x: (B, C, S, S) in [-1, 1], y: (B,) int64 -> (B, 1); :meth:`all_classes` -> (B, K).
    """

    def __init__(self, image_size: int, in_channels: int, num_classes: int, *, width: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = DCGANEncoder(image_size, 1, in_channels + num_classes, width=width, norm="none")

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        one_hot = F.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None]
        return self.encoder(torch.cat([x, one_hot.expand(-1, -1, *x.shape[2:])], dim=1))

    def all_classes(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, K): one pass per class (the class changes the input)."""
        return torch.cat([self(x, torch.full((len(x),), k, dtype=torch.long, device=x.device))
                          for k in range(self.num_classes)], dim=1)


# -- the model -----------------------------------------------------------------------------------


@register_generative("biggan")
class BigGAN(ConditionalGAN):
    """Class-conditional DCGAN-sized GAN with BigGAN's ingredients as switches (module docstring).

    Batches carry ``"image"`` (B, C, S, S) in [0, 1] and ``"class"`` (B,) int64 in
    [0, num_classes) (labels may be left out with ``num_classes`` 1), as ``cgan``.

    Args:
        image_size: S, a power of two >= 8 (32 in the benchmark).
        in_channels: C.
        num_classes: K.
        latent_dim: size of z; with ``conditional_bn`` split into one chunk per BatchNorm of G
            plus one for its input (4 chunks at 32 px).
        embed_dim: size of G's shared class embedding.
        width: channels of G's last / D's first layer, doubling per layer.
        conditional_bn / projection / spectral_norm: the ingredients (module docstring).
        loss: "hinge" or "non_saturating".
        n_critic: D steps per G step (BigGAN: 2; 1 here by default, for short runs).
        lr / d_lr: G's and D's Adam learning rates (TTUR: D's 4x G's).
        betas: Adam's betas for both ((0, 0.999) in BigGAN).
        ema_decay: decay of an EMA of G's weights that :meth:`sample` uses; None = no EMA.
        sample_seed / grid_every: the fixed noise of the per-epoch grid and how often it is
            written (with an ``out_dir``).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, num_classes: int = 10,
                 latent_dim: int = 128, *, embed_dim: int = 32, width: int = 64,
                 conditional_bn: bool = True, projection: bool = True, spectral_norm: bool = True,
                 loss: BigGANLoss = "hinge", n_critic: int = 1, lr: float = 2e-4, d_lr: float = 8e-4,
                 betas: list[float] | tuple[float, float] = (0.0, 0.999),
                 ema_decay: float | None = None, sample_seed: int = 0, grid_every: int = 1) -> None:
        # ConditionalGAN's training step, scores and grid are reused; its networks are not:
        # initialise as the common base, and build BigGAN's networks here.
        AdversarialModel.__init__(self)
        check_choice("loss", loss, BIGGAN_LOSSES)
        check_adversarial_options(loss=loss, n_critic=n_critic, gp_weight=0.0, clip=None, lr=lr,
                                  betas=betas, optimizer="adam")
        if d_lr <= 0:
            raise ConfigError(f"d_lr must be > 0; got {d_lr}")
        if num_classes < 1 or embed_dim < 1 or width < 1:
            raise ConfigError(f"num_classes, embed_dim and width must be >= 1; got {num_classes}, "
                              f"{embed_dim}, {width}")
        _store_adversarial(self, loss=loss, n_critic=n_critic, gp_weight=0.0, clip=None, lr=lr,
                           betas=betas, optimizer="adam", sample_seed=sample_seed,
                           grid_every=grid_every)
        self.image_size, self.in_channels = image_size, in_channels
        self.num_classes, self.latent_dim, self.d_lr = num_classes, latent_dim, d_lr
        self.generator = BigGANGenerator(image_size, latent_dim, in_channels, num_classes,
                                         embed_dim=embed_dim, width=width, conditional_bn=conditional_bn)
        if projection:  # Miyato & Koyama's D, no BatchNorm (their D has none either)
            self.discriminator = ProjectionDiscriminator(image_size, in_channels, num_classes,
                                                         width=width, norm="none")
        else:
            self.discriminator = ConcatDiscriminator(image_size, in_channels, num_classes, width=width)
        if spectral_norm:
            spectral_normalise(self.generator, embeddings=False)  # G's shared embedding stays plain
            spectral_normalise(self.discriminator)
        self.ema_decay = ema_decay
        self.generator_ema = (None if ema_decay is None
                              else ExponentialMovingAverage(self.generator, ema_decay))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[G's Adam (lr), D's Adam (d_lr)]: the two time-scale update rule."""
        betas = tuple(self.betas)
        return [torch.optim.Adam(self.generator_parameters(), lr=self.lr, betas=betas),
                torch.optim.Adam(self.discriminator_parameters(), lr=self.d_lr, betas=betas)]

    def on_after_optimizer_step(self, step: int) -> None:
        # adversarial_step steps G on the steps where (step - 1) % n_critic == 0 (step from 1).
        if self.generator_ema is not None and (step - 1) % self.n_critic == 0:
            self.generator_ema.update(self.generator, (step - 1) // self.n_critic + 1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, *,
               classes: Tensor | None = None, truncation: float | None = None) -> Tensor:
        """(n, C, S, S) images in [0, 1] of ``classes`` ((n,) int64; default 0, 1, .., K-1, 0, ..:
        a grid with K columns shows one class per column), z ~ N(0, I) from ``generator``,
        truncated to [-truncation, truncation] when given (None: the training distribution).
        Uses the EMA of G's weights when there is one."""
        like = next(self.parameters())
        z = (normal_codes(n, self.latent_dim, like, generator) if truncation is None
             else truncated_normal_codes(n, self.latent_dim, like, generator, truncation))
        classes = torch.arange(n) % self.num_classes if classes is None else classes.long()
        if classes.shape != (n,):
            raise ConfigError(f"classes must have shape ({n},); got {tuple(classes.shape)}")
        network = self.generator if self.generator_ema is None else self.generator_ema
        with evaluating(self):
            return from_tanh_range(network(z, classes.to(like.device)))

    def _labels(self, batch: dict[str, Any]) -> Tensor:
        if "class" not in batch and self.num_classes > 1:
            raise ConfigError("biggan needs class labels: batches with a 'class' entry, e.g. "
                              "data = {'image': images, 'class': labels}")
        return super()._labels(batch)
