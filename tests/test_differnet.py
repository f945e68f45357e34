"""DifferNet invariants: test-time rotations, the exportable map's backward pass, feature cache, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalykit.detectors.differnet import DifferNetDetector, flow_vjp

SIZE = 32


def small(**kwargs) -> DifferNetDetector:
    torch.manual_seed(0)
    options = {"image_size": SIZE, "coupling_blocks": 2, "fc_hidden": 64, "n_transforms": 4,
               "map_sigma": 1.0, **kwargs}
    return DifferNetDetector(**options).eval()


def images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_flow(model: DifferNetDetector, std: float = 0.02) -> None:
    """Zero-initialised couplings are the identity; give them weights so the tests see a real flow."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def test_four_quarter_turns_make_the_score_rotation_invariant():
    model = small()
    randomize_flow(model)
    x = images(2)
    with torch.no_grad():
        out = model(x)
        turned = model(torch.rot90(x, 1, dims=(2, 3)))
    torch.testing.assert_close(turned.score, out.score, rtol=1e-5, atol=1e-6)
    # the map is computed per transform and rotated back: it turns with the image
    torch.testing.assert_close(turned.anomaly_map, torch.rot90(out.anomaly_map, 1, dims=(2, 3)),
                               rtol=1e-4, atol=1e-9)


def test_shapes_and_the_grid_sample_rotations():
    model = small(n_transforms=3)  # 120-degree steps: grid_sample, not rot90
    assert not model.quarter_turns
    x = images(2, size=SIZE)
    # transform 0 is the identity, exactly reproduced by grid_sample at pixel centres
    torch.testing.assert_close(model._rotate(x, 0), x, rtol=0, atol=1e-6)
    assert model.transform_all(x).shape == (6, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model(x)
    assert out.score.shape == (2,) and out.anomaly_map.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(out.score).all() and (out.anomaly_map >= 0).all()
    assert model.gradient_map(x).shape == (2, 1, SIZE, SIZE)
    assert model.dim == 3 * 112  # three scales of stage 3 of EfficientNet-Lite0


def test_flow_vjp_matches_autograd():
    model = small(fc_layers=2, coupling_blocks=3)
    randomize_flow(model, std=0.05)
    v = torch.randn(5, model.dim, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad_z = torch.randn(5, model.dim, generator=torch.Generator().manual_seed(3))
    z, _ = model.flow(v)
    (expected,) = torch.autograd.grad((z * grad_z).sum(), v)
    got = flow_vjp(model.flow, v.detach(), grad_z)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cached_features_give_the_same_loss_as_images():
    model = small(train_rotations=False, train_transforms=2)
    x = images(3)
    cache = model.cache(x)
    assert len(cache) == 3 and cache[0]["features"].shape == (4, model.dim)
    batch = {k: torch.stack([cache[i][k] for i in range(3)]) for k in ("features", "image")}
    with torch.no_grad():
        from_cache = model.training_step(batch)["loss"]
        from_images = model.training_step({"image": x})["loss"]
    torch.testing.assert_close(from_cache, from_images, rtol=1e-5, atol=1e-6)
    history = model.fit(x, epochs=2, batch_size=2, device="cpu", progress=False)  # on the cache
    assert history["epochs_run"] == 2 and np.isfinite(history["train_loss"][-1]["loss"])


def test_augmenting_data_trains_uncached_with_a_warning():
    class Augmenting(torch.utils.data.Dataset):
        augment = True

        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"image": images(2)[index]}

    data = Augmenting()
    with pytest.warns(UserWarning, match="augments images on the fly"):
        train, val = small().setup_fit(data, None, batch_size=2, num_workers=0, progress=False)
    assert train is data and val is None


def test_input_statistics_are_saved_with_the_model(tmp_path):
    """A checkpoint is rebuilt with random backbone weights, whose default statistics may differ
    from those of the weights it was trained with: the trained ones come from the checkpoint."""
    from anomalykit.base import Estimator

    model = small()
    assert torch.equal(model.input_mean.flatten(), torch.tensor(model.backbone.input_mean))
    with torch.no_grad():  # stand-ins for another weight file's statistics
        model.input_mean.fill_(0.25)
        model.input_std.fill_(0.75)
    model.save(tmp_path / "model.ckpt")
    loaded = Estimator.load(tmp_path / "model.ckpt")
    assert loaded.backbone.source == "random"
    assert torch.equal(loaded.input_mean, model.input_mean)
    assert torch.equal(loaded.input_std, model.input_std)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from anomalykit.data import generate_synthetic
    from anomalykit.pipeline import train_detector

    root = generate_synthetic(tmp_path_factory.mktemp("washer"), categories=["washer"],
                              image_size=64, n_train=32, n_test_good=8, n_test_defect=12, seed=0)
    return train_detector("differnet", root=root, category="washer", config="quick",
                          overrides=["image_size=64", "epochs=40", "val_fraction=0.125"],
                          out_dir=tmp_path_factory.mktemp("run"), seed=0, progress=False)


@pytest.mark.slow
def test_learns_the_synthetic_washer(trained):
    from anomalykit.pipeline import evaluate_detector

    metrics = evaluate_detector(trained.detector, trained.test_records, progress=False).metrics
    assert metrics["image_auroc"] >= 0.8, metrics
    assert metrics["pixel_auroc"] >= 0.7, metrics


@pytest.mark.slow
def test_maps_point_at_defects(trained):
    from anomalykit.data import AnomalyDataset

    model = trained.detector.eval()
    records = [r for r in trained.test_records if r.label == 1 and r.mask_path is not None]
    items = [AnomalyDataset(records, model.image_size)[i] for i in range(len(records))]
    x = torch.stack([item["image"] for item in items])
    inside = torch.stack([item["mask"] for item in items]) > 0.5
    with torch.no_grad():
        amap = model(x).anomaly_map
    ratios = [float(m[i].mean() / m[~i].mean()) for m, i in zip(amap, inside, strict=True)]
    # forward's (exported) map is higher on most defects than around them (at 64 px the stride-16
    # features are a 4x4 grid, so the contrast is mild: about 1.1 on average)
    assert np.mean(np.array(ratios) > 1.0) >= 0.75, ratios

    # The paper's gradient map: an injected patch makes it larger where it is.
    clean = x[:1].clone()
    patched = clean.clone()
    patched[:, :, 20:30, 36:46] = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    before, after = model.gradient_map(clean), model.gradient_map(patched)
    assert torch.isfinite(after).all()
    assert (after - before)[:, :, 20:30, 36:46].mean() > 0
