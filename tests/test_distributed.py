"""Data-parallel training with torchrun: 2 real CPU processes on the gloo backend.

One torchrun launch (module fixture, ~15 s on 2 shared cores: marked slow) runs every in-loop
scenario, each process writing what it saw to a folder; the tests compare the ranks with each
other and with single-process runs done here. A second launch runs ``python -m anomalykit
train`` end to end.

Tolerances: two processes with batch b average the gradients of two b-image means, which is
the gradient of the 2b-image mean one process computes, but summed in another order; float32
rounding (~1e-7 relative) then goes through a few Adam steps, so losses and weights are
compared at 1e-5 (relative for losses, absolute for weights of magnitude ~0.3). Measured
(3 epochs of the curve scenario, CPU): the two runs differ by at most 3e-8 in any weight and
1.1e-7 relative in any training or validation loss, while one process merely shuffling with
another seed differs by 5e-3 relative in the first epoch's loss and 1.5e-2 in the weights: a
rank seeing the wrong shard, unaveraged gradients or a missed step would show.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from anomalykit.base import Estimator
from anomalykit.training import distributed, fit, load_model
from anomalykit.training.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT = 180


def data(n=16, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


class TinyAE(Estimator):
    """Conv -> ReLU -> conv reconstruction: a deterministic training step."""

    def __init__(self, lr: float = 0.02):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 3, 3, padding=1))
        self.unused = nn.Linear(2, 2)  # optimised but never in a step (a VQ-VAE's prior)

    def training_step(self, batch):
        x = batch["image"]
        return {"loss": (self.net(x) - x).pow(2).mean()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DataInit(TinyAE):
    """Sets a parameter from its first batch (as ActNorm does in the flows)."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(3, 1, 1))
        self.register_buffer("initialized_", torch.tensor(False))

    def training_step(self, batch):
        x = batch["image"]
        if not bool(self.initialized_):
            self.shift.data.copy_(x.mean((0, 2, 3))[:, None, None])
            self.initialized_.fill_(True)
        return {"loss": (self.net(x - self.shift) - x).pow(2).mean()}


class TwoPlayers(Estimator):
    """Manual optimisation with two optimizers stepped in turn (a GAN's shape, no noise)."""

    manual_optimization = True

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def training_step(self, batch, optimizers):
        x = batch["image"]
        opt_a, opt_b = optimizers
        loss_a = (self.a(x) - x).pow(2).mean()
        opt_a.zero_grad()
        loss_a.backward()
        opt_a.step()
        loss_b = (self.b(self.a(x).detach()) - x).pow(2).mean()
        opt_b.zero_grad()
        loss_b.backward()
        opt_b.step()
        return {"loss": loss_b.detach(), "loss_a": loss_a.detach()}

    def configure_optimizers(self):
        return [torch.optim.Adam(self.a.parameters(), lr=0.02),
                torch.optim.SGD(self.b.parameters(), lr=0.1, momentum=0.9)]


