"""PCA and GMM in the generative suite, and the ``pca`` detector.

PCA: the covariance and Gram routes give the same subspace and scikit-learn's variances,
the PPCA log-density is scikit-learn's, error falls with k, robust reconstruction recovers
occluded digits. GMM: log_prob is scikit-learn's score_samples, sampling is seeded. The
closed-form models train through the toolkit's ``fit``; the detector learns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA as SkPCA
from sklearn.mixture import GaussianMixture

from anomalykit.base import Estimator
from anomalykit.generative.gmm import GaussianMixtureModel
from anomalykit.generative.pca import PCA
from anomalykit.training import fit


@pytest.fixture(scope="module")
def digits():
    """(train (1400, 64), test (397, 64)) float64, pixel values 0..16."""
    x = load_digits().data.astype(np.float64)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:1400]], x[order[1400:]]


def _same_up_to_sign(a: np.ndarray, b: np.ndarray) -> float:
    """Largest deviation of |a_i . b_j| from the identity for two sets of unit rows."""
    return float(np.abs(np.abs(a @ b.T) - np.eye(len(a))).max())


# -- PCA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 64), (30, 200)], ids=["D<N", "D>N"])
def test_pca_routes_agree_and_match_sklearn(digits, shape):
    n, d = shape
    x = digits[0][:n] if d == 64 else np.random.default_rng(1).normal(size=shape) @ np.diag(
        np.linspace(3.0, 0.1, d))
    k = 10
    cov = PCA(k, method="covariance").double().fit_tensor(torch.tensor(x))
    gram = PCA(k, method="gram").double().fit_tensor(torch.tensor(x))
    sk = SkPCA(k, svd_solver="full").fit(x)
    assert _same_up_to_sign(cov.components_.numpy(), gram.components_.numpy()) < 1e-8
    # the sign convention makes the two routes agree exactly, not only up to sign
    assert torch.allclose(cov.components_, gram.components_, atol=1e-8)
    assert _same_up_to_sign(cov.components_.numpy(), sk.components_) < 1e-8
    for model in (cov, gram):
        np.testing.assert_allclose(model.explained_variance_.numpy(), sk.explained_variance_,
                                   rtol=1e-9)
        np.testing.assert_allclose(model.explained_variance_ratio_.numpy(),
                                   sk.explained_variance_ratio_, rtol=1e-9)
        np.testing.assert_allclose(model.mean_.numpy(), sk.mean_, atol=1e-12)


def test_pca_log_prob_is_sklearn_score_samples(digits):
    train, test = digits
    model = PCA(12).double().fit_tensor(torch.tensor(train))
    sk = SkPCA(12, svd_solver="full").fit(train)
    assert float(model.noise_variance_) == pytest.approx(sk.noise_variance_, rel=1e-9)
    np.testing.assert_allclose(model.log_prob(torch.tensor(test)).numpy(), sk.score_samples(test),
                               rtol=1e-9)


def test_pca_variance_fraction_and_reconstruction_error_falls_with_k(digits):
    train, test = digits
    model = PCA(0.9).fit_tensor(torch.tensor(train, dtype=torch.float32))
    assert model.k == SkPCA(0.9, svd_solver="full").fit(train).n_components_
    full = PCA().fit_tensor(torch.tensor(train, dtype=torch.float32))
    x = torch.tensor(test, dtype=torch.float32)
    errors = [float((full.reconstruct(x, n_components=k) - x).pow(2).mean())
              for k in (0, 2, 5, 10, 20, 40, full.k)]
    assert all(a > b for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[-1] < 1e-3 * errors[0]
    # images are flattened and come back in their shape
    images = torch.rand(6, 3, 4, 4)
    model = PCA(3).fit_tensor(images)
    assert model.reconstruct(images).shape == images.shape
    assert model.project(images).shape == (6, 3)


def test_pca_samples_are_seeded_and_follow_the_model(digits):
    model = PCA(8).fit_tensor(torch.tensor(digits[0], dtype=torch.float32))
    a = model.sample(4000, generator=torch.Generator().manual_seed(0))
    b = model.sample(4000, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4000, 64) and torch.equal(a, b)
    # the covariance log_prob scores: lambda along each component, sigma^2 across them
    ratio = model.project(a).var(0) / model.explained_variance_
    assert float((ratio - 1).abs().max()) < 0.1, ratio
    across = (a - model.reconstruct(a)).pow(2).sum(1).mean() / (64 - model.k)
    assert float(across / model.noise_variance_) == pytest.approx(1.0, abs=0.05)
    exact = model.sample(10, generator=torch.Generator().manual_seed(0), noise=False)
    assert torch.allclose(model.reconstruct(exact), exact, atol=1e-3)  # in the subspace


def test_robust_reconstruction_recovers_occluded_digits(digits):
    train, test = digits
    model = PCA(20).fit_tensor(torch.tensor(train, dtype=torch.float32))
    clean = torch.tensor(test[:100], dtype=torch.float32)
    # A white 4x5 block (31% of the 8x8 pixels) at a random place on every digit.
    g = torch.Generator().manual_seed(1)
    occluded_px = torch.zeros(100, 8, 8, dtype=torch.bool)
    for i in range(100):
        y, x = torch.randint(0, 5, (2,), generator=g).tolist()
        occluded_px[i, y:y + 4, min(x, 3):min(x, 3) + 5] = True
    occluded_px = occluded_px.flatten(1)
    corrupted = clean.masked_fill(occluded_px, 16.0)

    plain = model.reconstruct(corrupted)
    recon, inliers, codes = model.robust_reconstruct(corrupted,
                                                     generator=torch.Generator().manual_seed(0))
    assert recon.shape == corrupted.shape and inliers.shape == corrupted.shape
    assert codes.shape == (100, 20)

    def error(r):
        return float((r - clean)[occluded_px].pow(2).mean())

    assert error(recon) < 0.7 * error(plain), (error(recon), error(plain))
    # most occluded pixels are rejected, most clean ones kept
    assert float((~inliers[occluded_px]).float().mean()) > 0.5
    assert float(inliers[~occluded_px].float().mean()) > 0.7


# -- GMM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gmm_log_prob_is_sklearn_score_samples(digits, covariance_type):
    train, test = digits[0][:500], digits[1][:100]
    kwargs = dict(covariance_type=covariance_type, reg_covar=1e-2)
    model = GaussianMixtureModel(3, **kwargs).double().fit_tensor(torch.tensor(train), seed=0)
    sk = GaussianMixture(3, random_state=0, **kwargs).fit(train)
    expected = sk.score_samples(test)
    np.testing.assert_allclose(model.log_prob(torch.tensor(test)).numpy(), expected, atol=1e-5,
                               rtol=0)
    # float32 buffers: the same numbers to float32 round-off, and differentiable in x
    model32 = GaussianMixtureModel(3, **kwargs).fit_tensor(torch.tensor(train), seed=0)
    x = torch.tensor(test[:5], dtype=torch.float32, requires_grad=True)
    log_p = model32.log_prob(x)
    np.testing.assert_allclose(log_p.detach().numpy(), expected[:5], rtol=1e-5)
    log_p.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    np.testing.assert_allclose(model.responsibilities(torch.tensor(test)).numpy(),
                               sk.predict_proba(test), atol=1e-6)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gmm_sampling_is_seeded_and_matches_the_fit(covariance_type):
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])
    x = np.concatenate([rng.multivariate_normal([0, 0], cov, 600),
                        rng.multivariate_normal([6, -6], 0.25 * np.eye(2), 300)])
    model = GaussianMixtureModel(2, covariance_type=covariance_type).fit_tensor(torch.tensor(x))
    a = model.sample(6000, generator=torch.Generator().manual_seed(3))
    b = model.sample(6000, generator=torch.Generator().manual_seed(3))
    assert a.shape == (6000, 2) and torch.equal(a, b)
    assert not torch.equal(a, model.sample(6000, generator=torch.Generator().manual_seed(4)))
    # samples have the data's moments (the mixture mean and covariance)
    np.testing.assert_allclose(a.mean(0).numpy(), x.mean(0), atol=0.15)
    np.testing.assert_allclose(np.cov(a.numpy().T), np.cov(x.T), atol=0.5)
    # fitting is seeded too
    again = GaussianMixtureModel(2, covariance_type=covariance_type).fit_tensor(torch.tensor(x))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


# -- closed-form models in the toolkit's loop --------------------------------------------------


@pytest.mark.parametrize("model", [PCA(4), GaussianMixtureModel(2, covariance_type="diag")],
                         ids=["pca", "gmm"])
def test_closed_form_models_train_through_the_toolkit_fit(model, tmp_path):
    data = torch.rand(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    history = fit(model, data, data[:8], epochs=3, batch_size=16, device="cpu", progress=False,
                  out_dir=tmp_path)
    assert history["epochs_run"] == 1 and history["steps"] == 3
    assert np.isfinite(history["train_loss"][0]["loss"]) and len(history["val_loss"]) == 1
    assert int(model.n_samples_seen_) == 40
    loaded = Estimator.load(tmp_path / "last.ckpt")  # buffers resized to the fitted shapes
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # max_steps reads only that many batches
    history = fit(model, data, epochs=1, max_steps=1, batch_size=16, device="cpu", progress=False)
    assert history["steps"] == 1 and int(model.n_samples_seen_) == 16


# -- the detector ----------------------------------------------------------------------------
