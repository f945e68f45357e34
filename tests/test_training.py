"""The training loop: NaN guard, atomic checkpoints, exact resume, early stopping, devices."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from anomalykit.base import AnomalyOutput, Detector, Estimator
from anomalykit.errors import ConfigError, TrainingError
from anomalykit.registry import register_detector
from anomalykit.training import fit, load_model, resolve_device, save_checkpoint
from anomalykit.training.checkpoint import atomic_write, read_checkpoint


@register_detector("_training_test_linear")
class LinearDetector(Detector):
    """A one-conv reconstruction detector; ``nan_after`` makes the loss NaN from that step on."""

    def __init__(self, image_size: int = 8, *, lr: float = 0.05, nan_after: int | None = None):
        super().__init__()
        self.image_size, self.lr, self.nan_after = image_size, lr, nan_after
        self.set_normalization("none")
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.steps = 0

    def training_step(self, batch):
        self.steps += 1
        loss = (self.conv(batch["image"]) - batch["image"]).pow(2).mean()
        if self.nan_after is not None and self.steps > self.nan_after:
            loss = loss * float("nan")
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def forward(self, images):
        amap = (self.conv(images) - images).pow(2).mean(1, keepdim=True)
        return AnomalyOutput(amap.flatten(1).amax(1), amap)


def data(n=16, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_nan_loss_is_a_clear_error(tmp_path):
    model = LinearDetector(nan_after=3)
    with pytest.raises(TrainingError, match=r"loss 'loss' became nan at epoch 1, step 3"):
        fit(model, data(), epochs=2, batch_size=4, out_dir=tmp_path, progress=False, device="cpu")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    straight = LinearDetector()
    fit(straight, data(), epochs=4, batch_size=4, seed=3, progress=False, device="cpu")

    torch.manual_seed(0)
    interrupted = LinearDetector()
    fit(interrupted, data(), epochs=2, batch_size=4, seed=3, out_dir=tmp_path, progress=False,
        device="cpu")
    torch.manual_seed(99)  # a fresh process would start from other random weights
    resumed = LinearDetector()
    history = fit(resumed, data(), epochs=4, batch_size=4, seed=3, out_dir=tmp_path, resume=True,
                  progress=False, device="cpu")
    assert history["epochs_run"] == 4 and len(history["train_loss"]) == 4
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-7), key


class SizedDetector(LinearDetector):
    """LinearDetector with a buffer whose shape is only known once it has seen data."""

    def __init__(self, image_size: int = 8, *, lr: float = 0.05):
        super().__init__(image_size, lr=lr)
        self.register_buffer("channel_mean_", torch.zeros(0))

    def training_step(self, batch):
        self.channel_mean_ = batch["image"].mean((0, 2, 3))  # (0,) -> (3,)
        return super().training_step(batch)


def test_resume_resizes_fit_sized_buffers(tmp_path):
    fit(SizedDetector(), data(), epochs=1, batch_size=4, out_dir=tmp_path, progress=False,
        device="cpu")
    resumed = SizedDetector()
    history = fit(resumed, data(), epochs=2, batch_size=4, out_dir=tmp_path, resume=True,
                  progress=False, device="cpu")
    assert history["epochs_run"] == 2 and resumed.channel_mean_.shape == (3,)


def test_early_stopping_restores_best_weights():
    model = LinearDetector(lr=0.05)
    # validation on different data so that the loss plateaus; patience 1 must stop early
    history = fit(model, data(), data(8, seed=1), epochs=200, batch_size=4, progress=False,
                  early_stopping_patience=1, device="cpu")
    assert history["stopped_early"]
    assert history["epochs_run"] < 200
    assert history["best_epoch"] == history["epochs_run"] - 2


def test_early_stopping_needs_validation_data():
    with pytest.raises(ConfigError, match="needs validation data"):
        fit(LinearDetector(), data(), epochs=1, early_stopping_patience=2, progress=False)


def test_checkpoint_round_trip_and_weights_only(tmp_path):
    model = LinearDetector(image_size=8, lr=0.01)
    model.calibrate(data(4))
    path = save_checkpoint(tmp_path / "m.ckpt", model, meta={"category": "x"})
    loaded = load_model(path)
    assert type(loaded) is LinearDetector and loaded.config == model.config
    assert loaded.checkpoint_meta == {"category": "x"}
    assert torch.equal(loaded.threshold_, model.threshold_)
    # a pickle that would run code is refused by weights_only loading
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(EvilPayload()))
    with pytest.raises(TrainingError, match="cannot read checkpoint .*evil.ckpt"):
        read_checkpoint(evil)
    with pytest.raises(TrainingError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(TrainingError, match="not an anomalykit checkpoint"):
        read_checkpoint(other)


class EvilPayload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("old")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_config_is_recorded_from_constructor_arguments():
    model = LinearDetector(4, lr=0.5)
    assert model.config == {"image_size": 4, "lr": 0.5, "nan_after": None}

    class NotPlain(Estimator):
        def __init__(self, thing=None):
            super().__init__()

    with pytest.raises(ConfigError, match="not a plain value"):
        NotPlain(thing=object())


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_device("tpu")
