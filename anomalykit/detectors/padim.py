"""PaDiM (Defard et al. 2021): a Gaussian per feature-map position of a frozen pretrained CNN.

A frozen backbone gives feature maps of several stages (``out_indices``; the paper takes
ResNet stages 1-3, strides 4/8/16). The deeper maps are upsampled (``feature_upsample``:
"nearest", as anomalib and the reference code's unfold-based concatenation, or "bilinear")
to the grid of the finest selected stage and concatenated along the channels; a random
subset of ``n_features`` channels is kept (sec. 3: it costs little accuracy against PCA and
shrinks the covariances). Each position p of the grid (P = h * w positions) gets a
multivariate Gaussian fitted on the good images: mean mu_p (D,) and covariance
Sigma_p = (1 / (N - 1)) sum_i (x_ip - mu_p)(x_ip - mu_p)^T + eps I (eq. 1, eps = 0.01).

Fitting is closed form (``closed_form = True``, the loop calls :meth:`PaDiMDetector.solve`):
one pass of the backbone over the training images in batches, accumulating per position the
sum and the sum of outer products in float64 (never all N x P x D features at once: at
256 px, N = 400, D = 100 that would be 650 MB in float32), then one batched Cholesky
inversion. The buffers hold mu (``mean_``, (P, D)) and the INVERSE covariance
(``inv_covariance_``, (P, D, D), float32) so inference is matrix products only.

Map (eq. 2): the Mahalanobis distance sqrt((x_p - mu_p)^T Sigma_p^-1 (x_p - mu_p)) per
position, divided by sqrt(D) (a constant: see :meth:`PaDiMDetector.distance_grid`),
upsampled bilinearly to the input size and smoothed by a Gaussian of sigma ``map_sigma``
(4 in the paper); image score = max of the map.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError, DataError, check_choice
from anomalykit.nn.backbone import (
    DEFAULT_BACKBONE,
    RANDOM_WEIGHTS,
    Backbone,
    register_input_normalization,
)
from anomalykit.nn.functional import concat_on_grid, gaussian_blur, reduce_map
from anomalykit.registry import register_detector

FeatureUpsample = Literal["nearest", "bilinear"]
FEATURE_UPSAMPLES = ("nearest", "bilinear")

# Positions inverted at once in solve: bounds the float64 Cholesky workspace (chunk x D x D).
_INVERT_CHUNK = 512


# -- helpers --------------------------------------------------------------------------------


def random_channel_subset(total: int, n: int, seed: int) -> Tensor:
    """(n,) sorted int64 indices of a random n-subset of range(total), a function of ``seed`` only."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=generator)[:n].sort().values


