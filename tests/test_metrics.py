"""Tests of anomalykit.metrics against scikit-learn, brute force and hand-computed cases."""

from __future__ import annotations

import bisect
import math
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from anomalykit.errors import ConfigError, DataError
from anomalykit.metrics import (
    aupro,
    compute_metrics,
    f1_at_threshold,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    threshold_from_good,
)

SEEDS = [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- helpers


def random_image_case(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and scores (n,) with ties (scores rounded to one decimal)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    scores = np.round(rng.random(n) + 0.4 * labels, 1)
    return labels, scores


def random_pixel_case(
    seed: int, n: int = 4, size: int = 16, decimals: int | None = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Masks (n, size, size) with several blobs and float32 maps; ties when rounded."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.2, 1.2))
    masks = (field > np.quantile(field, 0.85)).astype(np.uint8)
    masks[0] = 0  # one good image
    # Pixels touching only diagonally, so 8- and 4-connectivity give different regions.
    masks[1, 0, 0] = masks[1, 1, 1] = 1
    masks[1, 0, 1] = masks[1, 1, 0] = 0
    maps = rng.random((n, size, size)) + 0.35 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps.astype(np.float32)


def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Threshold-by-threshold AUPRO, written independently of the library.

    One curve point per distinct map value, regions from scipy.ndimage.label with the 3x3
    (8-connectivity) structure, and the trapezoid of the MVTec AD evaluation code.
    """
    masks = masks.astype(bool)
    regions = []
    for i, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(i, labeled == r) for r in range(1, count + 1)]
    good = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(np.count_nonzero(pred & good) / np.count_nonzero(good))
        pros.append(np.mean([pred[i][region].mean() for i, region in regions]))
    x, y = np.array(fprs), np.array(pros)
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect.bisect(x, fpr_limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (
            x[ins] - x[ins - 1]
        )
        correction = 0.5 * (y_interp + y[ins - 1]) * (fpr_limit - x[ins - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction) / fpr_limit


# --------------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", SEEDS)
def test_image_auroc_ap_match_sklearn(seed: int) -> None:
    labels, scores = random_image_case(seed)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_image_metrics_accept_bool_float_labels_and_int_scores() -> None:
    labels, scores = random_image_case(7)
    expected = roc_auc_score(labels, scores)
    assert image_auroc(labels.astype(bool), scores) == pytest.approx(expected, abs=1e-12)
    assert image_auroc(labels.astype(float), scores) == pytest.approx(expected, abs=1e-12)
    int_scores = (scores * 10).astype(int)
    assert image_auroc(labels.tolist(), int_scores) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_more_positives_than_negatives() -> None:
    # The other branch of the pair counting (negatives searched among positives).
    rng = np.random.default_rng(5)
    labels = (rng.random(80) < 0.8).astype(int)
    labels[0] = 0
    scores = np.round(rng.random(80) + 0.3 * labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_single_class_gives_nan() -> None:
    scores = [0.1, 0.5, 0.3]
    assert math.isnan(image_auroc([0, 0, 0], scores))
    assert math.isnan(image_auroc([1, 1, 1], scores))
    assert math.isnan(image_ap([0, 0, 0], scores))
    assert image_ap([1, 1, 1], scores) == 1.0
    f1, thr = f1_max([0, 0, 0], scores)
    assert math.isnan(f1) and math.isnan(thr)
    assert math.isnan(f1_at_threshold([0, 0, 0], scores, 0.2))


def test_perfect_and_inverted_image_scores() -> None:
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert f1_max(labels, [0.1, 0.2, 0.8, 0.9]) == (1.0, 0.8)


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_matches_brute_force(seed: int) -> None:
    labels, scores = random_image_case(seed)
    candidates = np.append(np.unique(scores), np.inf)
    brute = max(f1_score(labels, scores >= t, zero_division=0.0) for t in candidates)
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(brute, abs=1e-12)
    assert threshold in scores
    assert f1_at_threshold(labels, scores, threshold) == pytest.approx(f1, abs=1e-15)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)


def test_f1_max_prefers_highest_threshold_among_ties() -> None:
    # F1 = 2 tp / (predicted + positives), 2 positives.
    # t = 0.9: tp 1, 1 predicted -> 2/3; t = 0.5: tp 2, 4 predicted -> 4/6 = 2/3; t = 0.1: 4/7.
    labels = [1, 0, 1, 0, 0]
    scores = [0.9, 0.5, 0.5, 0.5, 0.1]
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(2 / 3)
    assert threshold == 0.9


def test_f1_max_threshold_reproduces_f1_in_float32() -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 200)
    scores = (rng.random(200) + 0.5 * labels).astype(np.float32)
    f1, threshold = f1_max(labels, scores)
    assert f1_at_threshold(labels, scores, threshold) == f1


def test_f1_at_threshold_by_hand() -> None:
    # Predictions [0, 1, 0, 1, 0]: tp 1, fp 1, fn 1 -> F1 = 2 / (2 + 1 + 1).
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.5, 0.2, 0.6, 0.4]
    assert f1_at_threshold(labels, scores, 0.45) == 0.5
    assert f1_at_threshold(labels, scores, 0.5) == 0.5  # score == threshold is defective
    assert f1_at_threshold(labels, scores, 10.0) == 0.0


# --------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_auroc_ap_match_sklearn(seed: int) -> None:
    masks, maps = random_pixel_case(seed)
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(
        roc_auc_score(flat_masks, flat_maps), abs=1e-12
    )
    assert pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(flat_masks, flat_maps), abs=1e-12
    )


def test_pixel_metrics_accept_channel_axis_and_float_masks() -> None:
    masks, maps = random_pixel_case(3)
    expected = pixel_auroc(masks, maps)
    # The dataset yields float32 masks (N, 1, S, S); detectors may return (N, S, S) maps.
    masks4 = masks[:, None].astype(np.float32)
    assert pixel_auroc(masks4, maps) == expected
    assert pixel_auroc(masks4, maps[:, None]) == expected
    assert pixel_auroc(masks.astype(bool), maps.astype(np.float64)) == expected
    assert aupro(masks4, maps[:, None]) == aupro(masks, maps)


def test_pixel_metrics_without_defect_pixels_are_nan() -> None:
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(pixel_auroc(masks, maps))
    assert math.isnan(pixel_ap(masks, maps))
    assert math.isnan(aupro(masks, maps))
    assert math.isnan(aupro(np.ones_like(masks), maps))  # no good pixel: FPR undefined


# --------------------------------------------------------------------------- AUPRO


def one_region_4x4() -> np.ndarray:
    """One 4x4 image with a 2x2 defect region (4 defect, 12 good pixels)."""
    mask = np.zeros((1, 4, 4), dtype=np.uint8)
    mask[0, 1:3, 1:3] = 1
    return mask


def test_aupro_perfect_separation_is_one() -> None:
    mask = one_region_4x4()
    maps = mask * 0.9 + 0.05
    for limit in (0.01, 0.3, 1.0):
        assert aupro(mask, maps, fpr_limit=limit) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_map_is_zero() -> None:
    # Curve (0, 0) -> (1, 0) at t = 1 (all good pixels, no region pixel) -> (1, 1) at t = 0.
    mask = one_region_4x4()
    maps = 1.0 - mask
    assert aupro(mask, maps) == 0.0
    assert aupro(mask, maps, fpr_limit=1.0) == 0.0


def test_aupro_averages_regions_not_pixels() -> None:
    # One 6x6 image, a 3x3 region A (9 px) and a 1-px region B far apart; 26 good pixels.
    # Scores: B = 1.0 (found first), good pixels = 0.5, A = 0.0 (found last).
    # Curve: t=1.0 -> (FPR 0, PRO 1/2: B fully, A not); t=0.5 -> (1, 1/2); t=0 -> (1, 1).
    # For any limit L < 1 the area is L * 1/2, normalized: 0.5. Pixel-wise the overlap
    # would be 1/10: each region counts equally whatever its size.
    mask = np.zeros((1, 6, 6), dtype=np.uint8)
    mask[0, 3:6, 3:6] = 1
    mask[0, 0, 0] = 1
    maps = np.full((1, 6, 6), 0.5)
    maps[0, 3:6, 3:6] = 0.0
    maps[0, 0, 0] = 1.0
    for limit in (0.05, 0.3, 0.9):
        assert aupro(mask, maps, fpr_limit=limit) == pytest.approx(0.5, abs=1e-12)
    # L = 1 adds the vertical jump at FPR 1, which has no area: still 0.5.
    assert aupro(mask, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # A 2x2 block and one pixel touching it only at a corner: one 5-px region with
    # 8-connectivity (two regions, 4 px + 1 px, with 4-connectivity).
    # Block = 1.0, corner pixel = 0.0, good = 0.5: PRO at FPR 0 is 4/5 (it would be 1/2).
    mask = np.zeros((1, 5, 5), dtype=np.uint8)
    mask[0, 0:2, 0:2] = 1
    mask[0, 2, 2] = 1
    maps = np.full((1, 5, 5), 0.5)
    maps[0, 0:2, 0:2] = 1.0
    maps[0, 2, 2] = 0.0
    assert aupro(mask, maps) == pytest.approx(0.8, abs=1e-12)


def test_aupro_fpr_limit_hand_computed() -> None:
    # 4x4 image, 2x2 region (PRO weights 1/4), 12 good pixels. 3 good pixels score 0.9,
    # the region 0.5, the other 9 good pixels 0.1.
    # Curve: (0, 0) -> t=0.9 (3/12 = 0.25, 0) -> t=0.5 (0.25, 1) -> t=0.1 (1, 1).
    #   L = 0.2 : area 0                      -> 0
    #   L = 0.25: area 0                      -> 0
    #   L = 0.3 : area (0.3 - 0.25) * 1 = .05 -> 0.05 / 0.3 = 1/6
    #   L = 0.5 : area 0.25                   -> 0.5
    #   L = 1.0 : area 0.75                   -> 0.75
    mask = one_region_4x4()
    maps = np.where(mask == 1, 0.5, 0.1)
    maps[0, 0, 0:3] = 0.9
    expected = {0.2: 0.0, 0.25: 0.0, 0.3: 1 / 6, 0.5: 0.5, 1.0: 0.75}
    for limit, value in expected.items():
        assert aupro(mask, maps, fpr_limit=limit) == pytest.approx(value, abs=1e-12), limit


def test_aupro_interpolates_inside_a_tie() -> None:
    # The region (0.5) ties with 4 of the 12 good pixels; the other 8 score 0.1.
    # Curve: (0, 0) -> t=0.5 (4/12, 1) -> t=0.1 (1, 1). The first segment is the straight
    # line PRO = 3 * FPR, so the area up to L = 0.3 is 1.5 * 0.3^2 = 0.135 -> 0.45;
    # up to L = 0.5: 1/6 + (0.5 - 1/3) * 1 = 1/3 -> 2/3.
    mask = one_region_4x4()
    maps = np.where(mask == 1, 0.5, 0.1)
    maps[0, 0, :] = 0.5
    assert aupro(mask, maps, fpr_limit=0.3) == pytest.approx(0.45, abs=1e-12)
    assert aupro(mask, maps, fpr_limit=0.5) == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [0.05, 0.3, 0.5, 1.0])
def test_aupro_matches_slow_reference(seed: int, limit: float) -> None:
    masks, maps = random_pixel_case(seed)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
        slow_aupro(masks, maps, limit), abs=1e-6
    )


def test_aupro_matches_slow_reference_without_ties() -> None:
    masks, maps = random_pixel_case(9, n=3, size=12, decimals=None)
    for limit in (0.1, 0.3):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            slow_aupro(masks, maps, limit), abs=1e-6
        )


def test_aupro_grows_with_limit_on_good_detector() -> None:
    # A detector good at high thresholds: the normalized area differs with the limit.
    masks, maps = random_pixel_case(4)
    values = [aupro(masks, maps, fpr_limit=limit) for limit in (0.01, 0.1, 0.3, 1.0)]
    assert len(set(values)) == 4
    assert values[-1] > values[0]


def test_aupro_full_range_single_region_equals_pixel_auroc() -> None:
    # With one region every defect pixel weighs the same, so the area under the whole PRO
    # curve is the pixel AUROC.
    rng = np.random.default_rng(8)
    masks = np.zeros((3, 10, 10), dtype=np.uint8)
    masks[2, 3:7, 2:6] = 1
    maps = np.round(rng.random((3, 10, 10)) + 0.3 * masks, 1)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)


def test_aupro_binned_approximates_exact() -> None:
    masks, maps = random_pixel_case(6, n=4, size=48, decimals=None)
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(exact, abs=2e-3)
    assert aupro(masks, maps, num_thresholds=50) == pytest.approx(exact, abs=3e-2)
    # Perfect separation stays perfect with only a few thresholds.
    mask = one_region_4x4()
    assert aupro(mask, mask * 0.9 + 0.05, num_thresholds=2) == pytest.approx(1.0)


# --------------------------------------------------------------------------- threshold


def test_threshold_from_good_quantile_and_margin() -> None:
    good = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert threshold_from_good(good) == 5.0
    assert threshold_from_good(good, quantile=0.5) == 3.0
    assert threshold_from_good(good, quantile=0.9) == pytest.approx(4.6)  # linear interpolation
    assert threshold_from_good(good, quantile=0.0) == 1.0
    # Population std of 1..5 is sqrt(2).
    assert threshold_from_good(good, margin=1.0) == pytest.approx(5.0 + math.sqrt(2.0))
    assert threshold_from_good(good, quantile=0.5, margin=-0.5) == pytest.approx(
        3.0 - 0.5 * math.sqrt(2.0)
    )
    assert threshold_from_good([7.0]) == 7.0
    assert threshold_from_good([7.0], margin=3.0) == 7.0  # std of one value is 0


def test_threshold_from_good_flags_no_good_image() -> None:
    rng = np.random.default_rng(0)
    good = rng.normal(size=100).astype(np.float32)
    threshold = threshold_from_good(good)
    labels = np.zeros(100, dtype=int)
    metrics = compute_metrics(labels, good, threshold=threshold + 1e-6)
    assert metrics["fpr_good"] == 0.0


# --------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_keys_and_values() -> None:
    labels, scores = random_image_case(2, n=4)
    masks, maps = random_pixel_case(2, n=4)
    image_keys = ["image_auroc", "image_ap", "f1_max", "f1_max_threshold"]
    pixel_keys = ["pixel_auroc", "pixel_ap", "aupro"]
    threshold_keys = ["f1_at_threshold", "accuracy_at_threshold", "fpr_good", "tpr_defect"]

    assert list(compute_metrics(labels, scores)) == image_keys
    full = compute_metrics(labels, scores, masks, maps, threshold=0.5, fpr_limit=0.2)
    assert list(full) == image_keys + pixel_keys + threshold_keys
    assert all(isinstance(value, float) for value in full.values())
    assert full["image_auroc"] == image_auroc(labels, scores)
    assert full["image_ap"] == image_ap(labels, scores)
    assert (full["f1_max"], full["f1_max_threshold"]) == f1_max(labels, scores)
    assert full["pixel_auroc"] == pixel_auroc(masks, maps)
    assert full["pixel_ap"] == pixel_ap(masks, maps)
    assert full["aupro"] == pytest.approx(aupro(masks, maps, fpr_limit=0.2), abs=1e-15)
    assert full["f1_at_threshold"] == f1_at_threshold(labels, scores, 0.5)


def test_compute_metrics_threshold_metrics_by_hand() -> None:
    # Predictions [0, 1, 0, 1, 0] vs labels [0, 0, 0, 1, 1]: tp 1, fp 1, fn 1, tn 2.
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.5, 0.2, 0.6, 0.4]
    metrics = compute_metrics(labels, scores, threshold=0.45)
    assert metrics["f1_at_threshold"] == 0.5
    assert metrics["accuracy_at_threshold"] == 3 / 5
    assert metrics["fpr_good"] == 1 / 3
    assert metrics["tpr_defect"] == 1 / 2


def test_compute_metrics_only_good_images() -> None:
    metrics = compute_metrics([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.25)
    assert math.isnan(metrics["image_auroc"]) and math.isnan(metrics["tpr_defect"])
    assert metrics["fpr_good"] == 1 / 3
    assert metrics["accuracy_at_threshold"] == 2 / 3


# --------------------------------------------------------------------------- bad input


GOOD_MASKS = np.zeros((2, 4, 4), dtype=np.uint8)
GOOD_MAPS = np.zeros((2, 4, 4), dtype=np.float32)
MASKS_255 = GOOD_MASKS.copy()
MASKS_255[1, 2, 3] = 255


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: image_auroc([0, 1, 1], [0.1, 0.2]), DataError, "3 labels, 2 scores"),
        (lambda: image_ap([0, 1], [0.1, float("nan")]), DataError, "non-finite.*nan.*index 1"),
        (lambda: f1_max([0, 1], [np.inf, 0.2]), DataError, "non-finite.*inf.*index 0"),
        (lambda: image_auroc([0, 2], [0.1, 0.2]), DataError, "0 and 1, found 2 at index 1"),
        (lambda: image_auroc([[0, 1]], [[0.1, 0.2]]), DataError, r"labels must be 1-D.*\(1, 2\)"),
        (lambda: image_auroc([], []), DataError, "empty"),
        (lambda: image_auroc([0, 1], ["a", "b"]), DataError, "dtype <U1"),
        (lambda: f1_at_threshold([0, 1], [0.1, 0.2], float("nan")), DataError, "nan"),
        (
            lambda: pixel_auroc(GOOD_MASKS, GOOD_MAPS[:, :3]),
            DataError,
            r"masks shape \(2, 4, 4\) does not match maps shape \(2, 3, 4\)",
        ),
        (
            lambda: pixel_ap(GOOD_MASKS[0], GOOD_MAPS[0]),
            DataError,
            r"masks must have shape .*got \(4, 4\)",
        ),
        (
            lambda: aupro(MASKS_255, GOOD_MAPS),
            DataError,
            r"masks must contain only 0 and 1, found 255 at index \(1, 2, 3\)",
        ),
        (
            lambda: aupro(GOOD_MASKS, np.where(GOOD_MASKS == 0, np.nan, 0.0)),
            DataError,
            r"maps contain 32 non-finite.*nan at index \(0, 0, 0\)",
        ),
        (lambda: aupro(GOOD_MASKS, GOOD_MAPS, fpr_limit=0), ConfigError, "fpr_limit.*got 0"),
        (lambda: aupro(GOOD_MASKS, GOOD_MAPS, fpr_limit=1.5), ConfigError, "got 1.5"),
        (lambda: aupro(GOOD_MASKS, GOOD_MAPS, num_thresholds=1), ConfigError, "at least 2, got 1"),
        (lambda: aupro(GOOD_MASKS, GOOD_MAPS, num_thresholds=2.5), ConfigError, "got 2.5"),
        (lambda: threshold_from_good([]), DataError, "empty"),
        (lambda: threshold_from_good([1.0], quantile=1.5), ConfigError, "quantile.*got 1.5"),
        (lambda: threshold_from_good([1.0], margin=math.inf), ConfigError, "margin.*inf"),
        (lambda: threshold_from_good([1.0, math.nan]), DataError, "nan at index 1"),
        (lambda: compute_metrics([0, 1], [0.1, 0.2], GOOD_MASKS), DataError, "got only masks"),
        (
            lambda: compute_metrics([0, 1, 1], [0.1, 0.2, 0.3], GOOD_MASKS, GOOD_MAPS),
            DataError,
            "hold 2 images but labels hold 3",
        ),
        (lambda: compute_metrics([0, 1], [0.1, 0.2], threshold="x"), DataError, "'x'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(
    call: Callable[[], object], error: type[ValueError], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_metrics_do_not_import_torch() -> None:
    code = "import sys, anomalykit.metrics; assert 'torch' not in sys.modules"
    # Hand the child this process's import path, however pytest found the package.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
