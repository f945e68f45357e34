"""Adversarial losses, the gradient penalty, weight clipping and a training-health monitor.

One function per player, the loss chosen by name, so a GAN's networks never depend on its
loss (LSGAN, WGAN and WGAN-GP are options of one model, not copies of it). Discriminator
outputs are raw logits / critic values of shape (B,) or (B, 1):

==================  =================================================  ==========================
``loss``            discriminator / critic                             generator
==================  =================================================  ==========================
``minimax``         BCE(D(x), 1) + BCE(D(G(z)), 0)  (Goodfellow 2014)  -BCE(D(G(z)), 0) = log(1 - D)
``non_saturating``  same                                               BCE(D(G(z)), 1) = -log D
``lsgan``           0.5 (D(x) - 1)^2 + 0.5 D(G(z))^2  (Mao 2017)       0.5 (D(G(z)) - 1)^2
``wgan``            D(G(z)) - D(x)  (Arjovsky 2017; clip weights)      -D(G(z))
``wgan_gp``         same + 10 x gradient penalty (Gulrajani 2017)      -D(G(z))
``hinge``           relu(1 - D(x)) + relu(1 + D(G(z)))                 -D(G(z))
==================  =================================================  ==========================

All are means over the batch. The gradient penalty is not part of :func:`discriminator_loss`
(it needs the critic and the samples): add :func:`gradient_penalty` for ``wgan_gp``.

:class:`AdversarialMonitor` watches a run for the two silent failures of GAN training: the
discriminator winning outright (its loss near zero for many steps, so the generator gets no
gradient) and mode collapse (a batch of samples with almost no spread). It warns once each,
with what to change. Plain modules and functions: nothing here imports the toolkit's contracts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AdversarialLoss = Literal["minimax", "non_saturating", "lsgan", "wgan", "wgan_gp", "hinge"]
ADVERSARIAL_LOSSES = ("minimax", "non_saturating", "lsgan", "wgan", "wgan_gp", "hinge")
# Losses whose discriminator value is bounded below by 0 and reaches ~0 when it wins outright.
_BOUNDED = ("minimax", "non_saturating", "lsgan", "hinge")


def discriminator_loss(real: Tensor, fake: Tensor, loss: AdversarialLoss) -> Tensor:
    """Scalar loss of the discriminator / critic from its outputs on real and generated data."""
    real, fake = real.reshape(-1), fake.reshape(-1)
    if loss in ("minimax", "non_saturating"):
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    if loss == "lsgan":
        return 0.5 * ((real - 1.0).pow(2).mean() + fake.pow(2).mean())
    if loss in ("wgan", "wgan_gp"):
        return fake.mean() - real.mean()
    if loss == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    raise ValueError(f"loss must be one of {', '.join(ADVERSARIAL_LOSSES)}; got {loss!r}")


def generator_loss(fake: Tensor, loss: AdversarialLoss) -> Tensor:
    """Scalar loss of the generator from the discriminator's outputs on generated data."""
    fake = fake.reshape(-1)
    if loss == "minimax":
        # min log(1 - D(G(z))): saturates when D rejects the samples (why non_saturating exists)
        return -F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if loss == "non_saturating":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if loss == "lsgan":
        return 0.5 * (fake - 1.0).pow(2).mean()
    if loss in ("wgan", "wgan_gp", "hinge"):
        return -fake.mean()
    raise ValueError(f"loss must be one of {', '.join(ADVERSARIAL_LOSSES)}; got {loss!r}")


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, *,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP's penalty E[(||grad_x D(x_hat)||_2 - 1)^2] on random interpolates x_hat.

    real, fake: (B, ...) on the same device; ``fake`` is detached here. The interpolation
    weights come from ``generator`` (CPU) when given, else the global RNG. Differentiable
    with respect to the critic's parameters (create_graph), as the loss needs.
    """
    b = real.shape[0]
    shape = (b,) + (1,) * (real.dim() - 1)
    eps = torch.rand(shape, generator=generator).to(real.device, real.dtype)
    x_hat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def add_gradient_penalty(d_loss: Tensor, *, loss: AdversarialLoss,
                         critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                         gp_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """A critic's loss with WGAN-GP's term: ``(d_loss + gp_weight x penalty, {"gp": penalty})``
    for ``loss == "wgan_gp"`` (the penalty detached, for the logs), ``(d_loss, {})`` otherwise."""
    if loss != "wgan_gp":
        return d_loss, {}
    penalty = gradient_penalty(critic, real, fake)
    return d_loss + gp_weight * penalty, {"gp": penalty.detach()}


@torch.no_grad()
def clip_weights(module: nn.Module, clip: float) -> None:
    """WGAN's Lipschitz constraint: every parameter clamped to [-clip, clip] in place."""
    for p in module.parameters():
        p.clamp_(-clip, clip)


