"""PatchCore: the greedy k-center coreset, chunked nearest-neighbour search, the detector.

Coreset: the same pick order as a naive farthest-point reference, coverage shrinks, seeded.
Nearest neighbour: the chunked matrix-product search equals torch.cdist's minimum. Detector
(32-48 px; random backbone weights except where it has to learn): a pasted square scores
higher and its map peaks inside; a batch scores as one image at a time; the bank bound;
config errors.
"""

from __future__ import annotations

import pytest
import torch

from anomalykit.detectors.patchcore import (
    PatchCoreDetector,
    channel_pooling_matrix,
    nearest_distance,
)
from anomalykit.errors import ConfigError
from anomalykit.nn.coreset import coreset_coverage, greedy_coreset, random_projection
from anomalykit.training import fit


def naive_k_center(x: torch.Tensor, k: int, start: int) -> list[int]:
    """Reference greedy k-center: recompute every point's distance to every pick, each step."""
    picks = [start]
    while len(picks) < k:
        d = torch.stack([((x - x[p]) ** 2).sum(1) for p in picks]).amin(0)
        picks.append(int(d.argmax()))
    return picks


@pytest.mark.parametrize("pool_size", [1, 7, 64, 1024])
@pytest.mark.parametrize("shape", [(400, 2), (600, 16), (300, 64)])
def test_coreset_matches_naive_greedy_order(shape, pool_size):
    g = torch.Generator().manual_seed(shape[1])
    # clustered data with varied scales; small pools force many rounds and their bound checks
    centres = torch.randn(12, shape[1], generator=g, dtype=torch.float64) * 4
    x = centres[torch.randint(12, (shape[0],), generator=g)]
    x = x + torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape[0], 1, generator=g,
                                                                                   dtype=torch.float64)
    k = shape[0] // 4
    picks = greedy_coreset(x, k, start=5, pool_size=pool_size)
    assert picks.tolist() == naive_k_center(x, k, 5)
    assert len(set(picks.tolist())) == k


def test_coreset_covers_and_is_seeded():
    x = torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
    picks = greedy_coreset(x, 200, seed=3)
    radius = coreset_coverage(x, picks)
    assert (radius[1:] <= radius[:-1]).all()  # the covering radius never grows
    assert radius[-1] < 0.7 * radius[0]
    assert torch.equal(picks, greedy_coreset(x, 200, seed=3))
    assert not torch.equal(picks, greedy_coreset(x, 200, seed=4))  # another start
    # a random subset of the same size covers worse than the greedy one
    random_subset = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:200]
    assert coreset_coverage(x, random_subset)[-1] > radius[-1]
    with pytest.raises(ConfigError, match="k must be"):
        greedy_coreset(x, 0)
    with pytest.raises(ConfigError, match="pool_size"):
        greedy_coreset(x, 5, pool_size=0)
    seen = []
    assert torch.equal(greedy_coreset(x, 200, seed=3, pool_size=16,
                                      progress=lambda done, k: seen.append((done, k))), picks)
    assert seen[-1] == (200, 200) and [d for d, _ in seen] == sorted({d for d, _ in seen})


def test_random_projection_is_seeded_and_keeps_distances():
    x = torch.randn(50, 1000, generator=torch.Generator().manual_seed(0))
    a, b = random_projection(x, 128, seed=1), random_projection(x, 128, seed=1)
    assert a.shape == (50, 128) and torch.equal(a, b)
    ratio = torch.pdist(a) / torch.pdist(x)
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.3  # Johnson-Lindenstrauss
    narrow = x[:, :64]
    assert random_projection(narrow, 128, seed=1) is narrow  # D <= dim: nothing to project


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_nearest_distance_is_cdist_min(chunk):
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(100, 24, generator=g), torch.randn(150, 24, generator=g)
    expected = torch.cdist(queries, bank).amin(1)
    torch.testing.assert_close(nearest_distance(queries, bank, chunk), expected, atol=1e-4, rtol=1e-4)
    assert nearest_distance(bank[:10], bank, chunk).abs().max() < 1e-2  # members: distance ~0


