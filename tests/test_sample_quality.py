"""Sample-quality metrics: Fréchet distance, k-NN precision/recall, backbone embeddings."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from anomalykit.errors import ConfigError, DataError
from anomalykit.metrics.sample_quality import (
    backbone_embeddings,
    frechet_distance,
    knn_precision_recall,
    sample_quality,
)


def gaussian_with_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """(n, D) samples whose sample mean and (n - 1) covariance are exactly ``mean`` and ``cov``."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: cov exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mixing = np.random.default_rng(1).standard_normal((16, 16))
    x = np.random.default_rng(0).standard_normal((500, 16)) @ mixing
    assert abs(frechet_distance(x, x)) < 1e-6


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    a = gaussian_with_moments(rng, 400, mu1, np.diag(var1))
    b = gaussian_with_moments(rng, 300, mu2, np.diag(var2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_non_commuting_covariances():
    # 2x2: the eigenvalues l1, l2 of S1 S2 are positive, Tr (S1 S2)^(1/2) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)), independent of scipy's sqrtm.
    rng = np.random.default_rng(1)
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.0, 0.0]), np.array([3.0, -1.0])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2.0 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 10.0 + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    a = gaussian_with_moments(rng, 200, mu1, s1)
    b = gaussian_with_moments(rng, 200, mu2, s2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_finite_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 1.0
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 64.0 * 0.5  # the mean shift alone gives ~64
    assert abs(frechet_distance(a, a)) < 1e-3


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(0).standard_normal((300, 8))
    assert knn_precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 100.0
    assert knn_precision_recall(real, fake) == (0.0, 0.0)


def test_collapsed_fake_set_has_high_precision_and_low_recall():
    rng = np.random.default_rng(0)
    centres = 10.0 * np.eye(4)  # four well separated modes in 4-D
    real = np.concatenate([c + 0.3 * rng.standard_normal((200, 4)) for c in centres])
    fake = centres[0] + 0.3 * rng.standard_normal((800, 4))  # every sample from mode 0
    precision, recall = knn_precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert 0.1 < recall < 0.3  # mode 0 is a quarter of the real set


def test_bad_arguments_are_refused():
    x = np.zeros((10, 4))
    with pytest.raises(ConfigError, match="k must be"):
        knn_precision_recall(x, x, k=0)
    with pytest.raises(DataError, match="dimension"):
        frechet_distance(x, np.zeros((10, 5)))
    with pytest.raises(DataError, match="N >= 4"):
        knn_precision_recall(x[:3], x, k=3)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        backbone_embeddings(np.full((2, 3, 32, 32), 2.0, np.float32))
    with pytest.raises(DataError, match="C = 1 or 3"):
        backbone_embeddings(np.zeros((2, 2, 32, 32), np.float32))


def test_backbone_embeddings_shape_determinism_and_grey_input():
    rng = np.random.default_rng(0)
    grey = rng.random((5, 1, 32, 32)).astype(np.float32)
    first = backbone_embeddings(grey, image_size=64, batch_size=2)
    assert first.shape == (5, 320) and first.dtype == np.float64 and np.isfinite(first).all()
    np.testing.assert_array_equal(first, backbone_embeddings(grey, image_size=64, batch_size=2))
    # Another batch size or memory layout changes only float32 rounding in the convolutions.
    np.testing.assert_allclose(backbone_embeddings(grey, image_size=64, batch_size=5), first,
                               rtol=1e-4, atol=1e-4)
    rgb = np.repeat(grey, 3, axis=1)
    np.testing.assert_allclose(backbone_embeddings(rgb, image_size=64), first, rtol=1e-4, atol=1e-4)
    assert np.abs(first[0] - first[1]).max() > 1e-3  # different images, different features
    result = sample_quality(grey, grey[::-1].copy(), k=2, image_size=64)
    assert set(result) == {"frechet_distance", "precision", "recall"}
    assert result["precision"] == result["recall"] == 1.0  # the same images in another order


def test_metrics_package_import_stays_torch_free():
    code = ("import sys, anomalykit.metrics, anomalykit.metrics.sample_quality; "
            "print('torch' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def load_gan_suite():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gan_suite.py"
    spec = importlib.util.spec_from_file_location("gan_suite_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gan_suite_mode_coverage_rules():
    suite = load_gan_suite()
    ring = suite.ring_data(2000, seed=0)
    full = suite.mode_coverage("ring", ring)
    assert full["modes_covered"] == 8 and full["high_quality"] > 0.99
    one_mode = ring[np.linalg.norm(ring - suite.ring_centres()[0], axis=1) < 0.1]
    assert suite.mode_coverage("ring", one_mode)["modes_covered"] == 1
    assert suite.mode_coverage("ring", ring * 0.5)["high_quality"] == 0.0  # radius 1: off every mode
    moons = suite.mode_coverage("moons", suite.moons_data(2000, seed=0))
    assert moons["modes_covered"] == 8 and moons["high_quality"] > 0.99


def test_gan_suite_runs_end_to_end(tmp_path):
    suite = load_gan_suite()
    code = suite.main(["--out", str(tmp_path), "--models", "gan,ae", "--datasets", "digits",
                       "--losses-2d", "non_saturating", "--epochs", "1", "--epochs-2d", "1",
                       "--samples", "20", "--width", "8", "--latent-dim", "8", "--embed-size", "64",
                       "--threads", "1"])
    assert code == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"results.md", "results.csv", "2d_ring.png", "2d_moons.png", "digits_ae.png",
            "digits_real.png"} <= names
    report = (tmp_path / "results.md").read_text()
    assert "| ring | gan (non_saturating) |" in report and "| ae |" in report
