"""AnoGAN (Schlegl et al., IPMI 2017): a GAN of good images, scored by searching its latent space.

Training: a DCGAN (:class:`~anomalykit.nn.dcgan.DCGANGenerator`, and a
:class:`~anomalykit.nn.dcgan.DCGANEncoder` with one output as the discriminator, BatchNorm in
both) on good images in [-1, 1], one :func:`~anomalykit.nn.adversarial.adversarial_step` per
batch (non-saturating loss, Adam 2e-4, beta1 0.5, as DCGAN), watched by an
:class:`~anomalykit.nn.adversarial.AdversarialMonitor`.

Inference (paper sec. 2.2): find the code whose image is closest to the query x by gradient
descent on

    L(z) = [ (1 - lambda) sum |x - G(z)| + lambda sum |f_D(x) - f_D(G(z))| ] / (C S S)

the residual loss plus the discrimination loss on the discriminator's intermediate features
f_D (its (B, F, 4, 4) map before the last layer, the feature-matching variant the paper
uses), lambda = ``discrimination_weight`` = 0.1. Dividing by the number of input values
C S S keeps the paper's weighting of the two sums and makes L of order 1 (float32 rounding
of a sum of 10^4 terms would exceed the export check's 1e-4 otherwise); the ranking of
images is the paper's. Score = L(z*) per image (raw, higher = more anomalous);
map = |x - G(z*)| averaged over channels, Gaussian-smoothed (``map_sigma``).

Differences from the paper, on purpose:

* The search is unrolled to a fixed ``search_steps`` (the paper: 500 steps) of
  normalised momentum gradient descent with a fixed, linearly decaying step schedule
  (``step_size``, ``momentum``; the paper's code uses Adam) from z0 = 0, the prior's mode
  (:meth:`AnoGANDetector.search`), so it is one static graph that
  exports to ONNX (DESIGN.md: iterative inference is unrolled). Each step costs a forward
  and a backward pass of G and of D's feature layers per image, and each unrolled step
  adds to the export time (``torch.export``'s symbolic-shape work on the dynamic batch
  dimension dominates; the contract test's export at 32 px with 10 steps took 11 s with
  the 2-core machine quiet and 38-71 s with it shared by other jobs), which is what bounds
  ``search_steps`` in the profiles. A traced loop
  (``torch._higher_order_ops.scan`` -> ONNX Scan) would export in constant time, but
  torch 2.14's exporter fails on it ("Expected leaf to be a Tensor or None, got SymInt").
* dL/dz is computed without autograd: ``torch.autograd.grad`` inside ``forward`` does not
  export with torch 2.14's dynamo exporter (see :mod:`anomalykit.detectors.differnet`), so
  the backward passes through G and D are written out as explicit vector-Jacobian products
  (:func:`anomalykit.nn.vjp.sequential_vjp`: conv -> transposed conv and back, BatchNorm's
  running-statistics scale, activation derivatives). The L1 terms' gradient is their sign.
  The exported graph computes the same search, but the search amplifies float rounding
  (``export_tolerance``): on a trained 64 px model the maps of onnxruntime and PyTorch were
  1.8e-3 apart after 10 steps (1e-7 before the search), the scores 1.3e-5; the export check
  allows 1e-2 for AnoGAN instead of the toolkit's 1e-4.
* The step is scaled per image by the first gradient's norm (:meth:`AnoGANDetector.search`):
  the raw gradient of L changes scale by orders of magnitude with the image size and the
  training state, so one plain step size that suits one model diverges on another
  (measured: 1000 suited a trained 64 px model and sent the tiny 32 px test model's L from
  0.13 to 0.63 in one step).
* Inference runs the networks in eval semantics explicitly (BatchNorm on its running
  statistics) whatever the module's mode, so ``forward`` never depends on ``self.training``
  and an image's score does not depend on the rest of its batch.

Measured (quick profile, ``anomalykit benchmark --detectors anogan ... --threads 1 --no-onnx
--seed 0``; configs/anogan/quick.yaml has the commands): image AUROC grass 0.816, pill 0.397,
magnetic_tile 0.570 (pixel AUROC 0.646, 0.166, 0.582). A baseline; on pill (a centred object
with small defects) the image score ranks defects below good images. On a trained 64 px
magnetic_tile model onnxruntime matched PyTorch to 6e-8 (score) and 5e-7 (map); on
synthetic gravel and washer the maps were up to 2e-3 apart (``export_tolerance``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError, check_choice
from anomalykit.nn.adversarial import (
    AdversarialLoss,
    AdversarialMonitor,
    adversarial_step,
    discriminator_loss,
    generator_loss,
)
from anomalykit.nn.dcgan import DCGANEncoder, DCGANGenerator, from_tanh_range
from anomalykit.nn.functional import gaussian_blur
from anomalykit.nn.vjp import sequential_forward, sequential_vjp, vjp_constants
from anomalykit.registry import register_detector

# The Wasserstein losses need a critic without BatchNorm (gradient penalty) or weight
# clipping; AnoGAN's discriminator has BatchNorm, so only the bounded losses are offered.
LOSSES = ("non_saturating", "minimax", "lsgan", "hinge")


@register_detector("anogan")
class AnoGANDetector(Detector):
    """AnoGAN: DCGAN on good images; score = residual + discrimination loss after a latent search.

    Args:
        image_size: side S of the input (a power of two >= 8: the DCGAN nets).
        latent_dim: size of the code z (100 in the paper).
        width: channels of the first discriminator / last generator layer (64 = DCGAN's
            ndf / ngf), doubled per layer up to ``max_width``.
        loss: adversarial loss (:mod:`anomalykit.nn.adversarial`; non_saturating as DCGAN).
        discrimination_weight: lambda of L(z) (0.1 in the paper).
        search_steps: gradient steps of the latent search (500 in the paper; the module
            docstring says why fewer).
        step_size: the length of the search's first step in the latent space (the gradient
            divided by its norm at z0, or its own if larger; decays linearly to 0, see
            :meth:`search`).
        momentum: heavy-ball momentum of the search (0 = plain gradient descent).
        map_sigma: Gaussian smoothing of the map, in pixels of the input (0 = none).
        lr, beta1: Adam for both players (2e-4, 0.5: DCGAN).
        sample_every: with an output folder, write a grid of 16 samples every this many
            epochs and after the last (``samples/epoch_XXX.png``; 0 = never).
    """

    manual_optimization = True
    # The unrolled search amplifies float rounding: onnxruntime and PyTorch, 1e-7 apart on
    # the map before the search, were 1e-5 apart after 3 steps and 1.8e-3 after 10 on a
    # trained 64 px model (synthetic gravel, quick profile; ReLU/LeakyReLU derivatives and
    # the L1 terms' sign flip where rounding moves a value across 0, and each step carries
    # the difference on). The score stayed within 1.3e-5.
    export_tolerance = 1e-2

    def __init__(self, image_size: int = 64, *, latent_dim: int = 100, width: int = 64,
                 max_width: int = 512, loss: AdversarialLoss = "non_saturating",
                 discrimination_weight: float = 0.1, search_steps: int = 20,
                 step_size: float = 4.0, momentum: float = 0.5, map_sigma: float = 2.0,
                 lr: float = 2e-4, beta1: float = 0.5, sample_every: int = 10) -> None:
        super().__init__()
        check_choice("loss", loss, LOSSES)
        if not 0.0 <= discrimination_weight <= 1.0:
            raise ConfigError(f"discrimination_weight must be in [0, 1]; got {discrimination_weight}")
        if search_steps < 0:
            raise ConfigError(f"search_steps must be >= 0; got {search_steps}")
        if step_size <= 0:
            raise ConfigError(f"step_size must be > 0; got {step_size}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1); got {momentum}")
        if latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1; got {latent_dim}")
        self.image_size, self.latent_dim, self.loss = image_size, latent_dim, loss
        self.discrimination_weight, self.search_steps = discrimination_weight, search_steps
        self.step_size, self.momentum, self.map_sigma = step_size, momentum, map_sigma
        self.lr, self.beta1, self.sample_every = lr, beta1, sample_every
        self.set_normalization("symmetric")  # [-1, 1], the generator's tanh range
        self.generator = DCGANGenerator(image_size, latent_dim, 3, width=width,
                                        max_width=max_width, norm="batch")
        self.discriminator = DCGANEncoder(image_size, 1, 3, width=width, max_width=max_width,
                                          norm="batch")
        self.monitor = AdversarialMonitor(loss, name="anogan")

    # -- training --------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (self.beta1, 0.999)
        return [torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=betas),
                torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas)]

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        real = self.normalize_input(batch["image"])
        return adversarial_step(self.generator, self.discriminator, real, tuple(optimizers),
                                loss=self.loss, step=self.global_step, latent_dim=self.latent_dim,
                                monitor=self.monitor)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Both players' losses on held-out good images, codes from a fixed seed (no step)."""
        real = self.normalize_input(batch["image"])
        z = torch.randn(real.shape[0], self.latent_dim, generator=torch.Generator().manual_seed(0))
        fake = self.generator(z.to(real.device, real.dtype))
        d_loss = discriminator_loss(self.discriminator(real), self.discriminator(fake), self.loss)
        g_loss = generator_loss(self.discriminator(fake), self.loss)
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss}

    @torch.no_grad()
    def on_train_epoch_end(self, epoch: int, epochs: int, *, out_dir: Any = None) -> None:
        """Write a grid of samples (fixed codes) now and then: a collapsed GAN still has a loss."""
        from anomalykit.data.io import image_grid, write_epoch_picture

        def picture():
            z = torch.randn(16, self.latent_dim, generator=torch.Generator().manual_seed(0))
            samples, _ = sequential_forward(self.generator.net,
                                            z.to(self.device).view(16, self.latent_dim, 1, 1))
            return image_grid(from_tanh_range(samples), nrow=4)

        write_epoch_picture(out_dir, epoch, epochs, self.sample_every, picture)

    # -- inference -------------------------------------------------------------------------
    def search_loss(self, x: Tensor, features_x: Tensor, z: Tensor, with_grad: bool = True,
                    constants: tuple[Any, Any] = (None, None)
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """L(z) of the module docstring, its image, and dL/dz by explicit vjps.

        x: (B, 3, S, S) in [-1, 1]; features_x: f_D(x), (B, F, 4, 4); z: (B, latent_dim).
        ``constants``: :func:`~anomalykit.nn.vjp.vjp_constants` of G and of D's features,
        computed once per search. Returns (loss (B,), G(z) (B, 3, S, S), dL/dz (B, latent_dim)
        or None).
        """
        n = x[0].numel()
        lam = self.discrimination_weight
        fake, g_acts = sequential_forward(self.generator.net, z.view(-1, self.latent_dim, 1, 1))
        features, d_acts = sequential_forward(self.discriminator.body, fake)
        residual, discrimination = fake - x, features - features_x
        # Sums over dims and reshapes with -1: no batch size enters the graph as a number.
        loss = ((1.0 - lam) * residual.abs().sum(dim=(1, 2, 3))
                + lam * discrimination.abs().sum(dim=(1, 2, 3))) / n
        if not with_grad:
            return loss, fake, None
        grad_features = sequential_vjp(self.discriminator.body, fake, torch.sign(discrimination) * lam,
                                       activations=d_acts, constants=constants[1])
        grad_fake = ((1.0 - lam) * torch.sign(residual) + grad_features) / n
        grad_z = sequential_vjp(self.generator.net, g_acts[0], grad_fake, activations=g_acts,
                                constants=constants[0])
        return loss, fake, grad_z.reshape(-1, self.latent_dim)

    def search(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The unrolled latent search: x (B, 3, S, S) in [-1, 1] -> (L(z*) (B,), G(z*), [L(z_t)]).

        Heavy-ball descent with a per-image step set by the first gradient:
        v <- momentum v + g_t / max(||g_0||, ||g_t||), z <- z - eta_t v, with
        eta_t = step_size (T - t) / T decaying linearly to 0 over the T = ``search_steps``
        steps. The division makes ``step_size`` the length of the first step in the latent
        space (whose codes have norm ~ sqrt(latent_dim)), the same for every image size and
        training state (the raw gradient's scale varies by orders of magnitude); later
        steps shrink with the gradient, as plain gradient descent, and never grow past
        eta_t (dividing by ||g_0|| alone diverged on the tests' tiny model when the gradient
        grew). Normalising every step (g_t / ||g_t||) instead amplifies float rounding once
        the gradient is small: measured 7.5e-4 between onnxruntime and PyTorch on the map
        of a trained 64 px model after 10 steps, against 8e-7 with ||g_0|| alone.
        z* = z_T, the last iterate (picking the best one would jump between iterates of
        almost equal L under rounding). The list holds L at z_0 .. z_T (tests, tuning).
        """
        _, features_x = sequential_forward(self.discriminator.body, x)
        features_x = features_x[-1]
        z = x.new_zeros(x.shape[0], self.latent_dim)
        velocity = torch.zeros_like(z)
        first_norm = None
        constants = (vjp_constants(self.generator.net), vjp_constants(self.discriminator.body))
        steps = self.search_steps
        losses = []
        for t in range(steps):
            loss, _, grad_z = self.search_loss(x, features_x, z, constants=constants)
            losses.append(loss)
            # clamp, not "+ eps": onnxruntime returned 0 (then NaN) for sqrt(0) + 1e-12; a
            # zero first gradient (an untrained G's ReLUs all off at z0 = 0): no step.
            norm = grad_z.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-10)
            first_norm = norm if first_norm is None else first_norm
            velocity = self.momentum * velocity + grad_z / torch.maximum(norm, first_norm)
            z = z - self.step_size * (steps - t) / steps * velocity
        loss, fake, _ = self.search_loss(x, features_x, z, with_grad=False)
        losses.append(loss)
        return loss, fake, losses

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,) = L(z*), anomaly_map (B, 1, S, S)."""
        x = self.normalize_input(images)
        score, fake, _ = self.search(x)
        amap = gaussian_blur((x - fake).abs().mean(1, keepdim=True), self.map_sigma)
        return AnomalyOutput(score, amap)