def batch_spread(samples: Tensor) -> float:
    """Mean over features of the standard deviation across a batch (B, ...): 0 = all equal."""
    flat = samples.detach().float().flatten(1)
    return float(flat.std(dim=0, unbiased=False).mean()) if len(flat) > 1 else float("nan")


class AdversarialMonitor:
    """Warn (once each) when the discriminator wins outright or the samples collapse.

    Call :meth:`update` once per training step with the discriminator's loss and the batch
    of real and generated samples. The discriminator "wins" when a bounded loss (all but
    the Wasserstein ones, whose critic values have no floor) stays below ``win_loss`` for
    ``patience`` consecutive steps; the samples "collapse" when their batch spread stays
    below ``collapse_ratio`` times the real batch's for ``patience`` steps. ``warnings``
    lists what was raised (for reports and tests).
    """

    def __init__(self, loss: AdversarialLoss, *, name: str = "GAN", patience: int = 50,
                 win_loss: float = 1e-3, collapse_ratio: float = 0.05) -> None:
        self.loss, self.name, self.patience = loss, name, patience
        self.win_loss, self.collapse_ratio = win_loss, collapse_ratio
        self.win_steps = self.collapse_steps = 0
        self.warnings: list[str] = []

    def update(self, d_loss: float | Tensor, real: Tensor, fake: Tensor) -> None:
        d_loss = float(d_loss)
        if self.loss in _BOUNDED:
            self.win_steps = self.win_steps + 1 if d_loss < self.win_loss else 0
            if self.win_steps == self.patience:
                self._warn(f"{self.name}: the discriminator wins outright (its {self.loss} loss "
                           f"stayed below {self.win_loss:g} for {self.patience} steps), so the "
                           "generator gets almost no gradient; lower the discriminator's "
                           "learning rate, use the non_saturating or wgan_gp loss, or train longer "
                           "from another seed")
        real_spread, fake_spread = batch_spread(real), batch_spread(fake)
        collapsed = real_spread > 0 and fake_spread < self.collapse_ratio * real_spread
        self.collapse_steps = self.collapse_steps + 1 if collapsed else 0
        if self.collapse_steps == self.patience:
            self._warn(f"{self.name}: the generator's samples collapsed (batch spread "
                       f"{fake_spread:.3g} against {real_spread:.3g} for real data, for "
                       f"{self.patience} steps): mode collapse; try wgan_gp, a lower learning rate "
                       "or another seed")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def adversarial_step(generator: nn.Module, discriminator: nn.Module, real: Tensor,
                     optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], *,
                     loss: AdversarialLoss, step: int, latent_dim: int, n_critic: int = 1,
                     gp_weight: float = 10.0, clip: float | None = None,
                     monitor: AdversarialMonitor | None = None) -> dict[str, Tensor]:
    """One manual-optimisation step of an unconditional GAN: the discriminator every step,
    the generator every ``n_critic``-th step (``step`` counts from 0: the loop's global_step).

    generator: (B, latent_dim) -> samples like ``real``; discriminator: samples -> (B,) or
    (B, 1) raw outputs. ``optimizers`` = (generator's, discriminator's). ``wgan_gp`` adds
    ``gp_weight`` x :func:`gradient_penalty`; ``clip`` clamps the critic's weights after its
    step (WGAN). Codes are drawn from the global RNG (the loop seeds it per epoch), so a run
    is reproducible. Returns detached logs: ``d_loss``, ``g_loss`` (on steps without a
    generator update, its loss against the critic it faced), ``d_real``, ``d_fake`` (mean
    outputs), ``gp`` (the unweighted penalty, ``wgan_gp`` only) and ``loss`` = d_loss + g_loss
    (what the loop's progress bar shows first).
    """
    opt_g, opt_d = optimizers
    z = torch.randn(real.shape[0], latent_dim, device=real.device, dtype=real.dtype)
    fake = generator(z)
    d_real, d_fake = discriminator(real), discriminator(fake.detach())
    d_loss, logs = add_gradient_penalty(discriminator_loss(d_real, d_fake, loss), loss=loss,
                                        critic=discriminator, real=real, fake=fake,
                                        gp_weight=gp_weight)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    if clip is not None:
        clip_weights(discriminator, clip)
    if step % n_critic == 0:
        g_loss = generator_loss(discriminator(fake), loss)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    else:  # logged only: the generator's loss against the critic it just faced
        with torch.no_grad():
            g_loss = generator_loss(d_fake, loss)
    if monitor is not None:
        monitor.update(d_loss.detach(), real, fake.detach())
    return {"loss": d_loss.detach() + g_loss.detach(), "d_loss": d_loss.detach(),
            "g_loss": g_loss.detach(), "d_real": d_real.detach().mean(),
            "d_fake": d_fake.detach().mean(), **logs}
