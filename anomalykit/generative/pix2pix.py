"""pix2pix (Isola et al. 2017): a conditional GAN for paired image-to-image translation, put to
work as defect synthesis from a mask.

The generator G is the paper's U-Net (:class:`Pix2PixUNet`): an encoder of 4x4 stride-2
convolutions (LeakyReLU 0.2, BatchNorm) and a mirrored decoder of 4x4 stride-2 transposed
convolutions (ReLU, BatchNorm) with a skip connection from every encoder level; dropout 0.5 in
the first decoder layers is the only noise source (the paper found a noise input z ignored).
The discriminator is the PatchGAN (:class:`~anomalykit.nn.image_to_image.PatchDiscriminator`)
on the condition and the image concatenated, one logit per overlapping patch. The loss is the
non-saturating GAN loss plus ``lambda_l1`` (100) x L1 to the real image (paper eq. 4); Adam
2e-4, betas (0.5, 0.999); the discriminator's loss is halved (paper sec. 3.3).

Defect synthesis: G's input is a good image (3 channels, [-1, 1]) and a defect mask (1
channel, {0, 1}); its output is the defective image. Batches::

    {"image": defective (B, 3, S, S) in [0, 1], "good": (B, 3, S, S) in [0, 1],
     "mask": (B, 1, S, S) in {0, 1}}

(e.g. :func:`anomalykit.data.synthetic.defect_triples`). With ``composite=True`` (the default)
G's output is pasted into the good image with the EXACT mask as weight,
``good (1 - M) + G(good, M) M``, so a painted mask changes only the painted pixels, and the L1
and adversarial losses see that composite. Exact rather than dilated or feathered: the
synthetic set's masks are exact (every changed pixel lies inside the mask, see
:mod:`anomalykit.data.synthetic`), so the real defective image equals the good one outside the
mask and nothing is lost; G, which sees the good image and the mask, learns to blend at the
mask's edge itself. A soft (fractional) mask acts as an opacity.

Use: :meth:`Pix2Pix.render_defects` paints a defect wherever a mask says on any good image
whose side is divisible by ``2 ** depth`` (the U-Net is fully convolutional); DRAEM can take
its anomalies from it (``DraemDetector(anomaly_source="pix2pix", pix2pix_checkpoint=...)``).

Noise and determinism: in training, dropout draws from torch's global generator (the loop
seeds it). At inference BatchNorm uses its running statistics (the paper used the test batch's
statistics; running ones make an image's rendering independent of its batch-mates), and
dropout is applied only when a ``generator`` is passed, with masks drawn from it: the same
generator seed gives the same rendering, ``generator=None`` the deterministic mean rendering.

``sample(n)``: pix2pix has no unconditional samples; ``fit`` keeps up to ``examples`` (16)
training triples (saved with the model) and ``sample`` renders defects on their (good, mask)
pairs, cycling through them. ``score(x)``: a GAN has no likelihood; the score is the negated
mean patch logit of the discriminator for ``x`` under the condition "x, empty mask". The
discriminator never saw an empty mask in training, so this is a weak anomaly score at best.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice
from anomalykit.generative.gan import AdversarialModel, _store_adversarial, check_adversarial_options
from anomalykit.nn.adversarial import discriminator_loss, generator_loss
from anomalykit.nn.dcgan import from_tanh_range, to_tanh_range
from anomalykit.nn.image_to_image import I2I_NORMS, I2INorm, PatchDiscriminator, image_norm, init_normal
from anomalykit.registry import register_generative
from anomalykit.training.inference import evaluating

#: Adversarial losses pix2pix accepts (the Wasserstein ones need clipping / a penalty it lacks).
PIX2PIX_LOSSES = ("non_saturating", "lsgan", "hinge")
#: Example triples kept by fit, saved with the model (buffers), that ``sample`` renders.
EXAMPLE_BUFFERS = ("example_good_", "example_mask_", "example_image_")


class Pix2PixUNet(nn.Module):
    """The pix2pix U-Net: (B, in_channels, H, W) -> (B, out_channels, H, W) in [-1, 1].

    Encoder (Isola et al. 2017, appendix 6.1.1): C64-C128-C256-C512-C512-..., ``depth`` 4x4
    stride-2 convolutions, no BatchNorm on the first and the innermost, LeakyReLU 0.2 before
    each but the first. Decoder: the mirror with ReLU, 4x4 stride-2 transposed convolutions,
    BatchNorm, dropout on the first ``dropout_layers`` decoder layers (CD512 x 3 in the paper),
    the encoder feature of the same resolution concatenated after each, tanh out. Widths are
    ``width * min(2**i, 8)``. At 256 px the paper has ``depth`` 8 (a 1x1 bottleneck); H and W
    must be divisible by ``2 ** depth``.

    ``forward(x, noise=None)``: in training mode dropout uses torch's global generator; in eval
    mode it is off unless ``noise`` (a torch.Generator) is given, which then draws the dropout
    masks (test-time dropout as the paper's noise, reproducibly).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, width: int = 64, *,
                 depth: int = 8, dropout: float = 0.5, dropout_layers: int = 3,
                 norm: I2INorm = "batch") -> None:
        super().__init__()
        check_choice("norm", norm, I2I_NORMS)
        if depth < 2 or width < 1:
            raise ConfigError(f"Pix2PixUNet needs depth >= 2 and width >= 1; got depth {depth}, "
                              f"width {width}")
        if not 0.0 <= dropout < 1.0 or dropout_layers < 0:
            raise ConfigError(f"dropout must be in [0, 1) and dropout_layers >= 0; got {dropout}, "
                              f"{dropout_layers}")
        self.depth, self.dropout = depth, dropout
        self.downsampling = 2 ** depth
        channels = [width * min(2 ** i, 8) for i in range(depth)]
        bias = norm == "none"
        self.down = nn.ModuleList()
        for i in range(depth):
            # Not in place: the pre-activation feature is also the skip connection.
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2)]
            layers.append(nn.Conv2d(in_channels if i == 0 else channels[i - 1], channels[i], 4, 2, 1,
                                    bias=bias or i in (0, depth - 1)))
            if 0 < i < depth - 1:
                layers.append(image_norm(norm, channels[i]))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()  # innermost first
        for i in reversed(range(depth)):
            c_in = channels[i] if i == depth - 1 else 2 * channels[i]
            if i == 0:
                self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, out_channels, 4, 2, 1),
                                             nn.Tanh()))
            else:
                self.up.append(nn.Sequential(nn.ReLU(),
                                             nn.ConvTranspose2d(c_in, channels[i - 1], 4, 2, 1, bias=bias),
                                             image_norm(norm, channels[i - 1])))
        # Dropout after the first decoder layers, never the output layer.
        self.dropped = set(range(min(dropout_layers, depth - 1)))
        init_normal(self)

    def _dropout(self, h: Tensor, noise: torch.Generator | None) -> Tensor:
        if self.dropout == 0.0:
            return h
        if self.training:
            return F.dropout(h, self.dropout, training=True)
        if noise is None:
            return h
        keep = torch.bernoulli(torch.full(h.shape, 1.0 - self.dropout), generator=noise)
        return h * keep.to(h.device, h.dtype) / (1.0 - self.dropout)

    def forward(self, x: Tensor, noise: torch.Generator | None = None) -> Tensor:
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ConfigError(f"the pix2pix U-Net (depth {self.depth}) needs an image side divisible "
                              f"by {self.downsampling}; got {tuple(x.shape[-2:])}")
        skips, h = [], x
        for down in self.down:
            h = down(h)
            skips.append(h)
        h = skips.pop()  # the innermost feature feeds the decoder
        for level, up in enumerate(self.up):
            h = up(h)
            if level in self.dropped:
                h = self._dropout(h, noise)
            if skips:
                h = torch.cat([h, skips.pop()], dim=1)
        return h


