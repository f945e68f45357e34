"""Input normalisation: the named statistics and the buffers a model normalises with.

Detectors receive images in [0, 1] and normalise inside ``forward`` (so the ONNX graph
and PyTorch see exactly the same arithmetic) with ``(x - input_mean) / input_std``, two
(1, 3, 1, 1) buffers. Detectors with a fixed convention take them from
:data:`NORMALIZATIONS`; detectors on a pretrained backbone take the statistics its
weights were trained with (:attr:`anomalykit.nn.backbone.Backbone.input_mean`) and keep
them *persistent*, in the checkpoint: a checkpoint is rebuilt with random backbone weights
(``checkpoint_load_overrides``), whose default statistics may differ from the trained ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORMALIZATIONS = {
    # Detectors receive images in [0, 1] and normalise inside forward, so the
    # ONNX graph and PyTorch see exactly the same arithmetic.
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1], for tanh decoders
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def register_input_stats(module: nn.Module, mean: Sequence[float], std: Sequence[float], *,
                         persistent: bool = True) -> None:
    """Register (1, 3, 1, 1) float32 buffers ``input_mean`` / ``input_std`` on ``module``.

    ``persistent=True`` saves them with the model (backbone detectors: the statistics are a
    property of the weights the model was trained on, not of how it is rebuilt).
    """
    module.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=persistent)
    module.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=persistent)


def normalization_name(mean: Sequence[float], std: Sequence[float]) -> str | None:
    """The key of :data:`NORMALIZATIONS` whose statistics equal (mean, std) within 1e-6, or None."""
    for key, (m, s) in NORMALIZATIONS.items():
        if all(abs(a - b) < 1e-6 for a, b in zip((*mean, *std), (*m, *s), strict=True)):
            return key
    return None
