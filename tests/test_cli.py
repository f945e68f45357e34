"""The ``anomalykit`` command line, end to end on a tiny synthetic dataset.

Most commands run in-process through :class:`typer.testing.CliRunner` with a tiny
registered detector (fast); one test starts real ``python -m anomalykit`` subprocesses with
the real ``ae`` detector. Error cases check the exit status (2), the single ``error:`` line
and the message.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from torch import Tensor, nn
from typer.testing import CliRunner

import anomalykit.training
from anomalykit.base import AnomalyOutput, Detector
from anomalykit.cli import app
from anomalykit.data import SYNTHETIC_CATEGORIES, generate_synthetic
from anomalykit.registry import register_detector

REPO = Path(__file__).resolve().parents[1]
TINY = "_cli_test_tiny"
CATEGORY = SYNTHETIC_CATEGORIES[0]
SIZE = 32


@register_detector(TINY)
class TinyDetector(Detector):
    """Tiny conv autoencoder for CLI tests; map = per-pixel squared reconstruction error."""

    def __init__(self, image_size: int = SIZE, width: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.image_size = image_size
        self.lr = lr
        self.set_normalization("none")
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, images: Tensor) -> AnomalyOutput:
        error = ((self.net(images) - images) ** 2).mean(1, keepdim=True)
        return AnomalyOutput(error.flatten(1).amax(1), error)

    def training_step(self, batch: dict) -> dict[str, Tensor]:
        x = batch["image"]
        return {"loss": ((self.net(x) - x) ** 2).mean()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_dataset(root: Path) -> Path:
    """One small synthetic category at 32 px."""
    generate_synthetic(root, categories=[CATEGORY], seed=0, image_size=SIZE, n_train=12,
                       n_test_good=4, n_test_defect=4)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(
        "model:\n  image_size: 32\n"
        "train:\n  epochs: 2\n  batch_size: 8\n  val_fraction: 0.25\n"
        "calibrate:\n  quantile: 1.0\n", encoding="utf-8")
    return path


runner = CliRunner()


def invoke(*args: object) -> Result:
    """Run the app in-process and require success (output shown on failure)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (
        f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
        f"exception: {result.exception!r}")
    return result