@register_generative("pix2pix")
class Pix2Pix(AdversarialModel):
    """pix2pix defect synthesis: (good image, defect mask) -> defective image.

    Args:
        in_channels: C, channels of the good and defective images (3).
        width: channels of G's first layer (ngf = 64 in the paper), doubling up to 8 x width.
        depth: G's stride-2 levels; image sides must be divisible by ``2 ** depth`` (8 at
            256 px in the paper; the default 6 fits 64 px).
        dropout / dropout_layers: G's dropout rate (0.5) and how many decoder layers after the
            bottleneck have it (3).
        d_width / d_layers / d_norm: the PatchGAN's first width (ndf = 64), strided layers (3:
            70x70 patches at 256 px) and normalisation ("batch" in the paper).
        lambda_l1: weight of the L1 term (100).
        composite: paste G's output into the good image inside the mask only (see the module
            docstring); False keeps G's whole output.
        loss: the adversarial loss, one of :data:`PIX2PIX_LOSSES` ("non_saturating": BCE).
        lr / betas: Adam's (2e-4, (0.5, 0.999)) for both players.
        examples: training triples kept by ``fit`` for :meth:`sample` and the epoch grid (<= 16).
        sample_seed / grid_every: the dropout noise of the per-epoch grid, and how often it is
            written (with an ``out_dir``).
    """

    def __init__(self, in_channels: int = 3, *, width: int = 64, depth: int = 6,
                 dropout: float = 0.5, dropout_layers: int = 3, d_width: int = 64,
                 d_layers: int = 3, d_norm: I2INorm = "batch", lambda_l1: float = 100.0,
                 composite: bool = True, loss: Literal["non_saturating", "lsgan", "hinge"] = "non_saturating",
                 lr: float = 2e-4, betas: list[float] | tuple[float, float] = (0.5, 0.999),
                 examples: int = 16, sample_seed: int = 0, grid_every: int = 1) -> None:
        super().__init__()
        check_choice("loss", loss, PIX2PIX_LOSSES)
        check_adversarial_options(loss=loss, n_critic=1, gp_weight=0.0, clip=None, lr=lr,
                                  betas=betas, optimizer="adam")
        if lambda_l1 < 0:
            raise ConfigError(f"lambda_l1 must be >= 0; got {lambda_l1}")
        if not 1 <= examples <= 16:
            raise ConfigError(f"examples must be in [1, 16]; got {examples}")
        _store_adversarial(self, loss=loss, n_critic=1, gp_weight=0.0, clip=None, lr=lr,
                           betas=betas, optimizer="adam", sample_seed=sample_seed,
                           grid_every=grid_every)
        self.in_channels, self.lambda_l1, self.composite = in_channels, lambda_l1, composite
        self.examples = examples
        self.generator = Pix2PixUNet(in_channels + 1, in_channels, width, depth=depth,
                                     dropout=dropout, dropout_layers=dropout_layers, norm="batch")
        # D judges (condition, image): good (C) + mask (1) + candidate (C) channels.
        self.discriminator = PatchDiscriminator(2 * in_channels + 1, d_width, d_layers, norm=d_norm)
        self.register_buffer("example_good_", torch.zeros(0, in_channels, 0, 0))
        self.register_buffer("example_mask_", torch.zeros(0, 1, 0, 0))
        self.register_buffer("example_image_", torch.zeros(0, in_channels, 0, 0))

    # -- the translation ---------------------------------------------------------------------
    def _check_pair(self, good: Tensor, mask: Tensor) -> None:
        b, c, h, w = good.shape if good.dim() == 4 else (None,) * 4
        if good.dim() != 4 or c != self.in_channels:
            raise ConfigError(f"pix2pix: good images must be (B, {self.in_channels}, S, S); got "
                              f"{tuple(good.shape)}")
        if mask.shape != (b, 1, h, w):
            raise ConfigError(f"pix2pix: the mask must be (B, 1, H, W) = {(b, 1, h, w)} like the "
                              f"good images; got {tuple(mask.shape)}")
        step = self.generator.downsampling
        if h % step or w % step:
            raise ConfigError(f"pix2pix (depth {self.generator.depth}) renders images whose side is "
                              f"divisible by {step}; got size {h}x{w}")

    def translate(self, good_t: Tensor, mask: Tensor, noise: torch.Generator | None = None) -> Tensor:
        """G on (good in [-1, 1] (B, C, S, S), mask (B, 1, S, S)) -> (B, C, S, S) in [-1, 1],
        composited into the good image inside the mask when ``composite``."""
        out = self.generator(torch.cat([good_t, mask], dim=1), noise)
        return good_t * (1.0 - mask) + out * mask if self.composite else out

    def _judge(self, good_t: Tensor, mask: Tensor, image_t: Tensor) -> Tensor:
        """(B, 1, H', W') patch logits of D on (condition, image)."""
        return self.discriminator(torch.cat([good_t, mask, image_t], dim=1))

    @torch.no_grad()
    def render_defects(self, good: Tensor, mask: Tensor, *,
                       generator: torch.Generator | None = None) -> Tensor:
        """Paint defects where ``mask`` says: good (B, C, S, S) in [0, 1], mask (B, 1, S, S) in
        [0, 1] (a painted {0, 1} mask; fractions act as opacity) -> (B, C, S, S) in [0, 1].

        S must be divisible by ``2 ** depth``. ``generator`` (CPU torch.Generator) draws the
        dropout noise; None renders without it (deterministic). With ``composite`` the pixels
        outside the mask are returned unchanged.
        """
        self._check_pair(good, mask)
        device = self.device
        good, mask = good.to(device, torch.float32), mask.to(device, torch.float32)
        with evaluating(self):
            out = from_tanh_range(self.generator(torch.cat([to_tanh_range(good), mask], dim=1),
                                                 generator)).clamp(0.0, 1.0)
        # Composited here in [0, 1] (as translate does in [-1, 1]): outside the mask the result
        # is then the input itself, bit for bit, not a round trip of it through [-1, 1].
        return good * (1.0 - mask) + out * mask if self.composite else out

    # -- the GenerativeModel contract --------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, S, S) in [0, 1]: defects rendered on the (good, mask) pairs kept by ``fit``
        (cycled), with dropout noise from ``generator``."""
        kept = len(self.example_good_)
        if kept == 0:
            raise ConfigError("pix2pix samples by rendering defects on the training pairs that fit "
                              "keeps: fit the model first, or call render_defects(good, mask)")
        index = torch.arange(n, device=self.example_good_.device) % kept
        return self.render_defects(self.example_good_[index], self.example_mask_[index],
                                   generator=generator)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """(B,) the negated mean patch logit of D for x (B, C, S, S) in [0, 1] under the
        condition (x, empty mask). Weak: D never saw an empty mask in training."""
        x_t = to_tanh_range(x)
        with evaluating(self):
            return -self._judge(x_t, torch.zeros_like(x_t[:, :1]), x_t).mean((1, 2, 3))

    def sample_grid(self) -> np.ndarray:
        """(H, W, 3) uint8: one row per kept example, good | mask | rendered | real."""
        from anomalykit.data.io import image_grid

        generator = torch.Generator().manual_seed(self.sample_seed)
        good, mask, real = self.example_good_, self.example_mask_, self.example_image_
        rendered = self.sample(len(good), generator=generator)
        rows = torch.stack([good, mask.expand_as(good), rendered, real], dim=1)
        return image_grid(rows.flatten(0, 1), nrow=4)

    # -- training ----------------------------------------------------------------------------
    @staticmethod
    def _triple(batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        missing = [key for key in ("good", "mask") if key not in batch]
        if missing:
            raise ConfigError(f"pix2pix trains on (good, mask, defective) triples: batches need "
                              f"'good' and 'mask' entries besides 'image' (missing {missing}); e.g. "
                              "anomalykit.data.synthetic.defect_triples(...)")
        return batch["good"], batch["mask"].to(batch["good"].dtype), batch["image"]

    def setup_fit(self, train_data, val_data, **options: Any):
        """Keep the first ``examples`` training triples (in order) for ``sample`` and the grid."""
        from anomalykit.training.inference import as_loader

        train_data, val_data = super().setup_fit(train_data, val_data, **options)
        first = next(iter(as_loader(train_data, batch_size=self.examples)))
        good, mask, image = self._triple(first)
        device = self.example_good_.device
        for name, value in zip(EXAMPLE_BUFFERS, (good, mask, image), strict=True):
            self._buffers[name] = value[:self.examples].detach().to(device, torch.float32).clone()
        return train_data, val_data

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The kept examples' shape is only known after fit: take the incoming one.
        for name in EXAMPLE_BUFFERS:
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name],
                                                       device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """One discriminator step, then one generator step (non-saturating + lambda L1)."""
        g_opt, d_opt = optimizers
        good, mask, real = self._triple(batch)
        good_t, real_t = to_tanh_range(good), to_tanh_range(real)
        self._check_pair(good, mask)
        fake_t = self.translate(good_t, mask)

        d_opt.zero_grad(set_to_none=True)
        d_loss = discriminator_loss(self._judge(good_t, mask, real_t),
                                    self._judge(good_t, mask, fake_t.detach()), self.loss)
        (0.5 * d_loss).backward()  # halved: D learns slower than G (paper sec. 3.3)
        d_opt.step()

        g_opt.zero_grad(set_to_none=True)
        g_adv = generator_loss(self._judge(good_t, mask, fake_t), self.loss)
        l1 = (fake_t - real_t).abs().mean()
        (g_adv + self.lambda_l1 * l1).backward()
        g_opt.step()
        self.monitor.update(d_loss.detach(), real_t, fake_t.detach())
        return {"loss": (d_loss + g_adv + self.lambda_l1 * l1).detach(), "d_loss": d_loss.detach(),
                "g_loss": g_adv.detach(), "l1": l1.detach()}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        good, mask, real = self._triple(batch)
        good_t, real_t = to_tanh_range(good), to_tanh_range(real)
        fake_t = self.translate(good_t, mask)
        d_fake = self._judge(good_t, mask, fake_t)
        d_loss = discriminator_loss(self._judge(good_t, mask, real_t), d_fake, self.loss)
        g_adv, l1 = generator_loss(d_fake, self.loss), (fake_t - real_t).abs().mean()
        return {"loss": d_loss + g_adv + self.lambda_l1 * l1, "d_loss": d_loss, "g_loss": g_adv,
                "l1": l1}


def load_pix2pix(path: str | os.PathLike[str], *, what: str = "pix2pix_checkpoint") -> Pix2Pix:
    """A trained :class:`Pix2Pix` from its checkpoint, in eval mode; a ConfigError naming
    ``what`` and the path when the file is missing or holds another model."""
    from anomalykit.base import Estimator

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist: train a pix2pix model first "
                          "(e.g. benchmarks/pix2pix_suite.py writes one) and pass its .ckpt")
    try:
        model = Estimator.load(path)
    except Exception as exc:  # a corrupt or foreign file: say which option pointed at it
        raise ConfigError(f"{what} {str(path)!r} is not a readable anomalykit checkpoint ({exc})") from exc
    if not isinstance(model, Pix2Pix):
        kind = getattr(model, "registry_name", "") or type(model).__name__
        raise ConfigError(f"{what} {str(path)!r} holds a {kind} model, not a pix2pix one")
    return model.eval()
