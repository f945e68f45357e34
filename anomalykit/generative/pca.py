"""Principal component analysis as a generative model (probabilistic PCA), with robust reconstruction.

Data are vectors (N, D); images (N, C, H, W) are flattened to D = C * H * W and every
entry of that vector (one channel of one pixel) is a "pixel" below. ``reconstruct``
returns the input's shape; ``project`` / ``sample`` work on the flattened vectors.

Fitting is closed form (no gradient steps), in float64 with numpy/scipy, by one of the
two classic routes to the eigenvectors of the sample covariance C = Xc^T Xc / (N - 1),
Xc the centred data (N, D):

- ``"covariance"``: eigendecompose C (D x D). The right route when D <= N.
- ``"gram"``: the inner-product trick (Sirovich & Kirby 1987; Turk & Pentland 1991,
  "Eigenfaces"): eigendecompose the Gram matrix G = Xc Xc^T / (N - 1) (N x N). If
  G u = lambda u then C (Xc^T u) = lambda (Xc^T u), so v = Xc^T u / ||Xc^T u|| is a unit
  eigenvector of C with the same eigenvalue. The right route when D > N (images: a
  64x64x3 image has D = 12288 but a category has a few hundred training images).
- ``"auto"``: covariance when D <= N, else gram.

Both give the same subspace; signs are fixed so that each component's largest-magnitude
entry is positive, so the two routes agree exactly up to round-off.

Probabilistic PCA (Tipping & Bishop 1999): x = mean + W z + eps, z ~ N(0, I_k),
eps ~ N(0, sigma^2 I_D). The maximum-likelihood solution has the columns of W along the
top-k eigenvectors with variances ``explained_variance_`` (lambda_1..k), and
sigma^2 = ``noise_variance_`` = the discarded variance spread over the remaining D - k
directions (eq. 8 of the paper). So the model is a Gaussian with covariance
U diag(lambda) U^T + sigma^2 (I - U U^T): exact variances in the subspace and isotropic
noise outside it, which is what ``log_prob`` scores and ``sample`` draws from. (Where
D > N scikit-learn's ``PCA.score_samples`` averages the discarded variance over
min(N, D) - k directions instead of D - k; where D <= N the two agree.)

Robust reconstruction (``robust_reconstruct``) is the hypothesize-and-test recovery of
eigenimage coefficients of Leonardis & Bischof ("Robust recognition using eigenimages",
CVIU 2000), RANSAC style (Fischler & Bolles 1981): the codes of an image are solved by
least squares on a random subset of its pixels, many times; the hypothesis whose
reconstruction agrees with the most pixels (residual under a threshold) wins, and the
codes are refitted on those inlier pixels. Occluded or corrupted pixels then do not pull
the codes, so they are recovered from the others instead of being half-copied, as a plain
projection does.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError, DataError
from anomalykit.registry import register_generative

Method = Literal["auto", "covariance", "gram"]
METHODS = ("auto", "covariance", "gram")


class RobustReconstruction(NamedTuple):
    """What :meth:`PCA.robust_reconstruct` returns (unpacks as ``recon, inliers, codes``).

    reconstruction: like the input, (N, D) or (N, C, H, W): mean + codes @ components.
    inliers: bool, like the input: the pixels the final codes were fitted on.
    codes: (N, k).
    """

    reconstruction: Tensor
    inliers: Tensor
    codes: Tensor


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """(k, D): make each row's largest-|.| entry positive, so the result does not depend on the route."""
    rows = np.arange(len(components))
    signs = np.sign(components[rows, np.abs(components).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def pca_eigh(x: np.ndarray, method: Method = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Principal axes of (N, D) data, float64.

    Returns mean (D,), eigenvalues (r,) in decreasing order, components (r, D) (unit rows)
    and the total variance trace(C); r is the numerical rank of the centred data
    (at most min(N - 1, D)). ``method`` picks the route (see the module docstring).
    """
    check_choice("method", method, METHODS)
    n, d = x.shape
    if n < 2:
        raise DataError(f"PCA needs at least 2 samples, got {n}")
    mean = x.mean(axis=0)
    xc = x - mean
    total = float(np.einsum("nd,nd->", xc, xc) / (n - 1))
    if method == "auto":
        method = "covariance" if d <= n else "gram"
    if method == "covariance":
        eigvals, eigvecs = scipy.linalg.eigh(xc.T @ xc / (n - 1))
        eigvals, vectors = eigvals[::-1], eigvecs[:, ::-1]  # (D,), (D, D) decreasing
    else:
        eigvals, u = scipy.linalg.eigh(xc @ xc.T / (n - 1))
        eigvals, u = eigvals[::-1], u[:, ::-1]
        vectors = None
    # Eigenvalues under this are round-off: their eigenvectors are arbitrary (covariance) or
    # would be divided by ~0 (gram), so the rank ends there.
    tol = max(float(eigvals[0]), 0.0) * max(n, d) * np.finfo(np.float64).eps
    rank = int((eigvals > tol).sum())
    eigvals = eigvals[:rank].copy()
    if vectors is None:
        # Map the Gram eigenvectors back to pixel space and normalise (||Xc^T u||^2 = (N-1) lambda).
        vectors = xc.T @ u[:, :rank]
        vectors /= np.linalg.norm(vectors, axis=0, keepdims=True)
    components = _flip_signs(np.ascontiguousarray(vectors[:, :rank].T))
    return mean, eigvals, components, total


def _flatten(x: Tensor) -> Tensor:
    """(N, ...) -> (N, D); shared by the PCA and GMM models."""
    if x.dim() < 2:
        raise DataError(f"expected a batch (N, D) or (N, C, H, W), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


@register_generative("pca")
class PCA(GenerativeModel):
    """Probabilistic PCA on vectors (N, D) or flattened images (N, C, H, W).

    Args:
        n_components: k. An int keeps that many components; a float in (0, 1] keeps the
            fewest whose cumulative explained-variance ratio reaches it; None keeps all.
            Never more than the rank of the centred training data (<= min(N - 1, D)).
        method: "auto", "covariance" or "gram", the eigendecomposition route (module docstring).
        n_features: D, when known before fitting: the buffers then have their final width,
            so an unfitted model already reconstructs (to the zero mean) at the right shape.
        min_variance: floor of every variance (eigenvalues and sigma^2), so ``log_prob`` stays
            finite when the data have fewer directions than D.

    Buffers (learned state): ``mean_`` (D,), ``components_`` (k, D) orthonormal rows,
    ``explained_variance_`` (k,), ``noise_variance_`` (), ``total_variance_`` (),
    ``n_samples_seen_`` () (0 until fitted).
    """

    closed_form = True

    def __init__(self, n_components: int | float | None = None, *, method: Method = "auto",
                 n_features: int | None = None, min_variance: float = 1e-6) -> None:
        super().__init__()
        check_choice("method", method, METHODS)
        if isinstance(n_components, bool) or not (
                n_components is None
                or (isinstance(n_components, int) and n_components >= 1)
                or (isinstance(n_components, float) and 0.0 < n_components <= 1.0)):
            raise ConfigError("n_components must be an int >= 1, a float in (0, 1] or None; "
                              f"got {n_components!r}")
        self.n_components, self.method, self.min_variance = n_components, method, min_variance
        d = int(n_features or 0)
        k = n_components if isinstance(n_components, int) and d else 0
        self.register_buffer("mean_", torch.zeros(d))
        self.register_buffer("components_", torch.zeros(k, d))
        self.register_buffer("explained_variance_", torch.ones(k))
        self.register_buffer("noise_variance_", torch.tensor(1.0))
        self.register_buffer("total_variance_", torch.tensor(0.0))
        self.register_buffer("n_samples_seen_", torch.tensor(0))

    # -- fitting -----------------------------------------------------------------------------
    # ``fit`` (the toolkit's, on a Dataset / DataLoader / tensor (N, D) or (N, C, H, W) of
    # items ``{"image": ...}``) collects every training image and calls these two.
    def solve(self, images: Tensor, *, seed: int, progress=None) -> None:
        """Closed-form fit on every training image at once (the loop's hook; seed, progress unused)."""
        self.fit_tensor(images)

    def per_sample_loss(self, images: Tensor) -> Tensor:
        """(N,) the history's loss: mean squared reconstruction error per pixel (:meth:`score`)."""
        return self.score(images)

    @torch.no_grad()
    def fit_tensor(self, x: Tensor) -> PCA:
        """Fit in closed form on data already in memory, (N, D) or (N, C, H, W)."""
        flat = _flatten(x).detach().cpu().double().numpy()
        if not np.isfinite(flat).all():
            raise DataError("PCA input contains NaN or inf")
        d = flat.shape[1]
        if self.mean_.numel() and self.mean_.numel() != d:
            raise DataError(f"PCA was built for n_features={self.mean_.numel()}, got data with D={d}")
        mean, eigvals, components, total = pca_eigh(flat, self.method)
        k = self._choose_k(eigvals, total)
        kept = eigvals[:k]
        # Tipping & Bishop 1999, eq. 8: sigma^2 is the average discarded variance.
        noise = (total - kept.sum()) / (d - k) if d > k else 0.0
        like = self.mean_
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=like.dtype, device=like.device)  # noqa: E731
        # Assigning to a registered buffer's name replaces the buffer (its shape may change).
        self.mean_ = as_tensor(mean)
        self.components_ = as_tensor(components[:k])
        self.explained_variance_ = as_tensor(np.maximum(kept, self.min_variance))
        self.noise_variance_ = as_tensor(max(noise, self.min_variance))
        self.total_variance_ = as_tensor(total)
        self.n_samples_seen_ = torch.tensor(len(flat), device=like.device)
        return self

    def _choose_k(self, eigvals: np.ndarray, total: float) -> int:
        rank = len(eigvals)
        if rank == 0:
            raise DataError("PCA input has no variance (all samples are identical)")
        if self.n_components is None:
            return rank
        if isinstance(self.n_components, int):
            return min(self.n_components, rank)
        ratio = np.cumsum(eigvals) / total
        return min(int(np.searchsorted(ratio, self.n_components - 1e-12)) + 1, rank)

    # -- properties --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of components kept."""
        return self.components_.shape[0]

    @property
    def explained_variance_ratio_(self) -> Tensor:
        """(k,) fraction of the total variance along each component."""
        return self.explained_variance_ / self.total_variance_.clamp_min(1e-30)

    def _check_fitted(self, what: str) -> None:
        if int(self.n_samples_seen_) == 0:
            raise ConfigError(f"PCA.{what} needs a fitted model: call fit first")

    def _components(self, n_components: int | None) -> Tensor:
        if n_components is None:
            return self.components_
        if not 0 <= n_components <= self.k:
            raise ConfigError(f"n_components must be in [0, {self.k}], got {n_components}")
        return self.components_[:n_components]

    # -- the model ---------------------------------------------------------------------------
    def project(self, x: Tensor, n_components: int | None = None) -> Tensor:
        """(N, D) or (N, C, H, W) -> codes (N, k): coordinates along the components."""
        return (_flatten(x) - self.mean_) @ self._components(n_components).T

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (N, j), j <= k -> (N, D): mean + codes @ the first j components."""
        return self.mean_ + codes @ self.components_[:codes.shape[1]]

    def reconstruct(self, x: Tensor, n_components: int | None = None) -> Tensor:
        """Orthogonal projection onto the mean + span of the first ``n_components`` (default k).

        x (N, D) or (N, C, H, W) -> the same shape.
        """
        u = self._components(n_components)
        centred = _flatten(x) - self.mean_
        return (self.mean_ + (centred @ u.T) @ u).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    def score(self, x: Tensor) -> Tensor:
        """(N,) mean squared reconstruction error per pixel; higher = less like the data."""
        return (_flatten(x) - _flatten(self.reconstruct(x))).pow(2).mean(1)

    def log_prob(self, x: Tensor) -> Tensor:
        """(N,) log-density under probabilistic PCA (module docstring), natural log.

        log N(x; mean, C), C = U diag(lambda) U^T + sigma^2 (I - U U^T): with codes
        z = U^T (x - mean) and residual r = (x - mean) - U^T z,
        -1/2 [D log 2 pi + sum log lambda + (D - k) log sigma^2 + sum z^2 / lambda + |r|^2 / sigma^2].
        """
        self._check_fitted("log_prob")
        centred = _flatten(x) - self.mean_
        d, k = centred.shape[1], self.k
        codes = centred @ self.components_.T
        residual = centred.pow(2).sum(1) - codes.pow(2).sum(1)  # |r|^2 by Pythagoras
        # The subtraction can go a hair negative in float32 when x lies in the subspace.
        residual = residual.clamp_min(0.0)
        lam, sigma2 = self.explained_variance_, self.noise_variance_
        log_det = lam.log().sum() + (d - k) * sigma2.log()
        maha = (codes.pow(2) / lam).sum(1) + residual / sigma2
        return -0.5 * (d * math.log(2.0 * math.pi) + log_det + maha)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               noise: bool = True) -> Tensor:
        """(n, D) draws from the PPCA model; ``noise=False`` leaves out the isotropic residual
        (the samples then lie exactly in the subspace and look cleaner).

        The covariance is the one :meth:`log_prob` scores, U diag(lambda) U^T +
        sigma^2 (I - U U^T): variance lambda_i along component i, sigma^2 across it.
        """
        self._check_fitted("sample")
        z = torch.randn(n, self.k, generator=generator).to(self.mean_)
        x = self.mean_ + (z * self.explained_variance_.sqrt()) @ self.components_
        if noise:
            eps = torch.randn(n, self.mean_.numel(), generator=generator).to(self.mean_)
            # Project the noise out of the subspace: lambda already is the whole variance
            # along each component, so isotropic noise there would make it lambda + sigma^2.
            eps = eps - (eps @ self.components_.T) @ self.components_
            x = x + eps * self.noise_variance_.sqrt()
        return x

    # -- robust reconstruction ---------------------------------------------------------------
    def _ridge(self, lam: Tensor) -> Tensor:
        """(k, k) sigma^2 diag(1 / lambda): the PPCA prior on the codes as a ridge term.

        With it the least squares are the MAP codes given the observed pixels; it keeps a
        subset whose rows are nearly collinear from giving wild codes, and is negligible
        against many pixels.
        """
        return torch.diag(self.noise_variance_ / lam)

    def _codes_on_subsets(self, u: Tensor, centred: Tensor, subset: Tensor, lam: Tensor) -> Tensor:
        """Least-squares codes from the pixels ``subset`` (B, H, s) of centred (B, D) -> (B, H, k)."""
        a = u.T[subset]  # (B, H, s, k): the rows of the system, one per chosen pixel
        target = torch.gather(centred.unsqueeze(1).expand(-1, subset.shape[1], -1), 2, subset)
        lhs = a.transpose(-1, -2) @ a + self._ridge(lam)
        return torch.linalg.solve(lhs, (a.transpose(-1, -2) @ target.unsqueeze(-1)).squeeze(-1))

    def _codes_on_mask(self, u: Tensor, centred: Tensor, mask: Tensor, lam: Tensor) -> Tensor:
        """Least-squares codes from the pixels where ``mask`` (B, D) is True -> (B, k)."""
        uw = u * mask.to(u.dtype).unsqueeze(1)  # (B, k, D)
        lhs = uw @ u.T + self._ridge(lam)
        return torch.linalg.solve(lhs, (uw @ centred.unsqueeze(-1)).squeeze(-1))

    @torch.no_grad()
    def robust_reconstruct(self, x: Tensor, *, n_components: int | None = None,
                           n_hypotheses: int = 200, subset_size: int | None = None,
                           threshold: float | None = None, refine_steps: int = 3,
                           generator: torch.Generator | None = None,
                           max_elements: int = 2**24) -> RobustReconstruction:
        """Reconstruct despite occluded / corrupted pixels (hypothesize and test, module docstring).

        For each image: ``n_hypotheses`` random subsets of ``subset_size`` pixels; on each,
        the codes by least squares, with the PPCA prior as ridge (see :meth:`_ridge`); a
        pixel is consistent with a hypothesis when the reconstruction residual there is
        under ``threshold`` (default 2 sigma, sigma^2 = ``noise_variance_``, the mean
        squared residual of a clean pixel). The hypothesis with most consistent pixels wins (ties:
        smaller residual on them); then ``refine_steps`` times the codes are refitted on all
        of its consistent pixels and the consistent set recomputed; the last refit gives
        the result.

        x: (N, D) or (N, C, H, W). Returns :class:`RobustReconstruction` (reconstruction and
        inlier mask shaped like x, codes (N, k)). Images are processed in chunks so that a
        chunk's residuals (chunk x n_hypotheses x D) stay under ``max_elements``.

        Subset size: a clean subset of s pixels is drawn with probability about
        (1 - outlier fraction)^s, so s should be small; thanks to the prior, s may even be
        below k (the default, k // 4 + 2: 7 of k = 20 gives 8% clean subsets at 30%
        occlusion, so 200 hypotheses hold ~16 clean ones; s = k gives 0.08%, i.e. none).
        On 8x8 digits (k = 12..20, 30% occluded) s = 3..7 beat s = k clearly.
        """
        self._check_fitted("robust_reconstruct")
        u = self._components(n_components)
        k = u.shape[0]
        lam = self.explained_variance_[:k]
        flat = _flatten(x).to(self.mean_)
        d = flat.shape[1]
        s = min(d, subset_size if subset_size is not None else k // 4 + 2)
        if s < 1 or n_hypotheses < 1:
            raise ConfigError(f"subset_size and n_hypotheses must be >= 1, got {subset_size}, "
                              f"{n_hypotheses}")
        thr = float(threshold) if threshold is not None else 2.0 * float(self.noise_variance_.sqrt())
        chunk_size = max(1, max_elements // (n_hypotheses * d))
        recons, masks, all_codes = [], [], []
        for chunk in flat.split(chunk_size):
            centred = chunk - self.mean_  # (B, D)
            b = centred.shape[0]
            # Random subsets without replacement: the first s of a random permutation per hypothesis.
            keys = torch.rand(b, n_hypotheses, d, generator=generator).to(chunk.device)
            subset = keys.argsort(-1)[..., :s]
            codes = self._codes_on_subsets(u, centred, subset, lam)  # (B, H, k)
            residual = (centred.unsqueeze(1) - codes @ u).abs()  # (B, H, D)
            consistent = residual < thr
            count = consistent.sum(-1).to(chunk.dtype)
            # Consistent residuals are < thr each, so this term is < 1: it only breaks ties.
            tie = (residual.pow(2) * consistent).sum(-1) / (thr * thr * (d + 1))
            best = (count - tie).argmax(1)  # (B,)
            inliers = consistent[torch.arange(b, device=chunk.device), best]  # (B, D)
            for _ in range(refine_steps):
                refit = self._codes_on_mask(u, centred, inliers, lam)
                inliers = (centred - refit @ u).abs() < thr
            final = self._codes_on_mask(u, centred, inliers, lam)
            recons.append(self.mean_ + final @ u)
            masks.append(inliers)
            all_codes.append(final)
        return RobustReconstruction(torch.cat(recons).reshape(x.shape),
                                    torch.cat(masks).reshape(x.shape), torch.cat(all_codes))