def assert_error(result: Result, *fragments: str) -> str:
    """Exit 2, exactly one non-empty stderr line starting with 'error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr,
                                   result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(dataset: Path, tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    result = invoke("train", TINY, "--root", dataset, "--category", CATEGORY, "--config",
                    tiny_config, "--out", run, "--device", "cpu", "--quiet")
    checkpoint = run / "model.ckpt"
    assert checkpoint.is_file()
    assert str(checkpoint) in result.stdout
    return checkpoint


@pytest.fixture(scope="module")
def exported(trained: Path) -> Path:
    onnx_path = trained.parent / "model.onnx"
    result = invoke("export", trained, "--out", onnx_path)
    assert onnx_path.is_file() and onnx_path.stat().st_size > 0
    assert "parity" in result.stdout and "anomaly_map" in result.stdout
    return onnx_path


# -- commands --------------------------------------------------------------------------------


def test_list_shows_registered_names_first() -> None:
    lines = invoke("list").stdout.splitlines()
    names = [line.split()[0] for line in lines if line.strip()]
    assert {"ae", "ae_ssim", TINY} <= set(names)
    ae_line = next(line for line in lines if line.split()[0] == "ae")
    assert re.match(r"ae\s{2,}\S", ae_line)  # a description after at least two spaces
    assert "ae" in [line.split()[0] for line in invoke("list", "--generative").stdout.splitlines()]


def test_help_documents_every_option() -> None:
    for command in ("train", "test", "export", "predict", "benchmark"):
        text = invoke(command, "--help").stdout
        assert "--help" in text
    train_help = invoke("train", "--help").stdout
    for option in ("--root", "--category", "--config", "--set", "--out", "--device", "--seed",
                   "--resume", "--quiet", "--good-dir", "--defect-dir", "--mask-dir",
                   "--test-fraction"):
        assert option in train_help
    for command in ("test", "benchmark"):
        text = invoke(command, "--help").stdout
        assert "--good-dir" in text and "--defect-dir" in text and "--mask-dir" in text


def test_data_synth(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    invoke("data", "synth", "--out", out, "--categories", CATEGORY, "--image-size", SIZE,
           "--seed", 1)
    images = list((out / CATEGORY / "train" / "good").glob("*.png"))
    assert images
    assert list((out / CATEGORY / "test").iterdir())


def test_train_writes_checkpoint_with_meta(trained: Path) -> None:
    from anomalykit.training import load_model

    model = load_model(trained)
    meta = model.checkpoint_meta
    assert meta["category"] == CATEGORY
    assert meta["calibrated_on"] == "val" and meta["n_val"] >= 1
    assert meta["config"]["train"]["epochs"] == 2
    assert (trained.parent / "last.ckpt").is_file()  # for --resume


def test_test_writes_metrics_and_pictures(trained: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "test"
    result = invoke("test", trained, "--root", dataset, "--category", CATEGORY, "--out", out,
                    "--device", "cpu", "--quiet")
    assert "image_auroc" in result.stdout
    payload = json.loads((out / "metrics.json").read_text())
    metrics = payload["metrics"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert "pixel_auroc" in metrics and "f1_at_threshold" in metrics
    assert metrics["n_test"] == 8
    assert (out / "roc.png").is_file() and (out / "examples.png").is_file()


def test_test_defaults_to_training_data_and_checkpoint_folder(trained: Path) -> None:
    invoke("test", trained, "--device", "cpu", "--quiet")
    assert (trained.parent / "metrics.json").is_file()


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_checkpoint_and_onnx_agree(trained: Path, exported: Path, dataset: Path,
                                           tmp_path: Path) -> None:
    images = dataset / CATEGORY / "test"
    n_images = sum(1 for p in images.rglob("*.png"))
    outputs = {}
    for model in (trained, exported):
        out = tmp_path / model.suffix[1:]
        invoke("predict", model, images, "--out", out, "--device", "cpu", "--quiet")
        rows = read_predictions(out / "predictions.csv")
        assert len(rows) == n_images
        assert set(rows[0]) == {"path", "score", "normalized_score", "label"}
        overlays = list((out / "overlays").glob("*.png"))
        assert len(overlays) == n_images  # test/good/000 and test/<defect>/000 do not collide
        outputs[model.suffix] = rows
    ckpt, onnx = outputs[".ckpt"], outputs[".onnx"]
    assert [r["path"] for r in ckpt] == [r["path"] for r in onnx]
    assert [r["label"] for r in ckpt] == [r["label"] for r in onnx]
    np.testing.assert_allclose([float(r["score"]) for r in ckpt],
                               [float(r["score"]) for r in onnx], rtol=1e-4, atol=1e-6)
    # Same colour scale for both (the calibrated pixel threshold): the overlays match too.
    from anomalykit.data import read_image

    for overlay in (tmp_path / "ckpt" / "overlays").glob("*.png"):
        twin = tmp_path / "onnx" / "overlays" / overlay.name
        difference = read_image(overlay).astype(int) - read_image(twin).astype(int)
        assert np.abs(difference).max() <= 2, overlay.name


def test_predict_skips_its_own_output_inside_the_input(trained: Path, dataset: Path,
                                                      tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(dataset / CATEGORY / "test" / "good", images)
    n_images = len(list(images.glob("*.png")))
    for _ in range(2):  # the second run must not score the first run's overlays
        invoke("predict", trained, images, "--out", images / "out", "--device", "cpu", "--quiet")
        assert len(read_predictions(images / "out" / "predictions.csv")) == n_images


def test_predict_single_file_keeps_original_size(trained: Path, dataset: Path,
                                                 tmp_path: Path) -> None:
    from anomalykit.data import read_image

    image = next((dataset / CATEGORY / "test" / "good").glob("*.png"))
    invoke("predict", trained, image, "--out", tmp_path, "--device", "cpu", "--quiet")
    overlay = read_image(tmp_path / "overlays" / f"{image.stem}.png")
    assert overlay.shape == read_image(image).shape


def test_benchmark_one_detector_one_category(dataset: Path, tiny_config: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = invoke("benchmark", "--detectors", TINY, "--root", dataset, "--categories",
                    CATEGORY, "--config", tiny_config, "--set", "epochs=1", "--out", out,
                    "--device", "cpu", "--quiet")
    assert "image_auroc" in result.stdout and TINY in result.stdout
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert (row["detector"], row["category"], row["error"]) == (TINY, CATEGORY, "")
    for key in ("image_auroc", "pixel_auroc", "aupro", "torch_ms", "onnx_ms", "train_s"):
        assert np.isfinite(float(row[key])), key
    assert row["n_test"] == "8" and row["seed"] == "0" and "epochs=1" in row["config"]
    markdown = (out / "results.md").read_text()
    assert f"| {TINY} |" in markdown and "mean" in markdown
    assert "anomalykit benchmark" in markdown and "--detectors" in markdown
    html = (out / "report.html").read_text()
    sources = re.findall(r"src='([^']+)'", html)
    assert len(sources) >= 2  # the ROC curves and the example heat maps
    for source in sources:
        assert (out / source).is_file(), source


# -- real subprocess -------------------------------------------------------------------------


def run_module(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                     os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", "anomalykit", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_subprocess_train_predict_and_error(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_module("train", "ae", "--root", dataset, "--category", CATEGORY, "--out", run,
                      "--set", f"image_size={SIZE}", "--set", "epochs=1", "--set", "max_steps=2",
                      "--device", "cpu", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (run / "model.ckpt").is_file()
    assert "saved model to" in done.stdout

    image = next((dataset / CATEGORY / "test").rglob("*.png"))
    done = run_module("predict", run / "model.ckpt", image, "--out", tmp_path / "pred",
                      "--device", "cpu", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(read_predictions(tmp_path / "pred" / "predictions.csv")) == 1

    done = run_module("train", "no_such_detector", "--root", dataset, "--category", CATEGORY,
                      "--out", run, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: unknown detector 'no_such_detector'")
    assert "ae" in done.stderr and "Traceback" not in done.stderr


# -- errors ----------------------------------------------------------------------------------


def train_args(dataset: Path, out: Path, *extra: object) -> list[object]:
    return ["train", TINY, "--root", dataset, "--category", CATEGORY, "--out", out,
            "--device", "cpu", "--quiet", *extra]


def test_unknown_detector_lists_known(dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, list(map(str, ["train", "nope", "--root", dataset, "--category",
                                               CATEGORY, "--out", tmp_path])))
    line = assert_error(result, "unknown detector 'nope'", "known:", "ae_ssim")
    assert TINY in line


def test_unknown_config_key(dataset: Path, tiny_config: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, list(map(str, train_args(dataset, tmp_path, "--config",
                                                         tiny_config, "--set",
                                                         "model.bogus_key=3"))))
    assert_error(result, "bogus_key", "valid:")
    result = runner.invoke(app, list(map(str, train_args(dataset, tmp_path, "--config",
                                                         tiny_config, "--set", "nonsense=1"))))
    assert_error(result, "nonsense")


def test_missing_root(tmp_path: Path, tiny_config: Path) -> None:
    missing = tmp_path / "no_such_root"
    result = runner.invoke(app, list(map(str, train_args(missing, tmp_path / "out", "--config",
                                                         tiny_config))))
    assert_error(result, str(missing), "does not exist")


def test_unknown_category_lists_available(dataset: Path, tiny_config: Path,
                                          tmp_path: Path) -> None:
    args = ["train", TINY, "--root", dataset, "--category", "nope", "--out", tmp_path,
            "--config", tiny_config, "--device", "cpu"]
    result = runner.invoke(app, list(map(str, args)))
    assert_error(result, "'nope'", CATEGORY)


def test_predict_empty_folder(trained: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["predict", str(trained), str(empty), "--out",
                                 str(tmp_path / "out")])
    assert_error(result, f"no images in {empty}")


def test_corrupt_train_image_fails_before_training(dataset: Path, tiny_config: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    bad = sorted((root / CATEGORY / "train" / "good").glob("*.png"))[3]
    bad.write_bytes(b"this is not a png")
    calls = []

    @functools.wraps(anomalykit.training.fit)  # keeps the signature config.py inspects
    def recording_fit(*args, **kwargs):
        calls.append(1)

    monkeypatch.setattr(anomalykit.training, "fit", recording_fit)
    out = tmp_path / "out"
    result = runner.invoke(app, list(map(str, train_args(root, out, "--config", tiny_config))))
    assert_error(result, str(bad))
    assert calls == []  # training never started
    assert not (out / "model.ckpt").exists() and not (out / "last.ckpt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu(dataset: Path, tiny_config: Path, trained: Path,
                          tmp_path: Path) -> None:
    args = ["train", TINY, "--root", dataset, "--category", CATEGORY, "--out", tmp_path,
            "--config", tiny_config, "--device", "cuda"]
    assert_error(runner.invoke(app, list(map(str, args))), "cuda", "no CUDA GPU")
    result = runner.invoke(app, ["predict", str(trained), str(dataset), "--out",
                                 str(tmp_path / "p"), "--device", "cuda"])
    assert_error(result, "no CUDA GPU")
    result = runner.invoke(app, ["benchmark", "--root", str(dataset), "--out",
                                 str(tmp_path / "b"), "--device", "cuda"])
    assert_error(result, "no CUDA GPU")


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    assert_error(runner.invoke(app, ["test", str(missing)]), str(missing), "does not exist")
    assert_error(runner.invoke(app, ["export", str(missing), "--out", str(tmp_path / "m.onnx")]),
                 "does not exist")


# -- folder datasets (--good-dir / --defect-dir / --mask-dir) --------------------------------


@pytest.fixture(scope="module")
def folders(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic category rearranged as a user's folders: real PNG files on disk.

    product/good/ (train + test good images), product/bad/<type>/, product/masks/<type>/,
    and other_good/ (good images the model never sees in training).
    """
    base = tmp_path_factory.mktemp("folders")
    source = dataset / CATEGORY
    product = base / "product"
    good, bad, masks, other = (product / "good", product / "bad", product / "masks",
                               base / "other_good")
    good.mkdir(parents=True)
    other.mkdir()
    for image in sorted((source / "train" / "good").glob("*.png")):
        shutil.copy(image, good / image.name)
    test_good = sorted((source / "test" / "good").glob("*.png"))
    for image in test_good:
        shutil.copy(image, good / f"t{image.name}")
        shutil.copy(image, other / image.name)
    for folder in sorted((source / "test").iterdir()):
        if folder.name != "good":
            shutil.copytree(folder, bad / folder.name)
            shutil.copytree(source / "ground_truth" / folder.name, masks / folder.name)
    return {"good": good, "bad": bad, "masks": masks, "other": other}


