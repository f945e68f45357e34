"""anomalykit.benchmark on Ray: jobs as tasks on a local 2-CPU Ray, resume, failures as rows.

One local Ray instance (2 CPUs, no dashboard) serves the whole module. Its workers find the
test-only detectors below because this folder is on their PYTHONPATH and the runner imports
the module that registered a non-built-in detector in each worker (``JobSpec.modules``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_detector import TinyConvDetector
from torch import Tensor

from anomalykit.benchmark import executors, markdown_tables, read_csv, run_benchmark
from anomalykit.benchmark.report import metric_table
from anomalykit.data import SYNTHETIC_CATEGORIES, generate_synthetic
from anomalykit.errors import ConfigError
from anomalykit.registry import register_detector

CATEGORY = SYNTHETIC_CATEGORIES[0]
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "f1_max", "f1_at_threshold",
           "fpr_good", "n_train", "n_test")
# Set in the Ray workers only: the crashing detector must never take pytest down with it.
ON_RAY_WORKER = "ANOMALYKIT_TEST_ON_RAY_WORKER"

GOOD = "_ray_test_tiny"
RAISES = "_ray_test_raises"
CRASHES = "_ray_test_crashes"
SLOW = "_ray_test_slow"
STUCK = "_ray_test_stuck"


@register_detector(GOOD)
class TinyDetector(TinyConvDetector):
    """One conv layer reconstructing its input."""


@register_detector(RAISES)
class RaisingDetector(TinyDetector):
    def training_step(self, batch: dict) -> dict[str, Tensor]:
        raise RuntimeError("boom in training_step")


@register_detector(CRASHES)
class CrashingDetector(TinyDetector):
    """Kills its process mid-job, as the kernel's OOM killer would."""

    def training_step(self, batch: dict) -> dict[str, Tensor]:
        if os.environ.get(ON_RAY_WORKER) != "1":
            raise RuntimeError("this detector only crashes inside a Ray worker")
        os._exit(1)


@register_detector(SLOW)
class SlowDetector(TinyDetector):
    def training_step(self, batch: dict) -> dict[str, Tensor]:
        time.sleep(600)
        raise AssertionError("the job timeout should have stopped this")


