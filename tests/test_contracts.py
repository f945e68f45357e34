"""Contracts every registered detector keeps, driven by the registry.

Builds from its quick config at 32x32, one training step, output shapes and
finiteness, calibration, a save/load round trip in a fresh process with
identical outputs, and ONNX export matching PyTorch within 1e-4.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.config import load_config
from anomalykit.registry import create, list_detectors
from anomalykit.training import fit

SIZE = 32
DETECTORS = [name for name in list_detectors() if not name.startswith("_")]
REPO = Path(__file__).resolve().parent.parent


def build(name: str) -> Detector:
    model_cfg = load_config(name, "quick")["model"]
    model_cfg["image_size"] = SIZE
    torch.manual_seed(0)
    return create(name, **model_cfg)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", DETECTORS)
def test_builds_and_forward_shapes(name):
    detector = build(name).eval()
    assert isinstance(detector, Detector)
    with torch.no_grad():
        out = detector(images(3))
    assert isinstance(out, AnomalyOutput)
    assert out.score.shape == (3,)
    assert out.anomaly_map.shape == (3, 1, SIZE, SIZE)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.anomaly_map).all()


@pytest.mark.parametrize("name", DETECTORS)
def test_one_training_step_changes_weights(name):
    detector = build(name)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    history = fit(detector, images(4), epochs=1, max_steps=1, batch_size=4, device="cpu",
                  progress=False)
    assert np.isfinite(history["train_loss"][0]["loss"])
    changed = [k for k, v in detector.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one optimiser step left every weight unchanged"


@pytest.mark.parametrize("name", DETECTORS)
def test_calibrate_sets_threshold_from_good_images(name):
    detector = build(name)
    threshold = detector.calibrate(images(5, seed=1))
    with torch.no_grad():  # inference mode, as calibrate's (BatchNorm uses running statistics)
        scores = detector.eval()(images(5, seed=1)).score
    assert detector.calibrated_.item()
    assert threshold == pytest.approx(float(scores.max()), rel=1e-5)
    norm = detector.normalized_score(scores)
    assert float(norm.max()) == pytest.approx(0.5, abs=1e-6)  # threshold maps to 0.5


@pytest.mark.parametrize("name", DETECTORS)
def test_save_load_round_trip_in_fresh_process(name, tmp_path):
    detector = build(name)
    fit(detector, images(4), epochs=1, max_steps=1, batch_size=4, device="cpu", progress=False)
    detector.calibrate(images(4, seed=2))
    x = images(2, seed=3)
    with torch.no_grad():
        expected = detector.eval()(x)
    ckpt = tmp_path / "model.ckpt"
    detector.save(ckpt)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from anomalykit.base import Estimator
        model = Estimator.load({str(ckpt)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            out = model(x)
        torch.save({{"score": out.score, "map": out.anomaly_map,
                    "threshold": model.threshold_}}, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(got["score"], expected.score)
    assert torch.equal(got["map"], expected.anomaly_map)
    assert torch.equal(got["threshold"], detector.threshold_)


@pytest.mark.parametrize("name", DETECTORS)
def test_onnx_export_matches_pytorch(name, tmp_path):
    from anomalykit.export import compare_with_torch, export_onnx

    detector = build(name)
    if detector.closed_form:
        # Unfitted, PCA has no components and reconstructs the zero mean: fit it, so that
        # parity checks a real reconstruction.
        fit(detector, images(8), epochs=1, batch_size=8, device="cpu", progress=False)
    detector.calibrate(images(4, seed=4))
    path = export_onnx(detector.eval(), tmp_path / f"{name}.onnx", check=False)
    rng = np.random.default_rng(0)
    for shape in [(1, SIZE, SIZE, 3), (3, 48, 40, 3)]:
        batch = rng.integers(0, 256, size=shape, dtype=np.uint8)
        diffs = compare_with_torch(detector, path, batch)
        assert diffs["score"] <= 1e-4, diffs
        assert diffs["anomaly_map"] <= 1e-4, diffs


@pytest.mark.parametrize("name", DETECTORS)
def test_same_seed_same_weights(name):
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        detector = build(name)
        fit(detector, images(8), epochs=2, batch_size=4, device="cpu", seed=7, progress=False)
        return detector.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
