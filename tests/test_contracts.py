"""Contracts every registered detector keeps, driven by the registry.

Builds from its quick config at 32x32, one training step, output shapes and
finiteness, calibration, a save/load round trip in a fresh process with
identical outputs, and ONNX export matching PyTorch within 1e-4.
"""

from __future__ import annotations

import subprocess
import sys
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


# Closed-form detectors have no trainable parameters: their fit shows in these fitted
# buffers instead. A new closed-form detector must add its own entry.
CLOSED_FORM_FITTED_BUFFERS = {
    "pca": ["pca.mean_", "pca.components_", "pca.explained_variance_"],
    "patchcore": ["memory_bank"],
    "padim": ["channel_indices_", "mean_", "inv_covariance_"],
}


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensor differs (in shape or value) between two name -> tensor snapshots."""
    return [k for k, v in after.items()
            if k not in before or v.shape != before[k].shape or not torch.equal(v, before[k])]


@pytest.mark.parametrize("name", DETECTORS)
def test_one_training_step_changes_weights(name):
    detector = build(name)
    params = {k: v.detach().clone() for k, v in detector.named_parameters()}
    trainable = [k for k, v in detector.named_parameters() if v.requires_grad]
    buffers = {k: v.clone() for k, v in detector.named_buffers()}
    history = fit(detector, images(4), epochs=1, max_steps=1, batch_size=4, device="cpu",
                  progress=False)
    assert np.isfinite(history["train_loss"][0]["loss"])
    after = dict(detector.named_parameters())
    if detector.closed_form:
        assert name in CLOSED_FORM_FITTED_BUFFERS, (
            f"closed-form detector {name!r}: add the buffers its fit sets to "
            "CLOSED_FORM_FITTED_BUFFERS in tests/test_contracts.py")
        assert not trainable, f"closed-form {name} has trainable parameters {trainable[:5]}"
        changed = changed_tensors(buffers, dict(detector.named_buffers()))
        unchanged = [k for k in CLOSED_FORM_FITTED_BUFFERS[name] if k not in changed]
        assert not unchanged, f"fitting {name} left its fitted buffers {unchanged} unchanged"
    else:
        # Trainable parameters only: a BatchNorm running statistic (a buffer) changes in any
        # forward pass in train mode, even when the optimiser never steps.
        assert trainable, f"{name} has no trainable parameters"
        changed = changed_tensors({k: params[k] for k in trainable},
                                  {k: after[k] for k in trainable})
        assert changed, (f"one optimiser step left all {len(trainable)} trainable parameters "
                         f"of {name} unchanged")
    frozen = [k for k in params if k not in trainable]
    moved = changed_tensors({k: params[k] for k in frozen}, {k: after[k] for k in frozen})
    assert not moved, f"training changed frozen (requires_grad=False) parameters: {moved[:5]}"


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


LOAD_ALL_SCRIPT = """
import sys, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
from anomalykit.base import Estimator
root = Path(sys.argv[1])
x = torch.load(root / "x.pt", weights_only=True)
for name in sys.argv[2:]:
    try:
        model = Estimator.load(root / f"{name}.ckpt")
        with torch.no_grad():
            out = model(x)
        torch.save({"score": out.score, "map": out.anomaly_map, "threshold": model.threshold_},
                   root / f"{name}.out.pt")
    except Exception:
        (root / f"{name}.err").write_text(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def fresh_process_round_trips(tmp_path_factory):
    """Every detector fitted one step, calibrated and saved; then ONE fresh process loads each
    checkpoint and runs it on the same input (a process start costs seconds: one per detector
    was a third of this file's time). Returns the folder and name -> (output, threshold), or
    the exception that stopped that detector before saving."""
    root = tmp_path_factory.mktemp("round_trips")
    x = images(2, seed=3)
    torch.save(x, root / "x.pt")
    expected: dict[str, tuple[AnomalyOutput, torch.Tensor] | Exception] = {}
    for name in DETECTORS:
        try:
            detector = build(name)
            fit(detector, images(4), epochs=1, max_steps=1, batch_size=4, device="cpu",
                progress=False)
            detector.calibrate(images(4, seed=2))
            with torch.no_grad():
                expected[name] = (detector.eval()(x), detector.threshold_.clone())
            detector.save(root / f"{name}.ckpt")
        except Exception as error:  # reported by that detector's test only
            expected[name] = error
    saved = [name for name in DETECTORS if not isinstance(expected[name], Exception)]
    subprocess.run([sys.executable, "-c", LOAD_ALL_SCRIPT, str(root), *saved], check=True, cwd=REPO)
    return root, expected


@pytest.mark.parametrize("name", DETECTORS)
def test_save_load_round_trip_in_fresh_process(name, fresh_process_round_trips):
    root, all_expected = fresh_process_round_trips
    expected = all_expected[name]
    if isinstance(expected, Exception):
        raise expected
    if (root / f"{name}.err").exists():
        pytest.fail(f"loading {name} in a fresh process failed:\n{(root / f'{name}.err').read_text()}")
    got = torch.load(root / f"{name}.out.pt", weights_only=True)
    out, threshold = expected
    assert torch.equal(got["score"], out.score)
    assert torch.equal(got["map"], out.anomaly_map)
    assert torch.equal(got["threshold"], threshold)


# ONNX export measured over ~5 s on 2 CPU cores (differnet ~60 s, fastflow ~18 s): in
# `make test` only, not `make test-fast`. A new detector's parity test runs in both by default.
SLOW_ONNX = {"differnet", "fastflow", "draem", "riad", "anogan", "diffusion"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_ONNX
                                  else name for name in DETECTORS])
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
