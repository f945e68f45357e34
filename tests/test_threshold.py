"""Threshold rules (anomalykit.metrics.threshold) and the calibration record a detector carries."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm
from scipy.stats import t as student_t
from torch import Tensor, nn

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.config import load_config
from anomalykit.errors import ConfigError
from anomalykit.export.onnx import export_onnx
from anomalykit.export.runtime import OnnxDetector
from anomalykit.metrics.threshold import (
    DEFAULT_RULE,
    MIN_GPD_POINTS,
    calibrate_threshold,
    fit_gpd_pwm,
    tail_threshold,
    threshold_from_good,
)
from anomalykit.registry import register_detector
from anomalykit.training.checkpoint import load_model, read_checkpoint, save_checkpoint

NORMAL_TAIL_01 = 2.3263478740408408  # Phi^-1(0.99)


@register_detector("_threshold_test_tiny")
class TinyDetector(Detector):
    """One conv; map = conv output squared (B, 1, S, S), score = map mean (B,)."""

    def __init__(self, image_size: int = 16) -> None:
        super().__init__()
        self.image_size = image_size
        self.set_normalization("none")
        self.conv = nn.Conv2d(3, 1, kernel_size=3, padding=1)

    def forward(self, images: Tensor) -> AnomalyOutput:
        anomaly_map = self.conv(images) ** 2
        return AnomalyOutput(anomaly_map.flatten(1).mean(1), anomaly_map)


def tiny(seed: int = 0) -> TinyDetector:
    torch.manual_seed(seed)
    return TinyDetector().eval()


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- tail fits on scores of a known distribution ----------------------------------------------


@pytest.mark.parametrize("shape", [-0.3, 0.0, 0.3])
def test_gpd_pwm_recovers_known_parameters(shape):
    rng = np.random.default_rng(0)
    uniform = rng.random(20000)
    # Inverse CDF of the GPD(shape, scale=2).
    sample = 2.0 * np.log(1 / (1 - uniform)) if shape == 0 else 2.0 / shape * ((1 - uniform) ** -shape - 1)
    xi, sigma = fit_gpd_pwm(sample)
    assert xi == pytest.approx(shape, abs=0.05)
    assert sigma == pytest.approx(2.0, rel=0.05)


def test_gpd_threshold_on_exponential_scores_hits_the_target_rate():
    # Good scores 1 + Exp(1): P(score > t) = exp(-(t - 1)), the rate the threshold really gives.
    rng = np.random.default_rng(1)
    threshold, record = tail_threshold(1.0 + rng.exponential(size=2000), fpr=0.01, tail="gpd")
    assert math.exp(-(threshold - 1.0)) == pytest.approx(0.01, rel=0.25)
    assert record["tail_used"] == "gpd" and record["fallback"] == ""
    assert record["params"]["xi"] == pytest.approx(0.0, abs=0.15)


def test_gpd_with_forty_good_images_is_right_on_average():
    # What a line has: 40 validation images. Over 200 draws the true rate of the threshold
    # is near the target in the median (a single draw of 40 is noisy by nature).
    rng = np.random.default_rng(2)
    rates = [math.exp(-tail_threshold(rng.exponential(size=40), fpr=0.01, tail="gpd")[0])
             for _ in range(200)]
    assert 0.005 < float(np.median(rates)) < 0.02


@pytest.mark.parametrize("tail", ["gaussian", "gpd"])
def test_threshold_on_gaussian_scores_hits_the_target_rate(tail):
    rng = np.random.default_rng(3)
    threshold, record = tail_threshold(rng.normal(5.0, 2.0, size=4000), fpr=0.01, tail=tail)
    true_rate = 0.5 * math.erfc((threshold - 5.0) / (2.0 * math.sqrt(2.0)))
    assert true_rate == pytest.approx(0.01, rel=0.3)
    if tail == "gaussian":
        assert record["params"]["mean"] == pytest.approx(5.0, abs=0.1)
        assert threshold == pytest.approx(5.0 + 2.0 * NORMAL_TAIL_01, abs=0.15)


def test_gaussian_rule_is_exact_on_average_for_gaussian_scores_from_forty_images():
    # The predictive quantile counts the error of the mean and std from 40 points: averaged
    # over draws of the validation set a new good image exceeds it 1 % of the time (the
    # plug-in normal quantile would give about 1.3 %).
    rng = np.random.default_rng(8)
    rates = [norm.sf(tail_threshold(rng.normal(size=40), fpr=0.01, tail="gaussian")[0])
             for _ in range(2000)]
    assert float(np.mean(rates)) == pytest.approx(0.01, abs=0.001)


def test_lognormal_on_lognormal_scores():
    rng = np.random.default_rng(4)
    threshold, record = tail_threshold(np.exp(rng.normal(0.0, 0.5, 4000)), fpr=0.01,
                                       tail="lognormal")
    assert threshold == pytest.approx(math.exp(0.5 * NORMAL_TAIL_01), rel=0.05)
    assert record["tail_used"] == "lognormal"


def test_a_rate_inside_the_observed_scores_uses_the_empirical_quantile():
    scores = np.arange(100, dtype=float)
    threshold, record = tail_threshold(scores, fpr=0.3, tail="gpd")
    assert threshold == pytest.approx(np.quantile(scores, 0.7))
    assert record["params"]["empirical"] is True


# -- the quantile rule is unchanged -----------------------------------------------------------


@pytest.mark.parametrize(("quantile", "margin"), [(1.0, 0.0), (0.95, 0.0), (0.99, 1.5)])
def test_quantile_rule_gives_the_same_threshold_as_before(quantile, margin):
    scores = np.random.default_rng(5).gamma(2.0, size=37)
    old = float(np.quantile(scores, quantile)) + margin * float(np.std(scores))
    threshold, record = calibrate_threshold(scores, quantile=quantile, margin=margin)
    assert threshold == pytest.approx(old, rel=1e-12)
    assert threshold == threshold_from_good(scores, quantile=quantile, margin=margin)
    assert record["rule"] == "quantile" and record["n_good"] == 37


def test_packaged_profiles_keep_the_max_of_the_validation_scores():
    # Every quick profile says `quantile: 1.0` without a rule: still the maximum.
    cfg = load_config("pca", "quick")
    scores = np.random.default_rng(6).random(40)
    options = {k: v for k, v in cfg["calibrate"].items() if k not in ("pixel_quantile",)}
    threshold, record = calibrate_threshold(scores, **options)
    if "rule" not in cfg["calibrate"] or cfg["calibrate"]["rule"] == "quantile":
        assert threshold == scores.max()
        assert record["predicted_fpr"] == pytest.approx(1 / 41)


def test_default_rule_without_options():
    _, record = calibrate_threshold(np.arange(50.0))
    assert record["rule"] == DEFAULT_RULE


def test_an_explicit_rule_ignores_the_other_rules_options():
    scores = np.arange(50.0)
    threshold, record = calibrate_threshold(scores, rule="quantile", quantile=1.0, fpr=0.05)
    assert threshold == 49.0 and "target_fpr" not in record
    _, record = calibrate_threshold(scores, rule="fpr", quantile=1.0, fpr=0.05)
    assert record["target_fpr"] == 0.05


# -- too few good images ----------------------------------------------------------------------


def test_gpd_falls_back_to_gaussian_with_few_scores():
    scores = np.random.default_rng(7).normal(size=MIN_GPD_POINTS - 1)
    threshold, record = tail_threshold(scores, fpr=0.01, tail="gpd")
    assert record["tail_used"] == "gaussian" and "gpd needs" in record["fallback"]
    n = len(scores)
    z = student_t.ppf(0.99, df=n - 1) * math.sqrt(1 + 1 / n)
    assert threshold == pytest.approx(scores.mean() + scores.std(ddof=1) * z)


@pytest.mark.parametrize("scores", [[0.3, 0.5, 0.4], [0.2] * 30])
def test_no_spread_falls_back_to_the_maximum(scores):
    threshold, record = tail_threshold(scores, fpr=0.01, tail="gaussian")
    assert threshold == max(scores) and record["tail_used"] == "max"
    assert record["fallback"] and record["predicted_fpr"] == pytest.approx(1 / (len(scores) + 1))


def test_lognormal_falls_back_on_non_positive_scores():
    _, record = tail_threshold(np.linspace(-1.0, 1.0, 30), fpr=0.01, tail="lognormal")
    assert record["tail_used"] == "gaussian" and "positive" in record["fallback"]


def test_detector_warns_when_it_falls_back():
    detector = tiny()
    with pytest.warns(UserWarning, match="gpd needs"):
        detector.calibrate(images(6), rule="fpr", fpr=0.01, tail="gpd")
    assert detector.calibration_record["tail_used"] == "gaussian"


# -- bad options ------------------------------------------------------------------------------


@pytest.mark.parametrize("fpr", [0, 1, -0.1, 1.5, "often", float("nan")])
def test_fpr_outside_zero_one_is_a_config_error_naming_it(fpr):
    with pytest.raises(ConfigError, match="fpr") as info:
        calibrate_threshold([1.0, 2.0], rule="fpr", fpr=fpr)
    assert repr(fpr) in str(info.value)


def test_unknown_tail_and_rule_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match="weibull"):
        calibrate_threshold([1.0, 2.0], rule="fpr", tail="weibull")
    with pytest.raises(ConfigError, match="median"):
        calibrate_threshold([1.0, 2.0], rule="median")
    with pytest.raises(ConfigError, match="both threshold rules"):
        calibrate_threshold([1.0, 2.0], quantile=1.0, fpr=0.01)


def test_bad_calibrate_options_fail_when_the_config_loads():
    with pytest.raises(ConfigError, match="2"):
        load_config("pca", "quick", {"calibrate.rule": "fpr", "calibrate.fpr": 2})
    with pytest.raises(ConfigError, match="pareto"):
        load_config("pca", "quick", {"calibrate.rule": "fpr", "calibrate.tail": "pareto"})
    cfg = load_config("pca", "quick", {"calibrate.rule": "fpr", "calibrate.fpr": 0.05})
    assert cfg["calibrate"]["fpr"] == 0.05


def test_detector_checks_options_before_scoring():
    with pytest.raises(ConfigError, match="fpr"):
        tiny().calibrate(images(4), rule="fpr", fpr=1.0)


# -- the record travels with the model --------------------------------------------------------


def test_record_survives_save_load_and_appears_in_the_onnx_metadata(tmp_path):
    detector = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 40 images: no fallback, no warning
        threshold = detector.calibrate(images(40, seed=1), rule="fpr", fpr=0.01, tail="gpd")
    record = detector.calibration_record
    assert record["rule"] == "fpr" and record["target_fpr"] == 0.01 and record["n_good"] == 40
    assert record["tail_used"] == "gpd" and set(record["params"]) >= {"u", "xi", "sigma", "k"}

    save_checkpoint(tmp_path / "tiny.ckpt", detector)
    loaded = load_model(tmp_path / "tiny.ckpt")
    assert loaded.calibration_record == record
    assert float(loaded.threshold_) == pytest.approx(threshold)

    export_onnx(loaded, tmp_path / "tiny.onnx")
    meta = OnnxDetector(tmp_path / "tiny.onnx").metadata
    assert meta["threshold_rule"] == "fpr"
    assert meta["target_fpr"] == 0.01 and meta["expected_fpr"] == 0.01
    assert meta["calibration"] == record  # decoded from JSON by the runtime


def test_quantile_record_in_the_onnx_metadata(tmp_path):
    detector = tiny()
    detector.calibrate(images(10, seed=2))
    export_onnx(detector, tmp_path / "tiny.onnx")
    meta = OnnxDetector(tmp_path / "tiny.onnx").metadata
    assert meta["threshold_rule"] == DEFAULT_RULE
    if DEFAULT_RULE == "quantile":
        assert meta["target_fpr"] is None and meta["expected_fpr"] == pytest.approx(1 / 11)


def test_checkpoint_from_before_the_record_still_loads(tmp_path):
    detector = tiny()
    detector.calibrate(images(10, seed=3))
    save_checkpoint(tmp_path / "new.ckpt", detector)
    payload = read_checkpoint(tmp_path / "new.ckpt")
    del payload["state_dict"]["calibration_record_"]
    torch.save(payload, tmp_path / "old.ckpt")
    loaded = load_model(tmp_path / "old.ckpt")
    assert loaded.calibration_record == {}
    assert float(loaded.threshold_) == float(detector.threshold_)
    export_onnx(loaded, tmp_path / "old.onnx")
    assert OnnxDetector(tmp_path / "old.onnx").metadata["threshold_rule"] == ""
