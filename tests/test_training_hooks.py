"""The loop's hooks, schedulers, manual optimization, precision and exact resume after SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from anomalykit.base import Estimator
from anomalykit.errors import ConfigError, TrainingError
from anomalykit.training import fit
from anomalykit.training.trainer import move_to_device


def data(n=16, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


class Recon(Estimator):
    """A one-conv reconstruction model that records what the loop calls."""

    def __init__(self, lr: float = 0.05, schedule: str = "none"):
        super().__init__()
        self.lr, self.schedule = lr, schedule
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.calls: list = []

    def setup_fit(self, train_data, val_data, *, batch_size, num_workers, progress):
        self.calls.append(("setup_fit", len(train_data)))
        return train_data[: len(train_data) // 2], val_data  # the loop must iterate this

    def training_step(self, batch):
        self.calls.append(("step", self.global_step, len(batch["image"])))
        return {"loss": (self.conv(batch["image"]) - batch["image"]).pow(2).mean()}

    def on_after_optimizer_step(self, step):
        self.calls.append(("after", step))

    def on_train_epoch_end(self, epoch, epochs, *, out_dir=None):
        self.calls.append(("epoch_end", epoch, epochs, out_dir))

    def on_fit_end(self, train_data):
        self.calls.append(("end", len(train_data)))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.schedule == "none":
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizers": opt, "schedulers": sched, "interval": self.schedule}


def test_hooks_are_called_in_order_with_the_right_data():
    model = Recon()
    history = fit(model, data(16), epochs=2, batch_size=4, progress=False, device="cpu")
    assert model.calls[0] == ("setup_fit", 16)
    steps = [c for c in model.calls if c[0] == "step"]
    assert len(steps) == 4 == history["steps"]  # 8 images (setup_fit's half) / 4 per batch x 2
    assert [c[1] for c in steps] == [0, 1, 2, 3]  # global_step = steps done before this one
    assert [c[1] for c in model.calls if c[0] == "after"] == [1, 2, 3, 4]
    assert model.calls[-1] == ("end", 16)  # the ORIGINAL train data
    assert history["setup_seconds"] >= 0 and history["seconds"] >= history["setup_seconds"]
    ends = [c for c in model.calls if c[0] == "epoch_end"]
    assert ends == [("epoch_end", 0, 2, None), ("epoch_end", 1, 2, None)]
    assert model.calls.index(ends[0]) < model.calls.index(steps[2])  # after epoch 0's steps


def test_epoch_end_gets_the_run_folder_and_the_bar_shows_every_loss(tmp_path):
    from anomalykit.training.trainer import loss_info

    model = Recon()
    fit(model, data(8), epochs=1, batch_size=4, progress=False, device="cpu", out_dir=tmp_path)
    assert [c[3] for c in model.calls if c[0] == "epoch_end"] == [tmp_path]
    # "loss" first, then the other players' losses, at most four
    logs = {"d_loss": 0.5, "loss": 1.25, "g_loss": 0.75, "adv": 1.0, "con": 2.0}
    assert loss_info(logs) == "loss 1.25 d_loss 0.5 g_loss 0.75 adv 1"
    assert loss_info({"d_loss": 0.5}) == "d_loss 0.5"


@pytest.mark.parametrize("interval, scheduler_steps", [("epoch", 3), ("step", 6)])
def test_schedulers_step_per_interval_and_resume_exactly(tmp_path, interval, scheduler_steps):
    # 8 images -> 4 after setup_fit -> 2 steps of 2 per epoch, 3 epochs
    torch.manual_seed(0)
    straight = Recon(schedule=interval)
    fit(straight, data(8), epochs=3, batch_size=2, seed=1, progress=False, device="cpu")

    torch.manual_seed(0)
    first = Recon(schedule=interval)
    fit(first, data(8), epochs=1, batch_size=2, seed=1, out_dir=tmp_path, progress=False, device="cpu")
    torch.manual_seed(5)  # a fresh process starts from other weights
    resumed = Recon(schedule=interval)
    fit(resumed, data(8), epochs=3, batch_size=2, seed=1, out_dir=tmp_path, resume=True,
        progress=False, device="cpu")
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    training = torch.load(tmp_path / "last.ckpt", weights_only=True)["training"]
    assert training["schedulers"][0]["last_epoch"] == scheduler_steps
    lr = training["optimizers"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.05 * 0.5 ** scheduler_steps)


class TwoOptimizers(Estimator):
    """Manual optimization: alternate two optimizers on two halves of the model, as GANs do."""

    manual_optimization = True

    def __init__(self, lr: float = 0.05, validate: bool = True):
        super().__init__()
        self.lr = lr
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def loss(self, x):
        return (self.b(self.a(x)) - x).pow(2).mean()

    def training_step(self, batch, optimizers):
        opt_a, opt_b = optimizers
        x = batch["image"].flatten(1)[:, :4]
        opt = opt_a if self.global_step % 2 == 0 else opt_b
        opt.zero_grad(set_to_none=True)
        loss = self.loss(x)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def configure_optimizers(self):
        return [torch.optim.Adam(self.a.parameters(), lr=self.lr),
                torch.optim.Adam(self.b.parameters(), lr=self.lr)]


class TwoOptimizersValidated(TwoOptimizers):
    @torch.no_grad()
    def validation_step(self, batch):
        return {"loss": self.loss(batch["image"].flatten(1)[:, :4])}


def test_manual_optimization_alternates_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    straight = TwoOptimizersValidated()
    fit(straight, data(), data(4, seed=1), epochs=4, batch_size=4, progress=False, device="cpu")
    torch.manual_seed(0)
    interrupted = TwoOptimizersValidated()
    fit(interrupted, data(), data(4, seed=1), epochs=2, batch_size=4, out_dir=tmp_path,
        progress=False, device="cpu")
    assert len(torch.load(tmp_path / "last.ckpt", weights_only=True)["training"]["optimizers"]) == 2
    torch.manual_seed(3)
    resumed = TwoOptimizersValidated()
    history = fit(resumed, data(), data(4, seed=1), epochs=4, batch_size=4, out_dir=tmp_path,
                  resume=True, progress=False, device="cpu")
    assert len(history["val_loss"]) == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_manual_optimization_refuses_what_it_cannot_honour():
    with pytest.raises(ConfigError, match="grad_clip is not applied under manual optimization"):
        fit(TwoOptimizers(), data(), epochs=1, grad_clip=1.0, progress=False)
    with pytest.raises(ConfigError, match="implement validation_step"):
        fit(TwoOptimizers(), data(), data(4), epochs=1, progress=False)
    with pytest.raises(ConfigError, match="fp16"):
        fit(TwoOptimizers(), data(), epochs=1, precision="fp16", progress=False)


def test_several_optimizers_in_automatic_mode_are_an_error():
    class Auto(TwoOptimizers):
        manual_optimization = False

    with pytest.raises(ConfigError, match="several optimizers need manual optimization"):
        fit(Auto(), data(), epochs=1, progress=False)


def test_precision_option():
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        fit(Recon(), data(), epochs=1, precision="half", progress=False)
    model = Recon()
    history = fit(model, data(), epochs=1, batch_size=4, precision="bf16", progress=False, device="cpu")
    assert np.isfinite(history["train_loss"][0]["loss"])
    assert model.conv.weight.dtype == torch.float32  # autocast, not a cast of the weights


def test_move_to_device_is_recursive():
    Pair = namedtuple("Pair", "x y")
    batch = {"image": torch.zeros(2), "features": [torch.zeros(1), (torch.zeros(1), Pair(torch.zeros(1), 3))],
             "nested": {"a": torch.zeros(1)}, "path": ["a.png"]}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["image"].is_meta and moved["features"][0].is_meta
    assert moved["features"][1][0].is_meta and moved["features"][1][1].x.is_meta
    assert isinstance(moved["features"][1][1], Pair) and moved["features"][1][1].y == 3
    assert moved["nested"]["a"].is_meta and moved["path"] == ["a.png"]


def test_closed_form_needs_solve():
    class NoSolve(Estimator):
        closed_form = True

    with pytest.raises(ConfigError, match="does not implement solve"):
        fit(NoSolve(), data(), progress=False)


def test_closed_form_solve_reports_progress_and_the_train_loss_is_on_a_subset(monkeypatch):
    """solve gets the progress callback; the history's train loss covers an evenly spaced
    subset of at most CLOSED_FORM_TRAIN_LOSS_IMAGES training images."""
    import anomalykit.training.trainer as trainer

    class MeanModel(Estimator):
        closed_form = True

        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(()))
            self.reports, self.loss_inputs = [], 0

        def solve(self, images, *, seed, progress=None):
            for done in (5, 10):
                progress("stage", done, 10)
                self.reports.append(done)
            self.mean.fill_(float(images.mean()))

        def per_sample_loss(self, images):
            self.loss_inputs += len(images)
            return (images.flatten(1).mean(1) - self.mean).abs()

    monkeypatch.setattr(trainer, "CLOSED_FORM_TRAIN_LOSS_IMAGES", 6)
    model = MeanModel()
    history = fit(model, data(40), data(4, seed=1), batch_size=8, progress=False)
    assert model.reports == [5, 10]
    assert history["train_loss_images"] == 6 and model.loss_inputs == 6 + 4
    images = data(40)
    subset = images[torch.linspace(0, 39, 6).round().long()]
    expected = (subset.flatten(1).mean(1) - images.mean()).abs().mean()
    assert history["train_loss"][0]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_no_model_overrides_fit():
    import anomalykit.registry as registry

    offenders = []
    for kind, names in (("detector", registry.list_detectors()), ("generative", registry.list_generative())):
        for name in names:
            cls = registry.get_class(name, kind)
            for klass in cls.__mro__:
                if klass is Estimator:
                    break
                if "fit" in klass.__dict__:
                    offenders.append(f"{kind} {name}: {klass.__name__}.fit")
    assert not offenders, offenders


# -- SIGKILL in the middle of an epoch, then resume ------------------------------------------
SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import cv2, numpy as np, torch
    from torch import nn
    from anomalykit.base import Estimator
    from anomalykit.data import AnomalyDataset
    from anomalykit.data.records import ImageRecord
    from anomalykit.training import fit

    torch.set_num_threads(1)
    images_dir, out_dir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Model(Estimator):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.register_buffer("ema_", torch.zeros(3, 3, 3, 3))

        def training_step(self, batch):
            if self.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            x = batch["image"]
            return {"loss": (self.conv(x) - x).pow(2).mean()}

        def on_after_optimizer_step(self, step):
            with torch.no_grad():
                self.ema_.mul_(0.9).add_(0.1 * self.conv.weight)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
            return {"optimizers": opt,
                    "schedulers": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)}

    paths = sorted(os.path.join(images_dir, f) for f in os.listdir(images_dir))
    records = [ImageRecord(path=p, label=0, defect_type="good") for p in paths]
    dataset = AnomalyDataset(records, 16, augment=True, seed=0)
    torch.manual_seed(0)
    model = Model()
    fit(model, dataset, epochs=4, batch_size=3, seed=7, out_dir=out_dir, resume=True,
        progress=False, device="cpu")
    torch.save(model.state_dict(), os.path.join(out_dir, "final.pt"))
''')


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):  # 3 batches per epoch
        cv2.imwrite(str(images / f"{i:03d}.png"), rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)

    def run(out, kill_at):
        return subprocess.run([sys.executable, str(script), str(images), str(out), str(kill_at)],
                              capture_output=True, text=True, timeout=300)

    straight = run(tmp_path / "straight", -1)
    assert straight.returncode == 0, straight.stderr
    killed = run(tmp_path / "killed", 7)  # epoch 3 (0-based 2), its second batch
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert state["training"]["history"]["epochs_run"] == 2
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = run(tmp_path / "killed", -1)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resuming_a_finished_run_does_not_train_further(tmp_path):
    model = Recon()
    fit(model, data(16), epochs=3, max_steps=3, batch_size=4, out_dir=tmp_path, progress=False,
        device="cpu")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = Recon()
    history = fit(again, data(16), epochs=3, max_steps=3, batch_size=4, out_dir=tmp_path,
                  resume=True, progress=False, device="cpu")
    assert history["steps"] == 3
    for key, value in weights.items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_resume_with_other_optimizers_is_a_clear_error(tmp_path):
    fit(Recon(), data(8), epochs=1, batch_size=4, out_dir=tmp_path, progress=False, device="cpu")
    with pytest.raises(TrainingError, match=r"last.ckpt was written with other optimizers"):
        fit(Recon(schedule="epoch"), data(8), epochs=2, batch_size=4, out_dir=tmp_path, resume=True,
            progress=False, device="cpu")


def test_bad_loop_options_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="grad_clip must be > 0"):
        fit(Recon(), data(), epochs=1, grad_clip=-1.0, progress=False)
    with pytest.raises(ConfigError, match="early_stopping_patience must be >= 1"):
        fit(Recon(), data(), data(4), epochs=1, early_stopping_patience=0, progress=False)
    with pytest.raises(ConfigError, match="resume=True needs out_dir"):
        fit(Recon(), data(), epochs=1, resume=True, progress=False)
