"""Decision threshold calibrated on held-out GOOD images only.

The test set must never choose the threshold that is then scored on it, and defective
images are often unavailable at training time; so the threshold comes from the score
distribution of good images alone.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from anomalykit.errors import ConfigError, DataError
from anomalykit.metrics.classification import _as_scores

__all__ = ["threshold_from_good"]


def threshold_from_good(scores: ArrayLike, *, quantile: float = 1.0, margin: float = 0.0) -> float:
    """Threshold = ``quantile`` of the good scores + ``margin`` * their standard deviation.

    Args:
        scores: (N,) scores of held-out good images (any shape is accepted and flattened,
            e.g. (N, H, W) pixel maps to calibrate a pixel threshold).
        quantile: in [0, 1]; 1.0 = the highest good score, 0.99 = the 99th percentile
            (linear interpolation between order statistics, numpy's default).
        margin: finite multiple of the population standard deviation (ddof=0) added on top;
            negative values lower the threshold.

    Returns:
        The threshold; predict defective when ``score >= threshold``. With the defaults no
        good calibration image exceeds it.

    Raises:
        DataError: ``scores`` is empty, non-numeric or holds NaN/inf.
        ConfigError: ``quantile`` outside [0, 1] or ``margin`` not finite.
    """
    q = _check_real(quantile, "quantile")
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"quantile must be in [0, 1], got {quantile!r}")
    m = _check_real(margin, "margin")
    if not math.isfinite(m):
        raise ConfigError(f"margin must be finite, got {margin!r}")
    values = np.asarray(scores)
    if values.size == 0:
        raise DataError(
            f"no good scores to calibrate a threshold on (empty array of shape {values.shape})"
        )
    values = _as_scores(values, "good scores").ravel()
    threshold = float(np.quantile(values, q))
    if m != 0.0:
        # float64 accumulation: float32 sums over millions of pixels drift.
        threshold += m * float(np.std(values, dtype=np.float64))
    return threshold


def _check_real(value: float, name: str) -> float:
    """Return ``value`` as a float, or raise ConfigError naming it."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
