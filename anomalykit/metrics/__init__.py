"""Anomaly detection metrics (MVTec AD protocol), numpy only.

Image level: :func:`image_auroc`, :func:`image_ap`, :func:`f1_max`, :func:`f1_at_threshold`.
Pixel level: :func:`pixel_auroc`, :func:`pixel_ap`, :func:`aupro`.
Threshold calibration on good images: :func:`threshold_from_good`.
Everything at once: :func:`compute_metrics`.

Undefined metrics (AUROC with a single class present, AP/F1 without defects, AUPRO without
regions) are ``float("nan")``, which reports print as "n/a". Bad input raises ``ValueError``
(:class:`~anomalykit.errors.DataError` / :class:`~anomalykit.errors.ConfigError`) with a
one-line message naming the value. See the submodules for conventions, memory and timings.
"""

from __future__ import annotations

import math

from numpy.typing import ArrayLike

from anomalykit.errors import DataError
from anomalykit.metrics.classification import (
    _ap_sorted,
    _auroc_sorted,
    _check_labels_scores,
    _check_threshold,
    _confusion_at,
    _f1_max_sorted,
    _split_sorted,
    f1_at_threshold,
    f1_max,
    image_ap,
    image_auroc,
)
from anomalykit.metrics.sample_quality import (
    backbone_embeddings,
    frechet_distance,
    knn_precision_recall,
    sample_quality,
)
from anomalykit.metrics.segmentation import (
    _check_fpr_limit,
    _pixel_metrics,
    aupro,
    pixel_ap,
    pixel_auroc,
)
from anomalykit.metrics.threshold import threshold_from_good

__all__ = [
    "aupro",
    "backbone_embeddings",
    "compute_metrics",
    "f1_at_threshold",
    "f1_max",
    "frechet_distance",
    "image_ap",
    "image_auroc",
    "knn_precision_recall",
    "pixel_ap",
    "pixel_auroc",
    "sample_quality",
    "threshold_from_good",
]


def compute_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
    *,
    threshold: float | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All metrics of one test set, each class's scores sorted only once.

    Args:
        labels: (N,) 0 = good, 1 = defective.
        scores: (N,) image anomaly scores, higher = more anomalous.
        masks: optional (N, H, W) or (N, 1, H, W) 0/1 ground truth; give with ``maps``.
        maps: optional anomaly maps, same shape as ``masks``.
        threshold: optional image threshold (e.g. from :func:`threshold_from_good`).
        fpr_limit: FPR limit of AUPRO, in (0, 1].

    Returns:
        Floats (``nan`` where undefined) under the keys ``image_auroc``, ``image_ap``,
        ``f1_max``, ``f1_max_threshold``; with masks and maps also ``pixel_auroc``,
        ``pixel_ap``, ``aupro``; with a threshold also ``f1_at_threshold``,
        ``accuracy_at_threshold``, ``fpr_good`` (fraction of good images flagged) and
        ``tpr_defect`` (fraction of defective images flagged).
    """
    # Cheap checks first, so a bad option fails before any pixel is sorted.
    if (masks is None) != (maps is None):
        given = "masks" if maps is None else "maps"
        raise DataError(f"masks and maps must be given together, got only {given}")
    thr = None if threshold is None else _check_threshold(threshold)
    _check_fpr_limit(fpr_limit)
    is_pos, values = _check_labels_scores(labels, scores)

    pos, neg = _split_sorted(is_pos, values)
    best_f1, best_threshold = _f1_max_sorted(pos, neg)
    result: dict[str, float] = {
        "image_auroc": _auroc_sorted(pos, neg),
        "image_ap": _ap_sorted(pos, neg),
        "f1_max": best_f1,
        "f1_max_threshold": best_threshold,
    }
    if masks is not None:
        result.update(_pixel_metrics(masks, maps, n_images=values.shape[0], fpr_limit=fpr_limit))
    if thr is not None:
        tp, fp, n_pos, n_neg = _confusion_at(is_pos, values, thr)
        tn = n_neg - fp
        result["f1_at_threshold"] = 2.0 * tp / (tp + fp + n_pos) if n_pos else math.nan
        result["accuracy_at_threshold"] = (tp + tn) / (n_pos + n_neg)
        result["fpr_good"] = fp / n_neg if n_neg else math.nan
        result["tpr_defect"] = tp / n_pos if n_pos else math.nan
    return result
