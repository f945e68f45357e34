"""FastFlow (Yu et al. 2021): a 2-D normalizing flow on frozen CNN features, one per stage.

A frozen pretrained backbone gives feature maps at strides 4/8/16 (``out_indices``); each
stage is normalised by a trainable ``LayerNorm([C, H, W])`` (as in the reference code, where
it belongs to the flow model) and mapped by its own flow of ``flow_steps`` steps, each an
affine coupling whose conv subnet alternates 3x3 and 1x1 kernels (sec. 3.2, fig. 2;
``conv3x3_only`` keeps 3x3 everywhere) followed by a fixed channel permutation. Good
features are pushed to a standard normal, so the per-position density tells good from bad.

Training (sec. 3.3): maximum likelihood,
``loss = sum_stages mean_batch(0.5 * sum_{C,H,W} z^2 - log|det J|)``, here divided by
``C * H * W`` per stage (nats per dimension: the same minimiser, readable numbers; Adam is
invariant to the scale, each stage's flow has its own parameters). Adam, lr 1e-3,
weight decay 1e-5, no augmentation.

Because nothing augments the images and the backbone is frozen, ``fit`` (its
:meth:`FastFlowDetector.setup_fit` hook) runs the backbone over the training (and
validation) images ONCE, caches the stage features (:mod:`anomalykit.training.feature_cache`)
and the toolkit's loop trains the flows on the cache: every later epoch costs only the flows.
``training_step`` takes ``batch["features"]`` when present and computes them from
``batch["image"]`` otherwise, so the loop on images works too.

Map (sec. 3.4): per stage ``p = exp(-0.5 * mean_C z^2)`` (the density per position, up to
constants), upsampled bilinearly to the input size and averaged over stages. The reference
maps ``-p``; we map ``1 - p`` (the same ranking, higher = more anomalous, in [0, 1]).
Image score = max of the map, as in anomalib.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError
from anomalykit.nn.backbone import (
    DEFAULT_BACKBONE,
    RANDOM_WEIGHTS,
    Backbone,
    register_input_normalization,
)
from anomalykit.nn.coupling import AffineCoupling, FlowSequential, Permutation, subnet_conv
from anomalykit.nn.functional import reduce_map
from anomalykit.registry import register_detector
from anomalykit.training.feature_cache import FeatureCache, augments, cache_features

# -- helpers --------------------------------------------------------------------------------


def stage_flow(channels: int, flow_steps: int, *, conv3x3_only: bool, hidden_ratio: float,
               clamp: float, seed: int = 0) -> FlowSequential:
    """FastFlow's 2-D flow for one stage: (coupling, permutation) x flow_steps, on (B, C, H, W).

    Subnet kernels alternate 3, 1, 3, 1, ... (all 3 with ``conv3x3_only``); permutations are
    random with seeds ``seed + step``, so the same arguments build the same flow.
    """
    layers: list[nn.Module] = []
    for step in range(flow_steps):
        kernel = 3 if conv3x3_only or step % 2 == 0 else 1
        layers.append(AffineCoupling(channels, subnet_conv(kernel, hidden_ratio), clamp=clamp))
        layers.append(Permutation(channels, seed=seed + step))
    return FlowSequential(*layers)


# -- detector -------------------------------------------------------------------------------


@register_detector("fastflow")
class FastFlowDetector(Detector):
    """FastFlow (Yu et al. 2021): per-stage 2-D normalizing flows on frozen CNN features.

    Args:
        image_size: side S of the (square) input; the LayerNorms are built for its feature sizes.
        backbone: timm architecture of the frozen feature extractor (see
            :class:`anomalykit.nn.backbone.Backbone`; the default has offline ImageNet weights).
        out_indices: backbone stages to model, one flow each ((1, 2, 3): strides 4, 8, 16).
        backbone_weights: a local weight file, "random" (tests), or None for the offline default.
        allow_download: let timm download pretrained weights.
        flow_steps: coupling steps per stage (8 in the paper for ResNet backbones).
        conv3x3_only: every subnet uses 3x3 kernels instead of alternating 3x3 / 1x1.
        hidden_ratio: subnet hidden width / its input width (1.0 in the paper for ResNet18).
        clamp: soft clamp of the coupling log-scales (2.0 in the paper).
        lr, weight_decay: Adam.

    Loading a checkpoint never needs the pretrained weights (they are in the checkpoint).
    """

    checkpoint_load_overrides = {"backbone_weights": RANDOM_WEIGHTS}

    def __init__(self, image_size: int = 256, *, backbone: str = DEFAULT_BACKBONE,
                 out_indices: list[int] | tuple[int, ...] = (1, 2, 3),
                 backbone_weights: str | None = None, allow_download: bool = False,
                 flow_steps: int = 8, conv3x3_only: bool = False, hidden_ratio: float = 1.0,
                 clamp: float = 2.0, lr: float = 1e-3, weight_decay: float = 1e-5) -> None:
        super().__init__()
        if flow_steps < 1:
            raise ConfigError(f"flow_steps must be >= 1; got {flow_steps}")
        self.image_size = image_size
        self.lr, self.weight_decay = lr, weight_decay
        self.backbone = Backbone(backbone, out_indices, weights=backbone_weights,
                                 allow_download=allow_download)
        register_input_normalization(self, self.backbone)
        with torch.no_grad():  # exact feature sizes (padding conventions differ between backbones)
            shapes = [f.shape[1:] for f in self.backbone(torch.zeros(1, 3, image_size, image_size))]
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes)
        self.flows = nn.ModuleList(
            stage_flow(int(shape[0]), flow_steps, conv3x3_only=conv3x3_only,
                       hidden_ratio=hidden_ratio, clamp=clamp, seed=100 * i)
            for i, shape in enumerate(shapes))

    # -- features -------------------------------------------------------------------------
    def extract_features(self, images: Tensor) -> list[Tensor]:
        """(B, 3, S, S) in [0, 1] -> frozen backbone features [(B, C_i, H_i, W_i)], no LayerNorm."""
        return self.backbone(self.normalize_input(images))

    def cache_features(self, data, *, batch_size: int = 32, num_workers: int = 0,
                       progress: bool = False) -> FeatureCache:
        """Run the backbone once over ``data`` (Dataset, DataLoader or image tensor).

        Items ``{"features": [(C_i, H_i, W_i) per stage], ...}``, kept on the CPU (the loop
        moves each batch to the training device).
        """
        return cache_features(self, data, self.extract_features, batch_size=batch_size,
                              num_workers=num_workers, progress=progress)

    def setup_fit(self, train_data, val_data, *, batch_size: int, num_workers: int,
                  progress: bool) -> tuple[FeatureCache, FeatureCache | None]:
        """Loop hook: the backbone features of train (and val), computed once; the flows train on them.

        An augmenting dataset would be sampled once: FastFlow trains without augmentation.
        """
        if augments(train_data):
            warnings.warn("FastFlow caches backbone features once, so train.augment only draws one "
                          "augmentation per image; set augment: false", UserWarning, stacklevel=2)
        options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
        train = self.cache_features(train_data, **options)
        return train, None if val_data is None else self.cache_features(val_data, **options)

    # -- flows ----------------------------------------------------------------------------
    def flow_outputs(self, features: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Backbone features -> [(z (B, C_i, H_i, W_i), log_det_jacobian (B,))] per stage."""
        return [flow(norm(f)) for f, norm, flow in zip(features, self.norms, self.flows, strict=True)]

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        features = batch.get("features")
        if features is None:
            with torch.no_grad():  # frozen: no graph through the backbone
                features = self.extract_features(batch["image"])
        losses = {}
        for i, (z, log_det) in enumerate(self.flow_outputs(features)):
            # Negative log-likelihood per dimension, without the constant 0.5 * log(2 pi).
            nll = 0.5 * z.pow(2).flatten(1).sum(1) - log_det
            losses[f"nll_{i}"] = nll.mean() / z[0].numel()
        return {"loss": sum(losses.values()), **losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]  # norms and flows; backbone frozen
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def anomaly_map(self, features: list[Tensor], size: tuple[int, int] | torch.Size) -> Tensor:
        """Backbone features -> (B, 1, *size) map: 1 - exp(-0.5 mean_C z^2), upsampled, stage mean."""
        stage_maps = []
        for z, _ in self.flow_outputs(features):
            density = torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True))
            stage_maps.append(F.interpolate(1.0 - density, size=size, mode="bilinear",
                                            align_corners=False))
        return torch.stack(stage_maps).mean(0)

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,) = max of anomaly_map (B, 1, S, S) in [0, 1]."""
        amap = self.anomaly_map(self.extract_features(images), images.shape[-2:])
        return AnomalyOutput(reduce_map(amap, "max"), amap)
