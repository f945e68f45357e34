"""SinGAN (Shaham et al. 2019): a pyramid of small patch GANs learnt from ONE image.

The image is seen at ``N`` scales x_0 (coarsest, about ``min_size`` px on its short side) ...
x_{N-1} (the image), each ``scale_factor`` (r ~ 0.75) times the next finer one. Scale n has
its own fully convolutional generator G_n and patch critic D_n (5 conv blocks 3x3, ``width``
channels doubling every 4 scales up to ``max_width``; paper sec. 2.1, fig. 4):

    x~_0 = G_0(z_0),   x~_n = up(x~_{n-1}) + G_n(sigma_n z_n + up(x~_{n-1}))    (paper eq. 1-2)

(G_n adds a residual to the upsampled coarser image, tanh-bounded). The scales are trained
coarse to fine, one at a time, the coarser ones frozen (sec. 2.2). Scale n's loss:

- adversarial: WGAN-GP with gradient-penalty weight 0.1 (``loss``, ``gp_weight``), the critic
  judging every overlapping 11x11 patch (its receptive field) of x~_n against those of x_n;
- reconstruction, weight alpha = 10 (``rec_weight``): a fixed noise map z* at the coarsest
  scale and z = 0 at all finer ones must reproduce the image:
  || G_n(up(x^rec_{n-1})) + up(x^rec_{n-1}) - x_n ||^2  (eq. 5), which also sets the noise
  amplitude sigma_n = ``noise_amp`` x RMSE(up(x^rec_{n-1}), x_n) (sigma_0 = 1): a scale whose
  input already looks like the image gets little noise, so finer scales add detail, not
  layout.

How it fits the toolkit's one loop. ``fit`` takes training data like any model; SinGAN keeps
the FIRST image (with a warning when there are more: train one model per image) and resizes it
to ``image_size``. One ``training_step`` is one of the paper's iterations (``d_steps`` critic
updates, then ``g_steps`` generator updates, fresh noise each) at the current scale,
``global_step // steps_per_scale`` (capped at the finest), so an epoch of the loop is one
scale: :meth:`setup_fit` hands the loop ``steps_per_scale x batch_size`` copies of the image,
and **``epochs = model.num_scales`` trains the whole pyramid** (more epochs keep training the
finest scale; fewer leave the finer scales untrained, with a warning). A batch of B copies
trains with B independent noise maps at once (the paper: B = 1). Resume works: the scale and
its learning-rate step come from ``global_step`` and ``trained_steps_``. Each scale's first
step copies the next coarser scale's weights when the widths match (the authors' code) and
sets sigma_n. With an ``out_dir`` each epoch (= scale) writes a grid of the image, its
reconstruction and samples at the scale just trained to ``out_dir/samples/epoch_XXX.png``.

Implementation choices (documented departures from the authors' code): zero padding inside
every conv instead of padding the input once; 3-channel noise at every scale (the code uses
1-channel noise expanded to RGB at the coarsest); the critic has no BatchNorm (WGAN-GP's
penalty is per sample; the suite refuses BatchNorm in a WGAN-GP critic); the previous scales
run in eval mode (their BatchNorm running statistics frozen with their weights).

Use:
    model = SinGAN(image_size=64, steps_per_scale=300)
    model.fit(image[None], epochs=model.num_scales, batch_size=1)  # image (3, H, W) in [0, 1]
    variations = model.sample(16)                   # (16, 3, 64, 64), new arrangements
    wide = model.sample(4, size=(64, 128))          # another aspect ratio: a larger coarsest map
    recon = model.reconstruct()                     # the z* path: (1, 3, 64, 64) ~ the image
    harmonised = model.reconstruct(x, start_scale=2)  # x's layout, the image's texture
or :func:`variations` (one call: fit on an image, return n samples).

``score(x)``: the finest critic's verdict, negated and averaged over its patches: higher = the
patches of x look less like those of the training image (a weak, texture-only anomaly score;
:meth:`score_map` gives the per-patch map).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from anomalykit.errors import ConfigError
from anomalykit.generative.gan import AdversarialModel, check_adversarial_options
from anomalykit.nn.adversarial import (
    AdversarialLoss,
    add_gradient_penalty,
    discriminator_loss,
    generator_loss,
)
from anomalykit.nn.dcgan import from_tanh_range, to_tanh_range
from anomalykit.nn.image_to_image import I2INorm, image_norm, init_normal
from anomalykit.registry import register_generative
from anomalykit.training.inference import as_loader, evaluating

Size = tuple[int, int]
CONVS = 5  # conv layers per generator / critic (paper sec. 2.1)


# -- helpers ----------------------------------------------------------------------------------
def pyramid_sizes(size: Sequence[int], *, min_size: int, scale_factor: float) -> list[Size]:
    """(H, W) of every scale, coarsest first, the last one ``size`` itself.

    N = ceil(log(min_size / min(H, W)) / log(scale_factor)) + 1 scales (1 when the short side is
    already <= ``min_size``); the factor actually used is then adjusted so that the coarsest
    short side is ``min_size`` (the authors' code does the same). E.g. 64 px, min_size 25,
    r = 0.75: 5 scales of 25, 32, 40, 51, 64 px.
    """
    h, w = int(size[0]), int(size[1])
    short = min(h, w)
    if short <= min_size:
        return [(h, w)]
    n = math.ceil(math.log(min_size / short) / math.log(scale_factor) - 1e-9) + 1
    factor = (min_size / short) ** (1.0 / (n - 1))
    return [(max(1, round(h * factor ** (n - 1 - i))), max(1, round(w * factor ** (n - 1 - i))))
            for i in range(n)]


def resize(images: Tensor, size: Sequence[int]) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear with antialiasing when shrinking; as is when equal."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=True)


class _RepeatedImage(Dataset):
    """One (C, H, W) image, ``length`` times: an epoch of the loop = a fixed number of steps."""

    def __init__(self, image: Tensor, length: int) -> None:
        self.image, self.length = image, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.image}


# -- blocks ----------------------------------------------------------------------------------
def _conv_stack(in_channels: int, width: int, out_channels: int, norm: str) -> nn.Sequential:
    """CONVS 3x3 convs (zero padding, size kept): 4 x (conv - norm - LeakyReLU 0.2), then a
    plain conv to ``out_channels``."""
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(CONVS - 1):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"),
                   image_norm(norm, width), nn.LeakyReLU(0.2, inplace=True)]
        channels = width
    layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ScaleGenerator(nn.Module):
    """G_n: (noisy input (B, C, h, w), previous output (B, C, h, w)) -> previous + tanh(net(input)).

    The input is sigma_n z + up(x~_{n-1}) (just z at the coarsest scale, where the previous
    output is 0), so the network only adds the detail this scale is responsible for.
    """

    def __init__(self, channels: int = 3, width: int = 32, *, norm: I2INorm = "batch") -> None:
        super().__init__()
        self.net = _conv_stack(channels, width, channels, norm)
        init_normal(self)

    def forward(self, noisy: Tensor, previous: Tensor) -> Tensor:
        return previous + torch.tanh(self.net(noisy))


class PatchCritic(nn.Module):
    """D_n: (B, C, h, w) -> (B, 1, h, w) critic values, one per 11x11 patch; ``norm`` as the
    generators' ("none" by default, see :class:`SinGAN`'s ``d_norm``)."""

    def __init__(self, channels: int = 3, width: int = 32, *, norm: I2INorm = "none") -> None:
        super().__init__()
        self.net = _conv_stack(channels, width, 1, norm)
        init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# -- the model -------------------------------------------------------------------------------
@register_generative("singan")
class SinGAN(AdversarialModel):
    """SinGAN on one (C, H, W) image in [0, 1]; see the module docstring for the training scheme.

    Args:
        image_size: the training (finest) size, an int (square) or [H, W]; the training image
            is resized to it.
        in_channels: C.
        min_size: short side of the coarsest scale (25 in the paper, for 250-px images).
        scale_factor: r, the size ratio between neighbouring scales (0.75), adjusted so the
            coarsest is exactly ``min_size`` (see :func:`pyramid_sizes`).
        width / max_width: channels of the coarsest scales' networks (32) and the cap (128);
            the width doubles every 4 scales.
        norm: the generators' normalisation, "batch" (the paper), "instance" or "none".
        d_norm: the critics' ("none"; the authors' code has BatchNorm there too, which at
            SinGAN's batch of one image normalises per image, so the per-sample gradient
            penalty stays well defined). Not benchmarked beyond one exploratory run (see
            benchmarks/results/singan/results.md): the default stays "none".
        steps_per_scale: training iterations per scale (2000 in the paper) = steps of the loop
            per epoch.
        d_steps / g_steps: critic and generator updates per iteration (3 and 3).
        loss / gp_weight: adversarial loss (WGAN-GP) and the gradient-penalty weight (0.1).
        rec_weight: alpha, the weight of the reconstruction loss (10).
        noise_amp: sigma_n / RMSE of the reconstruction at scale n's input (0.1).
        lr / betas: Adam's, both players (5e-4, (0.5, 0.999)).
        lr_decay_at / lr_decay: the learning rate is multiplied by ``lr_decay`` (0.1) after
            this fraction (0.8) of a scale's iterations (the authors' 1600 of 2000).
        init_from_previous: start each scale from the next coarser scale's weights when the
            widths match (the authors' code).
        sample_seed / grid_every: the fixed noise of the per-epoch (= per-scale) grid, and how
            often it is written (with an ``out_dir``).

    Buffers (learned state, saved): ``image_`` (1, C, H, W) the training image in [0, 1],
    ``z_rec_`` (1, C, h_0, w_0) the fixed noise z*, ``noise_amp_`` (N,) sigma_n,
    ``trained_steps_`` (N,) iterations done per scale.
    """

    def __init__(self, image_size: int | list[int] | tuple[int, int] = 64, in_channels: int = 3, *,
                 min_size: int = 25, scale_factor: float = 0.75, width: int = 32,
                 max_width: int = 128, norm: I2INorm = "batch", d_norm: I2INorm = "none",
                 steps_per_scale: int = 2000,
                 d_steps: int = 3, g_steps: int = 3, loss: AdversarialLoss = "wgan_gp",
                 gp_weight: float = 0.1, rec_weight: float = 10.0, noise_amp: float = 0.1,
                 lr: float = 5e-4, betas: list[float] | tuple[float, float] = (0.5, 0.999),
                 lr_decay_at: float = 0.8, lr_decay: float = 0.1, init_from_previous: bool = True,
                 sample_seed: int = 0, grid_every: int = 1) -> None:
        super().__init__()
        check_adversarial_options(loss=loss, n_critic=d_steps, gp_weight=gp_weight, clip=None,
                                  lr=lr, betas=betas, optimizer="adam")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"image_size must be a side or [H, W] >= 1; got {image_size!r}")
        if min_size < 3:
            raise ConfigError(f"min_size must be >= 3 px; got {min_size}")
        if not 0.0 < scale_factor < 1.0:
            raise ConfigError(f"scale_factor must be in (0, 1); got {scale_factor}")
        if width < 1 or max_width < width:
            raise ConfigError(f"need 1 <= width <= max_width; got width {width}, max_width "
                              f"{max_width}")
        for name, value in (("steps_per_scale", steps_per_scale), ("g_steps", g_steps),
                            ("grid_every", grid_every), ("in_channels", in_channels)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1; got {value}")
        if rec_weight < 0 or noise_amp < 0:
            raise ConfigError(f"rec_weight and noise_amp must be >= 0; got {rec_weight}, "
                              f"{noise_amp}")
        if not 0.0 < lr_decay_at <= 1.0 or not 0.0 < lr_decay <= 1.0:
            raise ConfigError(f"lr_decay_at and lr_decay must be in (0, 1]; got {lr_decay_at}, "
                              f"{lr_decay}")
        self.image_size, self.in_channels = (int(size[0]), int(size[1])), in_channels
        self.min_size, self.scale_factor = min_size, scale_factor
        self.sizes = pyramid_sizes(self.image_size, min_size=min_size, scale_factor=scale_factor)
        self.widths = [min(width * 2 ** (n // 4), max_width) for n in range(self.num_scales)]
        self.steps_per_scale, self.d_steps, self.g_steps = steps_per_scale, d_steps, g_steps
        self.loss, self.gp_weight, self.rec_weight = loss, gp_weight, rec_weight
        self.noise_amp, self.lr, self.betas, self.optimizer = noise_amp, lr, tuple(betas), "adam"
        self.lr_decay_at, self.lr_decay = lr_decay_at, lr_decay
        self.init_from_previous = init_from_previous
        self.sample_seed, self.grid_every = sample_seed, grid_every
        self.generators = nn.ModuleList(ScaleGenerator(in_channels, w, norm=norm)
                                        for w in self.widths)
        self.critics = nn.ModuleList(PatchCritic(in_channels, w, norm=d_norm) for w in self.widths)
        self.register_buffer("image_", torch.zeros(1, in_channels, *self.image_size))
        self.register_buffer("z_rec_", torch.zeros(1, in_channels, *self.sizes[0]))
        self.register_buffer("noise_amp_", torch.zeros(self.num_scales))
        self.register_buffer("trained_steps_", torch.zeros(self.num_scales, dtype=torch.long))

    # -- the pyramid ---------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        """N: scales of the pyramid; ``epochs=num_scales`` trains them all."""
        return len(self.sizes)

    @property
    def current_scale(self) -> int:
        """The scale the next training step trains: ``global_step // steps_per_scale``, capped."""
        return min(self.global_step // self.steps_per_scale, self.num_scales - 1)

    def sizes_for(self, size: Sequence[int] | None = None) -> list[Size]:
        """(H, W) per scale for an output of ``size`` (default the training size), with the
        training pyramid's factor: another size or aspect ratio changes every scale's noise map
        (a wider coarsest map = more objects side by side, paper sec. 4)."""
        if size is None:
            return list(self.sizes)
        h, w = int(size[0]), int(size[1])
        ratios = [(sh / self.image_size[0], sw / self.image_size[1]) for sh, sw in self.sizes]
        return [(max(1, round(h * rh)), max(1, round(w * rw))) for rh, rw in ratios]

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generators.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.critics.parameters())

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[G_0's, D_0's, G_1's, D_1's, ...]: Adam per network; only the current scale's step."""
        optimizers = []
        for g, d in zip(self.generators, self.critics, strict=True):
            optimizers += [torch.optim.Adam(g.parameters(), lr=self.lr, betas=self.betas),
                           torch.optim.Adam(d.parameters(), lr=self.lr, betas=self.betas)]
        return optimizers

    def _run(self, noises: Sequence[Tensor | None], sizes: Sequence[Size], *, start: int = 0,
             previous: Tensor | None = None) -> Tensor:
        """Scales ``start`` .. ``start + len(noises) - 1``: each upsamples the previous output to
        its size and adds G_n(sigma_n z_n + previous). ``noises``: (B, C, h_n, w_n) unit-variance
        maps (None: z = 0); ``previous``: the image fed to scale ``start`` (None: zeros).
        Returns the last scale's output (B, C, h, w) in about [-1, 1]."""
        like = next(z for z in [*noises, previous, self.z_rec_] if z is not None)
        x = previous if previous is not None else torch.zeros(
            like.shape[0], self.in_channels, *sizes[start], device=like.device, dtype=like.dtype)
        for n, z in enumerate(noises, start=start):
            x = resize(x, sizes[n])
            noisy = x if z is None else x + self.noise_amp_[n] * z
            x = self.generators[n](noisy, x)
        return x

    def _noises(self, n: int, sizes: Sequence[Size], generator: torch.Generator | None,
                ) -> list[Tensor]:
        """One (n, C, h, w) N(0, 1) map per scale of ``sizes``, in order, from ``generator``
        (a CPU generator works on any device; None: the global RNG)."""
        like = self.z_rec_
        return [torch.randn(n, self.in_channels, *s, generator=generator,
                            dtype=like.dtype).to(like.device) for s in sizes]

    def _rec_noises(self, scales: int) -> list[Tensor | None]:
        """The reconstruction path's noise: z* at the coarsest scale, z = 0 above (eq. 5)."""
        return [self.z_rec_, *([None] * (scales - 1))]

    # -- training --------------------------------------------------------------------------
    def setup_fit(self, train_data, val_data, *, batch_size: int, num_workers: int = 0,
                  **options: Any):
        """Keep the first training image (resized to ``image_size``) in ``image_`` and hand the
        loop ``steps_per_scale x batch_size`` copies of it: one epoch = one scale."""
        loader = as_loader(train_data, batch_size=1)
        count = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
        first = next(iter(loader), None)
        if first is None:
            raise ConfigError("SinGAN needs a training image; the training data is empty")
        if count is None or count > 1:
            warnings.warn(f"SinGAN learns from ONE image: training on the first of the "
                          f"{count or 'several'} training images (fit one model per image)",
                          UserWarning, stacklevel=2)
        image = first["image"][:1].to(self.image_.device, self.image_.dtype)
        if image.shape[1] != self.in_channels:
            raise ConfigError(f"SinGAN was built for {self.in_channels}-channel images; got "
                              f"{image.shape[1]} channels")
        self.image_.copy_(resize(image, self.image_size).clamp(0.0, 1.0))
        super().setup_fit(train_data, val_data, **options)
        return _RepeatedImage(self.image_[0].cpu(), self.steps_per_scale * batch_size), val_data

    @torch.no_grad()
    def _start_scale(self, n: int, real: Tensor) -> None:
        """First step of scale n: z* (coarsest) or the coarser weights, and sigma_n."""
        if n == 0:
            self.z_rec_.copy_(torch.randn_like(self.z_rec_))
            self.noise_amp_[0] = 1.0
            return
        if self.init_from_previous and self.widths[n] == self.widths[n - 1]:
            self.generators[n].load_state_dict(self.generators[n - 1].state_dict())
            self.critics[n].load_state_dict(self.critics[n - 1].state_dict())
        self.noise_amp_[n] = self.noise_amp * F.mse_loss(self._rec_input(n), real[:1]).sqrt()

    @torch.no_grad()
    def _random_input(self, n: int, batch: int) -> Tensor:
        """Scale n's input on a random path through the frozen coarser scales, upsampled to
        scale n: (batch, C, h_n, w_n); zeros at the coarsest scale."""
        if n == 0:
            return torch.zeros(batch, self.in_channels, *self.sizes[0], device=self.z_rec_.device)
        return resize(self._run(self._noises(batch, self.sizes[:n], None), self.sizes),
                      self.sizes[n])

    @torch.no_grad()
    def _rec_input(self, n: int) -> Tensor:
        """Scale n's input on the reconstruction path, upsampled: (1, C, h_n, w_n)."""
        if n == 0:
            return torch.zeros_like(self.z_rec_)
        return resize(self._run(self._rec_noises(n), self.sizes), self.sizes[n])

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """One iteration at the current scale: ``d_steps`` critic updates (WGAN-GP), then
        ``g_steps`` generator updates (adversarial + ``rec_weight`` x reconstruction)."""
        n = self.current_scale
        real = resize(to_tanh_range(batch["image"]), self.sizes[n])
        b = len(real)
        for frozen in self.generators[:n]:
            frozen.eval()  # BatchNorm's running statistics are frozen with the weights
        if int(self.trained_steps_[n]) == 0:
            self._start_scale(n, real)
        opt_g, opt_d = optimizers[2 * n], optimizers[2 * n + 1]
        decayed = self.trained_steps_[n] >= self.lr_decay_at * self.steps_per_scale
        for optimizer in (opt_g, opt_d):
            for group in optimizer.param_groups:
                group["lr"] = self.lr * (self.lr_decay if decayed else 1.0)
        generator, critic = self.generators[n], self.critics[n]
        sigma = self.noise_amp_[n]

        def fake_batch() -> Tensor:
            previous = self._random_input(n, b)
            return generator(previous + sigma * torch.randn_like(previous), previous)

        logs: dict[str, Tensor] = {}
        for _ in range(self.d_steps):
            fake = fake_batch()
            d_real, d_fake = critic(real), critic(fake.detach())
            d_loss = discriminator_loss(d_real.mean((1, 2, 3)), d_fake.mean((1, 2, 3)), self.loss)
            d_loss, gp_logs = add_gradient_penalty(d_loss, loss=self.loss, critic=critic,
                                                   real=real, fake=fake, gp_weight=self.gp_weight)
            logs.update(gp_logs)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        rec_input = self._rec_input(n)
        z_rec = self.z_rec_ if n == 0 else torch.zeros_like(rec_input)
        for _ in range(self.g_steps):
            fake = fake_batch()
            g_loss = generator_loss(critic(fake).mean((1, 2, 3)), self.loss)
            rec_loss = F.mse_loss(generator(rec_input + sigma * z_rec, rec_input), real[:1])
            opt_g.zero_grad(set_to_none=True)
            (g_loss + self.rec_weight * rec_loss).backward()
            opt_g.step()
        self.trained_steps_[n] += 1
        self.monitor.update(d_loss.detach(), real, fake.detach())
        return {"loss": d_loss.detach() + g_loss.detach() + self.rec_weight * rec_loss.detach(),
                "d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                "rec_loss": rec_loss.detach(), "scale": torch.tensor(float(n)),
                "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean(), **logs}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Losses at the current scale on ``batch``'s images, nothing stepped, no penalty."""
        n = self.current_scale
        real = resize(to_tanh_range(batch["image"]), self.sizes[n])
        previous = self._random_input(n, len(real))
        sigma = self.noise_amp_[n]
        fake = self.generators[n](previous + sigma * torch.randn_like(previous), previous)
        d_fake = self.critics[n](fake).mean((1, 2, 3))
        d_loss = discriminator_loss(self.critics[n](real).mean((1, 2, 3)), d_fake, self.loss)
        rec = self._run(self._rec_noises(n + 1), self.sizes)
        rec_loss = F.mse_loss(rec, to_tanh_range(resize(self.image_, self.sizes[n])))
        g_loss = generator_loss(d_fake, self.loss)
        return {"loss": d_loss + g_loss + self.rec_weight * rec_loss, "d_loss": d_loss,
                "g_loss": g_loss, "rec_loss": rec_loss}

    def on_fit_end(self, train_data) -> None:
        untrained = [n for n in range(self.num_scales) if int(self.trained_steps_[n]) == 0]
        if untrained:
            warnings.warn(f"SinGAN: scales {untrained} of {self.num_scales} were not trained "
                          f"(train epochs={self.num_scales} with steps_per_scale="
                          f"{self.steps_per_scale} steps each for the whole pyramid); samples "
                          "pass through them untrained", UserWarning, stacklevel=2)

    # -- generating --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, *,
               size: Sequence[int] | None = None, scale: int | None = None) -> Tensor:
        """(n, C, H, W) random variations in [0, 1], noise from ``generator``.

        size: (H, W) of the output (default the training size); another size or aspect ratio
            scales every noise map, the coarsest included.
        scale: stop after this scale (default the finest): (n, C, h_scale, w_scale) images.
        """
        sizes = self.sizes_for(size)
        last = self.num_scales - 1 if scale is None else scale
        if not 0 <= last < self.num_scales:
            raise ConfigError(f"scale must be in [0, {self.num_scales - 1}]; got {scale}")
        with evaluating(self):
            return from_tanh_range(self._run(self._noises(n, sizes[:last + 1], generator), sizes))

    @torch.no_grad()
    def reconstruct(self, x: Tensor | None = None, *, start_scale: int | None = None) -> Tensor:
        """Without ``x``: the reconstruction path (z* at the coarsest scale, z = 0 above), which
        training pulls towards the training image: (1, C, H, W) in [0, 1].

        With ``x`` (B, C, H', W') in [0, 1]: injection (paper sec. 4, harmonisation / editing):
        x is downsampled to scale ``start_scale`` (default N // 2, at least 1) of an output of
        its own size and fed to that scale as if the coarser scales had made it; the finer
        scales run with z = 0, so the result is deterministic: x's layout rendered with the
        training image's fine texture. Returns (B, C, H', W').
        """
        with evaluating(self):
            if x is None:
                return from_tanh_range(self._run(self._rec_noises(self.num_scales), self.sizes))
            if self.num_scales < 2:
                raise ConfigError("reconstruct(x) injects x at a coarser scale; this SinGAN has a "
                                  "single scale (lower min_size)")
            start = max(1, self.num_scales // 2) if start_scale is None else start_scale
            if not 1 <= start < self.num_scales:
                raise ConfigError(f"start_scale must be in [1, {self.num_scales - 1}]; got "
                                  f"{start_scale}")
            sizes = self.sizes_for(x.shape[-2:])
            injected = resize(to_tanh_range(x.to(self.z_rec_.device)), sizes[start])
            out = self._run([None] * (self.num_scales - start), sizes, start=start,
                            previous=injected)
            return from_tanh_range(out)

    @torch.no_grad()
    def score_map(self, x: Tensor) -> Tensor:
        """(B, C, H', W') in [0, 1], at the training image's pixel scale (the critic is fully
        convolutional: any H', W') -> (B, 1, H', W') the finest critic's values, negated:
        higher = that patch looks less like the training image's patches."""
        with evaluating(self):
            return -self.critics[-1](to_tanh_range(x.to(self.z_rec_.device)))

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """(B,) the mean of :meth:`score_map`: higher = less like the training image."""
        return self.score_map(x).mean((1, 2, 3))

    def sample_grid(self) -> np.ndarray:
        """(H, W, 3) uint8 grid at the scale trained last: the image, the reconstruction path,
        then 14 samples from the fixed noise (``sample_seed``)."""
        from anomalykit.data.io import image_grid

        n = min(max(self.global_step - 1, 0) // self.steps_per_scale, self.num_scales - 1)
        generator = torch.Generator().manual_seed(self.sample_seed)
        with torch.no_grad(), evaluating(self):
            rec = from_tanh_range(self._run(self._rec_noises(n + 1), self.sizes))
        samples = self.sample(14, generator, scale=n)
        images = torch.cat([resize(self.image_, self.sizes[n]), rec, samples])
        return image_grid(images, nrow=8)


# -- convenience ------------------------------------------------------------------------------
def variations(image: Tensor, n: int, *, seed: int = 0, size: Sequence[int] | None = None,
               image_size: int | Sequence[int] | None = None, batch_size: int = 1,
               device: str = "auto", progress: bool = False,
               **singan_options: Any) -> Tensor:
    """Fit a :class:`SinGAN` on one image and return ``n`` random variations of it.

    image: (C, H, W) or (1, C, H, W) in [0, 1]. seed: the fit's and the samples' seed.
    size: (H, W) of the variations (default the training size). image_size: the training size
    (default the image's own). ``singan_options``: any :class:`SinGAN` argument
    (``steps_per_scale``, ``width``, ``min_size``, ...). Returns (n, C, H', W') in [0, 1] on
    the CPU. Keep the model yourself (``SinGAN(...).fit(...)``) to sample again later.
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or len(image) != 1:
        raise ConfigError(f"variations needs one image (C, H, W) or (1, C, H, W); got shape "
                          f"{tuple(image.shape)}")
    torch.manual_seed(seed)  # the networks' initial weights
    model = SinGAN(list(image.shape[-2:]) if image_size is None else image_size,
                   image.shape[1], **singan_options)
    model.fit(image, epochs=model.num_scales, batch_size=batch_size, seed=seed, device=device,
              progress=progress)
    generator = torch.Generator().manual_seed(seed)
    return model.sample(n, generator, size=size).cpu()
