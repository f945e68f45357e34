"""Image-level metrics: AUROC, average precision and F1 of per-image anomaly scores.

Conventions shared by the whole ``anomalykit.metrics`` package:

* labels are 0 (good) or 1 (defective); bool, integer and float arrays holding only 0 and 1
  are accepted.
* Scores: higher means more anomalous; a sample is predicted defective when
  ``score >= threshold``.
* Bad data raises :class:`~anomalykit.errors.DataError` and a bad option raises
  :class:`~anomalykit.errors.ConfigError`; both are ``ValueError`` subclasses whose one-line
  message names the offending value. NaN and infinite scores are rejected.
* A metric that the data leaves undefined returns ``float("nan")`` instead of raising, so a
  benchmark over many categories keeps going; reports print it as "n/a". This happens for
  AUROC when only one class is present, and for AP and F1 when no sample is defective.

Implementation: rather than argsorting all scores together with their labels (an int64
permutation plus permuted copies, about 30 bytes per sample), the scores of each class are
sorted separately and every cross-class count comes from ``np.searchsorted``. That costs
one float copy of the scores and gives exactly scikit-learn's ``roc_auc_score`` and
``average_precision_score``, ties included (a tied positive/negative pair counts one half).
The same code serves the pixel-level metrics in :mod:`anomalykit.metrics.segmentation`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anomalykit.errors import DataError

__all__ = ["f1_at_threshold", "f1_max", "image_ap", "image_auroc"]


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores.

    Args:
        labels: (N,) 0 = good, 1 = defective.
        scores: (N,) anomaly scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1]; ``nan`` when only one class is present (AUROC is undefined).
    """
    is_pos, values = _check_labels_scores(labels, scores)
    pos, neg = _split_sorted(is_pos, values)
    return _auroc_sorted(pos, neg)


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision (area under the step precision-recall curve), as scikit-learn.

    Args:
        labels: (N,) 0 = good, 1 = defective.
        scores: (N,) anomaly scores, higher = more anomalous.

    Returns:
        AP in [0, 1]; ``nan`` when no sample is defective (recall is undefined).
        With only defective samples AP is 1.0.
    """
    is_pos, values = _check_labels_scores(labels, scores)
    pos, neg = _split_sorted(is_pos, values)
    return _ap_sorted(pos, neg)


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold achieving it.

    Every distinct score is a candidate threshold (prediction = ``score >= threshold``).
    When several thresholds reach the same best F1 the highest one is returned.

    Args:
        labels: (N,) 0 = good, 1 = defective.
        scores: (N,) anomaly scores, higher = more anomalous.

    Returns:
        ``(f1, threshold)``; ``threshold`` is one of the scores, so
        ``f1_at_threshold(labels, scores, threshold) == f1``. ``(nan, nan)`` when no sample
        is defective.
    """
    is_pos, values = _check_labels_scores(labels, scores)
    pos, neg = _split_sorted(is_pos, values)
    return _f1_max_sorted(pos, neg)


def f1_at_threshold(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """F1 of the prediction ``score >= threshold``.

    Args:
        labels: (N,) 0 = good, 1 = defective.
        scores: (N,) anomaly scores, higher = more anomalous.
        threshold: finite decision threshold.

    Returns:
        F1 in [0, 1]; ``nan`` when no sample is defective.
    """
    thr = _check_threshold(threshold)
    is_pos, values = _check_labels_scores(labels, scores)
    tp, fp, n_pos, _ = _confusion_at(is_pos, values, thr)
    if n_pos == 0:
        return math.nan
    return 2.0 * tp / (tp + fp + n_pos)


# --------------------------------------------------------------------------- validation


def _check_labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.bool_], NDArray]:
    """Validate image labels and scores; return ``(is_defect (N,) bool, scores (N,))``."""
    lab = np.asarray(labels)
    val = np.asarray(scores)
    if lab.ndim != 1:
        raise DataError(f"labels must be 1-D (N,), got shape {lab.shape}")
    if val.ndim != 1:
        raise DataError(f"scores must be 1-D (N,), got shape {val.shape}")
    if lab.shape[0] != val.shape[0]:
        raise DataError(
            f"labels and scores differ in length: {lab.shape[0]} labels, {val.shape[0]} scores"
        )
    if lab.shape[0] == 0:
        raise DataError("labels and scores are empty")
    return _as_binary(lab, "labels"), _as_scores(val, "scores")


