"""VQGAN (Esser et al. 2021, "Taming Transformers"): a VQ-VAE trained with a perceptual and an
adversarial loss, its code maps modelled by an autoregressive prior.

The autoencoder is the suite's :class:`~anomalykit.generative.vqvae.VQVAE` (encoder, vector
quantizer with codebook + commitment losses, decoder), held as ``self.vqvae``; what VQGAN adds is
how it is trained (sec. 3.1, eqs. 4-7). Per step, on images x in [0, 1]:

* L_rec = |x - x_hat| (``recon_loss``, L1 as in the authors' code) + ``perceptual_weight`` x
  :class:`PerceptualLoss`. The paper uses LPIPS (VGG features with learned linear heads); this
  is LPIPS-like but WITHOUT learned heads: the squared distance of channel-normalised features
  of a few stages of the toolkit's frozen offline backbone
  (:class:`~anomalykit.nn.backbone.Backbone`, EfficientNet-Lite0 from its PyPI package).
  ``perceptual_weight=0`` does not build the backbone.
* L_VQ = L_rec + ||sg[E(x)] - z_q||^2 + beta ||sg[z_q] - E(x)||^2 (eq. 4, the VQ-VAE's terms).
* L_GAN: a :class:`~anomalykit.nn.image_to_image.PatchDiscriminator` on images in [-1, 1], hinge
  loss (``disc_loss``), switched on once ``disc_start`` steps are done (before that the
  discriminator is neither run nor stepped, and the autoencoder's loss has no GAN term).
* The autoencoder minimises L_VQ + lambda L_GAN with the adaptive weight (eq. 7)
  lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta), GL the decoder's last layer
  (:func:`adaptive_gan_weight`; delta = 1e-4 and the clamp to [0, 1e4] as in the authors' code,
  the paper states delta = 1e-6), times ``disc_weight``; ``adaptive_weight=False`` uses
  ``disc_weight`` alone.

Two Adam optimisers, [autoencoder's, discriminator's], stepped by ``training_step(batch,
optimizers)`` through the toolkit's manual path, as the GANs of :mod:`anomalykit.generative.gan`
(whose :class:`AdversarialModel` gives the optimisers, the health monitor and the epoch grid).

Prior and sampling (sec. 3.2 uses a transformer; this suite's autoregressive code prior is a
:class:`~anomalykit.generative.autoregressive.CodePixelCNN`, the VQ-VAE's own): ``on_fit_end``
counts the code histogram and, with ``prior_epochs`` > 0, trains the PixelCNN on the training
set's code maps (:meth:`VQGAN.fit_prior`). ``sample`` decodes PixelCNN samples once a prior is
fitted (``prior_fitted_``), and codes drawn uniformly at random before that (texture soup: a
sanity check of the decoder, not a model of the data).

Scores (``score_by``): "reconstruction" (default), the mean ``recon_loss`` error of the
reconstruction; or "prior", the negative log-likelihood of the image's code map under the fitted
PixelCNN, nats per map (needs a fitted prior).

Measured (benchmarks/results/vqgan: synthetic weave, 32 px, 480 steps, against the same VQ-VAE
trained the same way): this quick setting does NOT show VQGAN's benefit. Its reconstructions
carry high-frequency colour noise, with 3.2x the VQ-VAE's held-out MSE (0.0209 vs 0.0065); its
FD-Lite0 is lower (515 vs 826) but shares the perceptual loss's backbone weights, so it is not
evidence of better images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice
from anomalykit.generative.ae import LOSSES, ReconstructionLoss, reconstruction_loss
from anomalykit.generative.gan import GRID_SIZE, AdversarialModel
from anomalykit.generative.vqvae import CODE_PRIORS, VQVAE, CodePrior
from anomalykit.nn.adversarial import discriminator_loss, generator_loss
from anomalykit.nn.backbone import DEFAULT_BACKBONE, Backbone
from anomalykit.nn.dcgan import to_tanh_range
from anomalykit.nn.image_to_image import I2I_NORMS, I2INorm, PatchDiscriminator
from anomalykit.nn.normalization import register_input_stats
from anomalykit.registry import register_generative
from anomalykit.training.inference import as_loader, evaluating

# VQGAN's discriminator losses: the paper's hinge, and the two that also have a logit floor.
DISC_LOSSES = ("hinge", "non_saturating", "lsgan")
DiscLoss = Literal["hinge", "non_saturating", "lsgan"]
ScoreBy = Literal["reconstruction", "prior"]
SCORES = ("reconstruction", "prior")
GRID_IMAGES = 8  # real images (and their reconstructions) in the top rows of the epoch's grid


# -- helpers -------------------------------------------------------------------------------------


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, *,
                        delta: float = 1e-4, max_weight: float = 1e4) -> Tensor:
    """Esser et al. 2021, eq. 7: lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta).

    rec_loss, gan_loss: scalars whose graphs reach ``last_layer`` (the weight of the decoder's
    last layer, GL); both graphs are kept for the caller's backward. Returns a detached scalar,
    clamped to [0, max_weight]: it balances the two gradients at the decoder's output, so the
    GAN term neither drowns the reconstruction nor vanishes next to it.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + delta)).clamp(0.0, max_weight).detach()


