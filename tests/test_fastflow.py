"""FastFlow: features computed once per fit, map/score conventions, learning, offline checkpoint loads.

The registry-driven contracts (shapes, one step, save/load, ONNX, seeding) are in
test_contracts.py; these check what is particular to FastFlow.
"""

from __future__ import annotations

import pytest
import torch

import anomalykit.nn.backbone as backbone_module
from anomalykit.base import Estimator
from anomalykit.config import load_config
from anomalykit.data import generate_synthetic
from anomalykit.detectors.fastflow import FastFlowDetector
from anomalykit.errors import ConfigError
from anomalykit.nn.backbone import WEIGHTS_ENV
from anomalykit.pipeline import evaluate_detector, train_detector
from anomalykit.registry import create
from anomalykit.training import FeatureCache, fit


def small(**kwargs) -> FastFlowDetector:
    torch.manual_seed(0)
    options = {"image_size": 32, "backbone_weights": "random", "flow_steps": 2, **kwargs}
    return create("fastflow", **options)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_fit_runs_the_backbone_once_over_train_and_val():
    model = small()
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    history = model.fit(images(10), images(5, seed=1), epochs=3, batch_size=4, device="cpu",
                        progress=False)
    # one pass: ceil(10 / 4) train batches + ceil(5 / 4) val batches, whatever the epochs
    assert calls == [4, 4, 2, 4, 1]
    assert history["epochs_run"] == 3 and len(history["val_loss"]) == 3
    assert history["steps"] == 9
    assert 0 < history["setup_seconds"] <= history["seconds"]  # the feature pass, in setup_fit


def test_cached_and_image_training_steps_agree():
    model = small()
    x = images(3)
    cache = FeatureCache([f.clone() for f in model.extract_features(x)])
    item = cache[1]
    assert [tuple(f.shape) for f in item["features"]] == [tuple(f.shape[1:]) for f in cache.features]
    with torch.no_grad():
        from_images = model.training_step({"image": x})
        from_cache = model.training_step({"features": cache.features})
    assert set(from_images) == {"loss", "nll_0", "nll_1", "nll_2"}
    for key, value in from_images.items():
        torch.testing.assert_close(from_cache[key], value)


def test_map_in_unit_interval_and_score_is_its_max():
    model = small(image_size=64).eval()
    fit(model, images(4, 64), epochs=1, max_steps=2, batch_size=2, device="cpu", progress=False)
    with torch.no_grad():
        out = model(images(3, 64, seed=2))
    assert out.score.shape == (3,) and out.anomaly_map.shape == (3, 1, 64, 64)
    assert float(out.anomaly_map.min()) >= 0.0 and float(out.anomaly_map.max()) <= 1.0
    torch.testing.assert_close(out.score, out.anomaly_map.flatten(1).amax(1))
    # one LayerNorm over (C, H, W) and one flow per stage; the backbone stays frozen
    assert [list(n.normalized_shape) for n in model.norms] == [[24, 16, 16], [40, 8, 8], [112, 4, 4]]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.norms.parameters())


def test_flow_steps_alternate_kernels_unless_conv3x3_only():
    def kernels(model):
        return [layer.subnet[0].kernel_size[0] for layer in model.flows[0] if hasattr(layer, "subnet")]

    assert kernels(small(flow_steps=4)) == [3, 1, 3, 1]
    assert kernels(small(flow_steps=4, conv3x3_only=True)) == [3, 3, 3, 3]
    with pytest.raises(ConfigError):
        small(flow_steps=0)


@pytest.mark.slow
def test_learns_the_easy_synthetic_category(tmp_path):
    root = generate_synthetic(tmp_path / "data", categories=["washer"], image_size=64, n_train=32,
                              n_test_good=8, n_test_defect=12, seed=0)
    overrides = ["image_size=64", "epochs=3", "train.batch_size=8"]
    result = train_detector("fastflow", root=root, category="washer", config="quick",
                            overrides=overrides, out_dir=tmp_path / "run", seed=0, progress=False)
    assert result.history["epochs_run"] == 3
    metrics = evaluate_detector(result.detector, result.test_records, progress=False).metrics
    # measured: 1.0 image / 0.88-0.93 pixel AUROC over 2 datasets x 3 seeds, 1-4 s of training
    assert metrics["image_auroc"] >= 0.8, metrics
    assert metrics["pixel_auroc"] >= 0.8, metrics
    # the flows did the work: the same detector untrained (identity couplings) is near chance
    torch.manual_seed(0)
    untrained = create("fastflow", **load_config("fastflow", "quick", overrides)["model"]).eval()
    baseline = evaluate_detector(untrained, result.test_records, progress=False).metrics
    assert baseline["image_auroc"] < 0.8, baseline


def test_checkpoint_loads_without_the_weights_package(tmp_path, monkeypatch):
    model = small(backbone_weights=None)  # the offline default: the weights package
    assert model.backbone.source != "random"
    fit(model, images(4), epochs=1, max_steps=1, batch_size=4, device="cpu", progress=False)
    model.calibrate(images(4, seed=1))
    model.save(tmp_path / "model.ckpt")
    x = images(2, seed=2)
    with torch.no_grad():
        expected = model.eval()(x)

    monkeypatch.setattr(backbone_module, "package_weights_path", lambda name: None)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    backbone_module.clear_backbone_cache()
    try:
        with pytest.raises(ConfigError, match="no pretrained weights"):
            FastFlowDetector(image_size=32)  # building afresh does need them...
        loaded = Estimator.load(tmp_path / "model.ckpt")  # ...loading a checkpoint does not
    finally:
        backbone_module.clear_backbone_cache()
    assert loaded.config == model.config
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got.score, expected.score) and torch.equal(got.anomaly_map, expected.anomaly_map)
