"""PaDiM: learns a pasted defect, Mahalanobis against numpy, batching, seeded channel subset, config.

The registry-driven contracts (shapes, one fit, save/load in a fresh process, ONNX parity,
seeding) are in test_contracts.py; these check what is particular to PaDiM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalykit.detectors.padim import PaDiMDetector, random_channel_subset
from anomalykit.errors import ConfigError
from anomalykit.registry import create
from anomalykit.training import fit


def small(**kwargs) -> PaDiMDetector:
    options = {"image_size": 32, "backbone_weights": "random", "n_features": 8, "map_sigma": 1.0,
               **kwargs}
    torch.manual_seed(0)
    return create("padim", **options)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def flat_textures(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size): mid-grey with a little per-image tint and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    tint = 0.5 + 0.05 * torch.randn(n, 3, 1, 1, generator=g)
    return (tint + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def test_learns_a_pasted_square_and_the_map_peaks_inside_it():
    size, top, left, side = 64, 36, 12, 16
    model = create("padim", image_size=size, map_sigma=2.0)  # offline pretrained EfficientNet-Lite0
    fit(model, flat_textures(16, size, seed=0), device="cpu", seed=0, progress=False)
    good = flat_textures(4, size, seed=1)
    bad = good.clone()
    bad[:, :, top:top + side, left:left + side] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)
    with torch.no_grad():
        out_good, out_bad = model.eval()(good), model(bad)
    assert out_bad.score.min() > out_good.score.max()
    for amap in out_bad.anomaly_map[:, 0]:
        row, col = divmod(int(amap.argmax()), size)
        assert top <= row < top + side and left <= col < left + side, (row, col)


def test_mahalanobis_matches_numpy_with_uneven_batches():
    model = small(solve_batch_size=5)  # 12 images: batches of 5, 5, 2 accumulated
    train, test = images(12), images(3, seed=1)
    model.solve(train, seed=0)
    with torch.no_grad():
        x = model.embed(train).double().numpy()  # (N, P, D)
        y = model.embed(test)
        got = model.mahalanobis(y).double().numpy()
    y = y.double().numpy()
    dims = x.shape[-1]
    mean = x.mean(0)
    expected = np.empty(got.shape)
    for p in range(x.shape[1]):
        covariance = np.cov(x[:, p], rowvar=False, ddof=1) + 0.01 * np.eye(dims)
        inverse = np.linalg.inv(covariance)
        np.testing.assert_allclose(model.inv_covariance_[p].double().numpy(), inverse,
                                   rtol=1e-4, atol=1e-4 * np.abs(inverse).max())
        delta = y[:, p] - mean[p]
        expected[:, p] = np.sqrt(np.einsum("bd,de,be->b", delta, inverse, delta))
    np.testing.assert_allclose(model.mean_.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_batch_scores_equal_one_at_a_time():
    model = small()
    model.solve(images(10), seed=0)
    p, d = model.mean_.shape
    assert model.fit_summary() == [f"{p} Gaussians of {d} dims ({p * (d + d * d) * 4 / 2**20:.1f} MB)"]
    x = images(3, seed=2)
    with torch.no_grad():
        batch = model.eval()(x)
        singles = [model(x[i:i + 1]) for i in range(len(x))]
    torch.testing.assert_close(batch.score, torch.cat([s.score for s in singles]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.anomaly_map, torch.cat([s.anomaly_map for s in singles]),
                               rtol=1e-5, atol=1e-6)


def test_channel_subset_is_reproducible_from_the_seed():
    total = 24 + 40 + 112  # lite0 stages 1, 2, 3
    a, b = small(), small()
    a.solve(images(6), seed=3)
    b.solve(images(6), seed=3)
    assert torch.equal(a.channel_indices_, b.channel_indices_)
    assert torch.equal(a.channel_indices_, random_channel_subset(total, 8, 3))
    indices = a.channel_indices_.tolist()
    assert indices == sorted(set(indices)) and indices[0] >= 0 and indices[-1] < total
    assert not torch.equal(random_channel_subset(total, 8, 4), a.channel_indices_)
    # every channel kept: the subset is the identity, whatever the seed
    assert torch.equal(random_channel_subset(total, total, 5), torch.arange(total))
    c = small()
    fit(c, images(6), device="cpu", seed=3, progress=False)  # through the loop: the loop's seed
    assert torch.equal(c.channel_indices_, a.channel_indices_)


def test_nearest_and_bilinear_feature_upsampling_both_fit():
    for mode in ("nearest", "bilinear"):
        model = small(feature_upsample=mode)
        model.solve(images(6), seed=0)
        with torch.no_grad():
            out = model.eval()(images(2, seed=1))
        assert out.anomaly_map.shape == (2, 1, 32, 32) and torch.isfinite(out.score).all()


@pytest.mark.parametrize("options, message", [
    ({"n_features": 0}, "n_features"),
    ({"n_features": 177}, "n_features"),
    ({"feature_upsample": "cubic"}, "feature_upsample"),
    ({"covariance_eps": 0.0}, "covariance_eps"),
    ({"map_sigma": -1.0}, "map_sigma"),
    ({"solve_batch_size": 0}, "solve_batch_size"),
])
def test_config_errors_name_the_value(options, message):
    with pytest.raises(ConfigError, match=message):
        small(**options)
