"""PCA reconstruction detector (``pca``): the eigenimage baseline.

Good images span a low-dimensional affine subspace of pixel space; a defect adds a
component outside it, which the projection onto the subspace cannot reproduce. The map is
the per-pixel squared error between the image and its projection. There is no paper
behind this detector: it is the classic linear baseline for the reconstruction detectors
(``ae``, ``ae_ssim``), trained in closed form in seconds on a CPU.

Pipeline, all with static shapes so it exports to ONNX: images (B, 3, S, S) in [0, 1] ->
bilinear resize to ``work_size`` (the eigendecomposition costs O(N^2 D) with the Gram
route, and a smaller D also keeps the (k, D) component matrix small) -> flatten to
D = 3 * work_size^2 -> :class:`anomalykit.generative.pca.PCA` reconstruction -> squared
error, channel mean (B, 1, w, w) -> bilinear upsample to S -> Gaussian smoothing ->
score = max (or mean) of the map.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector, check_choice
from anomalykit.errors import ConfigError
from anomalykit.generative.pca import PCA, Method
from anomalykit.nn.functional import MAP_REDUCTIONS, MapReduction, gaussian_blur, reduce_map
from anomalykit.registry import register_detector


@register_detector("pca")
class PCADetector(Detector):
    """Reconstruction error of a PCA subspace fitted to good images.

    Args:
        image_size: side S of the (square) input.
        work_size: side the images are resized to before PCA (None or > S: S).
        n_components: the :class:`PCA`'s: int, variance fraction in (0, 1], or None (all).
        method: the eigendecomposition route, "auto", "covariance" or "gram".
        map_sigma: Gaussian smoothing of the map, in pixels of the input (0 = none).
        score_reduction: image score = "max" or "mean" of the smoothed map.
    """

    closed_form = True

    def __init__(self, image_size: int = 64, *, work_size: int | None = 32,
                 n_components: int | float | None = 0.95, method: Method = "auto",
                 map_sigma: float = 2.0, score_reduction: MapReduction = "max") -> None:
        super().__init__()
        check_choice("score_reduction", score_reduction, MAP_REDUCTIONS)
        if work_size is not None and work_size < 1:
            raise ConfigError(f"work_size must be >= 1 or None, got {work_size}")
        self.image_size = image_size
        self.work_size = min(work_size or image_size, image_size)
        self.map_sigma, self.score_reduction = map_sigma, score_reduction
        self.set_normalization("none")  # PCA centres the data itself
        self.pca = PCA(n_components, method=method, n_features=3 * self.work_size ** 2)

    def prepare(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, 3, w, w) at ``work_size``, what the PCA models."""
        x = self.normalize_input(images)
        if self.work_size == self.image_size:
            return x
        # antialias=False: the ONNX Resize op computes exactly this.
        return F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear",
                             align_corners=False, antialias=False)

    def error_map(self, x: Tensor) -> Tensor:
        """(B, 3, w, w) prepared images -> (B, 1, w, w) squared reconstruction error."""
        return (x - self.pca.reconstruct(x)).pow(2).mean(dim=1, keepdim=True)

    def solve(self, images: Tensor, *, seed: int, progress=None) -> None:
        """Closed-form fit of the PCA on every good training image at once (the loop's hook)."""
        self.pca.fit_tensor(self.prepare(images))

    def per_sample_loss(self, images: Tensor) -> Tensor:
        """(N,) the history's loss: mean squared reconstruction error per pixel at ``work_size``."""
        return reduce_map(self.error_map(self.prepare(images)), "mean")

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S)."""
        amap = self.error_map(self.prepare(images))
        if self.work_size != self.image_size:
            amap = F.interpolate(amap, size=(self.image_size, self.image_size), mode="bilinear",
                                 align_corners=False)
        amap = gaussian_blur(amap, self.map_sigma)
        return AnomalyOutput(reduce_map(amap, self.score_reduction), amap)
