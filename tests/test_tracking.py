"""anomalykit.tracking: a tiny training logged to a real MLflow file store and to real
TensorBoard event files, read back with each tool's own reader; off by default; a failing
backend never stops training; a missing package names the extra to install."""

from __future__ import annotations

import inspect
import json
import pickle
import sys
import textwrap
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from tiny_detector import TinyConvDetector
from torch import Tensor

from anomalykit.benchmark import report
from anomalykit.data import SYNTHETIC_CATEGORIES, AnomalyDataset, generate_synthetic, scan_mvtec
from anomalykit.errors import ConfigError
from anomalykit.pipeline import evaluate_detector
from anomalykit.registry import register_detector
from anomalykit.tracking import (
    NO_RUN,
    TrackingConfig,
    TrackingWarning,
    flatten,
    resolve_tracking,
    start_parent_run,
    start_run,
    track_run,
)

NAME = "_tracking_test_tiny"
CATEGORY = SYNTHETIC_CATEGORIES[0]
EPOCHS = 2
CONFIG = {"model": {"image_size": 32, "lr": 0.01},
          "train": {"epochs": EPOCHS, "batch_size": 4, "seed": 0}}


class Crash(RuntimeError):
    pass


@register_detector(NAME)
class TinyDetector(TinyConvDetector):
    """``crash_at_step``: training raises there (a run that dies half-way)."""

    reduction = "mean"
    crash_at_step: int | None = None

    def training_step(self, batch: dict) -> dict[str, Tensor]:
        if self.training and self.crash_at_step is not None and self.global_step >= self.crash_at_step:
            raise Crash("killed")
        return super().training_step(batch)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, categories=[CATEGORY], seed=0, image_size=32, n_train=12,
                       n_test_good=4, n_test_defect=4)
    return root


def tracked_training(tracking: TrackingConfig | None, dataset: Path, out: Path, *,
                     crash_at_step: int | None = None) -> dict:
    """What the pipeline does with a run (train_detector + evaluate): every epoch through
    fit's callback, the config, the calibration, the test metrics and the files."""
    train = [r for r in scan_mvtec(dataset, CATEGORY, "train") if r.label == 0]
    test = scan_mvtec(dataset, CATEGORY, "test")
    model = TinyDetector(**CONFIG["model"])
    model.crash_at_step = crash_at_step
    with track_run(tracking, f"{NAME}/{CATEGORY}", config=CONFIG,
                   tags={"detector": NAME, "category": CATEGORY}) as run:
        history = model.fit(AnomalyDataset(train[:9], 32), AnomalyDataset(train[9:], 32),
                            epochs=EPOCHS, batch_size=4, device="cpu", progress=False,
                            out_dir=out, epoch_callback=run.log_epoch)
        model.eval()
        model.calibrate(AnomalyDataset(train[9:], 32))
        run.log_calibration(model)
        evaluation = evaluate_detector(model, test, progress=False)
        figure = report.plot_examples(evaluation.predictions, out / "examples.png", "tiny",
                                      threshold=float(model.threshold_))
        metrics_file = out / "metrics.json"
        metrics_file.write_text(json.dumps({k: v for k, v in evaluation.metrics.items()
                                            if v == v}), encoding="utf-8")
        run.log_evaluation(evaluation.metrics, [figure, metrics_file])
    return {"history": history, "metrics": evaluation.metrics,
            "threshold": float(model.threshold_)}


# -- MLflow ----------------------------------------------------------------------------------