def folder_counts(folders: dict[str, Path]) -> tuple[int, int]:
    """(good images, defect images)."""
    return (len(list(folders["good"].glob("*.png"))),
            len(list(folders["bad"].rglob("*.png"))))


def test_folder_train_then_test_uses_held_out_good_images(folders: dict[str, Path],
                                                          tiny_config: Path,
                                                          tmp_path: Path) -> None:
    from anomalykit.training import load_model

    run = tmp_path / "run"
    invoke("train", TINY, "--good-dir", folders["good"], "--defect-dir", folders["bad"],
           "--mask-dir", folders["masks"], "--test-fraction", 0.25, "--config", tiny_config,
           "--out", run, "--device", "cpu", "--quiet")
    n_good, n_defect = folder_counts(folders)
    meta = load_model(run / "model.ckpt").checkpoint_meta
    held_out = n_good - meta["n_train"] - meta["n_val"]
    assert held_out == round(0.25 * n_good) and meta["n_val"] >= 1
    assert meta["n_test"] == held_out + n_defect
    assert meta["category"] == "product" and meta["root"] is None
    assert meta["folder"]["good_dir"] == str(folders["good"].resolve())
    assert meta["folder"]["test_fraction"] == 0.25

    # No data options: the folders recorded at training, the held-out good images only.
    out = tmp_path / "test"
    result = invoke("test", run / "model.ckpt", "--out", out, "--device", "cpu", "--quiet")
    assert "product" in result.stdout and "held out" in result.stderr
    payload = json.loads((out / "metrics.json").read_text())
    metrics = payload["metrics"]
    assert (metrics["n_good"], metrics["n_defect"]) == (held_out, n_defect)
    assert "pixel_auroc" in metrics  # the masks were found
    assert payload["folder"]["held_out_only"] is True
    assert (out / "roc.png").is_file() and (out / "examples.png").is_file()

    # The training folder named explicitly: still only its held-out images.
    again = tmp_path / "again"
    invoke("test", run / "model.ckpt", "--good-dir", folders["good"], "--out", again,
           "--device", "cpu", "--quiet")
    repeated = json.loads((again / "metrics.json").read_text())["metrics"]
    for key in ("n_good", "n_defect", "image_auroc", "pixel_auroc"):
        assert repeated[key] == metrics[key], key

    # Another folder of good images: all of them, with the recorded defects and their masks.
    other = tmp_path / "other"
    invoke("test", run / "model.ckpt", "--good-dir", folders["other"], "--out", other,
           "--device", "cpu", "--quiet")
    metrics = json.loads((other / "metrics.json").read_text())["metrics"]
    assert metrics["n_good"] == len(list(folders["other"].glob("*.png")))
    assert metrics["n_defect"] == n_defect and "pixel_auroc" in metrics


