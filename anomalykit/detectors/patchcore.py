"""PatchCore (Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection").

A frozen pretrained CNN describes every image position by a "locally aware" patch feature:
two mid-level stages (the paper: WideResNet-50 stages 2 and 3, strides 8 and 16; here by
default EfficientNet-Lite0 indices (2, 3), the same strides, 40 + 112 channels), each 3x3
average-pooled (stride 1, padding 1), the deeper one upsampled bilinearly to the stride-8
grid, concatenated and optionally reduced to ``feature_dim`` channels by adaptive average
pooling over channels (the paper: 1024; our 152 channels need no reduction).

Fit (closed form, :meth:`PatchCoreDetector.solve`): the patch features of every training
image form the candidate set; a greedy k-center coreset (:func:`anomalykit.nn.coreset.
greedy_coreset`) of ``coreset_ratio`` of them (at most ``max_bank_size``), chosen on a seeded
random projection to ``projection_dim`` = 128 dims (Johnson-Lindenstrauss), is the memory bank
(a buffer (K, D), resized when a checkpoint is loaded).

Inference (``forward``, ONNX-exportable with plain ops): patch score = Euclidean distance of
each test patch to its nearest bank entry, by matrix products
(``||a||^2 - 2 a.b + ||b||^2``, clamped at 0, sqrt), chunked over the bank with a static
``chunk_size`` (memory O(B P chunk), the ONNX graph a fixed sequence of MatMul / Min). Both
sides are centred on the bank mean first (distances unchanged; smaller norms, less float
cancellation). Map = patch scores upsampled bilinearly to S, Gaussian sigma ``map_sigma``
(4 in the paper). Image score (paper eq. 7): ``s* = max patch score``, at test patch
``m_test``; its nearest bank entry ``m*``; ``N_b(m*)`` = the ``num_neighbors`` (b = 9) bank
entries nearest to ``m*`` (``m*`` itself first); ``w = 1 - exp(||m_test - m*||) /
sum_{m in N_b(m*)} exp(||m_test - m||)`` (a softmax, computed with logsumexp); score = w s*.
``num_neighbors = 1`` turns the reweighting off (score = s*, as the official code and
anomalib with b = 1 do).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError
from anomalykit.nn.backbone import (
    DEFAULT_BACKBONE,
    RANDOM_WEIGHTS,
    Backbone,
    register_input_normalization,
)
from anomalykit.nn.coreset import greedy_coreset, random_projection
from anomalykit.nn.functional import concat_on_grid, gaussian_blur
from anomalykit.registry import register_detector


def channel_pooling_matrix(channels: int, out: int) -> Tensor:
    """(channels, out) matrix M with ``x @ M`` = adaptive average pooling of x's last dim.

    Output j averages inputs ``floor(j C / out) .. ceil((j + 1) C / out) - 1`` exactly as
    ``F.adaptive_avg_pool1d``; as a matrix it exports to ONNX as one MatMul.
    """
    matrix = torch.zeros(channels, out)
    for j in range(out):
        lo, hi = (j * channels) // out, -((-(j + 1) * channels) // out)
        matrix[lo:hi, j] = 1.0 / (hi - lo)
    return matrix


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances by matrix products, clamped at 0."""
    return (a.pow(2).sum(1, keepdim=True) - 2.0 * (a @ b.T) + b.pow(2).sum(1)).clamp_min(0.0)


def nearest_distance(queries: Tensor, bank: Tensor, chunk_size: int) -> Tensor:
    """(N, D) queries, (M, D) bank -> (N,) distance of each query to its nearest bank row.

    The bank is processed in static chunks of ``chunk_size`` rows (at most (N, chunk_size)
    distances alive at once), the running minimum taken over chunks.
    """
    best = None
    for start in range(0, bank.shape[0], chunk_size):
        d = squared_distances(queries, bank[start:start + chunk_size]).amin(1)
        best = d if best is None else torch.minimum(best, d)
    return best.sqrt()


