"""Variational autoencoder (Kingma & Welling 2014) and its class-conditional form, the CVAE
(Sohn et al. 2015), on images in [0, 1].

Encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))): the autoencoder's :class:`ConvEncoder`
(:mod:`anomalykit.nn.conv`) with 2 * latent_dim outputs, split into mu and logvar. Decoder
p(x|z): the autoencoder's :class:`ConvDecoder` (sigmoid output = the mean of p(x|z)), with
prior p(z) = N(0, I).

Training maximises the (beta-weighted, Higgins et al. 2017) evidence lower bound, per image
in nats (Kingma & Welling eq. 10, with the closed-form Gaussian KL of their appendix B):

    loss = E_q[-log p(x|z)] + beta * KL(q(z|x) || N(0, I)),
    KL   = 0.5 * sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)

with one reparameterised draw z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (sec. 2.4).
``likelihood`` chooses p(x|z): "gaussian" with a fixed std ``sigma`` (small sigma weighs the
reconstruction up against the KL, like a small beta) or "bernoulli" (binary cross-entropy,
the paper's MNIST choice; for grey levels it is not a normalised density).

``elbo(x)`` is the lower bound itself; ``log_prob(x, n_samples=K)`` is the importance-
weighted bound of Burda et al. 2016 (K = 1 gives the ELBO; it tightens towards log p(x) as K
grows), so it is a lower bound on the log-likelihood, never the exact value.

``cvae`` (:class:`CVAE`) is the same model with a one-hot label y fed to both networks
(q(z|x, y), p(x|z, y), prior N(0, I)); its bounds are on log p(x|y), and ``sample(n, labels)``
draws images of the asked classes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError, DataError
from anomalykit.generative.ae import BERGMANN_STRIDES, BERGMANN_WIDTHS, randn_like
from anomalykit.nn.conv import ConvDecoder, ConvEncoder, check_layout
from anomalykit.registry import register_generative

Likelihood = Literal["gaussian", "bernoulli"]
LIKELIHOODS = ("gaussian", "bernoulli")


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """(B,) KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def reparameterize(mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None,
                   temperature: float = 1.0) -> Tensor:
    """z = mu + temperature * exp(logvar / 2) * eps: differentiable in mu and logvar."""
    return mu + temperature * torch.exp(0.5 * logvar) * randn_like(mu, generator)


