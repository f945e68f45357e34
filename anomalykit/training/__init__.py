"""The one training loop and its helpers."""

from anomalykit.training.checkpoint import load_model, save_checkpoint
from anomalykit.training.distributed import is_main_process
from anomalykit.training.feature_cache import FeatureCache, cache_features
from anomalykit.training.inference import evaluating, predict
from anomalykit.training.seed import resolve_device, seed_everything
from anomalykit.training.trainer import fit

__all__ = ["FeatureCache", "cache_features", "evaluating", "fit", "is_main_process", "load_model",
           "predict", "resolve_device", "save_checkpoint", "seed_everything"]
