"""Decision threshold calibrated on held-out GOOD images only.

The test set must never choose the threshold that is then scored on it, and defective
images are often unavailable at training time; so the threshold comes from the score
distribution of good images alone. Two rules (:func:`calibrate_threshold`):

- ``quantile`` (the original rule): a quantile of the good scores plus a margin; the default
  ``quantile=1.0`` is the highest good validation score. With n validation images a new good
  image beats all n with probability 1/(n+1) (2.4 % for 40), but the maximum of a small
  sample is a noisy estimate far into the tail, and often far above the defects' scores.
- ``fpr``: a target false-alarm rate on good images (e.g. 0.01). A tail model is fitted to the
  good scores and the threshold placed where its exceedance probability equals the target:

  * ``gpd``: peaks over threshold. The ``k`` highest scores (``k = max(10, 25 %)``) minus the
    next one, ``u``, are fitted with a generalised Pareto distribution by probability-weighted
    moments (closed form, always defined; Hosking & Wallis 1987 found it more reliable than
    maximum likelihood for small samples such as the 10-30 exceedances that 40-120 validation
    images give); P(score > t) = (k/n) (1 + xi (t-u)/sigma)^(-1/xi). The shape xi is bounded
    to [-0.5, 0.5]: with so few points a larger |xi| is noise, and it would throw the
    threshold far out. With 40 images it flags 1.7 % of held-out good images at a 1 % target
    (benchmarks/results/threshold_magnetic_tile/: a threshold estimated from 10 points
    scatters, and a scattered threshold flags more on average).
  * ``gaussian``: mean and standard deviation (ddof=1) of all n good scores; the threshold is
    the predictive quantile mean + std * sqrt(1 + 1/n) * T_{n-1}^-1(1 - fpr) (Student t), which
    a new good score exceeds with probability fpr when the scores are Gaussian.
  * ``lognormal``: the same on log(score) (positive scores only).

  Too few scores for a tail model falls back (and says so in the record's ``fallback``): gpd
  -> gaussian below :data:`MIN_GPD_POINTS` scores, gaussian/lognormal -> the maximum below
  :data:`MIN_GAUSSIAN_POINTS` or when the scores are all equal, lognormal -> gaussian when a
  score is <= 0.

Every rule returns a *record* (plain JSON-able dict: the rule, the rate, the tail model and
its fitted parameters, the number of good scores, any fallback, and ``predicted_fpr``: the
false-alarm rate the rule expects on new good images), which the detector keeps and the ONNX
export writes into the model's metadata.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from anomalykit.errors import ConfigError, DataError, check_choice
from anomalykit.metrics.classification import _as_scores

__all__ = ["DEFAULT_FPR", "DEFAULT_RULE", "DEFAULT_TAIL", "RULES", "TAILS", "calibrate_threshold",
           "fit_gpd_pwm", "tail_threshold", "threshold_from_good"]

RULES = ("quantile", "fpr")
TAILS = ("gpd", "gaussian", "lognormal")
# Defaults, from benchmarks/results/threshold_magnetic_tile/ (9 detectors, 40 validation images,
# 500 random calibration / held-out splits of the good scores). Tail: gpd held its target best:
# mean |held-out rate - target| 0.007 at 1 % and 0.008 at 5 % (lognormal 0.009 / 0.010 but
# 0.3-3.0 % across detectors at a 1 % target; gaussian 0.021 / 0.021, too many alarms on every
# detector: the scores are right-skewed). Rule: still the quantile rule (the maximum), so
# existing configs keep their thresholds; at 40 images it flags 2.4 % of good images (exactly
# 1/(n+1)) against 1.7 % for gpd at 1 %, with about the same F1 (0.34 against 0.32).
DEFAULT_RULE = "quantile"
DEFAULT_FPR = 0.01
DEFAULT_TAIL = "gpd"
# Fewest exceedances a GPD is fitted to, and the share of the scores used as the tail.
MIN_EXCEEDANCES = 10
TAIL_FRACTION = 0.25
# Below this many scores the GPD has fewer than MIN_EXCEEDANCES points above a median-or-higher
# u: fall back to the Gaussian.
MIN_GPD_POINTS = 2 * MIN_EXCEEDANCES
# A standard deviation from fewer points is meaningless: fall back to the maximum.
MIN_GAUSSIAN_POINTS = 5
# |xi| above this from 10-30 points is noise (see the module docstring).
MAX_ABS_SHAPE = 0.5


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
    values = _good_scores(scores)
    threshold = float(np.quantile(values, q))
    if m != 0.0:
        # float64 accumulation: float32 sums over millions of pixels drift.
        threshold += m * float(np.std(values, dtype=np.float64))
    return threshold


def calibrate_threshold(scores: ArrayLike, *, rule: str | None = None,
                        quantile: float | None = None, margin: float | None = None,
                        fpr: float | None = None,
                        tail: str | None = None) -> tuple[float, dict[str, Any]]:
    """The image threshold from good scores by ``rule``, and the record of how it was set.

    Args:
        scores: (N,) scores of held-out good images.
        rule: ``"quantile"`` (uses ``quantile``, default 1.0, and ``margin``, default 0:
            :func:`threshold_from_good`) or ``"fpr"`` (uses ``fpr``, default
            :data:`DEFAULT_FPR`, and ``tail``, default :data:`DEFAULT_TAIL`:
            :func:`tail_threshold`); the other rule's options are ignored. ``None``:
            ``"quantile"`` when ``quantile`` or ``margin`` is given (a config written before
            the fpr rule keeps its thresholds), ``"fpr"`` when ``fpr`` or ``tail`` is, else
            :data:`DEFAULT_RULE`; options of both rules without a rule are an error.
        quantile, margin: the quantile rule's options.
        fpr: target false-alarm rate on good images, in (0, 1).
        tail: tail model of the fpr rule, one of :data:`TAILS`.

    Returns:
        ``(threshold, record)``; predict defective when ``score >= threshold``. The record is
        a JSON-able dict (see the module docstring).

    Raises:
        ConfigError: unknown rule or tail, quantile outside [0, 1], fpr outside (0, 1), or
            options of both rules without a rule.
        DataError: no scores, or non-finite ones.
    """
    quantile_options = {k: v for k, v in (("quantile", quantile), ("margin", margin)) if v is not None}
    fpr_options = {k: v for k, v in (("fpr", fpr), ("tail", tail)) if v is not None}
    if rule is None:
        if quantile_options and fpr_options:
            given = ", ".join(f"calibrate.{k}={v!r}" for k, v in {**quantile_options,
                                                                   **fpr_options}.items())
            raise ConfigError(f"{given}: options of both threshold rules; set calibrate.rule "
                              "to quantile or fpr")
        rule = "quantile" if quantile_options else "fpr" if fpr_options else DEFAULT_RULE
    check_choice("calibrate.rule", rule, RULES)
    if rule == "fpr":
        return tail_threshold(scores, fpr=DEFAULT_FPR if fpr is None else fpr,
                              tail=DEFAULT_TAIL if tail is None else tail)
    quantile = 1.0 if quantile is None else quantile
    margin = 0.0 if margin is None else margin
    threshold = threshold_from_good(scores, quantile=quantile, margin=margin)
    n = _good_scores(scores).size
    record: dict[str, Any] = {"rule": "quantile", "quantile": float(quantile),
                              "margin": float(margin), "n_good": int(n)}
    if float(margin) == 0.0:
        # Exchangeable scores: a new good one lands in each of the n+1 gaps equally likely;
        # the quantile q lies above about q*(n-1)+1 of the n (numpy's linear interpolation).
        record["predicted_fpr"] = (n - float(quantile) * (n - 1)) / (n + 1)
    return threshold, record


def tail_threshold(scores: ArrayLike, *, fpr: float = 0.01,
                   tail: str = "gpd") -> tuple[float, dict[str, Any]]:
    """Threshold whose exceedance probability under a tail model of the good scores is ``fpr``.

    Args:
        scores: (N,) scores of held-out good images.
        fpr: target false-alarm rate, in (0, 1).
        tail: ``gpd``, ``gaussian`` or ``lognormal`` (see the module docstring).

    Returns:
        ``(threshold, record)``: record keys ``rule`` ("fpr"), ``target_fpr``, ``tail`` (asked),
        ``tail_used`` (after any fallback), ``params`` (the fitted parameters), ``n_good``,
        ``fallback`` (why a simpler model was used, or ""), ``predicted_fpr``.

    Raises:
        ConfigError: ``fpr`` not in (0, 1) or unknown ``tail``.
        DataError: no scores, or non-finite ones.
    """
    rate = _check_real(fpr, "fpr")
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"fpr must be in (0, 1) (a false-alarm rate such as 0.01), got {fpr!r}")
    check_choice("calibrate.tail", tail, TAILS)
    values = np.sort(_good_scores(scores).astype(np.float64))
    n = values.size
    reasons: list[str] = []
    used = tail
    if used == "gpd" and n < MIN_GPD_POINTS:
        reasons.append(f"gpd needs >= {MIN_GPD_POINTS} good scores, got {n}: used gaussian")
        used = "gaussian"
    if used == "lognormal" and values[0] <= 0.0:
        reasons.append(f"lognormal needs positive scores, the lowest is {values[0]:.6g}: "
                       "used gaussian")
        used = "gaussian"
    if used in ("gaussian", "lognormal") and (n < MIN_GAUSSIAN_POINTS or values[0] == values[-1]):
        why = (f"{n} good score(s), fewer than {MIN_GAUSSIAN_POINTS}" if n < MIN_GAUSSIAN_POINTS
               else "all good scores are equal")
        reasons.append(f"{used} needs a spread of scores ({why}): used the maximum")
        used = "max"

    if used == "gpd":
        threshold, params = _gpd_threshold(values, rate)
    elif used in ("gaussian", "lognormal"):
        sample = np.log(values) if used == "lognormal" else values
        mean, std = float(sample.mean()), float(sample.std(ddof=1))
        # The predictive quantile (Student t, n-1 degrees of freedom, times sqrt(1 + 1/n)):
        # a new good score exceeds it with probability exactly ``rate`` for Gaussian scores,
        # counting the error of the mean and std estimated from n points (the plug-in normal
        # quantile would flag more: 1.3 % instead of 1 % for n = 40).
        from scipy.stats import t as student_t  # here: importing the metrics stays light

        z = float(student_t.ppf(1.0 - rate, df=n - 1)) * math.sqrt(1.0 + 1.0 / n)
        threshold = mean + std * z
        if used == "lognormal":
            threshold = math.exp(threshold)
        params = {"mean": mean, "std": std, "z": z}
    else:
        threshold, params = float(values[-1]), {}
    predicted = 1.0 / (n + 1) if used == "max" else rate
    record = {"rule": "fpr", "target_fpr": rate, "tail": tail, "tail_used": used,
              "params": params, "n_good": int(n), "fallback": "; ".join(reasons),
              "predicted_fpr": predicted}
    return float(threshold), record


def fit_gpd_pwm(excesses: ArrayLike) -> tuple[float, float]:
    """Generalised Pareto (location 0) fitted by probability-weighted moments.

    Args:
        excesses: (k,) non-negative exceedances over a threshold u, k >= 2, not all equal.

    Returns:
        ``(xi, sigma)``: shape (xi > 0 heavy tail, 0 exponential, < 0 bounded) and scale, in
        the convention of ``scipy.stats.genpareto(c=xi, scale=sigma)``. Unbiased for xi < 0.5
        (Hosking & Wallis 1987, with plotting positions (i - 0.35) / k).
    """
    y = np.sort(np.asarray(excesses, dtype=np.float64))
    k = y.size
    a0 = float(y.mean())
    # a1 = E[Y (1 - F(Y))], estimated with plotting positions.
    a1 = float(np.mean(y * (1.0 - (np.arange(1, k + 1) - 0.35) / k)))
    denominator = a0 - 2.0 * a1
    if k < 2 or denominator <= 0.0:
        # a1 >= a0/2 only when the tail is extremely heavy (xi >= 1): cap it.
        return 1.0, max(a0, 1e-12)
    hosking_k = a0 / denominator - 2.0
    return -hosking_k, max(2.0 * a0 * a1 / denominator, 1e-12)


def _gpd_threshold(values: np.ndarray, rate: float) -> tuple[float, dict[str, Any]]:
    """Peaks over threshold on ascending ``values``: the GPD quantile at exceedance ``rate``."""
    n = values.size
    k = min(n - 1, max(MIN_EXCEEDANCES, math.ceil(TAIL_FRACTION * n)))
    u = float(values[n - k - 1])
    zeta = k / n  # share of the good scores above u
    xi, sigma = fit_gpd_pwm(values[n - k:] - u)
    clipped = abs(xi) > MAX_ABS_SHAPE
    xi_used = float(np.clip(xi, -MAX_ABS_SHAPE, MAX_ABS_SHAPE))
    params: dict[str, Any] = {"u": u, "k": int(k), "zeta": zeta, "xi": xi_used, "sigma": sigma}
    if clipped:
        params["xi_fitted"] = xi
    if rate >= zeta:
        # The target lies inside the observed scores: the empirical quantile, no extrapolation.
        params["empirical"] = True
        return float(np.quantile(values, 1.0 - rate)), params
    ratio = zeta / rate
    if abs(xi_used) < 1e-9:  # the xi -> 0 limit: an exponential tail
        return u + sigma * math.log(ratio), params
    return u + sigma / xi_used * (ratio ** xi_used - 1.0), params


def _good_scores(scores: ArrayLike) -> np.ndarray:
    """Flattened finite scores, or DataError."""
    values = np.asarray(scores)
    if values.size == 0:
        raise DataError(
            f"no good scores to calibrate a threshold on (empty array of shape {values.shape})"
        )
    return _as_scores(values, "good scores").ravel()


def _check_real(value: float, name: str) -> float:
    """Return ``value`` as a float, or raise ConfigError naming it."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