@register_generative("vae")
class VAE(GenerativeModel):
    """Convolutional VAE on (B, C, S, S) images in [0, 1].

    Args:
        image_size: S, a multiple of 2**(number of stride-2 layers).
        in_channels: C.
        latent_dim: size of z.
        widths / strides / batch_norm: the encoder layers (mirrored by the decoder), as in
            :class:`~anomalykit.generative.ae.AutoEncoder`.
        beta: weight of the KL term (1 = the ELBO; beta-VAE otherwise).
        likelihood: "gaussian" (fixed std ``sigma``) or "bernoulli".
        sigma: std of the Gaussian likelihood, in image units.
        logvar_clamp: logvar is clamped to [-logvar_clamp, logvar_clamp] for stability.
        lr / weight_decay: Adam.
    """

    def __init__(self, image_size: int = 64, *, in_channels: int = 3, latent_dim: int = 32,
                 widths: list[int] | tuple[int, ...] = BERGMANN_WIDTHS,
                 strides: list[int] | tuple[int, ...] = BERGMANN_STRIDES,
                 batch_norm: bool = False, beta: float = 1.0, likelihood: Likelihood = "gaussian",
                 sigma: float = 0.1, logvar_clamp: float = 20.0, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self._build(image_size, in_channels, latent_dim, widths, strides, batch_norm, beta,
                    likelihood, sigma, logvar_clamp, lr, weight_decay, cond_dim=0)

    def _build(self, image_size: int, in_channels: int, latent_dim: int, widths, strides,
               batch_norm: bool, beta: float, likelihood: str, sigma: float, logvar_clamp: float,
               lr: float, weight_decay: float, *, cond_dim: int) -> None:
        """Check and store the options, build encoder and decoder.

        ``cond_dim`` > 0 (the CVAE) widens both for a (B, cond_dim) condition c: the encoder
        sees c as ``cond_dim`` constant extra input channels, the decoder sees [z, c].
        """
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_layout(image_size, widths, strides)
        if beta < 0 or sigma <= 0:
            raise ConfigError(f"beta must be >= 0 and sigma > 0; got beta={beta}, sigma={sigma}")
        self.image_size, self.latent_dim = image_size, latent_dim
        self.beta, self.likelihood, self.sigma = beta, likelihood, sigma
        self.logvar_clamp, self.lr, self.weight_decay = logvar_clamp, lr, weight_decay
        self.encoder = ConvEncoder(image_size, in_channels + cond_dim, widths, strides,
                                   2 * latent_dim, batch_norm)
        self.decoder = ConvDecoder(self.encoder.bottom, in_channels, widths, strides,
                                   latent_dim + cond_dim, batch_norm)

    # -- the model, given an optional condition c (B, cond_dim) -----------------------------
    def _posterior(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) [and c] -> mu, logvar (B, latent_dim) of q(z|x[, c])."""
        if cond is not None:
            x = torch.cat([x, cond[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-self.logvar_clamp, self.logvar_clamp)

    def _decoder_mean(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, latent_dim) [and c] -> (B, C, S, S) in [0, 1], the mean of p(x|z[, c])."""
        return self.decoder(z if cond is None else torch.cat([z, cond], dim=1))

    def _elbo(self, x: Tensor, cond: Tensor | None, n_samples: int,
              generator: torch.Generator | None) -> Tensor:
        mu, logvar = self._posterior(x, cond)
        nll = torch.stack([self.reconstruction_nll(
            x, self._decoder_mean(reparameterize(mu, logvar, generator=generator), cond))
            for _ in range(n_samples)]).mean(0)
        return -(nll + kl_divergence(mu, logvar))

    def _importance_weighted_bound(self, x: Tensor, cond: Tensor | None, n_samples: int,
                                   generator: torch.Generator | None) -> Tensor:
        mu, logvar = self._posterior(x, cond)
        std = torch.exp(0.5 * logvar)
        terms = []
        for _ in range(n_samples):
            z = reparameterize(mu, logvar, generator=generator)
            log_pz = -0.5 * (z.pow(2) + math.log(2.0 * math.pi)).sum(1)
            log_qz = -0.5 * (((z - mu) / std).pow(2) + logvar + math.log(2.0 * math.pi)).sum(1)
            terms.append(-self.reconstruction_nll(x, self._decoder_mean(z, cond)) + log_pz - log_qz)
        return torch.logsumexp(torch.stack(terms), dim=0) - math.log(n_samples)

    def _negative_elbo_at_mean(self, x: Tensor, cond: Tensor | None) -> Tensor:
        mu, logvar = self._posterior(x, cond)
        return self.reconstruction_nll(x, self._decoder_mean(mu, cond)) + kl_divergence(mu, logvar)

    def _losses(self, x: Tensor, *, sample: bool, cond: Tensor | None = None) -> dict[str, Tensor]:
        """Batch means of the beta-ELBO terms for x (B, C, S, S); z drawn from q(z|x) or z = mu."""
        mu, logvar = self._posterior(x, cond)
        recon = self._decoder_mean(reparameterize(mu, logvar) if sample else mu, cond)
        nll = self.reconstruction_nll(x, recon).mean()
        kl = kl_divergence(mu, logvar).mean()
        return {"loss": nll + self.beta * kl, "recon": nll.detach(), "kl": kl.detach(),
                "mse": F.mse_loss(recon, x).detach()}

    def _prior_draws(self, n: int, generator: torch.Generator | None, temperature: float) -> Tensor:
        """(n, latent_dim) z ~ N(0, temperature^2 I) on the model's device."""
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0; got {temperature}")
        dtype = next(self.parameters()).dtype
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=dtype).to(self.device)
        return z * temperature

    # -- the public interface -----------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) -> mu (B, latent_dim), logvar (B, latent_dim) of q(z|x)."""
        return self._posterior(x)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (B, C, S, S) in [0, 1], the mean of p(x|z)."""
        return self._decoder_mean(z)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic: the decode of the posterior mean mu(x)."""
        return self.decode(self.encode(x)[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    def reconstruction_nll(self, x: Tensor, recon: Tensor) -> Tensor:
        """(B,) -log p(x|z) in nats, summed over pixels and channels (``recon`` = decoder mean)."""
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1)
        nll = 0.5 * ((x - recon) / self.sigma).pow(2) + math.log(self.sigma) \
            + 0.5 * math.log(2.0 * math.pi)
        return nll.flatten(1).sum(1)

    def elbo(self, x: Tensor, *, n_samples: int = 1,
             generator: torch.Generator | None = None) -> Tensor:
        """(B,) evidence lower bound in nats, averaged over ``n_samples`` draws of z ~ q(z|x)."""
        return self._elbo(x, None, n_samples, generator)

    def log_prob(self, x: Tensor, *, n_samples: int = 16,
                 generator: torch.Generator | None = None) -> Tensor:
        """(B,) importance-weighted lower bound on log p(x) (Burda et al. 2016), nats.

        log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x); K = 1 is the ELBO.
        """
        return self._importance_weighted_bound(x, None, n_samples, generator)

    def score(self, x: Tensor) -> Tensor:
        """(B,) deterministic negative ELBO: NLL of the posterior-mean decode + KL."""
        return self._negative_elbo_at_mean(x, None)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch) -> dict[str, Tensor]:
        return self._losses(batch["image"], sample=True)

    @torch.no_grad()
    def validation_step(self, batch) -> dict[str, Tensor]:
        """The training loss with z = mu instead of a random draw: deterministic.

        recon is the NLL of the posterior-mean decode (as in :meth:`score`), plus beta * KL;
        the same weights give the same number every epoch, so early stopping compares like
        with like.
        """
        return self._losses(batch["image"], sample=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # -- generation and latent arithmetic -----------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> Tensor:
        """(n, C, S, S): decoder means of z ~ N(0, temperature^2 I) (no pixel noise added)."""
        return self.decode(self._prior_draws(n, generator, temperature))

    @torch.no_grad()
    def interpolate(self, x_a: Tensor, x_b: Tensor, steps: int = 8) -> Tensor:
        """Decode the straight line between the posterior means of x_a and x_b.

        x_a, x_b: (B, C, S, S) (or (C, S, S)) -> (B, steps, C, S, S) (or (steps, C, S, S));
        the first and last steps are exactly ``reconstruct(x_a)`` and ``reconstruct(x_b)``.
        """
        if steps < 2:
            raise ConfigError(f"steps must be >= 2; got {steps}")
        single = x_a.dim() == 3
        if single:
            x_a, x_b = x_a[None], x_b[None]
        mu_a, mu_b = self.encode(x_a)[0], self.encode(x_b)[0]
        t = torch.linspace(0.0, 1.0, steps, device=mu_a.device, dtype=mu_a.dtype).view(1, steps, 1)
        z = (1.0 - t) * mu_a[:, None] + t * mu_b[:, None]  # (B, steps, latent_dim)
        frames = self.decode(z.flatten(0, 1)).unflatten(0, (x_a.shape[0], steps))
        return frames[0] if single else frames

    @torch.no_grad()
    def attribute_vector(self, x_with: Tensor, x_without: Tensor) -> Tensor:
        """(latent_dim,) mean posterior mean of images with an attribute minus of those without."""
        return self.encode(x_with)[0].mean(0) - self.encode(x_without)[0].mean(0)

    @torch.no_grad()
    def apply_attribute(self, x: Tensor, vector: Tensor, weight: float = 1.0) -> Tensor:
        """(B, C, S, S): decode of mu(x) + weight * vector (weight 0 = ``reconstruct``)."""
        return self.decode(self.encode(x)[0] + weight * vector)


@register_generative("cvae")
class CVAE(VAE):
    """Conditional VAE (Sohn et al. 2015) on (B, C, S, S) images in [0, 1] with class labels.

    The VAE's networks, conditioned on the one-hot label y (B, K): the encoder q(z|x, y) sees y
    as K constant extra input channels, the decoder p(x|z, y) sees [z, y], and the prior is
    p(z) = N(0, I) (Sohn et al.'s simplest choice, their p(z|x) = N(0, I)). Training maximises
    the conditional (beta-)ELBO of log p(x|y) with the VAE's losses; ``log_prob`` is its
    importance-weighted bound, ``sample(n, labels)`` decodes prior draws with the asked labels.

    Batches carry ``"image"`` and the int64 labels (B,) in [0, K) under ``"label"`` (or
    ``"class"``, as the conditional GAN's batches do). With ``num_classes`` 1 the labels may be
    left out everywhere (all are 0); otherwise every method that encodes or decodes needs them
    and says so. The VAE's ``interpolate`` and attribute arithmetic work with 1 class only.

    Args:
        image_size: S.
        num_classes: K >= 1.
        **kwargs: the :class:`VAE`'s keyword arguments.
    """

    def __init__(self, image_size: int = 64, num_classes: int = 10, *, in_channels: int = 3,
                 latent_dim: int = 32, widths: list[int] | tuple[int, ...] = BERGMANN_WIDTHS,
                 strides: list[int] | tuple[int, ...] = BERGMANN_STRIDES,
                 batch_norm: bool = False, beta: float = 1.0, likelihood: Likelihood = "gaussian",
                 sigma: float = 0.1, logvar_clamp: float = 20.0, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        # Not VAE.__init__, which would build networks without the label inputs.
        GenerativeModel.__init__(self)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = num_classes
        self._build(image_size, in_channels, latent_dim, widths, strides, batch_norm, beta,
                    likelihood, sigma, logvar_clamp, lr, weight_decay, cond_dim=num_classes)

    def one_hot(self, labels: Tensor | int | None, n: int) -> Tensor:
        """Labels ((n,) ints in [0, K), one int for all, or None with K = 1) -> (n, K) one-hot."""
        like = next(self.parameters())
        if labels is None:
            if self.num_classes > 1:
                raise ConfigError(f"cvae with num_classes={self.num_classes} needs labels: pass "
                                  "labels=(B,) class indices, or batches with a 'label' entry")
            labels = 0
        if isinstance(labels, int):
            labels = torch.full((n,), labels, dtype=torch.long)
        if labels.shape != (n,):
            raise DataError(f"labels must have shape ({n},); got {tuple(labels.shape)}")
        labels = labels.long().to(like.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(f"labels must lie in [0, {self.num_classes}); got "
                            f"{int(labels.min())}..{int(labels.max())}")
        return F.one_hot(labels, self.num_classes).to(like.dtype)

    @staticmethod
    def batch_labels(batch) -> Tensor | None:
        """The batch's class labels: its ``"label"`` entry, else ``"class"``, else None."""
        for key in ("label", "class"):
            if key in batch:
                return batch[key]
        return None

    # -- the model given labels -----------------------------------------------------------------
    def encode(self, x: Tensor, labels: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, S, S), labels (B,) -> mu, logvar (B, latent_dim) of q(z|x, y)."""
        return self._posterior(x, self.one_hot(labels, len(x)))

    def decode(self, z: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """(B, latent_dim), labels (B,) -> (B, C, S, S) in [0, 1], the mean of p(x|z, y)."""
        return self._decoder_mean(z, self.one_hot(labels, len(z)))

    def reconstruct(self, x: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """Deterministic: the decode of the posterior mean mu(x, y) with the same labels."""
        cond = self.one_hot(labels, len(x))
        return self._decoder_mean(self._posterior(x, cond)[0], cond)

    def forward(self, x: Tensor, labels: Tensor | int | None = None) -> Tensor:
        return self.reconstruct(x, labels)

    def elbo(self, x: Tensor, labels: Tensor | int | None = None, *, n_samples: int = 1,
             generator: torch.Generator | None = None) -> Tensor:
        """(B,) lower bound on log p(x|y) in nats, averaged over ``n_samples`` draws of z."""
        return self._elbo(x, self.one_hot(labels, len(x)), n_samples, generator)

    def log_prob(self, x: Tensor, labels: Tensor | int | None = None, *, n_samples: int = 16,
                 generator: torch.Generator | None = None) -> Tensor:
        """(B,) importance-weighted lower bound on log p(x|y) (Burda et al. 2016), nats."""
        return self._importance_weighted_bound(x, self.one_hot(labels, len(x)), n_samples,
                                               generator)

    def score(self, x: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """(B,) deterministic negative conditional ELBO at z = mu(x, y)."""
        return self._negative_elbo_at_mean(x, self.one_hot(labels, len(x)))

    def training_step(self, batch) -> dict[str, Tensor]:
        x = batch["image"]
        return self._losses(x, sample=True, cond=self.one_hot(self.batch_labels(batch), len(x)))

    @torch.no_grad()
    def validation_step(self, batch) -> dict[str, Tensor]:
        """The training loss at z = mu (deterministic), as :meth:`VAE.validation_step`."""
        x = batch["image"]
        return self._losses(x, sample=False, cond=self.one_hot(self.batch_labels(batch), len(x)))

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | int | None = None, *,
               generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """(n, C, S, S): decoder means of z ~ N(0, temperature^2 I) given ``labels``.

        ``labels``: (n,) class indices or one int for all; default 0, 1, ..., K-1, 0, ..., so
        a grid of K columns shows one class per column.
        """
        if labels is None:
            labels = torch.arange(n) % self.num_classes
        return self._decoder_mean(self._prior_draws(n, generator, temperature),
                                  self.one_hot(labels, n))
