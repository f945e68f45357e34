"""Gaussian mixture model: scikit-learn fits it, torch scores and samples it.

p(x) = sum_k pi_k N(x; mu_k, Sigma_k) (Bishop, PRML sec. 9.2). Fitting is EM, done by
:class:`sklearn.mixture.GaussianMixture` (k-means initialisation, ``reg_covar`` added to
the covariance diagonals, ``n_init`` restarts, seeded by ``fit``'s ``seed``). The fitted
parameters are then copied into torch buffers in scikit-learn's own parametrisation,
the Cholesky factors of the precisions, P with Sigma^-1 = P P^T (upper triangular P), so
that

    log N(x; mu, Sigma) = -1/2 (D log 2 pi + |(x - mu)^T P|^2) + sum log diag(P)

needs no inverse or determinant at scoring time. ``log_prob`` (log-sum-exp over the
components) runs in torch, differentiable in x, on any device, and exports; ``sample``
draws x = mu_k + P_k^-T eps. Shapes of ``precisions_cholesky_`` follow
``covariance_type``: "full" (K, D, D), "tied" (D, D), "diag" (K, D), "spherical" (K,).

Data: vectors (N, D); anything else (N, ...) is flattened. A GMM on raw pixels only
makes sense for small images (8x8 digits); for real images fit it on deep features,
e.g. globally pooled backbone features (Rippel et al. 2020 fit one Gaussian to them)::

    from anomalykit.nn.backbone import Backbone

    backbone = Backbone(out_indices=(3,))
    def features(images):  # (B, 3, S, S) in [0, 1] -> (B, 112)
        x = (images - backbone.input_mean) / backbone.input_std  # the weights' statistics
        return backbone(x)[0].mean(dim=(2, 3))

    gmm = GaussianMixtureModel(4, covariance_type="full", reg_covar=1e-3)
    gmm.fit(features(train_images))          # any (N, D) tensor
    scores = -gmm.log_prob(features(test_images))  # higher = more anomalous

:meth:`GaussianMixtureModel.fit_features` does the same for a dataset and any feature
function, batch by batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError, DataError
from anomalykit.generative.pca import _flatten
from anomalykit.registry import register_generative

CovarianceType = Literal["full", "tied", "diag", "spherical"]
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


@register_generative("gmm")
class GaussianMixtureModel(GenerativeModel):
    """Mixture of ``n_components`` Gaussians on vectors (N, D).

    Args:
        n_components: K.
        covariance_type: "full", "tied", "diag" or "spherical" (scikit-learn's).
        reg_covar: added to the covariance diagonals (keeps them positive definite).
        max_iter, tol, n_init, init_params: scikit-learn's EM options.

    Buffers (learned state): ``weights_`` (K,), ``means_`` (K, D), ``precisions_cholesky_``
    (shape by covariance type, module docstring), ``converged_`` (), ``n_samples_seen_`` ()
    (0 until fitted).
    """

    closed_form = True

    def __init__(self, n_components: int = 1, *, covariance_type: CovarianceType = "full",
                 reg_covar: float = 1e-6, max_iter: int = 100, tol: float = 1e-3,
                 n_init: int = 1, init_params: str = "kmeans") -> None:
        super().__init__()
        check_choice("covariance_type", covariance_type, COVARIANCE_TYPES)
        check_choice("init_params", init_params, ("kmeans", "k-means++", "random", "random_from_data"))
        if n_components < 1:
            raise ConfigError(f"n_components must be >= 1, got {n_components}")
        self.n_components, self.covariance_type = n_components, covariance_type
        self.reg_covar, self.max_iter, self.tol = reg_covar, max_iter, tol
        self.n_init, self.init_params = n_init, init_params
        # Sized at fit time (D is unknown until then); checkpoints resize them on load.
        self.register_buffer("weights_", torch.full((n_components,), 1.0 / n_components))
        self.register_buffer("means_", torch.zeros(n_components, 0))
        self.register_buffer("precisions_cholesky_", torch.zeros(0))
        self.register_buffer("converged_", torch.tensor(False))
        self.register_buffer("n_samples_seen_", torch.tensor(0))

    # -- fitting -----------------------------------------------------------------------------
    # ``fit`` (the toolkit's, on a Dataset / DataLoader / tensor (N, D) of items
    # ``{"image": x}``, x a vector or anything, flattened) collects the data and calls these.
    def solve(self, images: Tensor, *, seed: int, progress=None) -> None:
        """EM on every training sample at once (the loop's hook); ``seed`` seeds the initialisation."""
        self.fit_tensor(images, seed=seed)

    def per_sample_loss(self, images: Tensor) -> Tensor:
        """(N,) the history's loss: negative log-likelihood per sample (nats)."""
        return -self.log_prob(images)

    @torch.no_grad()
    def fit_tensor(self, x: Tensor, *, seed: int = 0) -> GaussianMixtureModel:
        """Fit with scikit-learn on data in memory (N, D), then copy the parameters to buffers."""
        from sklearn.mixture import GaussianMixture

        data = _flatten(x).detach().cpu().double().numpy()
        if not np.isfinite(data).all():
            raise DataError("GMM input contains NaN or inf")
        if len(data) < self.n_components:
            raise DataError(f"a GMM with {self.n_components} components needs at least as many "
                            f"samples, got {len(data)}")
        sk = GaussianMixture(self.n_components, covariance_type=self.covariance_type,
                             reg_covar=self.reg_covar, max_iter=self.max_iter, tol=self.tol,
                             n_init=self.n_init, init_params=self.init_params,
                             random_state=seed).fit(data)
        self.load_sklearn(sk, n_samples=len(data))
        return self

    @torch.no_grad()
    def load_sklearn(self, sk, *, n_samples: int = 1) -> GaussianMixtureModel:
        """Copy a fitted :class:`sklearn.mixture.GaussianMixture`'s parameters into the buffers."""
        if sk.covariance_type != self.covariance_type or sk.n_components != self.n_components:
            raise ConfigError(f"scikit-learn model is {sk.n_components} x {sk.covariance_type}, "
                              f"this one {self.n_components} x {self.covariance_type}")
        like = self.weights_

        def as_tensor(a) -> Tensor:
            return torch.as_tensor(np.asarray(a), dtype=like.dtype, device=like.device)

        # Assigning to a registered buffer's name replaces the buffer (its shape may change).
        self.weights_ = as_tensor(sk.weights_)
        self.means_ = as_tensor(sk.means_)
        self.precisions_cholesky_ = as_tensor(sk.precisions_cholesky_)
        self.converged_ = torch.tensor(bool(sk.converged_), device=like.device)
        self.n_samples_seen_ = torch.tensor(int(n_samples), device=like.device)
        return self

    @torch.no_grad()
    def fit_features(self, data, features: Callable[[Tensor], Tensor], *, batch_size: int = 32,
                     seed: int = 0) -> GaussianMixtureModel:
        """Fit on ``features(images)`` (B, D) of every batch of a Dataset / DataLoader / tensor."""
        from anomalykit.training.inference import as_loader

        feats = torch.cat([_flatten(features(b["image"])).cpu()
                           for b in as_loader(data, batch_size=batch_size)])
        return self.fit_tensor(feats, seed=seed)

    def _check_fitted(self, what: str) -> None:
        if int(self.n_samples_seen_) == 0:
            raise ConfigError(f"GaussianMixtureModel.{what} needs a fitted model: call fit first")

    # -- the model ---------------------------------------------------------------------------
    def component_log_prob(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, K): log N(x; mu_k, Sigma_k) for every component (sklearn's
        ``_estimate_log_gaussian_prob``, in torch)."""
        self._check_fitted("log_prob")
        x = _flatten(x).to(self.means_.dtype)
        mu, prec = self.means_, self.precisions_cholesky_
        d = mu.shape[1]
        if x.shape[1] != d:
            raise DataError(f"GMM was fitted on D={d}, got data with D={x.shape[1]}")
        if self.covariance_type == "full":
            # (x - mu_k)^T P_k for every k: (N, K, D)
            y = torch.einsum("nd,kde->nke", x, prec) - torch.einsum("kd,kde->ke", mu, prec)
            log_det = torch.diagonal(prec, dim1=-2, dim2=-1).log().sum(-1)  # (K,)
        elif self.covariance_type == "tied":
            y = (x @ prec).unsqueeze(1) - (mu @ prec).unsqueeze(0)
            log_det = torch.diagonal(prec).log().sum()
        elif self.covariance_type == "diag":
            y = (x.unsqueeze(1) - mu) * prec  # prec (K, D): 1 / sigma
            log_det = prec.log().sum(-1)
        else:  # spherical, prec (K,)
            y = (x.unsqueeze(1) - mu) * prec[:, None]
            log_det = d * prec.log()
        return -0.5 * (d * math.log(2.0 * math.pi) + y.pow(2).sum(-1)) + log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """(N, D) -> (N,) log p(x) = logsumexp_k (log pi_k + log N(x; mu_k, Sigma_k)), natural log."""
        return torch.logsumexp(self.component_log_prob(x) + self.weights_.log(), dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, K) posterior p(k | x) (Bishop eq. 9.23)."""
        joint = self.component_log_prob(x) + self.weights_.log()
        return torch.softmax(joint, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, D): pick k ~ pi, then x = mu_k + L_k eps, L_k = P_k^-T (so L_k L_k^T = Sigma_k)."""
        self._check_fitted("sample")
        mu, prec = self.means_, self.precisions_cholesky_
        d = mu.shape[1]
        k = torch.multinomial(self.weights_.cpu().float(), n, replacement=True,
                              generator=generator).to(mu.device)
        eps = torch.randn(n, d, generator=generator).to(mu)
        if self.covariance_type in ("full", "tied"):
            p = prec[k] if self.covariance_type == "full" else prec.expand(n, d, d)
            # P^T is lower triangular: solve P^T y = eps for y = P^-T eps.
            y = torch.linalg.solve_triangular(p.transpose(-1, -2), eps.unsqueeze(-1),
                                              upper=False).squeeze(-1)
        elif self.covariance_type == "diag":
            y = eps / prec[k]
        else:
            y = eps / prec[k].unsqueeze(1)
        return mu[k] + y
