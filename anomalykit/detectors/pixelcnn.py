"""PixelCNN likelihood detector: anomaly map = per-pixel negative log-likelihood.

A PixelCNN (or Gated PixelCNN, ``model="gated"``) from :mod:`anomalykit.generative.
autoregressive` is trained on good images downsized to ``model_size`` (e.g. 32 or 64 px; the
detector takes the toolkit's ``image_size`` input and resizes inside ``forward``). At
inference one teacher-forced pass gives every sub-pixel's conditional distribution
p(x_i | x_<i); the map is -log p summed over the colours of each pixel, upsampled to the input
size and Gaussian-smoothed (``map_sigma``, input pixels); the score is the map's max (or mean).

Export: the pass is a fixed graph (no sampling), so it exports to ONNX. Images are not rounded
to the quantisation grid here: the NLL is interpolated linearly between the two nearest levels
(exact on the grid, continuous off it), because a resized image lands anywhere between levels
and a hard rounding would let onnxruntime and PyTorch disagree by a whole level wherever float
rounding differs at a level boundary.

Known limitation, honestly: likelihood models give some out-of-distribution images a HIGHER
likelihood than their training data (Nalisnick et al. 2019, "Do deep generative models know
what they don't know?": a model of CIFAR-10 scores SVHN as more likely). The likelihood is
dominated by local smoothness and low-level statistics. Here that means a smooth or
low-texture defect (a stain, a patch of flat fill, a missing piece showing plain background)
can look *more* likely than the good texture around it and go unnoticed, while the edges
around it are flagged; textured, high-contrast defects (scratches, cracks, contamination) are
what this detector sees best.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector, check_choice
from anomalykit.errors import ConfigError
from anomalykit.generative.autoregressive import GatedPixelCNN, PixelCNN, levels_to_input
from anomalykit.nn.functional import MAP_REDUCTIONS, MapReduction, gaussian_blur, reduce_map, shrink_to
from anomalykit.registry import register_detector

ModelKind = Literal["pixelcnn", "gated"]
MODEL_KINDS = ("pixelcnn", "gated")


def interpolated_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log p of continuous values, linear between the two nearest quantisation levels.

    logits: (B, C, L, H, W); x: (B, C, H, W) in [0, 1] -> (B, C, H, W) nats.
    """
    num_levels = logits.shape[2]
    log_p = torch.log_softmax(logits, dim=2)
    position = x.clamp(0.0, 1.0) * (num_levels - 1)
    low = torch.floor(position).clamp(max=num_levels - 2)
    weight = position - low
    low_nll = -torch.gather(log_p, 2, low.long().unsqueeze(2)).squeeze(2)
    high_nll = -torch.gather(log_p, 2, low.long().unsqueeze(2) + 1).squeeze(2)
    return (1.0 - weight) * low_nll + weight * high_nll


@register_detector("pixelcnn")
class PixelCNNDetector(Detector):
    """PixelCNN negative log-likelihood map on downsized images.

    Args:
        image_size: side S of the (square) input.
        model_size: side the PixelCNN works at (inputs are box-averaged down to it; if S is
            smaller the model works at S).
        model: "pixelcnn" (masked residual blocks) or "gated" (Gated PixelCNN, no blind spot).
        num_levels: quantisation levels of the softmax (256 as in the papers).
        hidden, layers, first_kernel, head_hidden: the PixelCNN's (see
            :class:`~anomalykit.generative.autoregressive.PixelCNN`).
        map_sigma: Gaussian smoothing of the upsampled map, in input pixels (0 = none).
        score_reduction: image score = "max" or "mean" of the smoothed map.
        lr: Adam.
    """

    def __init__(self, image_size: int = 256, *, model_size: int = 32, model: ModelKind = "pixelcnn",
                 num_levels: int = 256, hidden: int = 64, layers: int = 5, first_kernel: int = 7,
                 head_hidden: int = 128, map_sigma: float = 4.0,
                 score_reduction: MapReduction = "max", lr: float = 1e-3) -> None:
        super().__init__()
        check_choice("model", model, MODEL_KINDS)
        check_choice("score_reduction", score_reduction, MAP_REDUCTIONS)
        if model_size < 2:
            raise ConfigError(f"model_size must be >= 2; got {model_size}")
        self.image_size, self.model_size = image_size, min(model_size, image_size)
        self.map_sigma, self.score_reduction = map_sigma, score_reduction
        self.set_normalization("none")  # the PixelCNN quantises [0, 1] itself
        cls = PixelCNN if model == "pixelcnn" else GatedPixelCNN
        self.pixelcnn = cls(self.model_size, in_channels=3, num_levels=num_levels, hidden=hidden,
                            layers=layers, first_kernel=first_kernel, head_hidden=head_hidden, lr=lr)

    def training_step(self, batch) -> dict[str, Tensor]:
        return self.pixelcnn.training_step({"image": shrink_to(batch["image"], self.model_size)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.pixelcnn.configure_optimizers()

    def nll_map(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, 1, m, m) NLL per pixel (nats, summed over colours) at
        the model size m, teacher-forced: one pass."""
        small = shrink_to(images, self.model_size)
        model = self.pixelcnn
        b, c, h, w = small.shape
        x_in = levels_to_input(small.clamp(0.0, 1.0) * (model.num_levels - 1), model.num_levels)
        logits = model.logits_from_input(x_in).view(b, c, model.num_levels, h, w)
        return interpolated_nll(logits, small).sum(1, keepdim=True)

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S)."""
        amap = self.nll_map(images)
        if amap.shape[-1] != images.shape[-1]:
            amap = F.interpolate(amap, size=images.shape[-2:], mode="bilinear", align_corners=False)
        amap = gaussian_blur(amap, self.map_sigma)
        return AnomalyOutput(reduce_map(amap, self.score_reduction), amap)