def mlflow_runs(store: Path, experiment: str = "anomalykit") -> list:
    tracking = pytest.importorskip("mlflow.tracking", reason="mlflow-skinny not installed "
                                   "(pip install 'anomalykit[tracking]')")
    client = tracking.MlflowClient(store.absolute().as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {store}"
    return client, client.search_runs([found.experiment_id])


def test_mlflow_store_holds_params_epochs_metrics_and_files(dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow-skinny not installed")
    store = tmp_path / "mlruns"
    result = tracked_training(TrackingConfig("mlflow", str(store)), dataset, tmp_path / "run")

    client, runs = mlflow_runs(store)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{NAME}/{CATEGORY}"
    assert run.data.tags["detector"] == NAME
    assert run.data.params["model.image_size"] == "32"
    assert run.data.params["train.epochs"] == str(EPOCHS)
    # Every epoch's losses, at steps 0..EPOCHS-1, equal to the fit history's.
    train_curve = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in train_curve] == list(range(EPOCHS))
    assert [m.value for m in train_curve] == pytest.approx(
        [e["loss"] for e in result["history"]["train_loss"]])
    val_curve = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.value for m in val_curve] == pytest.approx(result["history"]["val_loss"])
    assert run.data.metrics["calibration/threshold"] == pytest.approx(result["threshold"])
    assert run.data.metrics["test/image_auroc"] == pytest.approx(result["metrics"]["image_auroc"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert files == {"evaluation/examples.png", "evaluation/metrics.json"}


def test_a_run_that_raises_ends_failed_with_its_epochs_kept(dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow-skinny not installed")
    store = tmp_path / "mlruns"
    with pytest.raises(Crash):
        # 9 training images, batch 4: 3 steps per epoch, so step 4 is in the second epoch.
        tracked_training(TrackingConfig("mlflow", str(store)), dataset, tmp_path / "run",
                         crash_at_step=4)
    client, runs = mlflow_runs(store)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [0]


def test_benchmark_jobs_are_nested_under_one_parent(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow-skinny not installed")
    store = tmp_path / "mlruns"
    parent, job_tracking = start_parent_run(TrackingConfig("mlflow", str(store)), "benchmark",
                                            config={"detectors": "a,b"})
    job_tracking = pickle.loads(pickle.dumps(job_tracking))  # it travels to Ray workers
    assert job_tracking.location == store.absolute().as_uri()  # workers run elsewhere
    for detector in ("a", "b"):
        with track_run(job_tracking, f"{detector}/{CATEGORY}/seed0", tags={"seed": 0}) as run:
            run.log_metrics({"test/image_auroc": 0.5})
    report_dir = tmp_path / "bench"
    (report_dir / "figures" / CATEGORY).mkdir(parents=True)
    (report_dir / "report.html").write_text("<html></html>", encoding="utf-8")
    cv2.imwrite(str(report_dir / "figures" / CATEGORY / "roc.png"), np.zeros((8, 8, 3), np.uint8))
    parent.log_files([report_dir / "report.html", report_dir / "figures",
                      report_dir / "not_drawn.png"], "report")
    parent.end("FINISHED")
    client, runs = mlflow_runs(store)
    by_name = {r.info.run_name: r for r in runs}
    parent_id = by_name["benchmark"].info.run_id
    assert sorted(by_name) == [f"a/{CATEGORY}/seed0", f"b/{CATEGORY}/seed0", "benchmark"]
    children = [r for name, r in by_name.items() if name != "benchmark"]
    assert [r.data.tags.get("mlflow.parentRunId") for r in children] == [parent_id] * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    parent_id = by_name["benchmark"].info.run_id
    assert [a.path for a in client.list_artifacts(parent_id, "report")] == [
        "report/figures", "report/report.html"]
    assert [a.path for a in client.list_artifacts(parent_id, f"report/figures/{CATEGORY}")] == [
        f"report/figures/{CATEGORY}/roc.png"]


def test_the_checkpoint_is_uploaded_only_when_asked(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow-skinny not installed")
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")
    for name, opt_in in (("default", False), ("asked", True)):
        tracking = TrackingConfig("mlflow", str(tmp_path / "mlruns"), log_checkpoint=opt_in)
        with track_run(tracking, name) as run:
            run.log_checkpoint(checkpoint)
    client, runs = mlflow_runs(tmp_path / "mlruns")
    uploaded = {r.info.run_name: [a.path for a in client.list_artifacts(r.info.run_id)]
                for r in runs}
    assert uploaded == {"default": [], "asked": ["model"]}


# -- TensorBoard -----------------------------------------------------------------------------


def event_accumulator(folder: Path):
    module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                 reason="tensorboard not installed")
    acc = module.EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_scalars_per_epoch(dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    logdir = tmp_path / "tb"
    result = tracked_training(TrackingConfig("tensorboard", str(logdir), experiment="exp"),
                              dataset, tmp_path / "run")

    folders = [p.parent for p in logdir.rglob("events.out.tfevents.*")]
    assert folders == [logdir / "exp" / f"{NAME}_{CATEGORY}"]
    acc = event_accumulator(folders[0])
    train_curve = acc.Scalars("train/loss")
    assert [e.step for e in train_curve] == list(range(EPOCHS))
    assert [e.value for e in train_curve] == pytest.approx(
        [e["loss"] for e in result["history"]["train_loss"]], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == list(range(EPOCHS))
    assert acc.Scalars("calibration/threshold")[0].value == pytest.approx(result["threshold"],
                                                                          rel=1e-6)
    assert acc.Scalars("test/image_auroc")[0].value == pytest.approx(
        result["metrics"]["image_auroc"], rel=1e-6)
    assert "evaluation/examples.png" in acc.Tags()["images"]
    assert {"params/text_summary", "status/text_summary"} <= set(acc.Tags()["tensors"])


def test_tensorboard_children_live_in_the_parent_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    parent, job_tracking = start_parent_run(TrackingConfig("tensorboard", str(tmp_path)), "bench")
    with track_run(job_tracking, "a/bottle/seed0") as run:
        run.log_metrics({"test/image_auroc": 0.75})
    parent.end()
    child = tmp_path / "anomalykit" / "bench" / "a_bottle_seed0"
    assert event_accumulator(child).Scalars("test/image_auroc")[0].value == 0.75


# -- off by default, failures, options -------------------------------------------------------


def test_off_by_default_writes_nothing(dataset: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking(None, None) is None and resolve_tracking(None, {}) is None
    assert start_run(None, "x") is NO_RUN
    tracked_training(None, dataset, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not any("tfevents" in p.name or p.name == "meta.yaml" for p in tmp_path.rglob("*"))


class BrokenTracker:
    """A backend whose every log call fails (a full disk, a dead server)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start_run(self, name, config=None, tags=None):
        self.calls.append("start_run")

    def log_params(self, params):
        raise OSError("disk full")

    def log_metrics(self, metrics, step=None):
        raise OSError("disk full")

    def log_artifact(self, path, folder=None):
        raise OSError("disk full")

    def end_run(self, status="FINISHED"):
        self.calls.append(f"end_run {status}")


def test_a_failing_backend_warns_once_and_training_completes(dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    broken = BrokenTracker()
    monkeypatch.setattr("anomalykit.tracking.create_tracker", lambda config: broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tracked_training(TrackingConfig("mlflow", str(tmp_path / "unused")), dataset,
                                  tmp_path / "run")
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "disk full" in str(ours[0].message) and "goes on" in str(ours[0].message)
    assert result["history"]["epochs_run"] == EPOCHS
    assert (tmp_path / "run" / "last.ckpt").is_file()
    assert broken.calls == ["start_run", "end_run FINISHED"]


@pytest.mark.parametrize(("backend", "module"), [("mlflow", "mlflow.tracking"),
                                                 ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_package_names_the_extra(backend: str, module: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'anomalykit\[tracking\]'"):
        start_run(TrackingConfig(backend, str(tmp_path)), "x")  # type: ignore[arg-type]


def test_only_rank_zero_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert start_run(TrackingConfig("tensorboard", str(tmp_path)), "x") is NO_RUN
    assert list(tmp_path.iterdir()) == []


def test_track_option_and_config_section() -> None:
    mlflow = TrackingConfig.parse("mlflow")
    assert mlflow.resolved_location() == (Path.cwd() / "runs" / "mlruns").as_uri()
    assert TrackingConfig.parse("mlflow:/data/store").resolved_location() == "file:///data/store"
    # A URI the user names is used as given (the only way a server is ever contacted).
    assert TrackingConfig.parse("mlflow:http://host:5000").resolved_location() == "http://host:5000"
    assert TrackingConfig.parse("tensorboard:tb").resolved_location() == str(Path.cwd() / "tb")
    with pytest.raises(ConfigError, match="mlflow.*tensorboard"):
        TrackingConfig.parse("wandb")
    section = {"backend": "tensorboard", "dir": "tb", "experiment": "e", "log_checkpoint": True}
    assert TrackingConfig.from_section(section) == TrackingConfig("tensorboard", "tb", "e", True)
    with pytest.raises(ConfigError, match=r"tracking option\(s\) \['url'\] unknown"):
        TrackingConfig.from_section({"backend": "mlflow", "url": "x"})
    with pytest.raises(ConfigError, match="needs a backend"):
        TrackingConfig.from_section({"uri": "x"})
    # The command line wins over the config for the backend and place, the rest comes along.
    chosen = resolve_tracking("mlflow:store", section)
    assert (chosen.backend, chosen.location, chosen.experiment) == ("mlflow", "store", "e")
    assert flatten({"model": {"size": 32, "blocks": [1, 2]}, "source": "q.yaml"}) == {
        "model.size": "32", "model.blocks": "[1, 2]", "source": "q.yaml"}


def test_fit_refuses_a_callback_that_is_not_callable() -> None:
    import torch

    with pytest.raises(ConfigError, match="epoch_callback must be a function"):
        TinyDetector().fit(torch.rand(4, 3, 32, 32), epochs=1, progress=False,
                           epoch_callback="log")


def test_pipeline_train_detector_logs_to_a_run(dataset: Path, tmp_path: Path) -> None:
    """Once pipeline.train_detector takes ``run=`` (wired by the lead), it logs through it."""
    from anomalykit.pipeline import train_detector

    if "run" not in inspect.signature(train_detector).parameters:
        pytest.skip("pipeline.train_detector has no run= argument yet (tracking not wired)")
    pytest.importorskip("mlflow", reason="mlflow-skinny not installed")
    store = tmp_path / "mlruns"
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  image_size: 32\ntrain:\n  epochs: 2\n  batch_size: 4\n",
                      encoding="utf-8")
    with track_run(TrackingConfig("mlflow", str(store)), "pipeline") as run:
        result = train_detector(NAME, root=dataset, category=CATEGORY, config=config,
                                out_dir=tmp_path / "run", device="cpu", progress=False, run=run)
    client, runs = mlflow_runs(store)
    assert runs[0].data.params["train.epochs"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 2
    assert runs[0].data.metrics["calibration/threshold"] == pytest.approx(result.meta["threshold"])


DDP_WORKER = """
import json, sys
from pathlib import Path

import torch
from torch import nn

from anomalykit.base import Estimator
from anomalykit.tracking import TrackingConfig, track_run
from anomalykit.training import distributed, fit


class TinyAE(Estimator):
    def __init__(self):
        super().__init__()
        self.net = nn.Conv2d(3, 3, 3, padding=1)

    def training_step(self, batch):
        return {"loss": (self.net(batch["image"]) - batch["image"]).pow(2).mean()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


out = Path(sys.argv[1])
calls = []
with track_run(TrackingConfig("tensorboard", str(out / "tb")), "ddp") as run:
    def callback(epoch, train_loss, val_loss):
        calls.append([epoch, val_loss is not None])
        run.log_epoch(epoch, train_loss, val_loss)

    fit(TinyAE(), torch.rand(16, 3, 8, 8), torch.rand(8, 3, 8, 8), epochs=2, batch_size=4,
        progress=False, device="cpu", epoch_callback=callback)
result = {"calls": calls, "tracked": run.enabled or run.tracker is not None}
(out / f"rank{distributed.rank()}.json").write_text(json.dumps(result))
"""


@pytest.mark.slow
def test_under_torchrun_only_rank_zero_reports_and_logs(tmp_path: Path) -> None:
    """Two real processes (gloo): rank 0 gets every epoch and writes the one run."""
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    from test_distributed import torchrun

    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(DDP_WORKER), encoding="utf-8")
    torchrun([str(script), str(tmp_path)], cwd=tmp_path)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == {"calls": [[0, True], [1, True]], "tracked": True}
    assert seen[1] == {"calls": [], "tracked": False}
    folders = [p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert folders == [tmp_path / "tb" / "anomalykit" / "ddp"]
    assert [e.step for e in event_accumulator(folders[0]).Scalars("train/loss")] == [0, 1]
