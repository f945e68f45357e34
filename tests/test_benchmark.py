"""anomalykit.benchmark: the runner (rows, failures, interruption) and the reports."""

from __future__ import annotations

import csv
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
from tiny_detector import TinyConvDetector
from torch import Tensor

from anomalykit.benchmark import COLUMNS, read_csv, run_benchmark, runner
from anomalykit.benchmark.report import (
    environment_info,
    markdown_report,
    metric_table,
    roc_curve,
    write_report,
)
from anomalykit.benchmark.timing import FIELDS
from anomalykit.data import SYNTHETIC_CATEGORIES, generate_synthetic
from anomalykit.errors import ConfigError
from anomalykit.registry import register_detector

GOOD = "_bench_test_tiny"
BROKEN = "_bench_test_broken"
CATEGORIES = list(SYNTHETIC_CATEGORIES[:2])


@register_detector(GOOD)
class TinyDetector(TinyConvDetector):
    """One conv layer reconstructing its input."""


@register_detector(BROKEN)
class BrokenDetector(TinyDetector):
    """Fails in its first training step, as a buggy detector would."""

    def training_step(self, batch: dict) -> dict[str, Tensor]:
        raise RuntimeError("boom in training_step")


SYNTH = "_bench_test_synth"


@register_detector(SYNTH)
class SynthesisingDetector(TinyDetector):
    """Shows its training data as DRAEM does: one PNG per training image it is given."""

    def example_figures(self, images, out_dir, *, n=8, seed=0):
        import cv2

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(images[:n]):
            paths.append(out_dir / f"example_{i}.png")
            cv2.imwrite(str(paths[-1]), (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        return paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, categories=CATEGORIES, seed=0, image_size=32, n_train=10,
                       n_test_good=3, n_test_defect=3)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("model:\n  image_size: 32\n"
                    "train:\n  epochs: 1\n  batch_size: 8\n  val_fraction: 0.2\n",
                    encoding="utf-8")
    return path


def test_failing_pair_is_recorded_and_the_benchmark_goes_on(dataset: Path, config: Path,
                                                           tmp_path: Path) -> None:
    rows = run_benchmark([BROKEN, GOOD], dataset, CATEGORIES[:1], config=config,
                         out_dir=tmp_path, device="cpu", onnx=False, progress=False,
                         command="anomalykit benchmark --test")
    assert [(r["detector"], bool(r["error"])) for r in rows] == [(BROKEN, True), (GOOD, False)]
    assert "boom in training_step" in rows[0]["error"]
    assert (tmp_path / "runs" / BROKEN / CATEGORIES[0] / "error.txt").is_file()
    saved = read_csv(tmp_path / "results.csv")
    assert [r["detector"] for r in saved] == [BROKEN, GOOD]
    assert list(saved[0]) == list(COLUMNS)
    assert saved[1]["onnx_ms"] == "" and float(saved[1]["torch_ms"]) > 0  # --no-onnx
    markdown = (tmp_path / "results.md").read_text()
    assert f"| {BROKEN} | error |" in markdown and "boom in training_step" in markdown
    assert "anomalykit benchmark --test" in markdown


def test_interrupted_benchmark_keeps_finished_rows(dataset: Path, config: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = runner.benchmark_pair
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "benchmark_pair", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark([GOOD], dataset, CATEGORIES, config=config, out_dir=tmp_path,
                      device="cpu", onnx=False, progress=False)
    saved = read_csv(tmp_path / "results.csv")
    assert [(r["detector"], r["category"]) for r in saved] == [(GOOD, CATEGORIES[0])]
    assert (tmp_path / "results.md").is_file() and (tmp_path / "report.html").is_file()


@pytest.mark.slow
def test_two_categories_with_onnx_and_report(dataset: Path, config: Path, tmp_path: Path) -> None:
    rows = run_benchmark([GOOD], dataset, CATEGORIES, config=config, overrides=["seed=3"],
                         out_dir=tmp_path, device="cpu", seed=1, onnx=True, progress=False,
                         threads=1)
    assert [r["category"] for r in rows] == CATEGORIES
    for row in rows:
        assert not row["error"]
        assert row["onnx_ms"] > 0 and row["torch_ms"] > 0 and row["train_s"] > 0
        assert row["seed"] == 1 and row["n_test"] == 6 and row["n_train"] == 8
        assert (tmp_path / "runs" / GOOD / row["category"] / "model.onnx").is_file()
    html = (tmp_path / "report.html").read_text()
    sources = re.findall(r"src='([^']+)'", html)
    assert {f"figures/{c}/roc.png" for c in CATEGORIES} <= set(sources)
    assert {f"runs/{GOOD}/{c}/examples.png" for c in CATEGORIES} <= set(sources)
    assert all((tmp_path / s).is_file() for s in sources)
    header, body = metric_table(rows, "image_auroc")
    assert header == ["detector", *CATEGORIES, "mean"] and body[0][0] == GOOD
    markdown = (tmp_path / "results.md").read_text()
    assert "CPU threads (torch and onnxruntime): 1" in markdown


def test_training_figures_of_a_synthesising_detector_are_in_the_report(
        dataset: Path, config: Path, tmp_path: Path) -> None:
    rows = run_benchmark([SYNTH, GOOD], dataset, CATEGORIES[:1], config=config, out_dir=tmp_path,
                         device="cpu", onnx=False, progress=False, threads=1)
    assert not any(r["error"] for r in rows)
    html = (tmp_path / "report.html").read_text()
    sources = re.findall(r"src='([^']+)'", html)
    training = [s for s in sources if "/training/" in s]
    # one PNG per training image shown, and only for the detector that synthesises
    assert training and all(s.startswith(f"runs/{SYNTH}/{CATEGORIES[0]}/training/")
                            for s in training)
    assert all((tmp_path / s).is_file() for s in training)


def test_typos_fail_before_any_training(dataset: Path, config: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'nope' not found"):
        run_benchmark([GOOD], dataset, ["nope"], config=config, out_dir=tmp_path,
                      device="cpu", progress=False)
    with pytest.raises(ConfigError, match="unknown detector"):
        run_benchmark(["nope"], dataset, CATEGORIES, config=config, out_dir=tmp_path,
                      device="cpu", progress=False)
    with pytest.raises(ConfigError, match="bogus"):
        run_benchmark([GOOD], dataset, CATEGORIES, config=config, overrides=["model.bogus=1"],
                      out_dir=tmp_path, device="cpu", progress=False)
    assert not (tmp_path / "runs").exists()


# -- report units ----------------------------------------------------------------------------


def test_metric_table_mean_skips_errors_and_nan() -> None:
    rows = [
        {"detector": "a", "category": "x", "image_auroc": 0.5},
        {"detector": "a", "category": "y", "image_auroc": 1.0},
        {"detector": "b", "category": "x", "image_auroc": math.nan},
        {"detector": "b", "category": "y", "error": "RuntimeError: boom"},
    ]
    header, body = metric_table(rows, "image_auroc")
    assert header == ["detector", "x", "y", "mean"]
    assert body == [["a", "0.500", "1.000", "0.750"], ["b", "n/a", "error", "n/a"]]


def test_roc_curve_endpoints_and_ties() -> None:
    fpr, tpr = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9]))
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.5, 1.0, 1.0])


