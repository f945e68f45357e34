"""Checkpoints: config + weights + buffers (+ training state), written atomically.

Everything inside is a plain value or a tensor, so loading uses
``torch.load(weights_only=True)``: a checkpoint cannot run code on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anomalykit import __version__
from anomalykit.atomic import atomic_write, atomic_write_text  # noqa: F401 - re-exported
from anomalykit.errors import TrainingError

FORMAT = "anomalykit-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path, model, *, meta: dict[str, Any] | None = None,
                    training: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (an Estimator) with its config; ``meta`` holds plain facts (data, metrics)."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "kind": model.registry_kind,
        "name": model.registry_name,
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    if training is not None:
        payload["training"] = training
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise TrainingError(f"cannot read checkpoint {path}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainingError(f"{path} is not an anomalykit checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise TrainingError(f"{path} was written by a newer anomalykit "
                            f"({payload.get('toolkit_version')}); upgrade to load it")
    return payload


def load_state_into(model, state_dict: dict[str, torch.Tensor], *, source: str = "") -> None:
    """load_state_dict, but buffers whose shape is only known after fitting are resized first."""
    own = dict(model.named_buffers())
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            module_name, _, buffer_name = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[buffer_name] = torch.empty_like(value, device=own[key].device)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint {source} does not match {type(model).__name__}: "
                            f"{str(exc).splitlines()[0]}") from exc


def load_model(path, map_location: str | torch.device = "cpu"):
    """Rebuild the saved model in a fresh process: ``create(name, **config)`` + weights."""
    from anomalykit.registry import create, get_class

    payload = read_checkpoint(path, map_location)
    config = payload["config"]
    # A class may name constructor arguments to replace when rebuilding from a checkpoint,
    # e.g. {"backbone_weights": "random"}: the checkpoint already holds every weight, so a
    # machine without the pretrained-weights package can still load it.
    overrides = getattr(get_class(payload["name"], payload["kind"]), "checkpoint_load_overrides", {})
    model = create(payload["name"], payload["kind"], **{**config, **overrides})
    object.__setattr__(model, "config", config)
    load_state_into(model, payload["state_dict"], source=str(path))
    model.checkpoint_meta = payload.get("meta", {})
    return model.eval()