def _as_binary(arr: np.ndarray, name: str) -> NDArray[np.bool_]:
    """Return ``arr != 0`` after checking that ``arr`` holds only 0 and 1."""
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{name} must be numeric 0/1, got dtype {arr.dtype}")
    ok = (arr == 0) | (arr == 1)
    if not ok.all():
        index = _first_index(~ok)
        raise DataError(
            f"{name} must contain only 0 and 1, found {arr[index].item()!r} at index {index}"
        )
    del ok
    # uint8 0/1 (the usual mask dtype) has the same bytes as bool: a view avoids a copy.
    if arr.dtype.itemsize == 1:
        return arr.view(np.bool_)
    return arr != 0


def _as_scores(arr: np.ndarray, name: str) -> np.ndarray:
    """Check that ``arr`` is real-valued and finite; return it without copying."""
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{name} must be real numbers, got dtype {arr.dtype}")
    # One boolean temporary in the common case; the failure path may spend more.
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        index = _first_index(bad)
        raise DataError(
            f"{name} contain {int(np.count_nonzero(bad))} non-finite value(s), "
            f"first {arr[index].item()!r} at index {index}"
        )
    return arr


def _first_index(mask: np.ndarray) -> int | tuple[int, ...]:
    """Index of the first True of ``mask``: an int for 1-D, a tuple otherwise."""
    flat = int(np.argmax(mask.ravel()))
    if mask.ndim == 1:
        return flat
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape))


def _check_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float after checking it is a finite real number."""
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise DataError(f"threshold must be a real number, got {threshold!r}") from None
    if not math.isfinite(thr):
        raise DataError(f"threshold must be finite, got {thr!r}")
    return thr


# --------------------------------------------------------------------------- core


def _split_sorted(is_pos: NDArray[np.bool_], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split scores by class and sort each class ascending.

    Args:
        is_pos: any shape, bool.
        values: same shape as ``is_pos``.

    Returns:
        ``(pos (P,), neg (M,))``, both new arrays sorted ascending in ``values.dtype``.
    """
    pos = values[is_pos]
    pos.sort()
    neg = values[~is_pos]
    neg.sort()
    return pos, neg


def _auroc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC = P(score_pos > score_neg) + 0.5 P(tie), from class-wise sorted scores."""
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Search the smaller class in the larger so the int64 search results stay small.
    if n_pos <= n_neg:
        below = int(np.searchsorted(neg, pos, side="left").sum(dtype=np.int64))
        below_or_tied = int(np.searchsorted(neg, pos, side="right").sum(dtype=np.int64))
    else:
        # Pairs (p, n) with p > n, and with p >= n, counted per negative.
        below = n_pos * n_neg - int(np.searchsorted(pos, neg, side="right").sum(dtype=np.int64))
        below_or_tied = n_pos * n_neg - int(
            np.searchsorted(pos, neg, side="left").sum(dtype=np.int64)
        )
    # Python ints keep the pair counts exact; one rounding in the final division.
    return (below + below_or_tied) / (2 * n_pos * n_neg)


def _distinct_sorted(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of an ascending array: ``(values (K,), first_index (K,), count (K,))``."""
    change = np.empty(sorted_values.size, dtype=bool)
    change[:1] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    counts = np.diff(starts, append=sorted_values.size)
    return sorted_values[starts], starts, counts


def _ap_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision from class-wise sorted scores (scikit-learn's definition).

    Recall only grows at thresholds equal to a positive score u, by count(u) / P, and the
    precision there is #pos>=u / (#pos>=u + #neg>=u).
    """
    n_pos = pos.size
    if n_pos == 0:
        return math.nan
    values, starts, counts = _distinct_sorted(pos)
    tp = n_pos - starts
    fp = neg.size - np.searchsorted(neg, values, side="left")
    return float(np.sum(counts * (tp / (tp + fp))) / n_pos)


def _f1_max_sorted(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """Best F1 and its threshold from class-wise sorted scores."""
    n_pos = pos.size
    if n_pos == 0:
        return math.nan, math.nan
    # Only positive scores need trying: raising a threshold up to the next positive score
    # keeps every true positive and drops false positives, so F1 cannot get worse.
    values, starts, _ = _distinct_sorted(pos)
    tp = n_pos - starts
    fp = neg.size - np.searchsorted(neg, values, side="left")
    f1 = 2.0 * tp / (tp + fp + n_pos)
    # values ascend: the last index of the maximum is the highest threshold among ties.
    best = f1.size - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(values[best])


def _confusion_at(
    is_pos: NDArray[np.bool_], values: np.ndarray, threshold: float
) -> tuple[int, int, int, int]:
    """Counts ``(tp, fp, n_pos, n_neg)`` of the prediction ``values >= threshold``."""
    pred = values >= threshold
    n_pos = int(np.count_nonzero(is_pos))
    tp = int(np.count_nonzero(pred & is_pos))
    fp = int(np.count_nonzero(pred)) - tp
    return tp, fp, n_pos, is_pos.size - n_pos
