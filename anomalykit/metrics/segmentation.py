"""Pixel-level metrics: pixel AUROC, pixel AP and AUPRO (MVTec AD protocol).

Masks are ``(N, H, W)`` or ``(N, 1, H, W)`` arrays of 0/1 (bool, uint8 or float); maps have
the same shape (a singleton channel axis may be present on either side) and any real dtype.
Maps are used in their own dtype: float32 maps are never copied to float64.

AUPRO follows Bergmann et al. (MVTec AD, IJCV 2021): every 8-connected component of a
ground-truth mask is a region; at a threshold t, PRO(t) is the mean over ALL regions of the
fraction of the region's pixels scoring >= t, and FPR(t) is the fraction of all good pixels
(pixels outside the masks, over all images) scoring >= t. The curve starts at (0, 0), passes
through one point per distinct map value, is integrated with the trapezoid rule from
FPR 0 to ``fpr_limit`` (the curve interpolated linearly at exactly ``fpr_limit``) and the
area is divided by ``fpr_limit`` so that a perfect detector scores 1.0.

How the exact AUPRO avoids an argsort of all pixels: PRO is a weighted count of region
pixels (weight 1 / (region size * number of regions)), so the area under the curve is a
weighted pair count, as for AUROC. The integration stops at a cut value c, the good-pixel
score at which FPR reaches the limit. Before it, a region pixel scoring s > c contributes its
weight times the number of good pixels scoring in (c, s), a tied good pixel counting one
half; the straight segment through the tie group at c is then cut at ``fpr_limit``. Good
scores and region scores are each sorted once (float copies in the map dtype, plus an int64
order and float64 weights for the region pixels only) and counted with ``np.searchsorted``.
The result is the number the MVTec reference code gives (sort everything, cumulative sums,
trapezoid interpolated at the limit): the tests compare it with a threshold-by-threshold
implementation, and a one-off check against the reference code itself agreed to 5e-14.

Measured on a synthetic full category, 400 images x 256 x 256 = 26.2M float32 pixels,
masks (N, 1, H, W) float32 as the dataset yields them, 1.9% defect pixels in 1-4 ellipses
per defective image, on 2 CPU cores; peak memory is what the call allocates on top of its
inputs (tracemalloc):

=====================================  =======  ===========  ==============================
call                                   time     peak memory  (20% defect pixels: time, peak)
=====================================  =======  ===========  ==============================
``pixel_auroc``                        0.4 s    157 MB       0.9 s, 174 MB
``pixel_ap``                           0.4 s    157 MB       0.6 s, 347 MB
``aupro`` (exact)                      0.4 s    161 MB       1.2 s, 344 MB
``aupro(num_thresholds=1000)``         0.5 s    138 MB       0.9 s, 240 MB
``compute_metrics`` (exact AUPRO)      0.6 s    160 MB       1.6 s, 389 MB
scikit-learn ``roc_auc_score``         14.3 s   1363 MB
scikit-learn ``average_precision``     10.3 s   914 MB
=====================================  =======  ===========  ==============================

The pixel arrays themselves cost about 6 bytes per pixel (good scores copy, boolean masks,
validation temporaries); the rest grows with the number of defect pixels (~40 bytes each).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from anomalykit.errors import ConfigError, DataError
from anomalykit.metrics.classification import (
    _ap_sorted,
    _as_binary,
    _as_scores,
    _auroc_sorted,
    _split_sorted,
)

__all__ = ["aupro", "pixel_ap", "pixel_auroc"]


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """AUROC over all pixels of all images pooled together.

    Args:
        masks: (N, H, W) or (N, 1, H, W), 0 = good pixel, 1 = defect pixel.
        maps: same shape, anomaly map, higher = more anomalous.

    Returns:
        AUROC in [0, 1]; ``nan`` when there are no defect pixels or no good pixels.
    """
    is_pos, values = _check_masks_maps(masks, maps)
    pos, neg = _split_sorted(is_pos, values)
    return _auroc_sorted(pos, neg)


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Average precision over all pixels pooled (scikit-learn's definition).

    Args:
        masks: (N, H, W) or (N, 1, H, W), 0 = good pixel, 1 = defect pixel.
        maps: same shape, anomaly map, higher = more anomalous.

    Returns:
        AP in [0, 1]; ``nan`` when there are no defect pixels.
    """
    is_pos, values = _check_masks_maps(masks, maps)
    pos, neg = _split_sorted(is_pos, values)
    return _ap_sorted(pos, neg)