# Each process: writes OUT/<scenario>_rank<r>.pt (state dict + history) for the test to compare.
# The worker imports this module for the models and data above.
WORKER = '''
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from test_distributed import DataInit, TinyAE, TwoPlayers, data
from anomalykit.errors import TrainingError
from anomalykit.generative.gan import GAN
from anomalykit.generative.pca import PCA
from anomalykit.training import distributed, fit

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])


def save(name, model, history):
    torch.save({"state": model.state_dict(), "history": history}, out / f"{name}_rank{rank}.pt")


torch.manual_seed(0)
model = TinyAE()
history = fit(model, data(), epochs=1, max_steps=1, batch_size=4, seed=3, progress=False,
              device="cpu")
save("one_step", model, history)

torch.manual_seed(0)
model = TinyAE()
history = fit(model, data(), data(6, seed=1), epochs=3, batch_size=4, seed=3, progress=False,
              device="cpu")
save("curve", model, history)

# 2 epochs into a run folder, then a fresh model resumed to 3: must equal "curve".
torch.manual_seed(0)
fit(TinyAE(), data(), data(6, seed=1), epochs=2, batch_size=4, seed=3, progress=False,
    device="cpu", out_dir=out / "run")
torch.manual_seed(rank + 10)  # other random weights on each process: the checkpoint decides
model = TinyAE()
history = fit(model, data(), data(6, seed=1), epochs=3, batch_size=4, seed=3, progress=False,
              device="cpu", out_dir=out / "run", resume=True)
save("resumed", model, history)

torch.manual_seed(0)
model = TinyAE()
history = fit(model, data(), data(6, seed=1), epochs=6, batch_size=4, seed=3, progress=False,
              device="cpu", early_stopping_patience=1)
save("early", model, history)

# One image is NaN: the process that gets it must not leave the other waiting in backward.
bad = data()
bad[5] = float("nan")
try:
    fit(TinyAE(), bad, epochs=1, batch_size=4, seed=3, progress=False, device="cpu")
except TrainingError as exc:
    (out / f"nan_rank{rank}.txt").write_text(str(exc))

torch.manual_seed(0)
model = DataInit()
history = fit(model, data(), epochs=1, batch_size=4, seed=3, progress=False, device="cpu")
save("data_init", model, history)

pca = PCA(4)
history = fit(pca, data(12).flatten(1), epochs=1, batch_size=4, progress=False, device="cpu",
              out_dir=out / "pca")
save("pca", pca, history)

torch.manual_seed(0)
model = TwoPlayers()
history = fit(model, data(), epochs=2, batch_size=4, seed=3, progress=False, device="cpu")
save("manual", model, history)

torch.manual_seed(0)
gan = GAN(dim=2, latent_dim=2, hidden=16, layers=1)
points = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
history = fit(gan, points, epochs=2, batch_size=8, seed=3, progress=False, device="cpu",
              out_dir=out / "gan")
save("gan", gan, history)
(out / f"done_rank{rank}").write_text(f"{distributed.world_size()} {distributed.rank()}")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on 127.0.0.1 with a free port; fails with its output."""
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun_bin)] if torchrun_bin.exists() else [sys.executable, "-m",
                                                                   "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    command = [*launcher, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *args]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun then stops its workers (each in its own session)
        # instead of leaving them hung in a collective.
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT} s:\n{stdout}\n{stderr}")
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert result.returncode == 0, f"torchrun failed:\n{stdout}\n{stderr}"
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's outputs, after one 2-process launch."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    result = torchrun([str(script), str(out), str(Path(__file__).parent)], cwd=out)
    for r in (0, 1):  # each process ran to the end and knew its place
        assert (out / f"done_rank{r}").read_text() == f"2 {r}", result.stderr
    return out


def both(out: Path, name: str) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0.0, atol=atol), (
            key, float((a[key] - b[key]).abs().max()))


def single(model: Estimator, **options) -> dict:
    """The same fit in this one process (no process group)."""
    assert distributed.world_size() == 1
    return fit(model, progress=False, device="cpu", **options)


@pytest.mark.slow
def test_weights_are_identical_on_both_ranks_after_one_step(ranks):
    zero, one = both(ranks, "one_step")
    assert zero["history"]["steps"] == one["history"]["steps"] == 1
    assert_same_weights(zero["state"], one["state"])  # bit for bit
    torch.manual_seed(0)
    start = TinyAE().state_dict()
    assert any(not torch.equal(start[k], zero["state"][k]) for k in start)  # it did step
    # ... and the step is the one a single process takes with the global batch (2 x 4).
    torch.manual_seed(0)
    model = TinyAE()
    single(model, train_data=data(), epochs=1, max_steps=1, batch_size=8, seed=3)
    assert_same_weights(model.state_dict(), zero["state"], atol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_global_batch(ranks):
    zero, one = both(ranks, "curve")
    assert_same_weights(zero["state"], one["state"])
    assert zero["history"]["train_loss"] == one["history"]["train_loss"]
    assert zero["history"]["val_loss"] == one["history"]["val_loss"]
    torch.manual_seed(0)
    model = TinyAE()
    history = single(model, train_data=data(), val_data=data(6, seed=1), epochs=3,
                     batch_size=8, seed=3)
    two = zero["history"]
    assert two["steps"] == history["steps"] == 6  # 16 images / (2 x 4) per step x 3 epochs
    assert [e["loss"] for e in two["train_loss"]] == pytest.approx(
        [e["loss"] for e in history["train_loss"]], rel=1e-5)
    assert two["val_loss"] == pytest.approx(history["val_loss"], rel=1e-5)
    assert two["best_epoch"] == history["best_epoch"]
    assert_same_weights(model.state_dict(), zero["state"], atol=1e-5)


@pytest.mark.slow
def test_only_rank_zero_writes_and_a_resume_continues_the_run(ranks):
    run = ranks / "run"
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt"]  # no temporary leftovers
    saved = read_checkpoint(run / "last.ckpt")
    assert saved["training"]["history"]["epochs_run"] == 3
    resumed, resumed_one = both(ranks, "resumed")
    curve, _ = both(ranks, "curve")
    assert_same_weights(resumed["state"], resumed_one["state"])
    assert_same_weights(resumed["state"], curve["state"])  # = the uninterrupted 3 epochs
    assert resumed["history"]["train_loss"] == curve["history"]["train_loss"]


@pytest.mark.slow
def test_early_stopping_takes_the_same_decision_everywhere(ranks):
    zero, one = both(ranks, "early")
    torch.manual_seed(0)
    model = TinyAE()
    history = single(model, train_data=data(), val_data=data(6, seed=1), epochs=6, batch_size=8,
                     seed=3, early_stopping_patience=1)
    assert history["stopped_early"] and history["epochs_run"] < 6  # the scenario stops early
    for key in ("stopped_early", "epochs_run", "best_epoch", "steps"):
        assert zero["history"][key] == one["history"][key] == history[key], key
    assert_same_weights(zero["state"], one["state"])  # the best epoch's, restored on both
    assert_same_weights(model.state_dict(), zero["state"], atol=1e-5)


@pytest.mark.slow
def test_a_nan_on_one_process_stops_both_with_the_same_error(ranks):
    zero, one = ((ranks / f"nan_rank{r}.txt").read_text() for r in (0, 1))
    assert zero == one
    assert "became nan (mean over 2 processes) at epoch 1" in zero


@pytest.mark.slow
def test_parameters_set_from_the_first_batch_agree_across_ranks(ranks):
    zero, one = both(ranks, "data_init")
    assert bool(zero["state"]["initialized_"])
    assert_same_weights(zero["state"], one["state"])


@pytest.mark.slow
def test_a_closed_form_model_solves_once_per_rank_and_rank_zero_saves(ranks):
    from anomalykit.generative.pca import PCA

    zero, one = both(ranks, "pca")
    assert_same_weights(zero["state"], one["state"])
    alone = PCA(4)
    single(alone, train_data=data(12).flatten(1), epochs=1, batch_size=4)
    assert_same_weights(alone.state_dict(), zero["state"], atol=1e-5)
    assert sorted(p.name for p in (ranks / "pca").iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_manual_optimization_averages_every_optimizers_gradients(ranks):
    zero, one = both(ranks, "manual")
    assert_same_weights(zero["state"], one["state"])
    torch.manual_seed(0)
    model = TwoPlayers()
    history = single(model, train_data=data(), epochs=2, batch_size=8, seed=3)
    assert [e["loss_a"] for e in zero["history"]["train_loss"]] == pytest.approx(
        [e["loss_a"] for e in history["train_loss"]], rel=1e-5)
    assert_same_weights(model.state_dict(), zero["state"], atol=1e-5)


@pytest.mark.slow
def test_a_toolkit_gan_trains_data_parallel(ranks):
    zero, one = both(ranks, "gan")
    assert_same_weights(zero["state"], one["state"])
    assert zero["history"]["epochs_run"] == 2 and zero["history"]["steps"] == 4  # 32 / (2 x 8)
    # Rank 0 alone wrote the checkpoint and the epoch pictures.
    assert sorted(p.name for p in (ranks / "gan").iterdir()) == ["last.ckpt", "samples"]
    assert len(list((ranks / "gan" / "samples").iterdir())) == 2


def test_single_process_has_no_process_group():
    model = TinyAE()
    single(model, train_data=data(8), epochs=1, batch_size=4)
    assert not torch.distributed.is_initialized()


def test_a_backend_name_is_checked_even_in_one_process():
    from anomalykit.errors import ConfigError

    with pytest.raises(ConfigError, match="backend must be one of nccl, gloo; got 'mpi'"):
        single(TinyAE(), train_data=data(8), epochs=1, distributed_backend="mpi")


def test_sync_batchnorm_round_trip_keeps_classes_and_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    weight = model[1].weight
    originals = distributed.to_sync_batchnorm(model)
    assert originals == [nn.BatchNorm2d, nn.BatchNorm1d]
    assert type(model[1]) is nn.SyncBatchNorm and model[1].weight is weight
    distributed.from_sync_batchnorm(model, originals)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is nn.BatchNorm1d
    assert model[1].weight is weight


@pytest.mark.slow
def test_torchrun_anomalykit_train_end_to_end(tmp_path):
    from anomalykit.data import generate_synthetic

    root = tmp_path / "data"
    generate_synthetic(root, categories=["weave"], seed=0, image_size=32, n_train=12,
                       n_test_good=4, n_test_defect=4)
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  image_size: 32\n  latent_dim: 8\n  widths: [8, 8]\n"
                      "  strides: [2, 2]\n  batch_norm: true\ntrain:\n  epochs: 2\n  batch_size: 4\n"
                      "  val_fraction: 0.25\ncalibrate:\n  quantile: 1.0\n", encoding="utf-8")
    out = tmp_path / "run"
    result = torchrun(["-m", "anomalykit", "train", "ae", "--root", str(root), "--category",
                       "weave", "--config", str(config), "--out", str(out), "--device", "cpu"],
                      cwd=tmp_path)
    # One progress bar per stage (rank 0's), one checkpoint of each kind.
    assert result.stderr.count("train ae") == 1 and result.stderr.count("calibrate") == 1, (
        result.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["last.ckpt", "model.ckpt"]
    assert result.stdout.count("saved model to") == 1, result.stdout  # rank 0 reports
    model = load_model(out / "model.ckpt")
    history = model.checkpoint_meta["history"]
    assert model.checkpoint_meta["n_train"] == 9 and bool(model.calibrated_)
    assert history["epochs_run"] == 2
    scores = model(torch.rand(2, 3, 32, 32)).score
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert json.dumps(model.checkpoint_meta["history"])  # plain values
