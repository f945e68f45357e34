"""Batched inference over a dataset: scores, maps, and the ground truth beside them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from anomalykit.errors import DataError
from anomalykit.training.progress import track


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, then restore its train/eval mode (even on error).

    Only the mode: gradients are the caller's business (``torch.no_grad()``).
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def as_loader(data, *, batch_size: int, shuffle: bool = False, generator=None,
              num_workers: int = 0) -> DataLoader:
    """Accept a DataLoader, a Dataset of dict items, an image tensor (N, 3, H, W), or a dict of
    equal-length tensors (``{"image": X, "class": y}``: items ``{"image": X[i], "class": y[i]}``)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, torch.Tensor):
        data = _TensorImages(data)
    elif isinstance(data, dict):
        data = _TensorDict(data)
    if not isinstance(data, Dataset):
        raise TypeError(f"expected a DataLoader, Dataset, Tensor or dict of tensors, got "
                        f"{type(data).__name__}")
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, drop_last=False)


class _TensorImages(TensorDataset):
    """Wrap an image tensor so items look like the data layer's dicts."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.tensors[0][index]}


class _TensorDict(Dataset):
    """A dict of tensors sharing their first dimension, seen as a dataset of dict items."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {name: len(t) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
        if not tensors or len(lengths) != len(tensors) or len(set(lengths.values())) != 1:
            raise DataError(f"a dict of data must hold tensors of one length; got "
                            f"{ {k: lengths.get(k, type(v).__name__) for k, v in tensors.items()} }")
        self.tensors = dict(tensors)
        self.length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: t[index] for name, t in self.tensors.items()}


@torch.no_grad()
def predict(model, data, *, batch_size: int = 16, device=None, progress: bool = False,
            desc: str = "predict") -> dict[str, Any]:
    """Run ``model`` in eval mode over ``data``.

    Returns numpy arrays: ``scores`` (N,), ``maps`` (N, H, W) float32, and when
    the data carries them ``labels`` (N,), ``masks`` (N, H, W) uint8, ``paths``,
    ``defect_types``.
    """
    loader = as_loader(data, batch_size=batch_size)
    device = model.device if device is None else torch.device(device)
    scores, maps, labels, masks, paths, defect_types = [], [], [], [], [], []
    with evaluating(model):
        for batch in track(loader, desc, enabled=progress):
            out = model(batch["image"].to(device))
            scores.append(out.score.float().cpu().numpy())
            maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
            if "label" in batch:
                labels.append(batch["label"].numpy())
            if "mask" in batch:
                masks.append(batch["mask"][:, 0].numpy().astype(np.uint8))
            paths.extend(batch.get("path", []))
            defect_types.extend(batch.get("defect_type", []))
    result: dict[str, Any] = {
        "scores": np.concatenate(scores) if scores else np.zeros(0, np.float32),
        "maps": np.concatenate(maps) if maps else np.zeros((0, 1, 1), np.float32),
        "paths": paths,
        "defect_types": defect_types,
    }
    if labels:
        result["labels"] = np.concatenate(labels)
    if masks:
        result["masks"] = np.concatenate(masks)
    return result