def aupro(
    masks: ArrayLike,
    maps: ArrayLike,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalized area under the per-region-overlap curve up to ``fpr_limit`` (see module doc).

    Args:
        masks: (N, H, W) or (N, 1, H, W), 0 = good pixel, 1 = defect pixel. Regions are the
            8-connected components of each image's mask.
        maps: same shape, anomaly map, higher = more anomalous.
        fpr_limit: upper end of the integrated FPR range, in (0, 1].
        num_thresholds: None for the exact curve (every distinct map value is a threshold).
            An int k >= 2 uses only the k map values at evenly spaced quantiles of all
            pixels: an approximation kept for comparison with binned implementations. It
            saves little here (both variants sort once; see the module docstring).

    Returns:
        AUPRO in [0, 1] (1.0 = perfect); ``nan`` when the masks hold no region or no good
        pixel.
    """
    limit = _check_fpr_limit(fpr_limit)
    if num_thresholds is not None:
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)):
            raise ConfigError(f"num_thresholds must be an int or None, got {num_thresholds!r}")
        if num_thresholds < 2:
            raise ConfigError(f"num_thresholds must be at least 2, got {num_thresholds}")
    is_pos, values = _check_masks_maps(masks, maps)
    pos, weights = _region_pixels(is_pos, values)
    if num_thresholds is None:
        neg = values[~is_pos]
        neg.sort()
        return _aupro_sorted(neg, pos, weights, limit)
    return _aupro_binned(values, pos, weights, limit, int(num_thresholds))


# --------------------------------------------------------------------------- validation


def _check_masks_maps(masks: ArrayLike, maps: ArrayLike) -> tuple[NDArray[np.bool_], np.ndarray]:
    """Validate masks and maps; return ``(is_defect (N, H, W) bool, maps (N, H, W))``."""
    mask_arr = np.asarray(masks)
    map_arr = np.asarray(maps)
    mask3 = _drop_channel(mask_arr, "masks")
    map3 = _drop_channel(map_arr, "maps")
    if mask3.shape != map3.shape:
        raise DataError(f"masks shape {mask_arr.shape} does not match maps shape {map_arr.shape}")
    if mask3.size == 0:
        raise DataError(f"masks and maps are empty, shape {mask_arr.shape}")
    return _as_binary(mask3, "masks"), _as_scores(map3, "maps")


def _drop_channel(arr: np.ndarray, name: str) -> np.ndarray:
    """(N, 1, H, W) -> (N, H, W) view; (N, H, W) unchanged; other shapes raise."""
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    if arr.ndim == 3:
        return arr
    raise DataError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {arr.shape}")


def _check_fpr_limit(fpr_limit: float) -> float:
    """Return ``fpr_limit`` as a float after checking 0 < fpr_limit <= 1."""
    try:
        limit = float(fpr_limit)
    except (TypeError, ValueError):
        raise ConfigError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}") from None
    if not 0.0 < limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


# --------------------------------------------------------------------------- core


def _region_pixels(is_pos: NDArray[np.bool_], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and PRO weights of all defect pixels.

    Args:
        is_pos: (N, H, W) bool defect masks.
        values: (N, H, W) anomaly maps.

    Returns:
        ``(scores (P,), weights (P,) float64)``, sorted by ascending score; a pixel of
        region r weighs ``1 / (size(r) * number_of_regions)``, so the weights of the pixels
        scoring >= t sum to PRO(t). Both empty when there is no region.
    """
    weight_parts: list[np.ndarray] = []
    n_regions = 0
    for mask in is_pos:
        if not mask.any():
            continue
        # A bool image has the bytes of a 0/1 uint8 image, which is what OpenCV takes.
        n_labels, labels = cv2.connectedComponents(
            np.ascontiguousarray(mask).view(np.uint8), connectivity=8
        )
        region = labels[mask]  # C order, as values[is_pos] visits this image
        sizes = np.bincount(region, minlength=n_labels)
        weight_parts.append(1.0 / sizes[region])
        n_regions += n_labels - 1
    if n_regions == 0:
        return np.empty(0, dtype=values.dtype), np.empty(0)
    weights = np.concatenate(weight_parts)
    weights /= n_regions
    scores = values[is_pos]
    # Sorted search keys make np.searchsorted about 10x faster on millions of pixels.
    order = np.argsort(scores)
    return scores[order], weights[order]


def _aupro_sorted(neg: np.ndarray, pos: np.ndarray, weights: np.ndarray, limit: float) -> float:
    """Exact AUPRO.

    Args:
        neg: (M,) good-pixel scores, sorted ascending.
        pos: (P,) defect-pixel scores, sorted ascending.
        weights: (P,) PRO weights of ``pos`` (see :func:`_region_pixels`).
        limit: FPR limit in (0, 1].
    """
    n_neg = neg.size
    if n_neg == 0 or pos.size == 0:
        return math.nan
    # The good pixel at descending rank k (FPR k/M before it, (k+1)/M after) lies in the tie
    # group whose FPR span [x0, x1] contains the limit; its value is the cut.
    rank = min(int(limit * n_neg), n_neg - 1)
    cut = neg[n_neg - 1 - rank]
    n_le_cut = int(np.searchsorted(neg, cut, side="right"))
    n_lt_cut = int(np.searchsorted(neg, cut, side="left"))
    x0 = (n_neg - n_le_cut) / n_neg
    x1 = (n_neg - n_lt_cut) / n_neg

    start = int(np.searchsorted(pos, cut, side="left"))
    stop = int(np.searchsorted(pos, cut, side="right"))
    pos_above = pos[stop:]
    w_above = weights[stop:]
    lt = np.searchsorted(neg, pos_above, side="left")
    le = np.searchsorted(neg, pos_above, side="right")
    # Area up to x0: each good pixel scoring g > cut adds 1/M times the PRO at the thresholds
    # just above g, i.e. the weight of region pixels scoring > g; tied pairs (g == s) sit on
    # a diagonal segment and count one half. Summed per region pixel instead of per good one.
    area = float(np.dot(w_above, (lt - n_le_cut) + 0.5 * (le - lt))) / n_neg

    # The tie group at the cut: a straight segment from (x0, pro_before) to (x1, pro_after),
    # cut off at the limit.
    pro_before = float(w_above.sum())
    pro_after = pro_before + float(weights[start:stop].sum())
    dx = min(max(limit - x0, 0.0), x1 - x0)
    pro_at_limit = pro_before + (pro_after - pro_before) * dx / (x1 - x0)
    area += dx * (pro_before + pro_at_limit) / 2.0
    return area / limit


def _aupro_binned(
    values: np.ndarray,
    pos: np.ndarray,
    weights: np.ndarray,
    limit: float,
    num_thresholds: int,
) -> float:
    """Approximate AUPRO on ``num_thresholds`` quantile-spaced thresholds.

    Args:
        values: (N, H, W) anomaly maps (all pixels).
        pos, weights: (P,) from :func:`_region_pixels`, sorted by score.
        limit: FPR limit in (0, 1].
        num_thresholds: number of quantiles, >= 2.
    """
    n_neg = values.size - pos.size
    if n_neg == 0 or pos.size == 0:
        return math.nan
    # One sort of all pixels serves both the quantiles and the counts: np.quantile with
    # many quantiles and per-pixel binning were each ~10x slower than np.sort on 26M float32.
    everything = np.sort(values, axis=None)
    # Thresholds are order statistics (map values, compared in the map dtype); quantiles 0
    # and 1 are the min and max, so the curve still ends at (1, 1).
    ranks = np.round(np.linspace(0.0, 1.0, num_thresholds) * (everything.size - 1))
    thresholds = np.unique(everything[ranks.astype(np.int64)])[::-1]  # highest first
    n_ge = everything.size - np.searchsorted(everything, thresholds, side="left")
    del everything
    # weight_below[i] = total weight of the i lowest-scoring region pixels.
    weight_below = np.concatenate(([0.0], np.cumsum(weights)))
    n_pos_lt = np.searchsorted(pos, thresholds, side="left")
    pro = weight_below[-1] - weight_below[n_pos_lt]
    fpr = (n_ge - (pos.size - n_pos_lt)) / n_neg
    x = np.concatenate(([0.0], fpr))
    y = np.concatenate(([0.0], pro))
    return _trapezoid_upto(x, y, limit) / limit


def _trapezoid_upto(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) for x in [x[0], limit], interpolating y at ``limit``.

    Args:
        x: (K,) non-decreasing, ``x[0] <= limit``.
        y: (K,) curve values.
        limit: upper end of the integration.
    """
    end = int(np.searchsorted(x, limit, side="right"))  # x[:end] <= limit < x[end:]
    area = float(np.trapezoid(y[:end], x[:end]))
    if end < x.size and x[end - 1] < limit:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def _pixel_metrics(
    masks: ArrayLike, maps: ArrayLike, *, n_images: int | None, fpr_limit: float
) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_ap`` and exact ``aupro`` sharing one sort of the good pixels.

    Args:
        masks, maps: as :func:`aupro`.
        n_images: expected N (number of image labels), or None to skip the check.
        fpr_limit: as :func:`aupro`.
    """
    limit = _check_fpr_limit(fpr_limit)
    is_pos, values = _check_masks_maps(masks, maps)
    if n_images is not None and is_pos.shape[0] != n_images:
        raise DataError(f"masks and maps hold {is_pos.shape[0]} images but labels hold {n_images}")
    neg = values[~is_pos]
    neg.sort()
    pos, weights = _region_pixels(is_pos, values)
    return {
        "pixel_auroc": _auroc_sorted(pos, neg),
        "pixel_ap": _ap_sorted(pos, neg),
        "aupro": _aupro_sorted(neg, pos, weights, limit),
    }
