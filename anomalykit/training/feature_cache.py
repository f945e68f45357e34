"""Frozen-backbone features computed once per fit and served as the loop's training data.

Detectors on a frozen pretrained backbone (FastFlow, DifferNet, and the memory-bank ones)
train only what sits on top of it. When nothing augments the images, the backbone's output
for an image is the same every epoch, so their :meth:`~anomalykit.base.Estimator.setup_fit`
runs it ONCE over the training (and validation) data with :func:`cache_features` and hands
the loop a :class:`FeatureCache` instead: later epochs cost only the trainable part. Their
``training_step`` / ``validation_step`` read ``batch["features"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from anomalykit.errors import ConfigError
from anomalykit.training.inference import as_loader, evaluating
from anomalykit.training.progress import track

#: What a feature function returns for a batch of B images: one tensor (B, ...) or one per stage.
Features = Tensor | list[Tensor]


class FeatureCache(Dataset):
    """Features of N images, served as the data layer's dict items.

    features: a tensor (N, ...) or a list of tensors (N, ...) (one per backbone stage). Item
    ``i``: ``{"features": features[i] (or [f[i] for f in features]), "image": placeholder}``.
    The empty ``"image"`` placeholder exists because the loop counts validation samples with
    ``len(batch["image"])``; it costs nothing.
    """

    def __init__(self, features: Features) -> None:
        parts = list(features) if isinstance(features, (list, tuple)) else [features]
        lengths = {len(f) for f in parts}
        if len(lengths) != 1:
            raise ConfigError(f"cached features disagree in length: {sorted(lengths)}")
        self.features = list(features) if isinstance(features, (list, tuple)) else features
        self._placeholder = torch.empty(0)

    def __len__(self) -> int:
        first = self.features[0] if isinstance(self.features, list) else self.features
        return len(first)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(self.features, list):
            item: Features = [f[index] for f in self.features]
        else:
            item = self.features[index]
        return {"features": item, "image": self._placeholder}


def augments(data: Any) -> bool:
    """Whether ``data`` (a Dataset, or a DataLoader / Subset over one) augments images on the fly.

    A cache would freeze one draw of the augmentation per image.
    """
    return bool(getattr(data, "augment", False)
                or getattr(getattr(data, "dataset", None), "augment", False))


@torch.no_grad()
def cache_features(model, data, features: Callable[[Tensor], Features], *, batch_size: int = 16,
                   num_workers: int = 0, progress: bool = False,
                   desc: str = "features") -> FeatureCache:
    """Run ``features(images)`` once over every batch of ``data``; results kept on the CPU.

    model: the :class:`~anomalykit.base.Estimator` that owns ``features``; it runs in eval
        mode (its mode is restored after) and the images go to ``model.device``.
    data: a Dataset, DataLoader or image tensor (N, 3, S, S), read in order, unshuffled.
    features: images (B, 3, S, S) on the model's device -> (B, ...) or a list of (B, ...).

    Returns a :class:`FeatureCache` of the N images' features (the loop moves each batch to
    the training device).
    """
    chunks: list[Features] = []
    device = model.device
    with evaluating(model):
        for batch in track(as_loader(data, batch_size=batch_size, num_workers=num_workers), desc,
                           enabled=progress):
            out = features(batch["image"].to(device))
            chunks.append([f.cpu() for f in out] if isinstance(out, (list, tuple)) else out.cpu())
    if not chunks:
        raise ConfigError("cannot cache features of an empty dataset")
    if isinstance(chunks[0], list):
        return FeatureCache([torch.cat(parts) for parts in zip(*chunks, strict=True)])
    return FeatureCache(torch.cat(chunks))