def inverse_covariance(sum_x: Tensor, sum_outer: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-position mean and inverse of (sample covariance + eps I) from float64 sums.

    sum_x: (P, D) sum of the (shifted) samples; sum_outer: (P, D, D) sum of their outer
    products; n: number of samples. The covariance uses the unbiased 1 / (n - 1) (1 when
    n = 1: the covariance is then eps I). Returns mean (P, D) and inverse (P, D, D), float64
    (the mean is of the shifted samples: add the shift back).
    """
    mean = sum_x / n
    dims = sum_x.shape[-1]
    eye = torch.eye(dims, dtype=torch.float64)
    inverse = torch.empty_like(sum_outer)
    for start in range(0, len(sum_x), _INVERT_CHUNK):
        part = slice(start, start + _INVERT_CHUNK)
        m = mean[part]
        covariance = (sum_outer[part] - n * m.unsqueeze(-1) * m.unsqueeze(-2)) / max(n - 1, 1)
        covariance = 0.5 * (covariance + covariance.transpose(-1, -2)) + eps * eye
        # Symmetric positive definite (eps > 0): Cholesky is the stable way to invert it.
        inverse[part] = torch.cholesky_inverse(torch.linalg.cholesky(covariance))
    return mean, inverse


# -- detector -------------------------------------------------------------------------------


@register_detector("padim")
class PaDiMDetector(Detector):
    """PaDiM (Defard et al. 2021): per-position Gaussians of frozen CNN features, Mahalanobis map.

    Args:
        image_size: side S of the (square) input; the buffers are sized for its feature grid.
        backbone: timm architecture of the frozen feature extractor (see
            :class:`anomalykit.nn.backbone.Backbone`; the default has offline ImageNet weights).
        out_indices: backbone stages to concatenate ((1, 2, 3): strides 4, 8, 16 on
            EfficientNet-Lite0, 24 + 40 + 112 = 176 channels, as the paper's ResNet stages 1-3).
        backbone_weights: a local weight file, "random" (tests), or None for the offline default.
        allow_download: let timm download pretrained weights.
        n_features: D, size of the random channel subset (100 for ResNet18 in the paper);
            None keeps every channel (in order).
        feature_upsample: how deeper stages reach the finest grid, "nearest" or "bilinear".
        covariance_eps: eps of Sigma + eps I (0.01 in the paper).
        map_sigma: Gaussian smoothing of the map in input pixels (4 in the paper; 0 = none).
        solve_batch_size: images per backbone pass while fitting (memory, not results).

    Buffers: ``channel_indices_`` (D,) int64, ``mean_`` (P, D), ``inv_covariance_`` (P, D, D),
    P = h * w positions of the finest selected stage. Loading a checkpoint never needs the
    pretrained weights (they are in the checkpoint).
    """

    closed_form = True
    solve_on_device = True
    checkpoint_load_overrides = {"backbone_weights": RANDOM_WEIGHTS}

    def __init__(self, image_size: int = 256, *, backbone: str = DEFAULT_BACKBONE,
                 out_indices: list[int] | tuple[int, ...] = (1, 2, 3),
                 backbone_weights: str | None = None, allow_download: bool = False,
                 n_features: int | None = 100, feature_upsample: FeatureUpsample = "nearest",
                 covariance_eps: float = 0.01, map_sigma: float = 4.0,
                 solve_batch_size: int = 32) -> None:
        super().__init__()
        check_choice("feature_upsample", feature_upsample, FEATURE_UPSAMPLES)
        if not covariance_eps > 0:
            raise ConfigError(f"covariance_eps must be > 0 (it keeps Sigma invertible); got {covariance_eps}")
        if map_sigma < 0:
            raise ConfigError(f"map_sigma must be >= 0; got {map_sigma}")
        if solve_batch_size < 1:
            raise ConfigError(f"solve_batch_size must be >= 1; got {solve_batch_size}")
        self.image_size = image_size
        self.feature_upsample = feature_upsample
        self.covariance_eps, self.map_sigma = covariance_eps, map_sigma
        self.solve_batch_size = solve_batch_size
        self.backbone = Backbone(backbone, out_indices, weights=backbone_weights,
                                 allow_download=allow_download)
        register_input_normalization(self, self.backbone)
        with torch.no_grad():  # exact feature sizes (padding conventions differ between backbones)
            shapes = [f.shape[1:] for f in self.backbone(torch.zeros(1, 3, image_size, image_size))]
        total = sum(int(shape[0]) for shape in shapes)
        dims = total if n_features is None else int(n_features)
        if not 1 <= dims <= total:
            raise ConfigError(f"n_features must be in [1, {total}] (the channels of stages "
                              f"{list(self.backbone.out_indices)} of {backbone}); got {n_features}")
        # The finest selected stage's grid (out_indices need not be in order).
        height, width = max((int(s[1]), int(s[2])) for s in shapes)
        self.grid_size = (height, width)
        positions = height * width
        self.register_buffer("channel_indices_", torch.arange(dims))
        # Unfitted: zero mean, identity covariance (a Euclidean distance), finite everywhere.
        self.register_buffer("mean_", torch.zeros(positions, dims))
        self.register_buffer("inv_covariance_", torch.eye(dims).expand(positions, dims, dims).clone())

    # -- features -------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, P, D): the selected channels of the concatenated stages."""
        features = self.backbone(self.normalize_input(images))
        stacked = concat_on_grid(features, self.grid_size, mode=self.feature_upsample)
        selected = stacked.index_select(1, self.channel_indices_)
        return selected.flatten(2).transpose(1, 2)

    def mahalanobis(self, embedding: Tensor) -> Tensor:
        """(B, P, D) embeddings -> (B, P) distances sqrt(delta^T Sigma_p^-1 delta), delta = x - mu_p.

        Batched matrix products over positions (plain MatMul in ONNX); the clamp removes
        float32 round-off below zero before the square root.
        """
        delta = (embedding - self.mean_).transpose(0, 1)  # (P, B, D)
        squared = (torch.matmul(delta, self.inv_covariance_) * delta).sum(-1)  # (P, B)
        return squared.clamp_min(0.0).sqrt().transpose(0, 1)

    def distance_grid(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, 1, h, w) Mahalanobis distances per dimension on the feature grid.

        Divided by sqrt(D): under the fitted Gaussian a good feature's squared distance is
        chi-square with D degrees of freedom, so good positions sit near 1 whatever
        ``n_features`` is. A constant factor: the ranking, hence every AUROC, is the paper's.
        It also keeps raw values small enough for float32 parity between PyTorch and
        onnxruntime (the toolkit's contract is 1e-4 absolute). Measured by hand with the quick
        config at 32 px fitted on 8 random images (D = 100 > N: a degenerate covariance, as
        in the contract test): unscaled distances reached 585 on random inputs and the
        exported map differed from PyTorch by 2.4e-4 (score 9e-5); scaled, by 2.3e-5 (8e-6).
        """
        distances = self.mahalanobis(self.embed(images)) / self.channel_indices_.numel() ** 0.5
        return distances.reshape(-1, 1, *self.grid_size)

    # -- closed-form fit ------------------------------------------------------------------
    @torch.no_grad()
    def solve(self, images: Tensor, *, seed: int, progress=None) -> None:
        """Fit every position's Gaussian on all good training images (N, 3, S, S) (the loop's hook).

        The channel subset is drawn from ``seed``. Sums are accumulated in float64 over
        batches of ``solve_batch_size`` images, shifted by the first batch's mean so the
        sum-of-squares formula does not cancel catastrophically. ``progress(stage, done,
        total)`` is called after each batch (the loop's progress bar).
        """
        if len(images) == 0:
            raise DataError("PaDiM needs at least one training image")
        # Sorted, so with every channel kept (n_features None or all) the subset is the identity.
        indices = random_channel_subset(sum(self.backbone.channels), self.channel_indices_.numel(), seed)
        self.channel_indices_.copy_(indices)
        dims = len(indices)
        shift = sum_x = sum_outer = None
        done = 0
        for batch in images.split(self.solve_batch_size):
            x = self.embed(batch.to(self.device)).cpu().double()  # (b, P, D)
            if shift is None:
                shift = x.mean(0)
                sum_x = torch.zeros_like(shift)
                sum_outer = torch.zeros(*shift.shape, dims, dtype=torch.float64)
            x = (x - shift).transpose(0, 1)  # (P, b, D)
            sum_x += x.sum(1)
            # sum_i x_i x_i^T per position, accumulated in place: no (P, D, D) temporary per batch.
            sum_outer.baddbmm_(x.transpose(1, 2), x)
            done += len(batch)
            if progress is not None:
                progress("features", done, len(images))
        mean, inverse = inverse_covariance(sum_x, sum_outer, len(images), self.covariance_eps)
        self.mean_.copy_((mean + shift).float())
        self.inv_covariance_.copy_(inverse.float())

    def fit_summary(self) -> list[str]:
        """The Gaussians' size: P positions x (D mean + D x D inverse covariance), float32 MB."""
        positions, dims = self.mean_.shape
        size = (self.mean_.numel() + self.inv_covariance_.numel()) * 4 / 2**20
        return [f"{positions} Gaussians of {dims} dims ({size:.1f} MB)"]

    def per_sample_loss(self, images: Tensor) -> Tensor:
        """(N,) the history's loss: mean Mahalanobis distance over the feature grid."""
        return reduce_map(self.distance_grid(images), "mean")

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,) = max of anomaly_map (B, 1, S, S)."""
        amap = F.interpolate(self.distance_grid(images), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)
        amap = gaussian_blur(amap, self.map_sigma)
        return AnomalyOutput(reduce_map(amap, "max"), amap)
