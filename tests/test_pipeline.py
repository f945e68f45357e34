"""anomalykit.pipeline: data checks before training, calibration on val, resume, evaluation."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_detector import TinyConvDetector
from torch import Tensor

import anomalykit.training
from anomalykit.benchmark.timing import time_inference
from anomalykit.data import SYNTHETIC_CATEGORIES, AnomalyDataset, generate_synthetic
from anomalykit.errors import ConfigError, DataError
from anomalykit.export.torch_predictor import TorchPredictor, load_predictor
from anomalykit.pipeline import evaluate_detector, load_split, train_detector
from anomalykit.registry import register_detector
from anomalykit.training import load_model, predict

NAME = "_pipeline_test_tiny"
CATEGORY = SYNTHETIC_CATEGORIES[0]


class SimulatedCrash(RuntimeError):
    pass


@register_detector(NAME)
class TinyDetector(TinyConvDetector):
    """``crash_at_step`` simulates a run killed in the middle of training."""

    reduction = "mean"
    crash_at_step: int | None = None
    steps_taken = 0

    def training_step(self, batch: dict) -> dict[str, Tensor]:
        cls = type(self)
        if self.training:  # validation_step reuses training_step; count optimizer steps only
            cls.steps_taken += 1
            if cls.crash_at_step is not None and cls.steps_taken >= cls.crash_at_step:
                raise SimulatedCrash("killed")
        return super().training_step(batch)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, categories=[CATEGORY], seed=0, image_size=32, n_train=12,
                       n_test_good=4, n_test_defect=4)
    return root


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  image_size: 32\n"
                    "train:\n  epochs: 2\n  batch_size: 4\n  val_fraction: 0.25\n",
                    encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_crash():
    TinyDetector.crash_at_step, TinyDetector.steps_taken = None, 0
    yield
    TinyDetector.crash_at_step, TinyDetector.steps_taken = None, 0


def train(dataset: Path, config: Path, out: Path, **kwargs):
    kwargs.setdefault("device", "cpu")
    return train_detector(NAME, root=dataset, category=CATEGORY, config=config, out_dir=out,
                          progress=False, **kwargs)


def test_load_split_validates(dataset: Path) -> None:
    train_records = load_split(dataset, CATEGORY, "train")
    test_records = load_split(dataset, CATEGORY, "test")
    assert len(train_records) == 12 and all(r.label == 0 for r in train_records)
    assert {r.label for r in test_records} == {0, 1}


def test_calibration_uses_val_images_not_test(dataset: Path, config: Path,
                                              tmp_path: Path) -> None:
    result = train(dataset, config, tmp_path)
    meta = load_model(result.checkpoint).checkpoint_meta
    assert meta["calibrated_on"] == "val"
    assert meta["n_val"] == len(result.val_records) == 3  # round(12 * 0.25)
    assert meta["n_train"] == len(result.train_records) == 9
    assert meta["seed"] == 0 and meta["config"]["model"] == {"image_size": 32}
    assert len(meta["history"]["train_loss"]) == 2
    val_paths = {r.path for r in result.val_records}
    assert val_paths.isdisjoint(r.path for r in result.train_records)
    assert val_paths.isdisjoint(r.path for r in result.test_records)
    # quantile 1.0: the threshold is exactly the highest validation score.
    val_scores = predict(result.detector, AnomalyDataset(result.val_records, 32))["scores"]
    assert float(result.detector.threshold_) == pytest.approx(float(val_scores.max()))
    assert meta["threshold"] == pytest.approx(float(val_scores.max()))


def test_no_val_images_calibrates_on_train_with_warning(dataset: Path, config: Path,
                                                         tmp_path: Path) -> None:
    result = train(dataset, config, tmp_path, overrides=["val_fraction=0"])
    assert result.meta["calibrated_on"] == "train" and result.meta["n_val"] == 0
    assert result.warnings and "training images" in result.warnings[0]
    assert result.meta["warnings"] == result.warnings


def test_resume_after_interrupted_fit(dataset: Path, config: Path, tmp_path: Path) -> None:
    steps_per_epoch = 3  # 9 train images, batch 4
    TinyDetector.crash_at_step = 2 * steps_per_epoch + 2  # dies inside epoch 3 of 4
    with pytest.raises(SimulatedCrash):
        train(dataset, config, tmp_path / "run", overrides=["epochs=4"])
    assert (tmp_path / "run" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "model.ckpt").exists()

    TinyDetector.crash_at_step = None
    resumed = train(dataset, config, tmp_path / "run", overrides=["epochs=4"], resume=True)
    assert len(resumed.history["train_loss"]) == 4
    assert resumed.history["epochs_run"] == 4
    assert resumed.meta["history"]["epochs_run"] == 4

    # Epoch reseeding + saved optimizer state: the same numbers as an uninterrupted run.
    straight = train(dataset, config, tmp_path / "straight", overrides=["epochs=4"])
    np.testing.assert_allclose(resumed.meta["history"]["train_loss"],
                               straight.meta["history"]["train_loss"], rtol=1e-5)


def test_bad_test_image_fails_before_training(dataset: Path, config: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    bad = next((root / CATEGORY / "test").rglob("*.png"))
    bad.write_bytes(b"\x89PNG broken")
    @functools.wraps(anomalykit.training.fit)  # keeps the signature config.py inspects
    def no_fit(*args, **kwargs):
        pytest.fail("training started on bad data")

    monkeypatch.setattr(anomalykit.training, "fit", no_fit)
    with pytest.raises(DataError, match=str(bad.name)):
        train(root, config, tmp_path / "out")


def test_unknown_detector_is_reported_before_config(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown detector 'nope'"):
        train_detector("nope", root=dataset, category=CATEGORY, out_dir=tmp_path)


def test_run_options_are_not_config_keys(dataset: Path, config: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--out"):
        train(dataset, config, tmp_path, overrides=[f"train.out_dir={tmp_path}"])


def test_evaluate_detector_metrics(dataset: Path, config: Path, tmp_path: Path) -> None:
    result = train(dataset, config, tmp_path)
    evaluation = evaluate_detector(result.detector, result.test_records, progress=False)
    metrics = evaluation.metrics
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "f1_max", "f1_at_threshold",
                "fpr_good", "threshold"):
        assert key in metrics, key
    assert metrics["n_test"] == 8 and metrics["n_good"] == 4 and metrics["n_defect"] == 4
    assert metrics["threshold"] == pytest.approx(float(result.detector.threshold_))
    assert evaluation.predictions["maps"].shape == (8, 32, 32)
    assert evaluation.ms_per_image > 0
    # The (root, category) form loads and validates the test split itself.
    again = evaluate_detector(result.detector, (str(dataset), CATEGORY), progress=False)
    assert again.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])


def test_evaluate_without_masks_skips_pixel_metrics(dataset: Path, config: Path,
                                                    tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    shutil.rmtree(root / CATEGORY / "ground_truth")
    result = train(root, config, tmp_path / "out")
    metrics = evaluate_detector(result.detector, result.test_records, progress=False).metrics
    assert "pixel_auroc" not in metrics and "image_auroc" in metrics


def test_torch_predictor_matches_onnx(dataset: Path, config: Path, tmp_path: Path) -> None:
    from anomalykit.export import export_onnx

    result = train(dataset, config, tmp_path)
    onnx_path = export_onnx(result.detector, tmp_path / "model.onnx")
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    torch_out = load_predictor(result.checkpoint, device="cpu").predict(frames)
    onnx_out = load_predictor(onnx_path, device="cpu").predict(frames)
    assert torch_out["anomaly_map"].shape == (2, 1, 40, 48)
    for key in ("score", "normalized_score", "anomaly_map"):
        np.testing.assert_allclose(torch_out[key], onnx_out[key], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(torch_out["label"], onnx_out["label"])
    assert time_inference(TorchPredictor(result.detector, "cpu"), list(frames), warmup=1) > 0


def test_load_predictor_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_predictor(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(ConfigError, match="broken.onnx"):
        load_predictor(broken, device="cpu")


def test_profile_sets_the_image_cache_folder(dataset: Path, config: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "image_cache"
    train(dataset, config, tmp_path / "run", overrides=[f"cache_dir={cache_dir}"])
    # 12 training images (train + val), each decoded and resized once, kept for the next run
    assert len(list(cache_dir.glob("*/*.npz")) + list(cache_dir.glob("*.npz"))) == 12