def test_folder_split_is_deterministic_in_the_seed(folders: dict[str, Path], tiny_config: Path,
                                                   tmp_path: Path) -> None:
    from anomalykit.training import load_model

    def held_out(seed: int, name: str) -> list[str]:
        run = tmp_path / name
        invoke("train", TINY, "--good-dir", folders["good"], "--config", tiny_config,
               "--set", "epochs=1", "--seed", seed, "--out", run, "--device", "cpu", "--quiet")
        meta = load_model(run / "model.ckpt").checkpoint_meta
        assert meta["folder"]["defect_dir"] is None and meta["folder"]["test_fraction"] == 0.2
        from anomalykit.pipeline import FolderData, load_folder_split

        records = load_folder_split(FolderData.from_meta(meta["folder"]), "test", seed)
        return [r.path.name for r in records]

    first, again, other = held_out(0, "a"), held_out(0, "b"), held_out(1, "c")
    assert first == again and len(first) == round(0.2 * folder_counts(folders)[0])
    assert first != other


def test_folder_train_good_only_then_test_with_defects(folders: dict[str, Path],
                                                       tiny_config: Path,
                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    invoke("train", TINY, "--good-dir", folders["good"], "--config", tiny_config, "--set",
           "epochs=1", "--out", run, "--device", "cpu", "--quiet")
    # Trained without defects: testing needs them, and says which option gives them.
    assert_error(runner.invoke(app, ["test", str(run / "model.ckpt")]), "--defect-dir")
    out = tmp_path / "test"
    invoke("test", run / "model.ckpt", "--defect-dir", folders["bad"], "--out", out,
           "--device", "cpu", "--quiet")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["n_defect"] == folder_counts(folders)[1]
    assert "pixel_auroc" not in metrics  # no --mask-dir: image-level metrics only


def test_folder_benchmark(folders: dict[str, Path], tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    invoke("benchmark", "--detectors", TINY, "--good-dir", folders["good"], "--defect-dir",
           folders["bad"], "--mask-dir", folders["masks"], "--config", tiny_config, "--set",
           "epochs=1", "--out", out, "--device", "cpu", "--no-onnx", "--quiet")
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["detector"], r["category"], r["error"]) for r in rows] == [(TINY, "product", "")]
    assert np.isfinite(float(rows[0]["pixel_auroc"]))
    assert "--good-dir" in (out / "results.md").read_text()


