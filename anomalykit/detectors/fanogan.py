"""f-AnoGAN (Schlegl et al. 2019): a WGAN-GP of good images, then an encoder into its latent space.

Phase 1 trains a Wasserstein GAN with gradient penalty on good images only (n_critic = 5 critic
steps per generator step, penalty weight 10, Adam 1e-4 with betas (0, 0.9)). Phase 2 freezes
the generator G and the critic D and trains an encoder E so that G(E(x)) reconstructs x, with
the paper's izi_f loss (Sec. 2.3.3)::

    izi_f(x) = 1/n ||x - G(E(x))||^2  +  kappa / n_d ||f(x) - f(G(E(x)))||^2

where f is the critic's penultimate feature map and kappa = 1. A good image lies close to the
generator's manifold, so it is reconstructed well; a defect is not, and izi_f (the anomaly
score, Eq. 7) grows. The map is the residual |x - G(E(x))| averaged over channels.
``score="residual"`` (the max of that smoothed map, as GANomaly's option of the same name) is
an option beside the paper's izi_f: izi_f averages over the whole image, so a small defect
adds less to it than the variation between good images of a finely patterned texture that a
briefly trained GAN draws imperfectly (the quick profile's comments give the measurements).

Simplification: the paper's generator and critic are ResNets; here both are the toolkit's
DCGAN networks (:mod:`anomalykit.nn.dcgan`), the critic with GroupNorm (``critic_norm="layer"``)
or no normalisation, never BatchNorm (the gradient penalty is per sample). The critic and the
encoder normalise per sample and the frozen generator runs in inference mode, so an image's
score never depends on the rest of its batch.

Both phases run in ONE :func:`anomalykit.training.fit`: the loop's ``epochs`` are split into
``gan_epochs`` then ``encoder_epochs``. A profile sets ``train.epochs = gan_epochs +
encoder_epochs`` and gets exactly that split; any other epoch count (``--set epochs=10``, the
contract tests' one-epoch run) scales both phases in proportion (:meth:`FAnoGANDetector.gan_epochs_of`).
The phase is a function of the epoch alone, chosen in ``on_train_epoch_start``, so a run
resumed from ``last.ckpt`` (even across the phase boundary) continues exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError, check_choice
from anomalykit.nn.adversarial import AdversarialMonitor, adversarial_step
from anomalykit.nn.dcgan import NORMS, DCGANEncoder, DCGANGenerator, to_tanh_range
from anomalykit.nn.functional import gaussian_blur
from anomalykit.registry import register_detector

LatentActivation = Literal["none", "tanh"]
LATENT_ACTIVATIONS = ("none", "tanh")
PHASES = ("gan", "encoder")
Score = Literal["izi_f", "residual"]
SCORES = ("izi_f", "residual")


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` without gradients inside the block (restored after): the loss
    back-propagates through them to the encoder without computing their own gradients."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@register_detector("fanogan")
class FAnoGANDetector(Detector):
    """f-AnoGAN: WGAN-GP generator + critic, then an izi_f encoder; score = izi_f per image.

    Args:
        image_size: side S of the input, a power of two >= 8 (DCGAN networks).
        latent_dim: size of z (128 in the paper); the generator's prior is N(0, I).
        width, max_width: DCGAN widths (first / capped) of the generator, critic and encoder.
        generator_norm: normalisation of the generator ("batch" as in DCGAN; frozen and in
            inference mode in phase 2 and at test time, so still per image there).
        critic_norm: "layer" or "none"; BatchNorm is refused (WGAN-GP's penalty is per sample).
        encoder_norm: normalisation of the encoder ("layer": per sample, no train/eval gap).
        latent_activation: on E's output. "none" (default): the prior N(0, I) is unbounded, so
            a bounded code could not reach its tails; "tanh" bounds z to [-1, 1] as the paper's
            encoder does for its bounded prior.
        gan_epochs, encoder_epochs: epochs of phase 1 (WGAN-GP) and phase 2 (encoder).
        n_critic: critic steps per generator step (5). gp_weight: the penalty's weight (10).
        kappa: weight of the feature term of izi_f (1).
        lr, betas: Adam of G and D (1e-4, (0, 0.9)); encoder_lr, encoder_betas: Adam of E
            (None = the same as G's and D's).
        score: "izi_f" (the paper's Eq. 7) or "residual" (max of the smoothed residual map).
        map_sigma: Gaussian smoothing of the residual map, in pixels (0 = none).
    """

    manual_optimization = True

    def __init__(self, image_size: int = 64, *, latent_dim: int = 128, width: int = 64,
                 max_width: int = 512, generator_norm: Literal["batch", "layer", "none"] = "batch",
                 critic_norm: Literal["layer", "none"] = "layer",
                 encoder_norm: Literal["batch", "layer", "none"] = "layer",
                 latent_activation: LatentActivation = "none", gan_epochs: int = 100,
                 encoder_epochs: int = 50, n_critic: int = 5, gp_weight: float = 10.0,
                 kappa: float = 1.0, lr: float = 1e-4, betas: list[float] | tuple[float, ...] = (0.0, 0.9),
                 encoder_lr: float | None = None,
                 encoder_betas: list[float] | tuple[float, ...] | None = None,
                 score: Score = "izi_f", map_sigma: float = 0.0) -> None:
        super().__init__()
        check_choice("score", score, SCORES)
        check_choice("generator_norm", generator_norm, NORMS)
        check_choice("critic_norm", critic_norm, ("layer", "none"))
        check_choice("encoder_norm", encoder_norm, NORMS)
        check_choice("latent_activation", latent_activation, LATENT_ACTIVATIONS)
        for name, value in (("gan_epochs", gan_epochs), ("encoder_epochs", encoder_epochs),
                            ("n_critic", n_critic), ("latent_dim", latent_dim)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        for name, value in (("gp_weight", gp_weight), ("kappa", kappa), ("map_sigma", map_sigma)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0; got {value!r}")
        for name, value in (("lr", lr), ("encoder_lr", encoder_lr)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0; got {value!r}")
        for name, value in (("betas", betas), ("encoder_betas", encoder_betas)):
            if value is not None and (len(value) != 2 or not all(0 <= b < 1 for b in value)):
                raise ConfigError(f"{name} must be two numbers in [0, 1); got {value!r}")
        self.image_size, self.latent_dim = image_size, latent_dim
        self.latent_activation = latent_activation
        self.gan_epochs, self.encoder_epochs = gan_epochs, encoder_epochs
        self.n_critic, self.gp_weight, self.kappa = n_critic, gp_weight, kappa
        self.lr, self.betas = lr, tuple(betas)
        self.encoder_lr = lr if encoder_lr is None else encoder_lr
        self.encoder_betas = self.betas if encoder_betas is None else tuple(encoder_betas)
        self.score, self.map_sigma = score, map_sigma
        self.set_normalization("none")  # the model works in [-1, 1] (to_tanh_range), from [0, 1]
        self.generator = DCGANGenerator(image_size, latent_dim, width=width, max_width=max_width,
                                        norm=generator_norm)
        self.critic = DCGANEncoder(image_size, 1, width=width, max_width=max_width,
                                   norm=critic_norm)
        self.encoder = DCGANEncoder(image_size, latent_dim, width=width, max_width=max_width,
                                    norm=encoder_norm)
        self.phase = "gan"  # set per epoch by on_train_epoch_start
        self.monitor: AdversarialMonitor | None = None  # built per fit by setup_fit

    # -- the model ------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> z (B, latent_dim)."""
        z = self.encoder(x)
        return torch.tanh(z) if self.latent_activation == "tanh" else z

    def izi_f(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (reconstruction G(E(x)) (B, 3, S, S), pixel MSE (B,),
        critic-feature MSE (B,)). izi_f = pixel + kappa x feature (the paper's Eq. 7)."""
        recon = self.generator(self.encode(x))
        # Two critic passes, not one over the concatenation: splitting a (2B, ...) batch in
        # halves fixes B in the exported graph.
        f_real, f_recon = self.critic.features(x), self.critic.features(recon)
        pixel = (x - recon).pow(2).flatten(1).mean(1)
        feature = (f_real - f_recon).pow(2).flatten(1).mean(1)
        return recon, pixel, feature

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), map = |x - G(E(x))| (B, 1, S, S).

        score: izi_f, or the map's max (``score="residual"``); from this image alone. The map
        is in units of the [0, 1] input (half the [-1, 1] residual)."""
        x = to_tanh_range(self.normalize_input(images))
        recon, pixel, feature = self.izi_f(x)
        amap = gaussian_blur(0.5 * (x - recon).abs().mean(1, keepdim=True), self.map_sigma)
        if self.score == "residual":
            return AnomalyOutput(amap.flatten(1).amax(1), amap)
        return AnomalyOutput(pixel + self.kappa * feature, amap)

    # -- training -------------------------------------------------------------------------
    def gan_epochs_of(self, epochs: int) -> int:
        """How many of the loop's first ``epochs`` train the GAN (the rest train the encoder).

        ``gan_epochs`` when ``epochs == gan_epochs + encoder_epochs``; otherwise the same
        proportion, rounded, with at least one epoch per phase when there are two epochs or
        more (a one-epoch run trains the GAN only).
        """
        share = round(epochs * self.gan_epochs / (self.gan_epochs + self.encoder_epochs))
        return min(max(share, 1), max(epochs - 1, 1))

    def setup_fit(self, train_data: Any, val_data: Any, **options: Any) -> tuple[Any, Any]:
        """A fresh health monitor per fit (it only warns; resuming needs none of its state)."""
        self.monitor = AdversarialMonitor("wgan_gp", name="f-AnoGAN")
        return train_data, val_data

    def on_train_epoch_start(self, epoch: int, epochs: int, optimizers) -> None:
        """Phase from the epoch alone: resume-safe, nothing to save."""
        self.phase = PHASES[0] if epoch < self.gan_epochs_of(epochs) else PHASES[1]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[G's, D's, E's] Adam."""
        return [torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas),
                torch.optim.Adam(self.critic.parameters(), lr=self.lr, betas=self.betas),
                torch.optim.Adam(self.encoder.parameters(), lr=self.encoder_lr,
                                 betas=self.encoder_betas)]

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        opt_g, opt_d, opt_e = optimizers
        x = to_tanh_range(self.normalize_input(batch["image"]))
        if self.phase == "gan":
            logs = adversarial_step(self.generator, self.critic, x, (opt_g, opt_d),
                                    loss="wgan_gp", step=self.global_step,
                                    latent_dim=self.latent_dim, n_critic=self.n_critic,
                                    gp_weight=self.gp_weight, monitor=self.monitor)
            return {k: logs[k] for k in ("loss", "d_loss", "g_loss", "gp")}
        # Phase 2: G and D frozen, G in inference mode (its BatchNorm statistics stay as phase 1
        # left them, and E learns the generator it will be scored with).
        self.generator.eval()
        self.critic.eval()
        with frozen(self.generator, self.critic):
            _, pixel, feature = self.izi_f(x)
            izi, feature = pixel.mean(), feature.mean()
            loss = izi + self.kappa * feature
            opt_e.zero_grad(set_to_none=True)
            loss.backward()
            opt_e.step()
        return {"loss": loss.detach(), "izi": izi.detach(), "izi_f": loss.detach()}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean izi_f of held-out good images (no step); meaningful once phase 2 has begun."""
        _, pixel, feature = self.izi_f(to_tanh_range(self.normalize_input(batch["image"])))
        return {"loss": (pixel + self.kappa * feature).mean()}