@register_detector("patchcore")
class PatchCoreDetector(Detector):
    """PatchCore: nearest-neighbour distance of patch features to a coreset memory bank.

    Args:
        image_size: side S of the (square) input.
        backbone: timm architecture of the frozen feature extractor (offline default:
            EfficientNet-Lite0; the paper's WideResNet-50 needs ``backbone_weights``).
        out_indices: two (or more) backbone stages; the first sets the patch grid, the others
            are upsampled to it. (2, 3) = strides 8 and 16 for EfficientNet-Lite0.
        backbone_weights: a local weight file, "random" (tests), or None for the offline default.
        allow_download: let timm download pretrained weights.
        patch_size: side of the local neighbourhood averaged per stage (3 in the paper).
        feature_dim: channels after adaptive average pooling over channels; None keeps all.
        coreset_ratio: fraction of all training patches kept in the bank, in (0, 1].
        max_bank_size: upper bound on the bank size (None: no bound).
        projection_dim: dimension of the random projection the coreset is chosen on.
        num_neighbors: b of the image-score reweighting; 1 = plain max patch score.
        map_sigma: Gaussian smoothing of the map in input pixels (0 = none).
        chunk_size: bank rows per distance chunk at inference (memory bound).
        fit_batch_size: images per backbone batch while fitting.
    """

    closed_form = True
    solve_on_device = True
    checkpoint_load_overrides = {"backbone_weights": RANDOM_WEIGHTS}

    def __init__(self, image_size: int = 256, *, backbone: str = DEFAULT_BACKBONE,
                 out_indices: list[int] | tuple[int, ...] = (2, 3),
                 backbone_weights: str | None = None, allow_download: bool = False,
                 patch_size: int = 3, feature_dim: int | None = None,
                 coreset_ratio: float = 0.1, max_bank_size: int | None = None,
                 projection_dim: int = 128, num_neighbors: int = 9, map_sigma: float = 4.0,
                 chunk_size: int = 4096, fit_batch_size: int = 16) -> None:
        super().__init__()
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        for name, value in (("projection_dim", projection_dim), ("num_neighbors", num_neighbors),
                            ("chunk_size", chunk_size), ("fit_batch_size", fit_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if max_bank_size is not None and (not isinstance(max_bank_size, int) or max_bank_size < 1):
            raise ConfigError(f"max_bank_size must be an integer >= 1 or None, got {max_bank_size!r}")
        if not isinstance(patch_size, int) or patch_size < 1 or patch_size % 2 == 0:
            raise ConfigError(f"patch_size must be an odd integer >= 1, got {patch_size!r}")
        if map_sigma < 0:
            raise ConfigError(f"map_sigma must be >= 0, got {map_sigma}")
        self.image_size = image_size
        self.patch_size, self.coreset_ratio, self.max_bank_size = patch_size, coreset_ratio, max_bank_size
        self.projection_dim, self.num_neighbors = projection_dim, num_neighbors
        self.map_sigma, self.chunk_size, self.fit_batch_size = map_sigma, chunk_size, fit_batch_size
        self.backbone = Backbone(backbone, out_indices, weights=backbone_weights,
                                 allow_download=allow_download)
        register_input_normalization(self, self.backbone)
        channels = sum(self.backbone.channels)
        if feature_dim is not None and not 1 <= feature_dim <= channels:
            raise ConfigError(f"feature_dim must be in [1, {channels}] (the stages' {channels} "
                              f"channels) or None, got {feature_dim}")
        self.feature_dim = feature_dim or channels
        pooling = None if feature_dim in (None, channels) else channel_pooling_matrix(channels, feature_dim)
        self.register_buffer("channel_pooling", pooling, persistent=False)
        # Resized to (K, D) by solve and by checkpoint loading; one zero row until fitted, so
        # an unfitted detector still runs (its scores are feature norms).
        self.register_buffer("memory_bank", torch.zeros(1, self.feature_dim))

    # -- features -------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, D, H, W) locally aware patch features on the first stage's grid."""
        stages = self.backbone(self.normalize_input(images))
        pad = self.patch_size // 2
        pooled = [F.avg_pool2d(f, self.patch_size, stride=1, padding=pad) if self.patch_size > 1
                  else f for f in stages]
        features = concat_on_grid(pooled, tuple(stages[0].shape[-2:]))
        if self.channel_pooling is not None:
            features = torch.einsum("bchw,cd->bdhw", features, self.channel_pooling)
        return features

    def patch_scores(self, patches: Tensor) -> Tensor:
        """(B, P, D) patch features -> (B, P) distance of each to its nearest bank entry."""
        b, p, d = patches.shape
        centre = self.memory_bank.mean(0)
        dist = nearest_distance((patches - centre).reshape(b * p, d), self.memory_bank - centre,
                                self.chunk_size)
        return dist.reshape(b, p)

    # -- fit --------------------------------------------------------------------------------
    @torch.no_grad()
    def training_patches(self, images: Tensor, progress=None) -> Tensor:
        """(N, 3, S, S) -> (N * H * W, D) every patch feature, backbone run in ``fit_batch_size`` batches.

        ``progress(stage, done, total)`` is called after each batch (the loop's progress bar).
        """
        out = []
        for chunk in images.split(self.fit_batch_size):
            features = self.embed(chunk.to(self.memory_bank.device))
            out.append(features.permute(0, 2, 3, 1).reshape(-1, self.feature_dim))
            if progress is not None:
                progress("features", min(len(out) * self.fit_batch_size, len(images)), len(images))
        return torch.cat(out)

    def bank_size(self, n_patches: int) -> int:
        """Coreset size for ``n_patches`` candidates: ceil(ratio * n), at most max_bank_size, >= 1."""
        k = max(1, math.ceil(self.coreset_ratio * n_patches))
        return min(k, self.max_bank_size or k, n_patches)

    @torch.no_grad()
    def solve(self, images: Tensor, *, seed: int, progress=None) -> None:
        """Closed-form fit: memory bank = greedy coreset of all training patches (the loop's hook).

        Runs on the detector's device (the loop keeps it there: ``solve_on_device``);
        ``progress(stage, done, total)`` reports the feature pass and then the coreset picks.
        """
        patches = self.training_patches(images, progress)
        k = self.bank_size(len(patches))
        projected = random_projection(patches, self.projection_dim, seed=seed)
        report = None if progress is None else (lambda done, total: progress("coreset", done, total))
        picks = greedy_coreset(projected, k, seed=seed, progress=report)
        self.memory_bank = patches[picks].contiguous()

    @torch.no_grad()
    def per_sample_loss(self, images: Tensor) -> Tensor:
        """(N,) mean nearest-bank distance of each image's patches (small on the training set)."""
        features = self.embed(images).flatten(2).transpose(1, 2)
        return self.patch_scores(features).mean(1)

    def fit_summary(self) -> list[str]:
        """The memory bank's size (K patches x D channels, float32 MB)."""
        k, d = self.memory_bank.shape
        return [f"memory bank {k} x {d} ({k * d * 4 / 2**20:.1f} MB)"]

    # -- inference ----------------------------------------------------------------------------
    def image_score(self, scores: Tensor, patches: Tensor) -> Tensor:
        """(B, P) patch scores, (B, P, D) patch features -> (B,) the paper's reweighted max."""
        s_star, where = scores.max(1)
        if self.num_neighbors == 1:
            return s_star
        bank = self.memory_bank
        centre = bank.mean(0)
        bank = bank - centre
        index = where.view(-1, 1, 1).expand(-1, 1, patches.shape[2])
        m_test = patches.gather(1, index).squeeze(1) - centre  # (B, D)
        to_bank = squared_distances(m_test, bank).sqrt()  # (B, M)
        m_star = bank[to_bank.argmin(1)]  # (B, D) nearest bank entry of m_test
        b = min(self.num_neighbors, bank.shape[0])
        support = squared_distances(m_star, bank).topk(b, dim=1, largest=False).indices  # (B, b)
        to_support = to_bank.gather(1, support)
        # exp(||m_test - m*||) / sum_b exp(||m_test - m_b||), stably; ||m_test - m*|| = min.
        weight = 1.0 - torch.exp(to_bank.amin(1) - torch.logsumexp(to_support, 1))
        return weight * s_star

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S) (distances)."""
        features = self.embed(images)
        b, _, h, w = features.shape
        patches = features.flatten(2).transpose(1, 2)  # (B, P, D)
        scores = self.patch_scores(patches)
        amap = F.interpolate(scores.reshape(b, 1, h, w), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)
        amap = gaussian_blur(amap, self.map_sigma)
        return AnomalyOutput(self.image_score(scores, patches), amap)
