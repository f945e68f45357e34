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

from anomalykit.benchmark import COLUMNS, markdown_tables, read_csv, run_benchmark, runner
from anomalykit.benchmark.report import (
    environment_info,
    example_tiles,
    load_examples,
    markdown_report,
    metric_table,
    roc_curve,
    save_examples,
    summary_table,
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
    assert {f"figures/{c}/examples/r0_c2.png" for c in CATEGORIES} <= set(sources)
    assert "figures/quality_cost.png" in sources
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
    assert "<table class='summary'>" in (tmp_path / "report.html").read_text()


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


# -- the summary report (issue 14) -----------------------------------------------------------


def test_summary_marks_the_best_of_each_column_and_flags_partial_detectors() -> None:
    rows = [
        {"detector": "a", "category": "x", "image_auroc": 0.9, "fpr_good": 0.2, "train_s": 5.0},
        {"detector": "a", "category": "y", "image_auroc": 0.7, "fpr_good": 0.0, "train_s": 7.0},
        {"detector": "b", "category": "x", "image_auroc": 0.8, "fpr_good": 0.1, "train_s": 1.0},
        {"detector": "b", "category": "y", "error": "RuntimeError: boom"},
        {"detector": "c", "category": "x", "error": "RuntimeError: boom"},
        {"detector": "c", "category": "y", "error": "RuntimeError: boom"},
    ]
    metrics, header, body, best = summary_table(rows)
    assert metrics == ["image_auroc", "fpr_good", "train_s"]  # columns nobody has are left out
    assert header == ["detector", "image AUROC", "false alarms (good)", "fit s"]
    assert body == [["a", "0.800", "0.100", "6.0"], ["b †", "0.800", "0.100", "1.0"],
                    ["c", "error", "error", "error"]]
    # higher AUROC is better, lower false alarms and time; equal printed values tie
    assert best == [[True, True, False], [True, True, True], [False, False, False]]
    _, _, x_body, x_best = summary_table(rows, "x")
    assert x_body[0] == ["a", "0.900", "0.200", "5.0"] and x_best[0] == [True, False, False]
    assert "| a | **0.800** | **0.100** | 6.0 |" in markdown_tables(rows, split_costs=False)
    markdown = markdown_tables(rows)  # the terminal's copy: costs in a table of their own
    assert "| a | **0.800** | **0.100** |\n" in markdown and "| a | 6.0 |\n" in markdown
    assert markdown.index("## Summary") < markdown.index("## x") < markdown.index("## y")
    assert "`image_auroc`" in markdown and "- c / y: RuntimeError: boom" in markdown


def test_summary_with_several_seeds_is_mean_and_std_and_one_detector_marks_nothing() -> None:
    rows = [{"detector": "a", "category": "x", "seed": s, "image_auroc": v}
            for s, v in ((0, 0.5), (1, 1.0))]
    _, _, body, best = summary_table(rows)
    assert body == [["a", "0.750 ± 0.354"]] and best == [[False]]


def _examples(path_names: list[str], labels: list[int], maps: np.ndarray,
              pixel_threshold: float, tmp: Path) -> dict[str, np.ndarray]:
    """What save_examples writes, for images it reads from ``tmp``."""
    import cv2

    paths = []
    for name in path_names:
        paths.append(str(tmp / name))
        cv2.imwrite(paths[-1], np.full((40, 40, 3), 128, np.uint8))
    predictions = {"maps": maps, "scores": maps.reshape(len(maps), -1).max(1),
                   "labels": np.asarray(labels), "paths": paths,
                   "defect_types": ["good" if v == 0 else "hole" for v in labels],
                   "masks": (maps > pixel_threshold).astype(np.uint8)}
    file = save_examples(predictions, tmp / f"ex{pixel_threshold}.npz", threshold=1.0,
                         pixel_threshold=pixel_threshold, size=16)
    return load_examples(file)


def test_examples_share_images_and_colour_at_the_detectors_pixel_threshold(tmp_path: Path) -> None:
    names = ["g0.png", "d0.png", "g1.png", "d1.png"]
    labels = [0, 1, 0, 1]
    maps = np.zeros((4, 32, 32), np.float32)
    maps[1], maps[3] = 2.0, 2.0  # defects: twice detector a's pixel threshold (1.0)
    a = _examples(names, labels, maps, 1.0, tmp_path)
    b = _examples(names, labels, maps * 10, 10.0, tmp_path)  # same maps, 10x the scale
    assert [Path(p).name for p in a["paths"]] == ["d0.png", "d1.png", "g0.png", "g1.png"]
    assert a["maps"].shape == (4, 16, 16) and a["images"].shape == (4, 16, 16, 3)
    assert float(a["pixel_threshold"]) == 1.0 and list(a["labels"]) == [1, 1, 0, 0]

    grid = example_tiles({"a": a, "b": b}, tmp_path / "tiles")
    assert len(grid) == 4 and all(len(row["tiles"]) == 4 for row in grid)
    import cv2

    def colour(tile: Path) -> np.ndarray:
        return cv2.imread(str(tile))[8, 8].astype(int)  # BGR

    for column in (2, 3):  # each on its own threshold: identical colours
        defect, good = colour(grid[0]["tiles"][column]), colour(grid[2]["tiles"][column])
        assert defect[2] > defect[0] + 50  # red at twice the threshold
        assert good[0] > good[2] + 50  # blue at 0: a calm good image looks calm
    np.testing.assert_array_equal(colour(grid[0]["tiles"][2]), colour(grid[0]["tiles"][3]))
    assert grid[0]["captions"][2] == "score 2 NG" and grid[2]["captions"][2] == "score 0 OK"


def test_report_with_one_detector_and_an_error_row_is_well_formed_html(
        dataset: Path, config: Path, tmp_path: Path) -> None:
    from html.parser import HTMLParser

    rows = run_benchmark([GOOD, BROKEN], dataset, CATEGORIES[:1], config=config,
                         out_dir=tmp_path, device="cpu", onnx=False, progress=False, threads=1)
    assert [bool(r["error"]) for r in rows] == [False, True]
    assert 0.0 <= rows[0]["miss_rate"] <= 1.0
    assert rows[0]["threshold_rule"].startswith(("quantile", "fpr"))  # how it was calibrated
    text = (tmp_path / "report.html").read_text()

    class Balanced(HTMLParser):
        VOID = {"meta", "img", "br", "link", "input"}

        def __init__(self) -> None:
            super().__init__()
            self.open: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag not in self.VOID:
                self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
            self.open.pop()

    parser = Balanced()
    parser.feed(text)
    assert parser.open == []
    assert text.index("class='summary'") < text.index("class='examples'")
    assert "http" not in "".join(re.findall(r"src='([^']+)'", text))
    sources = re.findall(r"src='([^']+)'", text)
    assert all((tmp_path / s).is_file() for s in sources)
    # one detector ran: the grid is image, ground truth and its column
    assert text.count("<th>image</th><th>ground truth</th><th>") == 1
    assert "boom in training_step" in text and read_csv(tmp_path / "results.csv")[0]["miss_rate"]
    assert f"Threshold rule: {rows[0]['threshold_rule']}." in text
