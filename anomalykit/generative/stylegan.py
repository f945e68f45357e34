"""A small StyleGAN trained by progressive growing (Karras et al. 2018 ProGAN, 2019 StyleGAN).

Generator = mapping network + synthesis network:

- mapping: z ~ N(0, I) (B, latent_dim) -> pixel norm -> ``mapping_layers`` equalized linear
  layers (8 in the paper) -> w (B, w_dim) (StyleGAN sec. 2).
- synthesis: a learned constant 4x4 map, then per resolution 4, 8, ..., S two 3x3 style layers
  (:class:`~anomalykit.nn.style.StyledConv`), each modulated by its own w: L = 2 log2(S / 2)
  layers, so ``ws`` is (B, L, w_dim) and style mixing is explicit (layer l takes ws[:, l]).
  Style modulation is StyleGAN2's modulated convolution with demodulation (Karras et al. 2020,
  sec. 2.2) rather than AdaIN: the same per-layer control of feature statistics, without
  AdaIN's droplet artefacts. Each style layer adds per-pixel noise times a learned per-channel
  strength (sec. 3.2). Every resolution has its toRGB (1x1 conv); the output is linear, in
  the [-1, 1] range of the data, clamped to [0, 1] at the API.
- All layers use the equalized learning rate (ProGAN sec. 4.1); the mapping runs at 0.01 x
  the learning rate (StyleGAN sec. C).

Discriminator: the mirror (ProGAN sec. 2): fromRGB per resolution, two 3x3 convs and a 2x
average pool per resolution, then at 4x4 the minibatch standard deviation (ProGAN sec. 3), a
3x3 conv and two linear layers. Loss: the non-saturating logistic loss with the R1 penalty
(r1_gamma / 2) E||grad D(x_real)||^2 (StyleGAN's choice, Mescheder et al. 2018), applied lazily
every ``r1_every`` steps (StyleGAN2 sec. 3.1); any loss of
:data:`~anomalykit.nn.adversarial.ADVERSARIAL_LOSSES` is an option (``wgan_gp``, ProGAN's
choice, adds ``gp_weight`` x the gradient penalty).

Progressive growing onto the toolkit's one loop. The networks hold every resolution's layers
from the start (so one optimiser covers them, and the checkpoint's shapes never change); which
of them run is a function of the model's own step counter ``growth_step_``, a buffer advanced
after every training step (:meth:`on_after_optimizer_step`) and therefore saved with the
weights: a resumed run, a loaded model, or a second ``fit`` continue the growth where it was.
:meth:`growth` maps the counter to (level, alpha): level 0 (4x4) trains ``stable_steps``;
each next level fades in over ``fade_steps`` (alpha 0 -> 1 linearly) and is then stabilised
for ``stable_steps`` (alpha 1); the last level stays. During a fade, G's output is (1 - alpha)
x the 2x nearest-upsampled toRGB of the previous resolution + alpha x the new block's toRGB,
and D's input features are (1 - alpha) x fromRGB of the 2x average-pooled image + alpha x the
new block's output (ProGAN fig. 2); the real images are shown at the current resolution,
faded the same way (as ProGAN's code does), so real and fake stay comparable. Samples at a
lower resolution are nearest-upsampled to ``image_size``, so every output has the full size.
``progressive=False`` trains the full resolution from the first step.

Truncation: w' = w_avg + psi (w - w_avg) (StyleGAN sec. 4), with w_avg an exponential moving
average of the mapped codes during training (buffer ``w_avg_``, decay ``w_avg_decay``).
Style-mixing regularisation (sec. 3.1): with probability ``style_mixing`` (0.9 in the paper)
a training batch takes its styles from two codes, switching at a random layer.

``score(x)`` = -D(x) at the current resolution: a weak anomaly score at best (a GAN has no
likelihood, and the discriminator is trained to separate data from samples, not data from
defects).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError
from anomalykit.generative.gan import (
    AdversarialModel,
    OptimizerName,
    _losses_of,
    _store_adversarial,
    check_adversarial_options,
    normal_codes,
)
from anomalykit.nn.adversarial import (
    AdversarialLoss,
    add_gradient_penalty,
    discriminator_loss,
    generator_loss,
)
from anomalykit.nn.dcgan import from_tanh_range, to_tanh_range
from anomalykit.nn.style import (
    HE_GAIN,
    LEAK,
    EqualConv2d,
    EqualLinear,
    MappingNetwork,
    MinibatchStdDev,
    StyledConv,
)
from anomalykit.registry import register_generative
from anomalykit.training.inference import evaluating

LAYERS_PER_RESOLUTION = 2
BASE = 4  # side of the learned constant


# -- helpers -------------------------------------------------------------------------------


def num_levels(image_size: int) -> int:
    """Resolutions 4, 8, ..., image_size (a power of two >= 4): log2(image_size / 4) + 1."""
    if image_size < BASE or image_size & (image_size - 1):
        raise ConfigError(f"image_size must be a power of two >= 4 for the StyleGAN; got {image_size}")
    return image_size.bit_length() - 2


def growth_schedule(step: int, levels: int, *, fade_steps: int, stable_steps: int) -> tuple[int, float]:
    """ProGAN's schedule: (level, alpha) after ``step`` training steps.

    Level 0 (4x4) trains ``stable_steps``; level k >= 1 fades in over ``fade_steps`` (alpha =
    steps into its fade / fade_steps, from 0 at its first step to 1 at the fade's end), then
    trains ``stable_steps`` at alpha 1; the last level (``levels`` - 1) stays after its fade.
    """
    last = levels - 1
    if step < stable_steps or last == 0:
        return 0, 1.0
    into = step - stable_steps
    level = 1 + into // (fade_steps + stable_steps)
    if level > last:
        return last, 1.0
    into -= (level - 1) * (fade_steps + stable_steps)
    return level, min(1.0, into / fade_steps) if fade_steps else 1.0


def level_widths(levels: int, width: int, max_width: int) -> list[int]:
    """Channels per resolution, 4x4 first: ``width`` at the largest, doubling towards 4x4, capped."""
    return [min(max_width, width * 2 ** (levels - 1 - r)) for r in range(levels)]


def upsample2x(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), nearest (ProGAN's choice; exact for the fade's skip path)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


# -- blocks --------------------------------------------------------------------------------


class SynthesisNetwork(nn.Module):
    """ws (B, L, w_dim) + noise -> (B, C, 4 2^level, 4 2^level) at ``level`` with fade ``alpha``.

    Layer 2r and 2r + 1 are resolution r's two style layers (r = 0: 4x4 on the constant;
    r >= 1: after a 2x bilinear upsample). ``noise``: one (B or 1, 1, H_l, W_l) map per layer
    (at least the layers in use).
    """

    def __init__(self, widths: list[int], w_dim: int, out_channels: int) -> None:
        super().__init__()
        self.const = nn.Parameter(torch.randn(1, widths[0], BASE, BASE))
        self.convs = nn.ModuleList()
        for r, w in enumerate(widths):
            self.convs.append(StyledConv(widths[r - 1] if r else w, w, w_dim))
            self.convs.append(StyledConv(w, w, w_dim))
        self.to_rgb = nn.ModuleList(EqualConv2d(w, out_channels, 1, gain=1.0) for w in widths)

    @property
    def num_layers(self) -> int:
        return len(self.convs)

    def forward(self, ws: Tensor, noise: list[Tensor], level: int, alpha: float = 1.0) -> Tensor:
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        skip = None
        for r in range(level + 1):
            if r:
                if r == level and alpha < 1.0:  # fade-in: the previous resolution's picture
                    skip = upsample2x(self.to_rgb[r - 1](x))
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            for layer in (2 * r, 2 * r + 1):
                x = self.convs[layer](x, ws[:, layer], noise[layer])
        rgb = self.to_rgb[level](x)
        return rgb if skip is None else torch.lerp(skip, rgb, alpha)


class StyleGenerator(nn.Module):
    """The mapping and synthesis networks in one module (one optimiser covers both)."""

    def __init__(self, widths: list[int], latent_dim: int, w_dim: int, out_channels: int, *,
                 mapping_layers: int, mapping_lr_mul: float) -> None:
        super().__init__()
        self.mapping = MappingNetwork(latent_dim, w_dim, mapping_layers, lr_mul=mapping_lr_mul)
        self.synthesis = SynthesisNetwork(widths, w_dim, out_channels)


class ProgressiveDiscriminator(nn.Module):
    """x (B, C, 4 2^level, 4 2^level) -> (B, 1) raw logits at ``level`` with fade ``alpha``."""

    def __init__(self, widths: list[int], in_channels: int, *, group_size: int) -> None:
        super().__init__()
        self.from_rgb = nn.ModuleList(EqualConv2d(in_channels, w, 1) for w in widths)
        # blocks[r - 1]: resolution r -> r - 1 (two convs, then a 2x average pool)
        self.blocks = nn.ModuleList(
            nn.Sequential(EqualConv2d(widths[r], widths[r], 3), nn.LeakyReLU(LEAK),
                          EqualConv2d(widths[r], widths[r - 1], 3), nn.LeakyReLU(LEAK),
                          nn.AvgPool2d(2))
            for r in range(1, len(widths)))
        c = widths[0]
        self.minibatch_std = MinibatchStdDev(group_size)
        self.final_conv = EqualConv2d(c + 1, c, 3)
        self.final_linear = EqualLinear(c * BASE * BASE, c, gain=HE_GAIN)
        self.out = EqualLinear(c, 1)

    def forward(self, x: Tensor, level: int, alpha: float = 1.0) -> Tensor:
        h = F.leaky_relu(self.from_rgb[level](x), LEAK)
        if level:
            h = self.blocks[level - 1](h)
            if alpha < 1.0:  # fade-in: the previous resolution's entry point
                skip = F.leaky_relu(self.from_rgb[level - 1](F.avg_pool2d(x, 2)), LEAK)
                h = torch.lerp(skip, h, alpha)
            for r in range(level - 1, 0, -1):
                h = self.blocks[r - 1](h)
        h = F.leaky_relu(self.final_conv(self.minibatch_std(h)), LEAK)
        return self.out(F.leaky_relu(self.final_linear(h.flatten(1)), LEAK))


# -- the model -----------------------------------------------------------------------------


@register_generative("stylegan")
class StyleGAN(AdversarialModel):
    """Small StyleGAN with progressive growing on (B, C, S, S) images in [0, 1] (see module doc).

    Args:
        image_size: S, a power of two >= 4 (resolutions 4, 8, ..., S).
        in_channels: C.
        latent_dim: size of z (512 in the paper).
        w_dim: size of w (512 in the paper).
        mapping_layers / mapping_lr_mul: depth of the mapping MLP (8) and its learning-rate
            multiplier (0.01).
        width / max_width: channels at resolution S, doubling towards 4x4, capped at max_width
            (both networks).
        progressive: grow 4x4 -> S (ProGAN); False trains S from the first step.
        fade_steps / stable_steps: training steps of each fade-in and of each stabilisation.
        style_mixing: probability of a mixed-style training batch (0.9 in the paper; 0 = off).
        w_avg_decay: decay of the moving average of w used by the truncation trick.
        r1_gamma: weight gamma of the R1 penalty (gamma / 2) E||grad D(x)||^2 (0 = off).
        r1_every: lazy regularisation (StyleGAN2 sec. 3.1): the penalty only every this many
            steps, weighted by it (16 in StyleGAN2; 1 = every step). The penalty's double
            backward costs about a third of a step.
        minibatch_group: group size of the minibatch standard deviation (4).
        loss / n_critic / gp_weight: as the GAN suite's (:class:`~anomalykit.generative.gan.DCGAN`).
        lr / betas / optimizer: both players' optimiser (Adam 2e-3, betas (0, 0.99) in StyleGAN).
        sample_seed / grid_every: the fixed noise of the per-epoch sample grid, and how often
            it is written (with an ``out_dir``).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, latent_dim: int = 128, *,
                 w_dim: int = 128, mapping_layers: int = 4, mapping_lr_mul: float = 0.01,
                 width: int = 32, max_width: int = 128, progressive: bool = True,
                 fade_steps: int = 500, stable_steps: int = 500, style_mixing: float = 0.9,
                 w_avg_decay: float = 0.995, r1_gamma: float = 1.0, r1_every: int = 16,
                 minibatch_group: int = 4,
                 loss: AdversarialLoss = "non_saturating", n_critic: int = 1,
                 gp_weight: float = 10.0, lr: float = 2e-3,
                 betas: list[float] | tuple[float, float] = (0.0, 0.99),
                 optimizer: OptimizerName = "adam", sample_seed: int = 0,
                 grid_every: int = 1) -> None:
        super().__init__()
        check_adversarial_options(loss=loss, n_critic=n_critic, gp_weight=gp_weight, clip=None,
                                  lr=lr, betas=betas, optimizer=optimizer)
        levels = num_levels(image_size)
        for name, value in (("in_channels", in_channels), ("latent_dim", latent_dim),
                            ("w_dim", w_dim), ("mapping_layers", mapping_layers), ("width", width),
                            ("r1_every", r1_every), ("minibatch_group", minibatch_group)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1; got {value}")
        if max_width < width:
            raise ConfigError(f"max_width must be >= width ({width}); got {max_width}")
        if fade_steps < 0 or stable_steps < 0 or fade_steps + stable_steps < 1:
            raise ConfigError(f"fade_steps and stable_steps must be >= 0 with a positive sum; got "
                              f"{fade_steps}, {stable_steps}")
        if not 0.0 <= style_mixing <= 1.0:
            raise ConfigError(f"style_mixing must be a probability in [0, 1]; got {style_mixing}")
        if not 0.0 <= w_avg_decay < 1.0:
            raise ConfigError(f"w_avg_decay must be in [0, 1); got {w_avg_decay}")
        if r1_gamma < 0 or mapping_lr_mul <= 0:
            raise ConfigError(f"r1_gamma must be >= 0 and mapping_lr_mul > 0; got {r1_gamma}, "
                              f"{mapping_lr_mul}")
        _store_adversarial(self, loss=loss, n_critic=n_critic, gp_weight=gp_weight, clip=None,
                           lr=lr, betas=betas, optimizer=optimizer, sample_seed=sample_seed,
                           grid_every=grid_every)
        self.image_size, self.in_channels = image_size, in_channels
        self.latent_dim, self.w_dim, self.levels = latent_dim, w_dim, levels
        self.progressive, self.fade_steps, self.stable_steps = progressive, fade_steps, stable_steps
        self.style_mixing, self.w_avg_decay = style_mixing, w_avg_decay
        self.r1_gamma, self.r1_every = r1_gamma, r1_every
        widths = level_widths(levels, width, max_width)
        self.generator = StyleGenerator(widths, latent_dim, w_dim, in_channels,
                                        mapping_layers=mapping_layers, mapping_lr_mul=mapping_lr_mul)
        self.discriminator = ProgressiveDiscriminator(widths, in_channels, group_size=minibatch_group)
        self.register_buffer("w_avg_", torch.zeros(w_dim))
        self.register_buffer("growth_step_", torch.zeros((), dtype=torch.long))

    # -- growth --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L: style layers (two per resolution); ``ws`` are (B, L, w_dim)."""
        return self.generator.synthesis.num_layers

    def growth(self, step: int | None = None) -> tuple[int, float]:
        """(level, alpha) after ``step`` training steps (default: ``growth_step_``); level r
        means resolution 4 2^r."""
        if not self.progressive:
            return self.levels - 1, 1.0
        step = int(self.growth_step_) if step is None else step
        return growth_schedule(step, self.levels, fade_steps=self.fade_steps,
                               stable_steps=self.stable_steps)

    @property
    def resolution(self) -> int:
        """The side the networks work at now (``image_size`` once grown)."""
        return BASE * 2 ** self.growth()[0]

    def on_after_optimizer_step(self, step: int) -> None:
        self.growth_step_ += 1

    def real_at(self, images: Tensor, level: int, alpha: float = 1.0) -> Tensor:
        """(B, C, S, S) -> (B, C, R, R) at level's resolution R by average pooling, faded like
        G's output: (1 - alpha) x the 2x-upsampled half-resolution image + alpha x the image."""
        x = F.adaptive_avg_pool2d(images, BASE * 2 ** level)
        if level and alpha < 1.0:
            x = torch.lerp(upsample2x(F.avg_pool2d(x, 2)), x, alpha)
        return x

    # -- styles ------------------------------------------------------------------------------
    def mapping(self, z: Tensor) -> Tensor:
        """z (B, latent_dim) -> w (B, w_dim)."""
        return self.generator.mapping(z)

    def broadcast(self, w: Tensor) -> Tensor:
        """w (B, w_dim) -> ws (B, L, w_dim): the same style for every layer."""
        return w[:, None].expand(-1, self.num_layers, -1)

    def truncate(self, w: Tensor, psi: float) -> Tensor:
        """w' = w_avg + psi (w - w_avg) (StyleGAN sec. 4); any shape ending in w_dim."""
        return torch.lerp(self.w_avg_.to(w), w, psi) if psi != 1.0 else w

    def mixed_ws(self, w1: Tensor, w2: Tensor, crossover_layer: int) -> Tensor:
        """(B, L, w_dim): layers < ``crossover_layer`` take w1 (B, w_dim), the rest w2
        (0: all w2; L: all w1)."""
        if not 0 <= crossover_layer <= self.num_layers:
            raise ConfigError(f"crossover_layer must be in [0, {self.num_layers}]; got {crossover_layer}")
        first = torch.arange(self.num_layers, device=w1.device) < crossover_layer
        return torch.where(first[None, :, None], w1[:, None], w2[:, None])

    def make_noise(self, n: int, *, generator: torch.Generator | None = None) -> list[Tensor]:
        """One (n, 1, H_l, W_l) N(0, 1) map per style layer, drawn from ``generator`` (CPU) or
        the global RNG. Maps of batch size 1 are shared by a whole batch."""
        like = self._like()
        sizes = [BASE * 2 ** (layer // LAYERS_PER_RESOLUTION) for layer in range(self.num_layers)]
        return [torch.randn(n, 1, s, s, generator=generator, dtype=like.dtype).to(like.device)
                for s in sizes]

    def _like(self) -> Tensor:
        """A parameter: the device and dtype new codes and noise take."""
        return self.generator.synthesis.const

    # -- generation (images in [0, 1] at image_size) -----------------------------------------
    @torch.no_grad()
    def synthesize(self, ws: Tensor, *, noise: list[Tensor] | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
        """ws (B, L, w_dim) -> (B, C, S, S) images in [0, 1] at the current growth; ``noise`` as
        :meth:`make_noise` (default: drawn from ``generator``)."""
        if ws.dim() != 3 or ws.shape[1:] != (self.num_layers, self.w_dim):
            raise ConfigError(f"ws must be (B, {self.num_layers}, {self.w_dim}); got {tuple(ws.shape)}")
        noise = self.make_noise(len(ws), generator=generator) if noise is None else noise
        level, alpha = self.growth()
        with evaluating(self):
            images = self.generator.synthesis(ws, noise, level, alpha)
        scale = self.image_size // images.shape[-1]
        if scale > 1:
            images = F.interpolate(images, scale_factor=scale, mode="nearest")
        return from_tanh_range(images)

    @torch.no_grad()
    def generate(self, z: Tensor, *, truncation_psi: float = 1.0, noise: list[Tensor] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """z (B, latent_dim) -> (B, C, S, S) images in [0, 1], one style for every layer."""
        return self.synthesize(self.broadcast(self.truncate(self.mapping(z), truncation_psi)),
                               noise=noise, generator=generator)

    @torch.no_grad()
    def mix(self, z1: Tensor, z2: Tensor, crossover_layer: int, *, truncation_psi: float = 1.0,
            noise: list[Tensor] | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Style mixing (StyleGAN sec. 3.1): layers < ``crossover_layer`` styled by z1, the rest
        by z2 (both (B, latent_dim)) -> (B, C, S, S) in [0, 1]."""
        w1, w2 = (self.truncate(self.mapping(z), truncation_psi) for z in (z1, z2))
        return self.synthesize(self.mixed_ws(w1, w2, crossover_layer), noise=noise, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, *,
               truncation_psi: float = 1.0, mixing: int | None = None) -> Tensor:
        """(n, C, S, S) images in [0, 1] from z ~ N(0, I) drawn from ``generator`` (then the
        noise maps); ``mixing``: a crossover layer, with a second code drawn for the layers
        from it on."""
        z = normal_codes(n, self.latent_dim, self._like(), generator)
        if mixing is None:
            return self.generate(z, truncation_psi=truncation_psi, generator=generator)
        z2 = normal_codes(n, self.latent_dim, self._like(), generator)
        return self.mix(z, z2, mixing, truncation_psi=truncation_psi, generator=generator)

    @torch.no_grad()
    def style_mixing_grid(self, crossover_layer: int, *, rows: int = 5, cols: int = 6,
                          truncation_psi: float = 1.0, seed: int = 0) -> np.ndarray:
        """(H, W, 3) uint8 picture as StyleGAN's fig. 3: the first row shows sources B, the first
        column sources A, cell (i, j) = mix(A_i, B_j, ``crossover_layer``): layers before it
        from A, the rest from B. One noise draw is shared by every image (styles alone differ)."""
        from anomalykit.data.io import image_grid

        generator = torch.Generator().manual_seed(seed)
        like = self._like()
        z_a = normal_codes(rows, self.latent_dim, like, generator)
        z_b = normal_codes(cols, self.latent_dim, like, generator)
        noise = self.make_noise(1, generator=generator)
        kw = {"truncation_psi": truncation_psi, "noise": noise}
        blank = torch.ones(1, self.in_channels, self.image_size, self.image_size, device=like.device)
        top = torch.cat([blank, self.generate(z_b, **kw)])
        cells = [top]
        for i in range(rows):
            a = z_a[i:i + 1].expand(cols, -1)
            cells += [self.generate(z_a[i:i + 1], **kw), self.mix(a, z_b, crossover_layer, **kw)]
        return image_grid(torch.cat(cells), nrow=cols + 1)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """(B,) -D(x) for images (B, C, S, S) in [0, 1], at the current resolution: higher = the
        discriminator finds x less like the training images (weak; see the module doc)."""
        level, alpha = self.growth()
        with evaluating(self):
            return -self.discriminator(self.real_at(to_tanh_range(x), level, alpha), level, alpha).reshape(-1)

    # -- training ----------------------------------------------------------------------------
    def _training_ws(self, n: int, level: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(ws (n, L, w_dim), the first code's w (n, w_dim)); with probability ``style_mixing`` a
        second code styles the layers from a random crossover among the layers in use."""
        w = self.mapping(normal_codes(n, self.latent_dim, like, None))
        used = LAYERS_PER_RESOLUTION * (level + 1)
        if float(torch.rand(())) < self.style_mixing:
            crossover = int(torch.randint(1, used, ()))
            w2 = self.mapping(normal_codes(n, self.latent_dim, like, None))
            return self.mixed_ws(w, w2, crossover), w
        return self.broadcast(w), w

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """One discriminator step (+ R1 every ``r1_every`` steps, or the gradient penalty) and,
        every ``n_critic``-th step, one generator step, both at the current (level, alpha); the
        generator step also moves w_avg."""
        opt_g, opt_d = optimizers
        level, alpha = self.growth()
        real = self.real_at(to_tanh_range(batch["image"]), level, alpha)
        ws, w = self._training_ws(len(real), level, real)
        fake = self.generator.synthesis(ws, self.make_noise(len(real)), level, alpha)

        def critic(x: Tensor) -> Tensor:
            return self.discriminator(x, level, alpha)

        lazy_r1 = self.r1_gamma > 0 and self.global_step % self.r1_every == 0
        real.requires_grad_(lazy_r1)
        d_real, d_fake = critic(real), critic(fake.detach())
        d_loss = discriminator_loss(d_real, d_fake, self.loss)
        logs: dict[str, Tensor] = {}
        if lazy_r1:  # R1 (Mescheder et al. 2018, eq. 9): gradient on real data only
            (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            d_loss = d_loss + 0.5 * self.r1_gamma * self.r1_every * r1
            logs["r1"] = r1.detach()
        d_loss, gp_logs = add_gradient_penalty(d_loss, loss=self.loss, critic=critic, real=real,
                                               fake=fake, gp_weight=self.gp_weight)
        logs.update(gp_logs)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if self.global_step % self.n_critic == 0:
            g_loss = generator_loss(critic(fake), self.loss)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            with torch.no_grad():
                self.w_avg_.lerp_(w.detach().mean(0), 1.0 - self.w_avg_decay)
        else:
            with torch.no_grad():
                g_loss = generator_loss(d_fake, self.loss)
        self.monitor.update(d_loss.detach(), real.detach(), fake.detach())
        return {"loss": d_loss.detach() + g_loss.detach(), "d_loss": d_loss.detach(),
                "g_loss": g_loss.detach(), "d_real": d_real.detach().mean(),
                "d_fake": d_fake.detach().mean(), **logs,
                "resolution": torch.tensor(float(BASE * 2 ** level)), "alpha": torch.tensor(alpha)}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        level, alpha = self.growth()
        real = self.real_at(to_tanh_range(batch["image"]), level, alpha)
        w = self.mapping(normal_codes(len(real), self.latent_dim, real, None))
        fake = self.generator.synthesis(self.broadcast(w), self.make_noise(len(real)), level, alpha)
        return _losses_of(self.discriminator(real, level, alpha), self.discriminator(fake, level, alpha),
                          self.loss)
