"""VQ-VAE (van den Oord et al. 2017): a discrete spatial latent from a learned codebook.

Encoder: :func:`anomalykit.nn.conv.conv_stack` (the autoencoder's) then a 1x1 conv to ``code_dim`` channels,
giving z_e (B, D, h, w) with h = S / 2**(number of stride-2 layers). The
:class:`VectorQuantizer` replaces every z_e vector by its nearest of K codebook rows, and
the decoder (a 3x3 conv, then :func:`deconv_stack`, then a sigmoid) maps z_q back to the image.

Loss (eq. 3): ``recon + ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2`` with beta = 0.25 and a
straight-through gradient from z_q to z_e. With ``ema=True`` the codebook term is replaced
by exponential-moving-average updates of the codebook (appendix A.1; Razavi et al. 2019)
with Laplace-smoothed cluster sizes; only the commitment term stays in the loss.

Codebook collapse (few codes in use) is countered by seeding the codebook with encoder
outputs of the first batch (``data_init``) and, optionally, by random restarts of codes that
fall out of use (``dead_code_threshold``).

Sampling: ``sample`` decodes code grids drawn from a prior over codes:

* "uniform" or "empirical": independently per position, uniformly or from the code histogram
  of the training set (``fit_code_prior``, called at the end of ``fit`` by the ``on_fit_end``
  hook). That ignores all spatial structure, so samples are texture soup;
* "pixelcnn" (with ``code_prior="pixelcnn"``): the paper's spatial prior, a
  :class:`~anomalykit.generative.autoregressive.CodePixelCNN` over the (h, w) code map, trained
  by :meth:`VQVAE.fit_prior` on the training set's code maps after the VQ-VAE (``on_fit_end``
  does it, ``prior_epochs`` epochs). benchmarks/autoregressive_suite.py compares the two.

On digits (benchmarks/results/autoregressive_suite: 4x4 maps of 64 codes, 30 prior epochs) the
PixelCNN prior's decoded samples are much closer to held-out digits (FD-Lite0 379 and 406 for
two prior sizes, against 694 for the histogram and 738 uniform), and the smaller prior also
gives held-out code maps a better likelihood (50.0 nats per map against the histogram's 64.3);
the larger one overfits (best 46.3 at epoch 7, 86.6 after 30: worse than uniform), so give
``fit_prior`` validation data and early stopping when the code maps are few. The histogram
stays the default: it needs no training, and the toolkit's detectors use VQ-VAE
reconstructions, not samples.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError
from anomalykit.generative.ae import (
    LOSSES,
    ReconstructionLoss,
    reconstruction_error_map,
    reconstruction_loss,
)
from anomalykit.generative.autoregressive import CodePixelCNN
from anomalykit.nn.conv import check_layout, conv_stack, deconv_stack
from anomalykit.nn.functional import reduce_map
from anomalykit.registry import register_generative

CodePrior = Literal["uniform", "empirical", "pixelcnn"]
CODE_PRIORS = ("uniform", "empirical", "pixelcnn")
# What ``code_prior`` may name: the histogram is always fitted, a PixelCNN only on request.
DEFAULT_PRIORS = ("empirical", "pixelcnn")


class QuantizerOutput(NamedTuple):
    """quantized (B, D, h, w) with straight-through gradient; indices (B, h, w) int64;
    loss: scalar codebook + commitment loss; perplexity: scalar exp(entropy of code use)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of (B, D, h, w) onto a (K, D) codebook.

    Args:
        num_codes: K.
        code_dim: D.
        beta: commitment weight (0.25 in the paper).
        ema: update the codebook by exponential moving averages instead of gradients; the
            codebook is then the buffer ``embedding_``, otherwise the parameter ``embedding``.
        decay: EMA decay gamma (0.99 in the paper).
        eps: Laplace smoothing of the EMA cluster sizes.
        data_init: on the first training batch, set the codebook to K encoder outputs drawn
            at random (as k-means seeding does); a codebook initialised far from the encoder
            outputs otherwise tends to collapse onto a handful of codes.
        dead_code_threshold: random restarts (Jukebox, Dhariwal et al. 2020): a
            code whose moving-average use per training batch (decay ``decay``) falls below
            this count is moved onto a random encoder output of the current batch. 0 = off.
    """

    def __init__(self, num_codes: int, code_dim: int, *, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, data_init: bool = True,
                 dead_code_threshold: float = 0.0) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ConfigError(f"num_codes and code_dim must be >= 1; got {num_codes}, {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1); got {decay}")
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        self.data_init, self.dead_code_threshold = data_init, dead_code_threshold
        self.register_buffer("initialized_", torch.tensor(False))
        # Moving average of how many vectors of a training batch each code receives.
        self.register_buffer("usage_", torch.ones(num_codes))
        init = torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            self.register_buffer("embedding_", init)
            # Counts start at 1 and sums at the initial codes, so a code that is never chosen
            # stays where it is instead of being divided by a vanishing count.
            self.register_buffer("ema_count_", torch.ones(num_codes))
            self.register_buffer("ema_sum_", init.clone())
        else:
            self.embedding = nn.Parameter(init)

    @property
    def codebook(self) -> Tensor:
        """(K, D) the current code vectors."""
        return self.embedding_ if self.ema else self.embedding

    def nearest(self, flat: Tensor) -> Tensor:
        """(N, D) -> (N,) index of the nearest codebook row (squared Euclidean distance)."""
        codebook = self.codebook.detach()
        distances = (flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codebook.t()
                     + codebook.pow(2).sum(1)[None])
        return distances.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, D, h, w) code vectors."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _init_from(self, flat: Tensor) -> None:
        """Codebook <- K rows of ``flat`` (N, D) drawn at random (with replacement if N < K)."""
        n = flat.shape[0]
        rows = (torch.randperm(n)[:self.num_codes] if n >= self.num_codes
                else torch.randint(0, n, (self.num_codes,)))
        self.codebook.copy_(flat[rows.to(flat.device)])
        if self.ema:
            self.ema_sum_.copy_(self.embedding_ * self.ema_count_[:, None])
        self.initialized_.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor) -> None:
        dead = (self.usage_ < self.dead_code_threshold).nonzero().flatten()
        if len(dead) == 0:
            return
        rows = torch.randint(0, flat.shape[0], (len(dead),)).to(flat.device)
        self.codebook[dead] = flat[rows]
        self.usage_[dead] = 1.0
        if self.ema:
            self.ema_count_[dead] = 1.0
            self.ema_sum_[dead] = flat[rows]

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, one_hot: Tensor) -> None:
        """Appendix A.1: N <- g N + (1-g) n, m <- g m + (1-g) sum z_e, e = m / N (smoothed N)."""
        self.ema_count_.mul_(self.decay).add_(one_hot.sum(0), alpha=1.0 - self.decay)
        self.ema_sum_.mul_(self.decay).add_(one_hot.t() @ flat, alpha=1.0 - self.decay)
        total = self.ema_count_.sum()
        count = (self.ema_count_ + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding_.copy_(self.ema_sum_ / count[:, None])

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and self.data_init and not bool(self.initialized_):
            self._init_from(flat.detach())
        if self.training and self.dead_code_threshold > 0:
            self._restart_dead_codes(flat.detach())
        indices = self.nearest(flat.detach())
        z_q = self.lookup(indices.view(b, h, w))
        # With EMA the codebook follows its clusters directly; only the commitment term is a loss.
        loss = self.beta * F.mse_loss(z_e, z_q.detach())
        if not self.ema:
            loss = loss + F.mse_loss(z_q, z_e.detach())
        one_hot = F.one_hot(indices, self.num_codes).to(flat.dtype)
        if self.training:
            with torch.no_grad():
                self.usage_.mul_(self.decay).add_(one_hot.sum(0), alpha=1.0 - self.decay)
            if self.ema:
                self._ema_update(flat.detach(), one_hot)
        usage = one_hot.mean(0)
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        # Straight-through estimator: forward uses z_q, backward copies dL/dz_q to z_e.
        quantized = z_e + (z_q - z_e).detach()
        return QuantizerOutput(quantized, indices.view(b, h, w), loss, perplexity)


@register_generative("vqvae")
class VQVAE(GenerativeModel):
    """VQ-VAE on (B, C, S, S) images in [0, 1] with a (h, w) grid of discrete codes.

    Args:
        image_size: S, a multiple of 2**(number of stride-2 layers).
        in_channels: C.
        widths / strides / batch_norm: encoder layers (mirrored by the decoder), see
            :func:`~anomalykit.nn.conv.conv_stack`.
        num_codes: K, codebook size.
        code_dim: D, code vector size.
        beta: commitment weight.
        ema / decay: EMA codebook updates (see :class:`VectorQuantizer`).
        data_init: initialise the codebook from the first training batch's encoder outputs.
        dead_code_threshold: restart codes used less than this per batch (0 = off).
        loss: reconstruction loss, "l2", "l1" or "ssim".
        lr / weight_decay: Adam.
        code_prior: the prior ``sample`` uses by default: "empirical" (the code histogram) or
            "pixelcnn" (builds a :class:`CodePixelCNN`, trained after the VQ-VAE by
            :meth:`fit_prior`).
        prior_hidden / prior_layers / prior_lr / prior_epochs / prior_batch_size: that
            PixelCNN's width, residual blocks, Adam rate and training schedule
            (``prior_epochs=0``: ``fit`` leaves it untrained; call :meth:`fit_prior`, e.g. with
            validation data and early stopping).
    """

    def __init__(self, image_size: int = 32, *, in_channels: int = 3,
                 widths: list[int] | tuple[int, ...] = (64, 64, 64),
                 strides: list[int] | tuple[int, ...] = (2, 2, 1), batch_norm: bool = False,
                 num_codes: int = 128, code_dim: int = 32, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, data_init: bool = True, dead_code_threshold: float = 0.0,
                 loss: ReconstructionLoss = "l2", lr: float = 1e-3,
                 weight_decay: float = 0.0, code_prior: CodePrior = "empirical",
                 prior_hidden: int = 64, prior_layers: int = 5, prior_lr: float = 1e-3,
                 prior_epochs: int = 20, prior_batch_size: int = 64) -> None:
        super().__init__()
        check_choice("loss", loss, LOSSES)
        check_choice("code_prior", code_prior, DEFAULT_PRIORS)
        check_layout(image_size, widths, strides)
        self.image_size, self.loss, self.lr, self.weight_decay = image_size, loss, lr, weight_decay
        self.grid = image_size // 2 ** sum(s == 2 for s in strides)
        self.encoder = nn.Sequential(conv_stack(in_channels, widths, strides, batch_norm),
                                     nn.Conv2d(widths[-1], code_dim, 1))
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta=beta, ema=ema, decay=decay,
                                         data_init=data_init,
                                         dead_code_threshold=dead_code_threshold)
        self.decoder = nn.Sequential(nn.Conv2d(code_dim, widths[-1], 3, padding=1),
                                     nn.LeakyReLU(0.2, inplace=True),
                                     deconv_stack(in_channels, widths, strides, batch_norm),
                                     nn.Sigmoid())
        # Code histogram of the training set (Laplace-smoothed counts); uniform until fitted.
        self.register_buffer("code_counts_", torch.ones(num_codes))
        self.code_prior = code_prior
        self.prior_epochs, self.prior_batch_size = prior_epochs, prior_batch_size
        self.prior = (CodePixelCNN(num_codes, self.grid, hidden=prior_hidden, layers=prior_layers,
                                   head_hidden=2 * prior_hidden, lr=prior_lr)
                      if code_prior == "pixelcnn" else None)

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, h, w) code indices."""
        return self.quantizer(self.encoder(x)).indices

    def decode(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, C, S, S) in [0, 1]."""
        return self.decoder(self.quantizer.lookup(indices))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.quantizer(self.encoder(x)).quantized)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    def score(self, x: Tensor) -> Tensor:
        """(B,) mean reconstruction error under the training loss."""
        return reduce_map(reconstruction_error_map(x, self.reconstruct(x), self.loss), "mean")

    def training_step(self, batch) -> dict[str, Tensor]:
        x = batch["image"]
        q = self.quantizer(self.encoder(x))
        recon = reconstruction_loss(x, self.decoder(q.quantized), self.loss)
        return {"loss": recon + q.loss, "recon": recon.detach(), "vq": q.loss.detach(),
                "perplexity": q.perplexity.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The PixelCNN prior is trained afterwards, by fit_prior, with its own optimizer.
        params = [p for name, p in self.named_parameters() if not name.startswith("prior.")]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def on_fit_end(self, train_data) -> None:
        """Loop hook: count the training set's code use for ``sample(prior="empirical")`` and,
        with ``code_prior="pixelcnn"``, train the PixelCNN prior on its code maps."""
        self.fit_code_prior(train_data)
        if self.prior is not None and self.prior_epochs > 0:
            self.fit_prior(train_data)

    @torch.no_grad()
    def code_maps(self, data, batch_size: int = 64) -> Tensor:
        """(N, h, w) int64 code maps of every image of ``data`` (anything ``fit`` takes)."""
        from anomalykit.training.inference import as_loader, evaluating

        with evaluating(self):
            return torch.cat([self.encode(batch["image"].to(self.device)).cpu()
                              for batch in as_loader(data, batch_size=batch_size)])

    def fit_prior(self, data, val_data=None, *, epochs: int | None = None, seed: int = 0,
                  early_stopping_patience: int | None = None, progress: bool = False) -> dict:
        """Train the PixelCNN prior with the toolkit's loop on the code maps of ``data``.

        The VQ-VAE is frozen meanwhile (only the prior's parameters are optimised). ``epochs``
        defaults to ``prior_epochs``; with ``val_data`` (images) and
        ``early_stopping_patience`` the prior with the best held-out code NLL is kept (a
        PixelCNN overfits a few thousand small code maps quickly). Returns the loop's history
        (losses in nats per code).
        """
        from anomalykit.training import fit

        if self.prior is None:
            raise ConfigError("this VQVAE has no PixelCNN prior: build it with code_prior='pixelcnn'")
        val = None if val_data is None else self.code_maps(val_data)
        return fit(self.prior, self.code_maps(data), val,
                   epochs=self.prior_epochs if epochs is None else epochs,
                   batch_size=self.prior_batch_size, device=str(self.device), seed=seed,
                   early_stopping_patience=early_stopping_patience, progress=progress)

    @torch.no_grad()
    def code_log_prob(self, x: Tensor, prior: CodePrior | None = None) -> Tensor:
        """(B, C, S, S) -> (B,) log-likelihood of the images' code maps under a prior, nats.

        Compares the priors on held-out images: "uniform" is -h w log K for every image.
        """
        prior = self.code_prior if prior is None else prior
        check_choice("prior", prior, CODE_PRIORS)
        codes = self.encode(x)
        if prior == "pixelcnn":
            return self._pixelcnn_prior().log_prob(codes)
        weights = self.code_counts_ if prior == "empirical" else torch.ones_like(self.code_counts_)
        return (weights / weights.sum()).log()[codes].flatten(1).sum(1)

    def _pixelcnn_prior(self) -> CodePixelCNN:
        if self.prior is None:
            raise ConfigError("prior 'pixelcnn' needs a VQVAE built with code_prior='pixelcnn'")
        return self.prior

    @torch.no_grad()
    def fit_code_prior(self, data, batch_size: int = 64) -> None:
        """Count code use on ``data`` (plus one per code) for ``sample(prior="empirical")``."""
        from anomalykit.training.inference import as_loader, evaluating

        counts = torch.ones_like(self.code_counts_)
        with evaluating(self):
            for batch in as_loader(data, batch_size=batch_size):
                indices = self.encode(batch["image"].to(self.device))
                counts += torch.bincount(indices.flatten(), minlength=counts.numel()).to(counts)
        self.code_counts_.copy_(counts)

    def code_perplexity(self) -> float:
        """exp(entropy) of the fitted code histogram: the number of codes effectively in use."""
        p = self.code_counts_ / self.code_counts_.sum()
        return math.exp(float(-(p * p.log()).sum()))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               prior: CodePrior | None = None) -> Tensor:
        """(n, C, S, S) decoded from code grids drawn from a prior (default ``code_prior``).

        prior: "uniform" over the K codes or "empirical" (the histogram ``fit_code_prior``
        counted; uniform before any fit), both i.i.d. per position; or "pixelcnn", ancestral
        sampling from the PixelCNN prior (needs ``code_prior="pixelcnn"``).
        """
        prior = self.code_prior if prior is None else prior
        check_choice("prior", prior, CODE_PRIORS)
        if prior == "pixelcnn":
            return self.decode(self._pixelcnn_prior().sample(n, generator=generator))
        weights = self.code_counts_ if prior == "empirical" else torch.ones_like(self.code_counts_)
        indices = torch.multinomial(weights.cpu().double(), n * self.grid ** 2, replacement=True,
                                    generator=generator)
        return self.decode(indices.view(n, self.grid, self.grid).to(self.device))
