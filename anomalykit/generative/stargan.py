"""StarGAN (Choi et al. 2018): one generator that translates an image into any of K domains.

G(x, c) takes the image and the target domain c as K one-hot channels broadcast over the
image (Choi sec. 3, fig. 3), through Johnson et al.'s ResNet generator
(:class:`~anomalykit.nn.image_to_image.ResnetGenerator`) whose 7x7 stem pads with zeros, as in
Choi et al.'s code (with reflection padding the instance norm erases the constant domain
channels, see :class:`DomainGenerator`). The discriminator is a PatchGAN body
(:meth:`PatchDiscriminator.features <anomalykit.nn.image_to_image.PatchDiscriminator.features>`)
with two heads: D_src, the real/fake patch map, and D_cls, a convolution over the whole feature
map giving (B, K) domain logits. Losses (Choi eqs. 1-7):

    L_D = L_adv(D) + lambda_cls CE(D_cls(x), c')                 (real images, their domain c')
    L_G = L_adv(G) + lambda_cls CE(D_cls(G(x, c)), c) + lambda_rec |G(G(x, c), c') - x|_1

with the WGAN-GP adversarial loss (gradient penalty 10), 5 critic steps per generator step,
lambda_cls 1, lambda_rec 10, Adam 1e-4 betas (0.5, 0.999): the paper's settings are the
defaults. The target domains c are drawn uniformly at random per image each step (the paper
shuffles the batch's labels; uniform draws give every domain its share in small batches too).
``loss`` may be "lsgan", "non_saturating" or "hinge" instead: no gradient penalty (its double
backward) and, with ``n_critic=1``, a generator update every step, which is cheaper on a CPU.
The default stays the paper's; measured in ``benchmarks/results/translation`` (washer, good +
4 defect types, 32 px, batch 1, about 2.5 min of training each on a shared 2-core machine),
``loss="lsgan", n_critic=1`` got further in the same time: FD-Lite0 of the translations
1513-2013 against 3167-3696 for 3 of the 4 defect types ("missing": 3156 against 3051), mean
|G(good, good) - good| 0.054 against 0.100, domain classifier accuracy on held-out images
0.49 against 0.23 (chance 0.2). Neither renders
realistic defects in that budget; use the cheaper loss for quick CPU runs.
``decay_epochs`` decays the learning rate linearly to zero over the last epochs of a fit.

Data: batches ``{"image": (B, C, S, S) in [0, 1], "domain": (B,) int64 in [0, K)}``, e.g.
good images with domain 0 and each defect type of the synthetic set as a domain of its own:
one model then renders each defect type on a good image (:meth:`StarGAN.translate`).
:meth:`StarGAN.sample` translates ``num_examples`` stored training images (captured when a fit
starts, kept in the state dict) to the domains 0, 1, ..., K-1 in turn. :meth:`StarGAN.score`
is the domain classifier's -log p(domain | x) for a reference domain (0: "good"): higher = the
classifier finds x less like that domain.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError
from anomalykit.generative.cyclegan import (
    TRANSLATION_LOSSES,
    check_translation_options,
    decay_learning_rates,
    first_examples,
    frozen,
)
from anomalykit.generative.gan import AdversarialModel, _store_adversarial
from anomalykit.nn.adversarial import add_gradient_penalty, discriminator_loss, generator_loss
from anomalykit.nn.dcgan import from_tanh_range, to_tanh_range
from anomalykit.nn.image_to_image import I2INorm, PatchDiscriminator, ResnetGenerator, init_normal
from anomalykit.registry import register_generative
from anomalykit.training.inference import evaluating

StarLoss = Literal["wgan_gp", "lsgan", "non_saturating", "hinge"]
STAR_LOSSES = ("wgan_gp", *TRANSLATION_LOSSES)
GRID_ROWS = 8  # examples in the epoch's grid


# -- blocks ------------------------------------------------------------------------------------


class DomainGenerator(nn.Module):
    """G(x, c): (B, C, S, S) in [-1, 1] and (B,) int64 target domains -> (B, C, S, S) in
    [-1, 1]; the ResNet generator on x concatenated with the one-hot domain as K constant
    channels."""

    def __init__(self, in_channels: int, num_domains: int, width: int, *, blocks: int,
                 downsamples: int, norm: I2INorm) -> None:
        super().__init__()
        self.num_domains = num_domains
        # The domain channels are constant over the image. Reflection padding keeps them
        # constant, and the stem's instance norm then subtracts them away entirely: G would
        # never see c (measured on the 3 colour domains of tests/test_stargan.py: after 180
        # steps the translations had the target's colour for 33% of the images, chance).
        # Zero padding, as in Choi et al.'s code, makes c visible at the borders, from where
        # the convolutions carry it inwards (100% after 36 steps).
        self.net = ResnetGenerator(in_channels + num_domains, in_channels, width, blocks=blocks,
                                   downsamples=downsamples, norm=norm, stem_padding="zeros")

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        code = F.one_hot(domain, self.num_domains).to(x.dtype)
        code = code[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.net(torch.cat([x, code], dim=1))


class DomainDiscriminator(nn.Module):
    """(B, C, S, S) in [-1, 1] -> (D_src (B, 1, h, w) real/fake patch logits, D_cls (B, K)
    domain logits), both heads on one PatchGAN body (Choi sec. 3.1: D: x -> {D_src, D_cls}).

    D_cls is a convolution whose kernel spans the whole feature map (the paper's h/64 x w/64
    kernel at 128 px), so each image gets one K-way prediction.
    """

    def __init__(self, image_size: int, in_channels: int, num_domains: int, *, width: int,
                 layers: int, norm: I2INorm) -> None:
        super().__init__()
        self.patch = PatchDiscriminator(in_channels, width, layers, norm=norm)
        with torch.no_grad():  # the body's output side at this image size
            side = self.patch.features(torch.zeros(1, in_channels, image_size, image_size)).shape[-1]
        self.classifier = nn.Conv2d(self.patch.feature_channels, num_domains, side, bias=False)
        init_normal(self.classifier)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.patch.features(x)
        return self.patch.head(features), self.classifier(features).flatten(1)

    def source(self, x: Tensor) -> Tensor:
        """D_src alone (what the gradient penalty differentiates)."""
        return self.patch(x)


# -- the model ---------------------------------------------------------------------------------


@register_generative("stargan")
class StarGAN(AdversarialModel):
    """StarGAN: one generator G(x, c) for K domains, a discriminator with a domain classifier.

    See the module docstring.

    Args:
        image_size: S; divisible by ``2 ** downsamples`` and S / 2 ** d_layers >= 3.
        in_channels: C.
        num_domains: K, the number of domains (labels 0 .. K-1).
        domain_names: optional names of the K domains (e.g. ["good", "crack", ...]), kept in
            the config for whoever renders with the model (``anomalykit data augment``).
        width / blocks / downsamples: the generator's first width (64), residual blocks (6)
            and stride-2 stages (2).
        d_width / d_layers: the discriminator body's first width (64) and strided layers.
        norm: the generator's normalisation ("instance", the paper).
        d_norm: the discriminator's ("none", the paper; the gradient penalty is per image, so
            "batch" is refused with wgan_gp).
        loss: "wgan_gp" (the paper), "lsgan", "non_saturating" or "hinge".
        n_critic: discriminator steps per generator step (5 with wgan_gp in the paper).
        gp_weight: weight of the gradient penalty (wgan_gp only; 10).
        lambda_cls / lambda_rec: weights of the domain classification (1) and reconstruction
            (10) losses.
        lr / betas: Adam for both players (1e-4, (0.5, 0.999)).
        decay_epochs: decay the learning rate linearly to 0 over the last ``decay_epochs``
            epochs of a fit (0 = constant).
        num_examples: training images kept for :meth:`sample` and the grid.
        sample_seed / grid_every: as the other GANs.
    """

    def __init__(self, image_size: int = 64, in_channels: int = 3, num_domains: int = 5, *,
                 domain_names: list[str] | None = None, width: int = 64, blocks: int = 6,
                 downsamples: int = 2, d_width: int = 64, d_layers: int = 3,
                 norm: I2INorm = "instance", d_norm: I2INorm = "none",
                 loss: StarLoss = "wgan_gp", n_critic: int = 5, gp_weight: float = 10.0,
                 lambda_cls: float = 1.0, lambda_rec: float = 10.0, lr: float = 1e-4,
                 betas: list[float] | tuple[float, float] = (0.5, 0.999), decay_epochs: int = 0,
                 num_examples: int = 16, sample_seed: int = 0, grid_every: int = 1) -> None:
        super().__init__()
        check_translation_options(image_size=image_size, downsamples=downsamples,
                                  d_layers=d_layers, loss=loss, lr=lr, betas=betas,
                                  num_examples=num_examples, losses=STAR_LOSSES)
        if n_critic < 1 or gp_weight < 0:
            raise ConfigError(f"n_critic must be >= 1 and gp_weight >= 0; got {n_critic}, "
                              f"{gp_weight}")
        if loss == "wgan_gp" and d_norm == "batch":
            # The penalty is per image; BatchNorm mixes the images of a batch.
            raise ConfigError("loss 'wgan_gp' needs a discriminator without BatchNorm: set d_norm "
                              "to 'instance' or 'none'; got d_norm 'batch'")
        if num_domains < 2:
            raise ConfigError(f"num_domains must be >= 2; got {num_domains}")
        if domain_names is not None and len(domain_names) != num_domains:
            raise ConfigError(f"domain_names must name the {num_domains} domains; got "
                              f"{list(domain_names)}")
        if lambda_cls < 0 or lambda_rec < 0:
            raise ConfigError(f"lambda_cls and lambda_rec must be >= 0; got {lambda_cls}, "
                              f"{lambda_rec}")
        if decay_epochs < 0:
            raise ConfigError(f"decay_epochs must be >= 0; got {decay_epochs}")
        _store_adversarial(self, loss=loss, n_critic=n_critic, gp_weight=gp_weight, clip=None,
                           lr=lr, betas=betas, optimizer="adam", sample_seed=sample_seed,
                           grid_every=grid_every)
        self.image_size, self.in_channels, self.num_domains = image_size, in_channels, num_domains
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.lambda_cls, self.lambda_rec = lambda_cls, lambda_rec
        self.decay_epochs, self.num_examples = decay_epochs, num_examples
        self.generator = DomainGenerator(in_channels, num_domains, width, blocks=blocks,
                                         downsamples=downsamples, norm=norm)
        self.discriminator = DomainDiscriminator(image_size, in_channels, num_domains,
                                                 width=d_width, layers=d_layers, norm=d_norm)
        # Training images and their domains for sample() and the grid, set when a fit starts.
        self.register_buffer("examples_", torch.zeros(0, in_channels, image_size, image_size))
        self.register_buffer("example_domains_", torch.zeros(0, dtype=torch.long))

    # -- fitting hooks ---------------------------------------------------------------------
    def setup_fit(self, train_data, val_data, **options: Any):
        """The first ``num_examples`` training images (and domains) kept for the grid."""
        train_data, val_data = super().setup_fit(train_data, val_data, **options)
        examples = first_examples(train_data, ("image", "domain"), self.num_examples)
        self.examples_ = examples["image"].to(self.examples_)
        self.example_domains_ = examples["domain"].long().to(self.example_domains_.device)
        return train_data, val_data

    def on_train_epoch_start(self, epoch: int, epochs: int, optimizers) -> None:
        decay_learning_rates(optimizers, self.lr, epoch, epochs, self.decay_epochs)

    # -- training --------------------------------------------------------------------------
    def _batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if "domain" not in batch:
            raise ConfigError("stargan trains on batches {'image': images, 'domain': (B,) int64 "
                              f"domain labels}}; got entries {sorted(batch)}")
        domain = batch["domain"].long()
        if len(domain) and (domain.min() < 0 or domain.max() >= self.num_domains):
            raise ConfigError(f"domain labels must be in [0, {self.num_domains}); got "
                              f"{int(domain.min())} .. {int(domain.max())}")
        return to_tanh_range(batch["image"]), domain

    def _generator_terms(self, x: Tensor, source: Tensor, target: Tensor,
                         fake: Tensor) -> dict[str, Tensor]:
        """L_G's terms for fakes G(x, target) of real x (domains ``source``)."""
        d_src, d_cls = self.discriminator(fake)
        terms = {"g_adv": generator_loss(d_src, self.loss),
                 "g_cls": F.cross_entropy(d_cls, target),
                 "rec": F.l1_loss(self.generator(fake, source), x)}
        terms["g_loss"] = (terms["g_adv"] + self.lambda_cls * terms["g_cls"]
                           + self.lambda_rec * terms["rec"])
        return terms

    def _discriminator_terms(self, x: Tensor, source: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """L_D's terms (the gradient penalty excepted) on real x and detached fakes."""
        (real_src, real_cls), (fake_src, _) = self.discriminator(x), self.discriminator(fake)
        terms = {"d_adv": discriminator_loss(real_src, fake_src, self.loss),
                 "d_cls": F.cross_entropy(real_cls, source)}
        terms["d_loss"] = terms["d_adv"] + self.lambda_cls * terms["d_cls"]
        return terms

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """The discriminator every step, the generator every ``n_critic``-th step (on the
        other steps its terms are evaluated for the log only). Logs d_loss, d_adv, d_cls,
        g_loss, g_adv, g_cls, rec, and gp with wgan_gp."""
        opt_g, opt_d = optimizers
        x, source = self._batch(batch)
        # Global RNG: the loop seeds it per epoch, so a run reproduces.
        target = torch.randint(self.num_domains, source.shape).to(source.device)
        fake = self.generator(x, target)
        d_terms = self._discriminator_terms(x, source, fake.detach())
        d_loss, gp_logs = add_gradient_penalty(d_terms["d_loss"], loss=self.loss,
                                               critic=self.discriminator.source, real=x, fake=fake,
                                               gp_weight=self.gp_weight)
        d_terms.update(gp_logs)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if self.global_step % self.n_critic == 0:
            with frozen(self.discriminator):
                g_terms = self._generator_terms(x, source, target, fake)
            opt_g.zero_grad(set_to_none=True)
            g_terms["g_loss"].backward()
            opt_g.step()
        else:
            with torch.no_grad():
                g_terms = self._generator_terms(x, source, target, fake.detach())
        self.monitor.update(d_loss.detach(), x, fake.detach())
        logs = {k: v.detach() for k, v in {**d_terms, **g_terms}.items()}
        logs["d_loss"] = d_loss.detach()  # with the penalty
        return {"loss": logs["d_loss"] + logs["g_loss"], **logs}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x, source = self._batch(batch)
        target = torch.randint(self.num_domains, source.shape).to(source.device)
        fake = self.generator(x, target)
        terms = {**self._discriminator_terms(x, source, fake),
                 **self._generator_terms(x, source, target, fake)}
        return {"loss": terms["d_loss"] + terms["g_loss"], **terms}

    # -- use -------------------------------------------------------------------------------
    def _domains(self, domain: int | Tensor, n: int, device: torch.device) -> Tensor:
        domain = torch.as_tensor(domain, dtype=torch.long)
        if domain.dim() == 0:
            domain = domain.expand(n)
        if domain.shape != (n,):
            raise ConfigError(f"domain must be an int or have shape ({n},); got "
                              f"{tuple(domain.shape)}")
        if domain.min() < 0 or domain.max() >= self.num_domains:
            raise ConfigError(f"domain must be in [0, {self.num_domains}); got "
                              f"{domain.unique().tolist()}")
        return domain.to(device)

    @torch.no_grad()
    def translate(self, x: Tensor, domain: int | Tensor) -> Tensor:
        """(B, C, S, S) images in [0, 1] -> (B, C, S, S) in [0, 1] rendered in ``domain`` (an
        int for all, or (B,) int64 per image)."""
        with evaluating(self):
            return from_tanh_range(self.generator(to_tanh_range(x),
                                                  self._domains(domain, len(x), x.device)))

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> (B, K) the domain classifier's logits."""
        with evaluating(self):
            return self.discriminator(to_tanh_range(x))[1]

    @torch.no_grad()
    def score(self, x: Tensor, domain: int = 0) -> Tensor:
        """(B,) -log p(domain | x) under the domain classifier D_cls; with ``domain`` the
        good images' domain (0 by convention), higher = less like a good image."""
        if not 0 <= domain < self.num_domains:
            raise ConfigError(f"domain must be in [0, {self.num_domains}); got {domain}")
        return -F.log_softmax(self.classify(x), dim=1)[:, domain]

    def _examples(self) -> Tensor:
        if len(self.examples_) == 0:
            raise ConfigError("StarGAN.sample translates stored training images: call fit first")
        return self.examples_

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, S, S) in [0, 1]: n stored examples drawn (with replacement) from ``generator``,
        translated to the domains 0, 1, ..., K-1, 0, ... in turn."""
        examples = self._examples()
        index = torch.randint(len(examples), (n,), generator=generator).to(examples.device)
        return self.translate(examples[index], torch.arange(n) % self.num_domains)

    def sample_grid(self) -> np.ndarray:
        """(H, W, 3) uint8 grid: one row per stored example (at most 8): the input, then its
        translation to each domain 0 .. K-1."""
        from anomalykit.data.io import image_grid

        x = self._examples()[:GRID_ROWS]
        columns = [x] + [self.translate(x, k) for k in range(self.num_domains)]
        return image_grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=self.num_domains + 1)