# -- blocks --------------------------------------------------------------------------------------


class PerceptualLoss(nn.Module):
    """LPIPS-like distance (Zhang et al. 2018) on a frozen backbone's features, WITHOUT LPIPS's
    learned linear heads: every channel of a stage weighs the same.

    ``forward(x, y)``: x, y (B, 3 or 1, H, W) in [0, 1] -> (B,) mean over the stages of
    mean_{h,w} sum_c (f_c(x) / ||f(x)|| - f_c(y) / ||f(y)||)^2, the features unit-normalised
    over channels at each position (so each stage counts equally, whatever its scale); each
    stage's term is 2 - 2 cos(f(x), f(y)), in [0, 4]. LPIPS sums its layers; the mean keeps the
    value in [0, 4] whatever the number of stages. Zero for identical images. Gradients flow to
    the images, never to the backbone.

    Args:
        backbone: timm architecture (default: the offline EfficientNet-Lite0).
        stages: its feature stages (for Lite0: 0..3 = strides 2, 4, 8, 16).
        weights: as :class:`~anomalykit.nn.backbone.Backbone` (None: the packaged ImageNet
            weights; ``"random"`` for tests).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: Sequence[int] = (0, 1, 2, 3), *,
                 weights: str | None = None) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, stages, weights=weights)
        # Not saved: they follow from the weights, which the config names.
        register_input_stats(self, self.backbone.input_mean, self.backbone.input_std,
                             persistent=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:  # grey images: the backbone sees three equal channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        features_x = self.backbone((x - self.input_mean) / self.input_std)
        features_y = self.backbone((y - self.input_mean) / self.input_std)
        distance = x.new_zeros(x.shape[0])
        for fx, fy in zip(features_x, features_y, strict=True):
            diff = F.normalize(fx, dim=1, eps=1e-10) - F.normalize(fy, dim=1, eps=1e-10)
            distance = distance + diff.pow(2).sum(1).mean((1, 2))
        return distance / len(features_x)


# -- the model -----------------------------------------------------------------------------------


@register_generative("vqgan")
class VQGAN(AdversarialModel):
    """VQGAN on (B, C, S, S) images in [0, 1] with an (h, w) grid of discrete codes.

    Args:
        image_size, in_channels, widths, strides, batch_norm, num_codes, code_dim, beta, ema,
            decay, data_init, dead_code_threshold: the autoencoder, as
            :class:`~anomalykit.generative.vqvae.VQVAE`.
        recon_loss: the pixel term of L_rec, "l1" (the authors'), "l2" or "ssim".
        perceptual_weight: weight of :class:`PerceptualLoss` in L_rec; 0 = off (no backbone).
        perceptual_backbone / perceptual_stages / perceptual_weights: its backbone, stages and
            weights (None: the packaged ImageNet weights; "random": tests only).
        disc_width / disc_layers / disc_norm: the :class:`PatchDiscriminator` (first layer's
            channels, strided layers, "batch" as in the authors' code, "instance" or "none");
            needs ``image_size >= 3 * 2**disc_layers``. The paper's width 64 dominates a
            step at this scale: 2.1 s per batch of 64 32-px images (perceptual off) against
            0.34 s for the default VQ-VAE alone (one thread of a shared 2-core machine);
            benchmarks/vqgan_suite.py uses 16.
        disc_loss: "hinge" (the paper), "non_saturating" or "lsgan".
        disc_start: steps done before the discriminator switches on.
        disc_weight: factor on the GAN term (times lambda when ``adaptive_weight``).
        adaptive_weight: use eq. 7's lambda; ``max_adaptive_weight`` clamps it.
        lr / betas: both Adam optimisers (the authors' betas (0.5, 0.9)).
        prior_hidden, prior_layers, prior_lr, prior_epochs, prior_batch_size: the
            PixelCNN code prior (VQVAE's ``prior_*``); ``prior_epochs`` 0: ``fit`` leaves it
            unfitted (call :meth:`fit_prior`).
        score_by: "reconstruction" or "prior" (see the module docstring).
        sample_seed / grid_every: the epoch grid's fixed seed and how often it is written.
    """

    def __init__(self, image_size: int = 32, *, in_channels: int = 3,
                 widths: list[int] | tuple[int, ...] = (64, 64, 64),
                 strides: list[int] | tuple[int, ...] = (2, 2, 1), batch_norm: bool = False,
                 num_codes: int = 128, code_dim: int = 32, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, data_init: bool = True, dead_code_threshold: float = 0.0,
                 recon_loss: ReconstructionLoss = "l1", perceptual_weight: float = 1.0,
                 perceptual_backbone: str = DEFAULT_BACKBONE,
                 perceptual_stages: list[int] | tuple[int, ...] = (0, 1, 2, 3),
                 perceptual_weights: str | None = None, disc_width: int = 64, disc_layers: int = 3,
                 disc_norm: I2INorm = "batch", disc_loss: DiscLoss = "hinge",
                 disc_start: int = 1000, disc_weight: float = 0.8, adaptive_weight: bool = True,
                 max_adaptive_weight: float = 1e4, lr: float = 2e-4,
                 betas: list[float] | tuple[float, float] = (0.5, 0.9),
                 prior_hidden: int = 64, prior_layers: int = 5, prior_lr: float = 1e-3,
                 prior_epochs: int = 20, prior_batch_size: int = 64,
                 score_by: ScoreBy = "reconstruction", sample_seed: int = 0,
                 grid_every: int = 1) -> None:
        super().__init__()
        check_choice("recon_loss", recon_loss, LOSSES)
        check_choice("disc_loss", disc_loss, DISC_LOSSES)
        check_choice("disc_norm", disc_norm, I2I_NORMS)
        check_choice("score_by", score_by, SCORES)
        for name, value in (("perceptual_weight", perceptual_weight), ("disc_weight", disc_weight),
                            ("disc_start", disc_start), ("prior_epochs", prior_epochs)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0; got {value}")
        if max_adaptive_weight <= 0 or lr <= 0:
            raise ConfigError(f"max_adaptive_weight and lr must be > 0; got {max_adaptive_weight}, "
                              f"{lr}")
        if len(betas) != 2:
            raise ConfigError(f"betas must be two numbers; got {betas!r}")
        if grid_every < 1:
            raise ConfigError(f"grid_every must be >= 1; got {grid_every}")
        if disc_layers >= 1 and image_size < 3 * 2 ** disc_layers:
            # The patch map is S / 2**layers - 2 wide: at least one patch must remain.
            raise ConfigError(f"image_size {image_size} is too small for disc_layers {disc_layers}: "
                              f"the PatchDiscriminator needs image_size >= {3 * 2 ** disc_layers}")
        self.vqvae = VQVAE(image_size, in_channels=in_channels, widths=widths, strides=strides,
                           batch_norm=batch_norm, num_codes=num_codes, code_dim=code_dim,
                           beta=beta, ema=ema, decay=decay, data_init=data_init,
                           dead_code_threshold=dead_code_threshold, loss=recon_loss,
                           code_prior="pixelcnn", prior_hidden=prior_hidden,
                           prior_layers=prior_layers, prior_lr=prior_lr, prior_epochs=prior_epochs,
                           prior_batch_size=prior_batch_size)
        self.discriminator = PatchDiscriminator(in_channels, disc_width, disc_layers, norm=disc_norm)
        self.perceptual = (PerceptualLoss(perceptual_backbone, perceptual_stages,
                                          weights=perceptual_weights)
                           if perceptual_weight > 0 else None)
        self.image_size, self.recon_loss, self.perceptual_weight = image_size, recon_loss, perceptual_weight
        # ``loss`` is the adversarial loss's name: what AdversarialModel's monitor reads.
        self.loss, self.disc_start, self.disc_weight = disc_loss, disc_start, disc_weight
        self.adaptive_weight, self.max_adaptive_weight = adaptive_weight, max_adaptive_weight
        self.lr, self.betas, self.optimizer = lr, tuple(betas), "adam"
        self.score_by, self.sample_seed, self.grid_every = score_by, sample_seed, grid_every
        self.register_buffer("prior_fitted_", torch.tensor(False))

    # -- the autoencoder, delegated ---------------------------------------------------------------
    def generator_parameters(self) -> list[nn.Parameter]:
        """The autoencoder's parameters (encoder, codebook, decoder); the prior trains apart."""
        return [p for name, p in self.vqvae.named_parameters() if not name.startswith("prior.")]

    @property
    def last_layer(self) -> Tensor:
        """The weight of the decoder's last convolution (GL of eq. 7)."""
        convs = [m for m in self.vqvae.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        return convs[-1].weight

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, h, w) code indices."""
        return self.vqvae.encode(x)

    def decode(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, C, S, S) in [0, 1]."""
        return self.vqvae.decode(indices)

    def reconstruct(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, C, S, S) in [0, 1], through the codebook."""
        return self.vqvae.reconstruct(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """(B,) higher = more anomalous: the mean ``recon_loss`` error of the reconstruction, or
        (``score_by="prior"``) the code map's negative log-likelihood under the PixelCNN, nats."""
        if self.score_by == "prior":
            if not bool(self.prior_fitted_):
                raise ConfigError("score_by 'prior' needs a fitted prior: fit with prior_epochs > 0 "
                                  "or call fit_prior first")
            return -self.vqvae.code_log_prob(x, prior="pixelcnn")
        return self.vqvae.score(x)

    # -- training ---------------------------------------------------------------------------------
    def disc_active(self) -> bool:
        """Whether the discriminator takes part in the current step (``disc_start`` steps done)."""
        return self.global_step >= self.disc_start

    def reconstruction_terms(self, x: Tensor) -> dict[str, Tensor]:
        """One pass of the autoencoder on x (B, C, S, S): ``recon`` (x_hat), ``rec_loss`` (L_rec:
        pixel + weighted perceptual term), ``pixel``, ``perceptual`` (unweighted; 0 when off),
        ``vq`` (codebook + commitment loss) and ``perplexity``."""
        q = self.vqvae.quantizer(self.vqvae.encoder(x))
        x_hat = self.vqvae.decoder(q.quantized)
        pixel = reconstruction_loss(x, x_hat, self.recon_loss)
        perceptual = (self.perceptual(x, x_hat).mean() if self.perceptual is not None
                      else pixel.new_zeros(()))
        return {"recon": x_hat, "rec_loss": pixel + self.perceptual_weight * perceptual,
                "pixel": pixel, "perceptual": perceptual, "vq": q.loss,
                "perplexity": q.perplexity}

    def gan_weight(self, rec_loss: Tensor, gan_loss: Tensor) -> Tensor:
        """The factor on the GAN term: ``disc_weight`` x eq. 7's lambda (or ``disc_weight``)."""
        if not self.adaptive_weight:
            return rec_loss.new_tensor(self.disc_weight)
        return self.disc_weight * adaptive_gan_weight(rec_loss, gan_loss, self.last_layer,
                                                      max_weight=self.max_adaptive_weight)

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """The autoencoder's step on L_VQ (+ lambda L_GAN once the discriminator is on), then
        the discriminator's on the same reconstructions. Returns detached logs; ``d_loss``,
        ``g_loss`` and ``gan_weight`` are 0 while the discriminator is off."""
        opt_ae, opt_d = optimizers
        x = batch["image"]
        terms = self.reconstruction_terms(x)
        x_hat = terms["recon"]
        loss = terms["rec_loss"] + terms["vq"]
        zero = loss.new_zeros(())
        g_loss = d_loss = weight = zero
        active = self.disc_active()
        if active:
            g_loss = generator_loss(self.discriminator(to_tanh_range(x_hat)), self.loss)
            weight = self.gan_weight(terms["rec_loss"], g_loss)
            loss = loss + weight * g_loss
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()
        if active:
            d_loss = discriminator_loss(self.discriminator(to_tanh_range(x)),
                                        self.discriminator(to_tanh_range(x_hat.detach())), self.loss)
            opt_d.zero_grad(set_to_none=True)  # also drops what the autoencoder's pass left in D
            d_loss.backward()
            opt_d.step()
            self.monitor.update(d_loss.detach(), x, x_hat.detach())
        return {"loss": loss.detach(), "rec_loss": terms["rec_loss"].detach(),
                "pixel": terms["pixel"].detach(), "perceptual": terms["perceptual"].detach(),
                "vq": terms["vq"].detach(), "perplexity": terms["perplexity"].detach(),
                "g_loss": g_loss.detach(), "d_loss": d_loss.detach(), "gan_weight": weight.detach(),
                "disc_active": loss.new_tensor(float(active))}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Held-out losses, nothing stepped: ``loss`` is L_rec + the VQ terms (no GAN term: its
        weight needs gradients), plus the discriminator's and generator's losses."""
        x = batch["image"]
        terms = self.reconstruction_terms(x)
        d_fake = self.discriminator(to_tanh_range(terms["recon"]))
        d_loss = discriminator_loss(self.discriminator(to_tanh_range(x)), d_fake, self.loss)
        return {"loss": terms["rec_loss"] + terms["vq"], "rec_loss": terms["rec_loss"],
                "vq": terms["vq"], "d_loss": d_loss, "g_loss": generator_loss(d_fake, self.loss)}

    def setup_fit(self, train_data, val_data, **options: Any):
        """A new monitor, and the first :data:`GRID_IMAGES` training images for the epoch grid."""
        self.reset_monitor()
        first = next(iter(as_loader(train_data, batch_size=GRID_IMAGES)))["image"]
        self.__dict__["_grid_images"] = first[:GRID_IMAGES].detach().cpu()  # a picture, not state
        return train_data, val_data

    # -- prior and sampling -----------------------------------------------------------------------
    def on_fit_end(self, train_data) -> None:
        """Loop hook: count the code histogram and, with ``prior_epochs`` > 0, fit the prior."""
        self.vqvae.fit_code_prior(train_data)
        if self.vqvae.prior_epochs > 0:
            self.fit_prior(train_data)

    def code_maps(self, data, batch_size: int = 64) -> Tensor:
        """(N, h, w) int64 code maps of every image of ``data``."""
        return self.vqvae.code_maps(data, batch_size)

    def fit_prior(self, data, val_data=None, *, epochs: int | None = None, seed: int = 0,
                  early_stopping_patience: int | None = None, progress: bool = False) -> dict:
        """Train the PixelCNN code prior on the code maps of ``data`` (the autoencoder frozen);
        :meth:`VQVAE.fit_prior <anomalykit.generative.vqvae.VQVAE.fit_prior>`'s arguments.
        From then on ``sample`` draws from it. Returns the loop's history (nats per code)."""
        history = self.vqvae.fit_prior(data, val_data, epochs=epochs, seed=seed,
                                       early_stopping_patience=early_stopping_patience,
                                       progress=progress)
        self.prior_fitted_.fill_(True)
        return history

    @torch.no_grad()
    def code_log_prob(self, x: Tensor, prior: CodePrior | None = None) -> Tensor:
        """(B, C, S, S) -> (B,) log-likelihood of the images' code maps, nats (default prior:
        the PixelCNN once fitted, else uniform)."""
        return self.vqvae.code_log_prob(x, prior=self._prior(prior))

    def _prior(self, prior: CodePrior | None) -> CodePrior:
        if prior is None:
            return "pixelcnn" if bool(self.prior_fitted_) else "uniform"
        check_choice("prior", prior, CODE_PRIORS)
        return prior

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               prior: CodePrior | None = None) -> Tensor:
        """(n, C, S, S) in [0, 1]: decoded code maps drawn from ``prior`` (default: the PixelCNN
        once fitted, uniform codes before; "empirical": the code histogram, i.i.d. per position)."""
        with evaluating(self.vqvae):
            return self.vqvae.sample(n, generator=generator, prior=self._prior(prior))

    def sample_grid(self) -> np.ndarray:
        """(H, W, 3) uint8: the first training images and their reconstructions (top rows, when
        ``fit`` has seen data), then samples from the fixed seed (``sample_seed``)."""
        from anomalykit.data.io import image_grid

        rows = []
        real = self.__dict__.get("_grid_images")
        if real is not None:
            with torch.no_grad(), evaluating(self.vqvae):
                recon = self.reconstruct(real.to(self.device)).cpu()
            rows += [real, recon]
        n = GRID_SIZE - sum(len(r) for r in rows)
        rows.append(self.sample(n, generator=torch.Generator().manual_seed(self.sample_seed)).cpu())
        return image_grid(torch.cat(rows), nrow=GRID_IMAGES)