def test_channel_pooling_matrix_is_adaptive_avg_pool():
    x = torch.randn(5, 152)
    for out in (1, 10, 64, 152):
        expected = torch.nn.functional.adaptive_avg_pool1d(x[:, None], out)[:, 0]
        torch.testing.assert_close(x @ channel_pooling_matrix(152, out), expected)


def detector(size: int = 48, weights: str | None = "random", **kwargs) -> PatchCoreDetector:
    torch.manual_seed(0)
    return PatchCoreDetector(size, backbone_weights=weights, **kwargs)


def textured(n: int, size: int, seed: int) -> torch.Tensor:
    """Good images: a smooth stripe texture with a random phase plus light noise."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.arange(size, dtype=torch.float32)
    phase = torch.rand(n, 1, 1, 1, generator=g) * 6.28
    stripes = 0.5 + 0.25 * torch.sin(xs.view(1, 1, 1, -1) * 0.8 + phase)
    return (stripes + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def test_learns_pasted_square_scores_higher_and_map_peaks_inside():
    size = 48
    model = detector(size, None, coreset_ratio=0.25, map_sigma=1.0)  # the offline ImageNet weights
    fit(model, textured(12, size, seed=0), epochs=1, batch_size=12, device="cpu", seed=0,
        progress=False)
    good = textured(4, size, seed=1)
    bad = good.clone()
    bad[:, :, 14:26, 20:32] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        out_good, out_bad = model(good), model(bad)
    assert float(out_bad.score.min()) > float(out_good.score.max())
    for amap in out_bad.anomaly_map[:, 0]:
        y, x = divmod(int(amap.argmax()), size)
        assert 12 <= y < 28 and 18 <= x < 34, (y, x)


def test_batch_scores_equal_one_at_a_time():
    model = detector(32, coreset_ratio=0.2)
    fit(model, torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), epochs=1,
        batch_size=6, device="cpu", progress=False)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        batch = model(x)
        single = [model(x[i:i + 1]) for i in range(5)]
    torch.testing.assert_close(batch.score, torch.cat([o.score for o in single]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.anomaly_map, torch.cat([o.anomaly_map for o in single]),
                               atol=1e-5, rtol=1e-5)


def test_bank_size_ratio_bound_and_seed():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = detector(32, coreset_ratio=0.5, max_bank_size=7)
    model.solve(x, seed=0)
    assert model.memory_bank.shape == (7, 152)  # 4 images x 4x4 patches x 0.5 = 32, bound 7
    assert model.fit_summary() == ["memory bank 7 x 152 (0.0 MB)"]  # the benchmark row's note
    model2 = detector(32, coreset_ratio=0.25)
    model2.solve(x, seed=0)
    assert model2.memory_bank.shape == (16, 152)
    again = detector(32, coreset_ratio=0.25)
    again.solve(x, seed=0)
    assert torch.equal(again.memory_bank, model2.memory_bank)
    reduced = detector(32, coreset_ratio=0.25, feature_dim=64)
    reduced.solve(x, seed=0)
    assert reduced.memory_bank.shape == (16, 64)
    # bank rows are training patches themselves
    patches = model2.training_patches(x)
    assert (model2.memory_bank[:, None] - patches[None]).abs().amax(2).amin(1).max() == 0


def test_reweighting_off_gives_plain_max():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain, weighted = detector(32, num_neighbors=1), detector(32, num_neighbors=9)
    plain.solve(x, seed=0)
    weighted.solve(x, seed=0)
    test = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = plain.embed(test).flatten(2).transpose(1, 2)
        s_star = plain.patch_scores(features).amax(1)
        torch.testing.assert_close(plain.eval()(test).score, s_star)
        w = weighted.eval()(test).score / s_star
    assert ((w > 0) & (w < 1)).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"coreset_ratio": 0.0}, "coreset_ratio"),
    ({"coreset_ratio": 1.5}, "coreset_ratio"),
    ({"max_bank_size": 0}, "max_bank_size"),
    ({"num_neighbors": 0}, "num_neighbors"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"patch_size": 2}, "patch_size"),
    ({"feature_dim": 4096}, "feature_dim"),
    ({"map_sigma": -1.0}, "map_sigma"),
    ({"out_indices": [9]}, "out_indices"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PatchCoreDetector(32, backbone_weights="random", **kwargs)