def test_folder_errors_name_the_folder(folders: dict[str, Path], dataset: Path,
                                       tiny_config: Path, tmp_path: Path) -> None:
    def train(*extra: object) -> Result:
        args = ["train", TINY, "--config", tiny_config, "--out", tmp_path / "out", "--device",
                "cpu", "--quiet", *extra]
        return runner.invoke(app, [str(a) for a in args])

    missing = tmp_path / "no_such_folder"
    assert_error(train("--good-dir", missing), str(missing), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(train("--good-dir", empty), f"no images in {empty}")
    assert_error(train("--good-dir", folders["good"], "--defect-dir", missing), str(missing))
    assert_error(train("--defect-dir", folders["bad"]), "--good-dir")
    assert_error(train("--good-dir", folders["good"], "--root", dataset, "--category",
                       CATEGORY), "not both")
    assert_error(train(), "--root", "--good-dir")
    # A defect image without its mask: the message names the image.
    bad = tmp_path / "bad"
    shutil.copytree(folders["bad"], bad)
    extra = next(bad.rglob("*.png"))
    shutil.copy(extra, extra.with_name("extra.png"))
    assert_error(train("--good-dir", folders["good"], "--defect-dir", bad, "--mask-dir",
                       folders["masks"]), "extra.png", "has no mask")
    result = runner.invoke(app, ["benchmark", "--detectors", TINY, "--good-dir",
                                 str(folders["good"]), "--out", str(tmp_path / "b"),
                                 "--config", str(tiny_config)])
    assert_error(result, "--defect-dir")


# -- profiles --------------------------------------------------------------------------------


def test_user_profiles_come_before_the_packaged_ones(dataset: Path, tiny_config: Path,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalykit.config import available_profiles, configs_dir, load_config

    packaged = load_config("ae", "quick")
    assert Path(packaged["source"]).is_relative_to(Path(str(configs_dir())))
    assert (REPO / "anomalykit" / "configs" / "ae" / "quick.yaml").is_file()
    assert not (REPO / "configs").exists()  # one copy of the profiles, inside the package

    profiles = tmp_path / "profiles"
    (profiles / TINY).mkdir(parents=True)
    shutil.copy(tiny_config, profiles / TINY / "mine.yaml")
    (profiles / "ae").mkdir()
    (profiles / "ae" / "quick.yaml").write_text("model:\n  image_size: 32\ntrain:\n  epochs: 1\n",
                                                encoding="utf-8")
    monkeypatch.setenv("ANOMALYKIT_CONFIGS", str(profiles))
    mine = load_config("ae", "quick")
    assert mine["source"] == str(profiles / "ae" / "quick.yaml")
    assert mine["train"] == {"epochs": 1}
    assert available_profiles("ae") == ["paper", "quick"]  # the packaged paper is still there
    assert load_config("ae", "paper")["source"] != mine["source"]

    run = tmp_path / "run"
    invoke("train", TINY, "--root", dataset, "--category", CATEGORY, "--config", "mine",
           "--out", run, "--device", "cpu", "--quiet")
    assert (run / "model.ckpt").is_file()
    result = runner.invoke(app, ["train", TINY, "--root", str(dataset), "--category", CATEGORY,
                                 "--config", "nope", "--out", str(run)])
    assert_error(result, "no config 'nope'", "mine")


# -- several seeds, the line commands ------------------------------------------------------


def test_benchmark_several_seeds_and_bad_seeds(dataset: Path, tiny_config: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["benchmark", "--detectors", TINY, "--root", dataset, "--categories", CATEGORY,
            "--config", tiny_config, "--set", "epochs=1", "--out", out, "--device", "cpu",
            "--no-onnx", "--quiet"]
    invoke(*args, "--seeds", "0,1")
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["error"]) for r in rows] == [("0", ""), ("1", "")]
    assert "±" in (out / "results.md").read_text()
    for seed in (0, 1):  # one run folder per seed
        assert (out / "runs" / TINY / CATEGORY / f"seed{seed}" / "model.ckpt").is_file()
    assert_error(runner.invoke(app, list(map(str, [*args, "--seeds", "0,x"]))), "--seeds", "0,x")
    assert_error(runner.invoke(app, list(map(str, [*args, "--executor", "spark"]))), "spark")


def test_watch_scores_what_is_in_the_inbox(exported: Path, dataset: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    frames = sorted((dataset / CATEGORY / "test").rglob("*.png"))[:3]
    for i, frame in enumerate(frames):
        shutil.copy(frame, inbox / f"frame_{i}.png")
    invoke("watch", exported, inbox, "--once", "--settle", "0", "--quiet")
    with open(inbox / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == ["frame_0.png", "frame_1.png", "frame_2.png"]
    moved = sorted(p.name for folder in ("ok", "ng") for p in (inbox / folder).glob("*.png"))
    assert moved == ["frame_0.png", "frame_1.png", "frame_2.png"]
    assert not list(inbox.glob("*.png"))


def test_serve_and_watch_name_a_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "no_model.onnx"
    for command in (["serve", missing, "--port", "0"], ["watch", missing, tmp_path]):
        result = runner.invoke(app, list(map(str, command)))
        assert result.exit_code == 2, (command, result.output)
        assert str(missing) in result.stderr and "error" in result.stderr
    help_text = runner.invoke(app, ["serve", "--help"]).stdout
    assert "--max-batch" in help_text and "--max-pixels" in help_text


def test_export_int8_beside_the_fp32_model_and_the_auroc_guard(trained: Path, dataset: Path,
                                                              tmp_path: Path) -> None:
    from anomalykit.export.runtime import OnnxDetector

    good = dataset / CATEGORY / "train" / "good"
    out = tmp_path / "model.onnx"
    result = invoke("export", trained, "--out", out, "--quantize", "int8", "--calibration", good)
    int8 = tmp_path / "model_int8.onnx"
    assert out.is_file() and int8.is_file(), result.stdout
    assert "quantization" in OnnxDetector(int8, device="cpu").metadata
    # Any AUROC change is "too much" at a negative limit: refused, nothing written.
    refused = tmp_path / "refused.onnx"
    line = assert_error(runner.invoke(app, list(map(str, [
        "quantize", out, refused, "--calibration", good, "--check", dataset / CATEGORY,
        "--max-auroc-drop", "-1"]))))
    assert "refused" in line and "auroc" in line and not refused.exists()
    assert_error(runner.invoke(app, list(map(str, ["export", trained, "--out", tmp_path / "x.onnx",
                                                   "--quantize", "int4"]))), "int4")
    assert_error(runner.invoke(app, list(map(str, ["quantize", out, tmp_path / "y.onnx"]))),
                 "--calibration")
    assert not (tmp_path / "x.onnx").exists()


def test_train_with_track_logs_and_a_bad_backend_is_named(dataset: Path, tiny_config: Path,
                                                         tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="pip install 'anomalykit[tracking]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    run = tmp_path / "run"
    invoke("train", TINY, "--root", dataset, "--category", CATEGORY, "--config", tiny_config,
           "--out", run, "--device", "cpu", "--quiet", "--track", f"tensorboard:{board}")
    events = [EventAccumulator(str(p.parent)).Reload() for p in board.rglob("events.out.*")]
    tags = {tag for e in events for tag in e.Tags()["scalars"]}
    assert "train/loss" in tags and any(t.startswith("calibration/") for t in tags), tags
    assert_error(runner.invoke(app, list(map(str, ["train", TINY, "--root", dataset, "--category",
                                                   CATEGORY, "--out", tmp_path / "x", "--config",
                                                   tiny_config, "--track", "wandb"]))), "wandb")