@register_detector(STUCK)
class StuckDetector(TinyDetector):
    """Cannot be interrupted from Python (as a job stuck inside a C call)."""

    def training_step(self, batch: dict) -> dict[str, Tensor]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)
        raise AssertionError("the driver should have killed this worker")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray with 2 worker CPUs for the module; skipped when Ray is not installed."""
    ray = pytest.importorskip("ray", reason="Ray is an extra: pip install 'anomalykit[cluster]'")
    if ray.is_initialized():
        pytest.skip("another Ray instance is already running in this process")
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).parent),
                                             os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
                                       ON_RAY_WORKER: "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, categories=[CATEGORY], seed=0, image_size=32, n_train=10,
                       n_test_good=3, n_test_defect=3)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("model:\n  image_size: 32\n"
                    "train:\n  epochs: 1\n  batch_size: 8\n  val_fraction: 0.2\n",
                    encoding="utf-8")
    return path


def _bench(detectors, dataset, config, out, **kwargs):
    options = {"config": config, "out_dir": out, "device": "cpu", "onnx": False,
               "progress": False, **kwargs}
    return run_benchmark(detectors, dataset, [CATEGORY], **options)


def _mark_row(run_dir: Path, **changes) -> None:
    """Edit a saved row.json (not its job key), to see later whether it was reused."""
    path = run_dir / "row.json"
    saved = json.loads(path.read_text())
    saved["row"].update(changes)
    path.write_text(json.dumps(saved))


# -- without Ray -----------------------------------------------------------------------------


def test_importing_the_benchmark_does_not_import_ray() -> None:
    code = "import sys, anomalykit.benchmark; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"


def test_missing_ray_names_the_extra(dataset: Path, config: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'anomalykit\[cluster\]'"):
        _bench([GOOD], dataset, config, tmp_path, executor="ray")
    assert not (tmp_path / "runs").exists()


def test_tables_with_several_seeds_have_seed_lines_and_mean_std() -> None:
    rows = [{"detector": "a", "category": "x", "seed": 0, "image_auroc": 0.5},
            {"detector": "a", "category": "x", "seed": 1, "image_auroc": 1.0},
            {"detector": "a", "category": "x", "seed": 2, "error": "WorkerCrashedError: died"}]
    header, body = metric_table(rows, "image_auroc")
    assert header == ["detector", "x", "mean"]
    assert body == [["a / seed 0", "0.500", "0.500"], ["a / seed 1", "1.000", "1.000"],
                    ["a / seed 2", "error", "n/a"],
                    ["a mean ± std", "0.750 ± 0.354", "0.750 ± 0.354"]]  # std over 2 seeds
    assert "- a / x / seed 2: WorkerCrashedError: died" in markdown_tables(rows)


def test_local_job_timeout_is_an_error_row(dataset: Path, config: Path, tmp_path: Path) -> None:
    rows = _bench([SLOW], dataset, config, tmp_path, job_timeout=1.5)
    assert rows[0]["error"].startswith("JobTimeout: job exceeded the job timeout of 1.5 s")
    assert "JobTimeout" in (tmp_path / "runs" / SLOW / CATEGORY / "error.txt").read_text()


# -- on Ray ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_rows_match_local_ones_and_a_rerun_reuses_them(ray_cluster, dataset: Path,
                                                           config: Path, tmp_path: Path) -> None:
    seeds = [0, 1]
    on_ray = _bench(["pca", "ae"], dataset, config, tmp_path / "ray", seeds=seeds,
                    executor="ray", threads=1)
    local = _bench(["pca", "ae"], dataset, config, tmp_path / "local", seeds=seeds, threads=1)
    order = [("pca", "0"), ("pca", "1"), ("ae", "0"), ("ae", "1")]
    ray_csv = read_csv(tmp_path / "ray" / "results.csv")
    local_csv = read_csv(tmp_path / "local" / "results.csv")
    assert [(r["detector"], r["seed"]) for r in ray_csv] == order
    assert not any(r["error"] for r in on_ray + local)
    for ray_row, local_row in zip(ray_csv, local_csv, strict=True):
        assert {m: ray_row[m] for m in METRICS} == {m: local_row[m] for m in METRICS}
    # the two seeds really differ somewhere (else "same seed, same numbers" proves nothing)
    assert {m: ray_csv[0][m] for m in METRICS} != {m: ray_csv[1][m] for m in METRICS}
    markdown = (tmp_path / "ray" / "results.md").read_text()
    assert "| pca / seed 1 |" in markdown and "| ae mean ± std |" in markdown
    assert "executor: ray" in markdown

    run_dir = tmp_path / "ray" / "runs" / "pca" / CATEGORY / "seed1"
    checkpoint_mtime = (run_dir / "model.ckpt").stat().st_mtime_ns
    _mark_row(run_dir, notes="reused from disk")
    again = _bench(["pca", "ae"], dataset, config, tmp_path / "ray", seeds=seeds, executor="ray")
    assert all(r["reused"] for r in again)
    assert (run_dir / "model.ckpt").stat().st_mtime_ns == checkpoint_mtime  # not retrained
    assert read_csv(tmp_path / "ray" / "results.csv")[1]["notes"] == "reused from disk"
    assert "4 of 4 rows reused" in (tmp_path / "ray" / "results.md").read_text()


@pytest.mark.slow
def test_failing_and_crashing_jobs_on_ray_are_error_rows_and_rerun(
        ray_cluster, dataset: Path, config: Path, tmp_path: Path) -> None:
    rows = _bench([GOOD, RAISES, CRASHES], dataset, config, tmp_path, executor="ray")
    assert [r["detector"] for r in rows] == [GOOD, RAISES, CRASHES]
    assert rows[0]["error"] == ""
    assert rows[1]["error"] == "RuntimeError: boom in training_step"
    assert rows[2]["error"].startswith("WorkerCrashedError")
    for name in (RAISES, CRASHES):
        assert (tmp_path / "runs" / name / CATEGORY / "error.txt").is_file()
    saved = read_csv(tmp_path / "results.csv")
    assert [bool(r["error"]) for r in saved] == [False, True, True]
    assert "WorkerCrashedError" in (tmp_path / "results.md").read_text()

    # A rerun keeps the finished job and runs the failed one again.
    _mark_row(tmp_path / "runs" / GOOD / CATEGORY, notes="reused from disk")
    _mark_row(tmp_path / "runs" / RAISES / CATEGORY, error="stale error")
    rows = _bench([GOOD, RAISES], dataset, config, tmp_path, executor="ray")
    assert rows[0]["reused"] and rows[0]["notes"] == "reused from disk"
    assert not rows[1].get("reused") and rows[1]["error"] == "RuntimeError: boom in training_step"
    assert "1 of 2 rows reused" in (tmp_path / "results.md").read_text()

    # --no-resume runs everything again.
    rows = _bench([GOOD], dataset, config, tmp_path, executor="ray", resume=False)
    assert not rows[0].get("reused") and rows[0]["notes"] != "reused from disk"


@pytest.mark.slow
def test_job_timeout_on_ray(ray_cluster, dataset: Path, config: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executors, "KILL_GRACE_S", 1.0)
    rows = _bench([SLOW, STUCK], dataset, config, tmp_path, executor="ray", job_timeout=2.0)
    # the task stops itself; a task that cannot be interrupted is killed by the driver
    assert rows[0]["error"].startswith("JobTimeout: job exceeded the job timeout of 2 s")
    assert rows[1]["error"] == "JobTimeout: killed after the job timeout of 2 s"
    assert (tmp_path / "runs" / STUCK / CATEGORY / "error.txt").is_file()
