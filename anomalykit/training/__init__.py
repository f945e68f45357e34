"""The one training loop and its helpers."""

from anomalykit.training.checkpoint import load_model, save_checkpoint
from anomalykit.training.inference import predict
from anomalykit.training.seed import resolve_device, seed_everything
from anomalykit.training.trainer import fit

__all__ = ["fit", "load_model", "predict", "resolve_device", "save_checkpoint", "seed_everything"]
