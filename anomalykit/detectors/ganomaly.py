"""GANomaly (Akcay et al. 2018): an adversarially trained encoder-decoder-encoder.

The generator maps an image x to a code z = G_E(x) (latent 100), decodes it to
x_hat = G_D(z) and encodes the reconstruction again, z_hat = E(x_hat); all three are
DCGAN blocks (:mod:`anomalykit.nn.dcgan`, ngf = ndf = 64 in the paper, ``width`` here). A
discriminator (the same encoder with a 1-unit head) tells x from x_hat, and its
penultimate features drive the generator's adversarial loss by feature matching
(paper, eq. 1-4)::

    L_G = w_adv ||f(x) - f(x_hat)||_2^2 + w_con ||x - x_hat||_1 + w_enc ||z - z_hat||_2^2
    L_D = BCE(D(x), 1) + BCE(D(x_hat), 0)

with (w_adv, w_con, w_enc) = (1, 50, 1), all terms means. Trained on good images only,
the second encoder learns to map reconstructions of good images onto their codes; an
anomalous image is reconstructed as a good one, so its two codes disagree. The image
score is the paper's A(x) = mean_j (z_j - z_hat_j)^2 (eq. 6).

Scores are raw and per image, never normalised by batch statistics: the reference code
min-max scales the scores of the whole test set, and the field's default toolkit copied
that as a per-batch normalisation, which makes a score depend on the other images of its
batch (its own re-run reports 42.1 mean image AUROC on MVTec AD, below chance). Thresholds
here come from :meth:`calibrate` on held-out good images.

The paper has no pixel map; the residual map |x - x_hat| (averaged over channels,
optionally Gaussian-smoothed by ``map_sigma``) is this toolkit's extra, and
``score="residual"`` (the max of that map) is an option beside the paper's latent score.
On small CPU budgets it ranks anomalies much better than the latent score (see the quick
profile's comments for the measurements); the paper profile keeps the latent score.

Training follows the reference code: one generator step, then one discriminator step per
batch (Adam 2e-4, beta1 0.5), and the discriminator is re-initialised when its loss
collapses below ``d_reinit_loss`` (1e-5), because a discriminator that wins outright gives
the feature-matching loss nothing to match. An :class:`AdversarialMonitor` warns when that
still happens for many steps, or when the reconstructions collapse to one image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError, check_choice
from anomalykit.nn.adversarial import AdversarialMonitor, discriminator_loss
from anomalykit.nn.dcgan import (
    DCGANEncoder,
    DCGANGenerator,
    from_tanh_range,
    init_dcgan_weights,
    to_tanh_range,
)
from anomalykit.nn.functional import gaussian_blur
from anomalykit.registry import register_detector

Score = Literal["latent", "residual"]
SCORES = ("latent", "residual")
# The paper's discriminator is a standard GAN's: BCE on real/fake logits.
D_LOSS = "non_saturating"


@register_detector("ganomaly")
class GANomalyDetector(Detector):
    """GANomaly: encoder -> decoder -> encoder generator, DCGAN discriminator.

    Args:
        image_size: side S of the (square) input, a power of two >= 8.
        latent_dim: size of the codes z, z_hat (100 in the paper).
        width: channels of the first encoder layer / last decoder layer, doubling per
            layer (ngf = ndf = 64 in the paper); ``max_width`` caps them.
        w_adv, w_con, w_enc: weights of the feature-matching, L1 reconstruction and latent
            losses (1, 50, 1 in the paper); each >= 0.
        score: "latent" (the paper's mean (z - z_hat)^2) or "residual" (max of the smoothed
            residual map, not in the paper).
        map_sigma: Gaussian smoothing of the residual map, in input pixels (0 = none).
        lr, beta1: Adam's, for both networks (2e-4, 0.5 in the paper).
        d_reinit_loss: re-initialise the discriminator when its loss falls below this
            (1e-5 in the reference code); 0 disables it.
        monitor_patience: steps the :class:`AdversarialMonitor` waits before warning.
    """

    manual_optimization = True  # G and D alternate: training_step steps both

    def __init__(self, image_size: int = 32, *, latent_dim: int = 100, width: int = 64,
                 max_width: int = 512, w_adv: float = 1.0, w_con: float = 50.0,
                 w_enc: float = 1.0, score: Score = "latent", map_sigma: float = 0.0,
                 lr: float = 2e-4, beta1: float = 0.5, d_reinit_loss: float = 1e-5,
                 monitor_patience: int = 50) -> None:
        super().__init__()
        check_choice("score", score, SCORES)
        for name, value in [("w_adv", w_adv), ("w_con", w_con), ("w_enc", w_enc),
                            ("map_sigma", map_sigma),
                            ("d_reinit_loss", d_reinit_loss)]:
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if latent_dim < 1 or width < 1:
            raise ConfigError(f"latent_dim and width must be >= 1, got {latent_dim}, {width}")
        self.image_size, self.latent_dim = image_size, latent_dim
        self.w_adv, self.w_con, self.w_enc = w_adv, w_con, w_enc
        self.score, self.map_sigma = score, map_sigma
        self.lr, self.beta1 = lr, beta1
        self.d_reinit_loss, self.monitor_patience = d_reinit_loss, monitor_patience
        nets = dict(width=width, max_width=max_width)
        self.encoder = DCGANEncoder(image_size, latent_dim, **nets)          # G_E
        self.decoder = DCGANGenerator(image_size, latent_dim, **nets)        # G_D
        self.encoder_hat = DCGANEncoder(image_size, latent_dim, **nets)      # E
        self.discriminator = DCGANEncoder(image_size, 1, **nets)             # D
        # Counted so a run can report how often the discriminator collapsed (saved, not exported).
        self.register_buffer("d_reinits_", torch.tensor(0))

    # -- the networks ------------------------------------------------------------------
    def generate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, 3, S, S) in [-1, 1] -> (z (B, L), x_hat (B, 3, S, S) in [-1, 1], z_hat (B, L))."""
        z = self.encoder(x)
        x_hat = self.decoder(z)
        return z, x_hat, self.encoder_hat(x_hat)

    def generator_losses(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Weighted generator loss and its terms on x (B, 3, S, S) in [-1, 1], and x_hat."""
        z, x_hat, z_hat = self.generate(x)
        with torch.no_grad():  # the real images' features are a target, not a path to G
            real_features = self.discriminator.features(x)
        adv = F.mse_loss(self.discriminator.features(x_hat), real_features)
        con = F.l1_loss(x_hat, x)
        enc = F.mse_loss(z_hat, z)
        loss = self.w_adv * adv + self.w_con * con + self.w_enc * enc
        return {"g_loss": loss, "adv": adv, "con": con, "enc": enc}, x_hat

    # -- training ----------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (self.beta1, 0.999)
        generator = [*self.encoder.parameters(), *self.decoder.parameters(),
                     *self.encoder_hat.parameters()]
        return [torch.optim.Adam(generator, lr=self.lr, betas=betas),
                torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas)]

    def setup_fit(self, train_data, val_data, **kwargs):
        # A fresh monitor per fit: its step counts describe this run only.
        self._monitor = AdversarialMonitor(D_LOSS, name="GANomaly",
                                           patience=self.monitor_patience)
        return train_data, val_data

    @property
    def monitor(self) -> AdversarialMonitor:
        """The monitor of the current fit (built on first use outside :meth:`fit`)."""
        if getattr(self, "_monitor", None) is None:
            self._monitor = AdversarialMonitor(D_LOSS, name="GANomaly",
                                               patience=self.monitor_patience)
        return self._monitor

    def training_step(self, batch, optimizers) -> dict[str, Tensor]:
        """One generator step, then one discriminator step (the reference code's order)."""
        opt_g, opt_d = optimizers
        x = to_tanh_range(batch["image"])
        g_logs, x_hat = self.generator_losses(x)
        opt_g.zero_grad(set_to_none=True)
        g_logs["g_loss"].backward()
        opt_g.step()

        x_hat = x_hat.detach()
        d_loss = discriminator_loss(self.discriminator(x), self.discriminator(x_hat), D_LOSS)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        self.monitor.update(d_loss.detach(), x, x_hat)
        if float(d_loss.detach()) < self.d_reinit_loss:
            self.reinit_discriminator(opt_d)

        logs = {k: v.detach() for k, v in g_logs.items()}
        return {"loss": logs["g_loss"] + d_loss.detach(), "d_loss": d_loss.detach(), **logs}

    @torch.no_grad()
    def reinit_discriminator(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fresh DCGAN weights for D (global RNG: seeded by the loop) and, since its Adam
        moments belong to the collapsed network, a fresh optimizer state."""
        init_dcgan_weights(self.discriminator)
        for module in self.discriminator.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
        if optimizer is not None:
            optimizer.state.clear()
        self.d_reinits_ += 1

    @torch.no_grad()
    def validation_step(self, batch) -> dict[str, Tensor]:
        """The generator's losses on held-out good images, without stepping anything."""
        logs, _ = self.generator_losses(to_tanh_range(batch["image"]))
        return {"loss": logs["g_loss"], **logs}

    # -- inference -----------------------------------------------------------------------
    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S).

        score: per ``self.score``, from this image alone (BatchNorm in eval mode uses its
        running statistics, so a batch scores like its images one at a time).
        anomaly_map: |x - x_hat| in [0, 1] image units, averaged over channels and smoothed
        by ``map_sigma`` (not in the paper).
        """
        z, x_hat, z_hat = self.generate(to_tanh_range(images))
        amap = (images - from_tanh_range(x_hat)).abs().mean(1, keepdim=True)
        amap = gaussian_blur(amap, self.map_sigma)
        # "latent": the paper's eq. 6; "residual": the map's max (not in the paper)
        score = (z - z_hat).pow(2).mean(1) if self.score == "latent" else amap.flatten(1).amax(1)
        return AnomalyOutput(score, amap)
