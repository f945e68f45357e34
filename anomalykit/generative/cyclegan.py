"""CycleGAN (Zhu et al. 2017): unpaired image-to-image translation between two domains A and B.

Two generators, G_AB: A -> B and G_BA: B -> A (Johnson et al.'s ResNet generator,
:class:`~anomalykit.nn.image_to_image.ResnetGenerator`), and two PatchGAN discriminators, D_A
and D_B (:class:`~anomalykit.nn.image_to_image.PatchDiscriminator`, instance norm). Without
pairs, an adversarial loss alone would let G_AB map every image to any plausible B image; the
cycle-consistency loss (Zhu eq. 2) ties each translation to its input:

    L = L_GAN(G_AB, D_B) + L_GAN(G_BA, D_A)
        + lambda_cycle (|G_BA(G_AB(a)) - a|_1 + |G_AB(G_BA(b)) - b|_1)
        + lambda_identity lambda_cycle (|G_BA(a) - a|_1 + |G_AB(b) - b|_1)

with the least-squares adversarial loss (sec. 4, "Training details"), lambda_cycle 10 and the
identity loss (sec. 5.2, 0.5 x lambda_cycle) that keeps a generator from changing what is
already in its target domain (colours, mostly). Each discriminator sees its real images
against a pool of the 50 last generated images (:class:`~anomalykit.nn.image_to_image.ImagePool`,
Shrivastava et al. 2017), not only the newest ones, which damps oscillation. Adam 2e-4,
betas (0.5, 0.999); ``decay_epochs`` > 0 decays the learning rate linearly to zero over the
last epochs of a fit (the paper: 100 constant + 100 decaying).

Data: unpaired batches ``{"image": (B, C, S, S) domain-A images, "image_b": (B, C, S, S)
domain-B images}`` in [0, 1], e.g. ``model.fit({"image": good, "image_b": defective})``.
The two sets must have the same length (repeat or trim the smaller); which A image shares an
index with which B image does not matter: no loss compares them.

At the API images are in [0, 1]; inside, [-1, 1] (the generators end in tanh).
:meth:`CycleGAN.translate` maps either way; :meth:`CycleGAN.sample` translates stored A
examples (``num_examples`` training images of each domain captured when a fit starts and
kept in the state dict), so the model samples like every generative model of the suite;
:meth:`CycleGAN.score` is the cycle reconstruction error A -> B -> A per image: a model
trained with A = good images reconstructs good images and fails on what it never saw.

Measured in ``benchmarks/results/translation`` (32 px, width 16, batch 1, about 830 steps in
2.5 min on a shared 2-core machine): on washer good <-> defective, G_BA removes the defects
from held-out defective images (see ``cyclegan_defect.png``) while G_AB does not yet draw any,
and the cycle error separates held-out good from defective images with AUROC 0.70; on grass
<-> brick, the translations take the target's colour but not yet its texture.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice
from anomalykit.generative.gan import AdversarialModel, _store_adversarial, check_adversarial_options
from anomalykit.nn.adversarial import discriminator_loss, generator_loss
from anomalykit.nn.dcgan import from_tanh_range, to_tanh_range
from anomalykit.nn.image_to_image import I2INorm, ImagePool, PatchDiscriminator, ResnetGenerator
from anomalykit.registry import register_generative
from anomalykit.training.inference import as_loader, evaluating

# Losses that need nothing beyond the two players' outputs (WGAN's clipping and WGAN-GP's
# penalty would need a critic of their own here).
TranslationLoss = Literal["lsgan", "non_saturating", "hinge"]
TRANSLATION_LOSSES = ("lsgan", "non_saturating", "hinge")
Direction = Literal["a2b", "b2a"]
DIRECTIONS = ("a2b", "b2a")
GRID_COLUMNS = 8  # examples per row of the epoch's grid


# -- helpers shared with StarGAN ---------------------------------------------------------------


def first_examples(train_data: Any, keys: Sequence[str], n: int) -> dict[str, Tensor]:
    """The first ``n`` items of ``train_data`` (in order, unshuffled), entries ``keys`` only.

    ``train_data``: what ``fit`` takes (a dict of tensors, a Dataset of dict items, a
    DataLoader). Returns CPU tensors, at most ``n`` rows each (fewer when the data is smaller).
    """
    loader = as_loader(train_data, batch_size=n)
    batch = next(iter(loader), None)
    if batch is None:
        raise ConfigError("the training set is empty")
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ConfigError(f"the training batches lack {missing}; got entries {sorted(batch)}")
    return {key: batch[key][:n].detach().cpu() for key in keys}


def check_translation_options(*, image_size: int, downsamples: int, d_layers: int, loss: str,
                              lr: float, betas, num_examples: int,
                              losses: Sequence[str] = TRANSLATION_LOSSES) -> None:
    """The options CycleGAN and StarGAN share; a ConfigError naming the bad value."""
    check_choice("loss", loss, losses)
    check_adversarial_options(loss=loss, n_critic=1, gp_weight=0.0, clip=None, lr=lr, betas=betas,
                              optimizer="adam")
    if image_size < 1 or image_size % (2 ** downsamples):
        raise ConfigError(f"image_size must be a positive multiple of 2 ** downsamples = "
                          f"{2 ** downsamples}; got {image_size}")
    if d_layers < 1 or image_size // 2 ** d_layers < 3:
        # Its last two 4x4 convs (stride 1, padding 1) take 2 pixels off the strided map,
        # which must keep one.
        raise ConfigError(f"d_layers {d_layers} is too deep for image_size {image_size}: the "
                          f"discriminator needs image_size / 2 ** d_layers >= 3")
    if num_examples < 1:
        raise ConfigError(f"num_examples must be >= 1; got {num_examples}")


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter gradients for ``modules`` inside the block (the generator's step passes
    gradients through the discriminators without computing theirs)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def linear_decay(epoch: int, epochs: int, decay_epochs: int) -> float:
    """CycleGAN's learning-rate factor for 0-based ``epoch`` of ``epochs``: 1 until the last
    ``decay_epochs`` epochs, then decaying linearly (d / (d + 1), ..., 1 / (d + 1))."""
    return min(1.0, (epochs - epoch) / (decay_epochs + 1))


def decay_learning_rates(optimizers: Sequence[torch.optim.Optimizer], lr: float, epoch: int,
                         epochs: int, decay_epochs: int) -> None:
    """Set every optimiser's learning rate to ``lr`` x :func:`linear_decay` (no-op with
    ``decay_epochs`` 0). Set from the epoch, so a resumed fit gets the same rates."""
    if decay_epochs:
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * linear_decay(epoch, epochs, decay_epochs)


# -- the model ---------------------------------------------------------------------------------


@register_generative("cyclegan")
class CycleGAN(AdversarialModel):
    """CycleGAN: unpaired translation A <-> B (two generators, two PatchGANs, cycle loss).

    Cycle and identity losses and an image pool per discriminator (see the module docstring).

    Args:
        image_size: S; divisible by ``2 ** downsamples`` (the generators) and large enough for
            the discriminators' ``d_layers`` strided convs (S / 2 ** d_layers >= 3).
        in_channels: C of both domains.
        width / blocks / downsamples: the generators' first width (64 in the paper), residual
            blocks (6 at 128 px, 9 at 256 px) and stride-2 stages (2).
        d_width / d_layers: the PatchGAN discriminators' first width (64) and strided layers
            (3: 70x70 patches).
        norm: both players' normalisation, "instance" (the paper), "batch" or "none".
        loss: adversarial loss, "lsgan" (the paper), "non_saturating" or "hinge".
        lambda_cycle: weight of the cycle loss (10).
        lambda_identity: weight of the identity loss as a fraction of ``lambda_cycle`` (0.5);
            0 turns it off.
        pool_size: images in each discriminator's pool of generated images (50; 0 = no pool).
        lr / betas: Adam for both players (2e-4, (0.5, 0.999)).
        decay_epochs: decay the learning rate linearly to 0 over the last ``decay_epochs``
            epochs of a fit (0 = constant).
        num_examples: training images of each domain kept for :meth:`sample` and the grid.
        sample_seed / grid_every: as the other GANs (the grid shows the stored examples).
    """

    def __init__(self, image_size: int = 64, in_channels: int = 3, *, width: int = 64,
                 blocks: int = 6, downsamples: int = 2, d_width: int = 64, d_layers: int = 3,
                 norm: I2INorm = "instance", loss: TranslationLoss = "lsgan",
                 lambda_cycle: float = 10.0, lambda_identity: float = 0.5, pool_size: int = 50,
                 lr: float = 2e-4, betas: list[float] | tuple[float, float] = (0.5, 0.999),
                 decay_epochs: int = 0, num_examples: int = 16, sample_seed: int = 0,
                 grid_every: int = 1) -> None:
        super().__init__()
        check_translation_options(image_size=image_size, downsamples=downsamples,
                                  d_layers=d_layers, loss=loss, lr=lr, betas=betas,
                                  num_examples=num_examples)
        if lambda_cycle < 0 or lambda_identity < 0:
            raise ConfigError(f"lambda_cycle and lambda_identity must be >= 0; got {lambda_cycle}, "
                              f"{lambda_identity}")
        if pool_size < 0 or decay_epochs < 0:
            raise ConfigError(f"pool_size and decay_epochs must be >= 0; got {pool_size}, "
                              f"{decay_epochs}")
        _store_adversarial(self, loss=loss, n_critic=1, gp_weight=0.0, clip=None, lr=lr,
                           betas=betas, optimizer="adam", sample_seed=sample_seed,
                           grid_every=grid_every)
        self.image_size, self.in_channels = image_size, in_channels
        self.lambda_cycle, self.lambda_identity = lambda_cycle, lambda_identity
        self.pool_size, self.decay_epochs, self.num_examples = pool_size, decay_epochs, num_examples

        def generator() -> ResnetGenerator:
            return ResnetGenerator(in_channels, in_channels, width, blocks=blocks,
                                   downsamples=downsamples, norm=norm)

        def discriminator() -> PatchDiscriminator:
            return PatchDiscriminator(in_channels, d_width, d_layers, norm=norm)

        self.generator = nn.ModuleDict({"a2b": generator(), "b2a": generator()})
        self.discriminator = nn.ModuleDict({"a": discriminator(), "b": discriminator()})
        # Training images of each domain for sample() and the grid, set when a fit starts.
        self.register_buffer("examples_a_", torch.zeros(0, in_channels, image_size, image_size))
        self.register_buffer("examples_b_", torch.zeros(0, in_channels, image_size, image_size))

    # -- fitting hooks ---------------------------------------------------------------------
    @property
    def pools(self) -> dict[str, ImagePool]:
        """Each discriminator's pool of generated images ("a": fakes of A, "b": fakes of B);
        new ones per fit (see :meth:`setup_fit`)."""
        if "_pools" not in self.__dict__:
            self.reset_pools()
        return self.__dict__["_pools"]

    def reset_pools(self) -> None:
        # Plain attributes, not buffers: a pool is a running history of one fit, not learned.
        self.__dict__["_pools"] = {"a": ImagePool(self.pool_size), "b": ImagePool(self.pool_size)}

    def setup_fit(self, train_data, val_data, **options: Any):
        """New pools, and the first ``num_examples`` training images of each domain kept."""
        train_data, val_data = super().setup_fit(train_data, val_data, **options)
        self.reset_pools()
        examples = first_examples(train_data, ("image", "image_b"), self.num_examples)
        self.examples_a_ = examples["image"].to(self.examples_a_)
        self.examples_b_ = examples["image_b"].to(self.examples_b_)
        return train_data, val_data

    def on_train_epoch_start(self, epoch: int, epochs: int, optimizers) -> None:
        decay_learning_rates(optimizers, self.lr, epoch, epochs, self.decay_epochs)

    # -- training --------------------------------------------------------------------------
    def _domains(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if "image_b" not in batch:
            raise ConfigError("cyclegan trains on unpaired batches {'image': domain-A images, "
                              f"'image_b': domain-B images}}; got entries {sorted(batch)}")
        return to_tanh_range(batch["image"]), to_tanh_range(batch["image_b"])

    def _generator_losses(self, a: Tensor, b: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The generators' loss terms on real a, b ([-1, 1]) and the fakes (G_BA(b), G_AB(a))."""
        g, d = self.generator, self.discriminator
        fake_b, fake_a = g["a2b"](a), g["b2a"](b)
        # Zhu et al. minimise E[(D(G(x)) - 1)^2]; the suite's lsgan has Mao's factor 1/2.
        scale = 2.0 if self.loss == "lsgan" else 1.0
        adversarial = scale * (generator_loss(d["b"](fake_b), self.loss)
                               + generator_loss(d["a"](fake_a), self.loss))
        cycle = F.l1_loss(g["b2a"](fake_b), a) + F.l1_loss(g["a2b"](fake_a), b)
        terms = {"g_adv": adversarial, "cycle": cycle}
        g_loss = adversarial + self.lambda_cycle * cycle
        if self.lambda_identity > 0:
            identity = F.l1_loss(g["b2a"](a), a) + F.l1_loss(g["a2b"](b), b)
            terms["identity"] = identity
            g_loss = g_loss + self.lambda_identity * self.lambda_cycle * identity
        terms["g_loss"] = g_loss
        return terms, fake_a, fake_b

    def _discriminator_loss(self, a: Tensor, b: Tensor, fake_a: Tensor, fake_b: Tensor) -> Tensor:
        d = self.discriminator
        return (discriminator_loss(d["a"](a), d["a"](fake_a), self.loss)
                + discriminator_loss(d["b"](b), d["b"](fake_b), self.loss))

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """Both generators, then both discriminators on real images against pooled fakes
        (Zhu et al.'s order). Logs d_loss, g_loss, g_adv, cycle, identity."""
        opt_g, opt_d = optimizers
        a, b = self._domains(batch)
        with frozen(self.discriminator):
            terms, fake_a, fake_b = self._generator_losses(a, b)
        opt_g.zero_grad(set_to_none=True)
        terms["g_loss"].backward()
        opt_g.step()
        pooled_a, pooled_b = self.pools["a"].query(fake_a), self.pools["b"].query(fake_b)
        d_loss = self._discriminator_loss(a, b, pooled_a, pooled_b)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        self.monitor.update(d_loss.detach(), b, fake_b.detach())
        logs = {k: v.detach() for k, v in terms.items()}
        return {"loss": d_loss.detach() + logs["g_loss"], "d_loss": d_loss.detach(), **logs}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        a, b = self._domains(batch)
        terms, fake_a, fake_b = self._generator_losses(a, b)
        d_loss = self._discriminator_loss(a, b, fake_a, fake_b)
        return {"loss": d_loss + terms["g_loss"], "d_loss": d_loss, **terms}

    # -- use -------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, x: Tensor, direction: Direction = "a2b") -> Tensor:
        """(B, C, S, S) images in [0, 1] of the source domain -> (B, C, S, S) in [0, 1] of the
        target: ``"a2b"`` = G_AB, ``"b2a"`` = G_BA."""
        check_choice("direction", direction, DIRECTIONS)
        with evaluating(self):
            return from_tanh_range(self.generator[direction](to_tanh_range(x)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """(B, C, S, S) A images in [0, 1] -> G_BA(G_AB(x)), their cycle reconstruction."""
        return self.translate(self.translate(x, "a2b"), "b2a")

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """(B,) mean absolute cycle error |G_BA(G_AB(x)) - x| per image ([0, 1] units), an
        anomaly score for domain A: higher = the A -> B -> A cycle fails to bring x back."""
        return (self.reconstruct(x) - x).abs().flatten(1).mean(1)

    def _examples(self, domain: str) -> Tensor:
        examples = self.examples_a_ if domain == "a" else self.examples_b_
        if len(examples) == 0:
            raise ConfigError("CycleGAN.sample translates stored training images: call fit first")
        return examples

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, S, S) in [0, 1]: G_AB of n stored A examples drawn (with replacement) from
        ``generator``. A translation model has no noise to sample; these are its outputs."""
        examples = self._examples("a")
        index = torch.randint(len(examples), (n,), generator=generator).to(examples.device)
        return self.translate(examples[index], "a2b")

    def sample_grid(self) -> np.ndarray:
        """(H, W, 3) uint8 grid of the stored examples, 6 rows: A | G_AB(A) | G_BA(G_AB(A)) and
        B | G_BA(B) | G_AB(G_BA(B))."""
        from anomalykit.data.io import image_grid

        a, b = self._examples("a")[:GRID_COLUMNS], self._examples("b")[:GRID_COLUMNS]
        k = min(len(a), len(b))
        a, b = a[:k], b[:k]
        fake_b, fake_a = self.translate(a, "a2b"), self.translate(b, "b2a")
        rows = [a, fake_b, self.translate(fake_b, "b2a"), b, fake_a, self.translate(fake_a, "a2b")]
        return image_grid(torch.cat(rows), nrow=k)