def test_report_header_and_rebuild(tmp_path: Path) -> None:
    info = environment_info("cpu", "anomalykit benchmark --detectors a")
    assert info["machine"] and "torch" in info["versions"] and "onnxruntime" in info["versions"]
    rows = [{"detector": "a", "category": "x", "image_auroc": 0.9, "config": "quick", "seed": 0}]
    text = markdown_report(rows, info)
    assert "`anomalykit benchmark --detectors a`" in text and info["date"] in text
    paths = write_report(rows, tmp_path, info)  # no predictions saved: tables only
    assert all(p.is_file() for p in paths.values())
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_export_failure_keeps_the_metrics(dataset: Path, config: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_export(*args, **kwargs):
        raise ConfigError("cannot export this one")

    monkeypatch.setattr(runner, "_time_onnx", fail_export)
    rows = run_benchmark([GOOD], dataset, CATEGORIES[:1], config=config, out_dir=tmp_path,
                         device="cpu", onnx=True, progress=False)
    assert rows[0]["error"] == "" and 0.0 <= rows[0]["image_auroc"] <= 1.0
    assert math.isnan(rows[0]["onnx_ms"]) and "cannot export this one" in rows[0]["notes"]
    assert "cannot export this one" in (tmp_path / "results.md").read_text()


def test_time_inference_script_writes_the_tables(config: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/time_inference.py: a thin script over anomalykit.benchmark.timing."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "time_inference.py"
    spec = importlib.util.spec_from_file_location("time_inference_script", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "timing"
    assert module.main(["--out", str(out), "--detectors", GOOD, "--config", str(config),
                        "--batch-sizes", "1", "2", "--frame-size", "40", "--warmup", "1",
                        "--repeats", "3"]) == 0
    with open(out / "timing.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["detector"], r["batch"]) for r in rows] == [(GOOD, "1"), (GOOD, "2")]
    assert list(rows[0]) == FIELDS
    assert all(float(r["torch_ms_batch"]) > 0 and float(r["onnx_ms_batch"]) > 0 for r in rows)
    markdown = (out / "timing.md").read_text()
    assert f"| {GOOD} | 32 | 2 |" in markdown
    assert "wrote" in capsys.readouterr().out
