"""The dataset layouts users bring: each reader on a tiny copy it generates in the dataset's
published layout, auto-detection, malformed copies, and the CLI benchmarking each copy.

Fixtures are written here (32x40 images, a few per split) in the layouts described in the
readers' module docstrings: MPDD (MVTec layout, ``.jpg``/``.PNG`` images, masks named
``<stem>_mask.png`` or ``<stem>.png``), BTAD (``ok``/``ko``, ``.bmp`` images, ``.png`` or
``.bmp`` masks), VisA (``split_csv/1cls.csv``, masks with values 1, 2), MVTec LOCO AD (one
ground-truth folder per image, several mask files) and MVTec AD 2 (``test_public``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from tiny_detector import TinyConvDetector
from typer.testing import CliRunner

from anomalykit.cli import app
from anomalykit.data import ImageRecord, detect_format, list_categories, read_mask
from anomalykit.data.formats import FORMAT_CHOICES, FORMATS, scan_split
from anomalykit.errors import ConfigError, DataError
from anomalykit.pipeline import load_split, train_detector
from anomalykit.registry import register_detector

TINY = "_formats_test_tiny"
HEIGHT, WIDTH = 32, 40
BOX = (slice(8, 16), slice(10, 20))  # the defect region of every generated defect image
BOX2 = (slice(20, 26), slice(24, 34))  # a second region (LOCO's second mask, VisA's class 2)


@register_detector(TINY)
class FormatsTinyDetector(TinyConvDetector):
    """A one-conv detector: real training, calibration and evaluation in a second."""


# -- writing fixtures ------------------------------------------------------------------------


def write(path: Path, array: np.ndarray) -> Path:
    """Encode ``array`` (gray or BGR uint8) by the path's extension, whatever its case."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix.lower(), array)
    assert ok, path
    encoded.tofile(path)
    return path


def image(path: Path, seed: int, defect: bool = False) -> Path:
    """A smooth random picture; a defect image has a bright patch in :data:`BOX`."""
    rng = np.random.default_rng(seed)
    pixels = cv2.GaussianBlur(rng.integers(60, 140, (HEIGHT, WIDTH, 3), dtype=np.uint8), (5, 5), 0)
    if defect:
        pixels[BOX] = 250
    return write(path, pixels)


def mask(path: Path, *regions: tuple[slice, slice], value: int = 255,
         shape: tuple[int, int] = (HEIGHT, WIDTH)) -> Path:
    array = np.zeros(shape, np.uint8)
    for region in regions:
        array[region] = value
    return write(path, array)


def make_mpdd(root: Path) -> Path:
    """MPDD's quirks: .png train, .jpg / .PNG test images, two mask naming styles, and a
    stray ground_truth/good folder."""
    cat = root / "tubes"
    for i in range(6):
        image(cat / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        image(cat / "test" / "good" / f"{i:03d}.jpg", 100 + i)
        mask(cat / "ground_truth" / "good" / f"{i:03d}_mask.png")  # empty, ignored
    for i in range(2):
        image(cat / "test" / "anomalous" / f"{i:03d}.jpg", 200 + i, defect=True)
        mask(cat / "ground_truth" / "anomalous" / f"{i:03d}_mask.png", BOX)
        image(cat / "test" / "flattening" / f"{i:03d}.PNG", 300 + i, defect=True)
        mask(cat / "ground_truth" / "flattening" / f"{i:03d}.png", BOX)
    return root


def make_btad(root: Path) -> Path:
    """Two products: 01 with .png masks, 03 with .bmp masks; .bmp images throughout."""
    for product, mask_ext in (("01", ".png"), ("03", ".bmp")):
        cat = root / product
        for i in range(6):
            image(cat / "train" / "ok" / f"{i:04d}.bmp", i)
        for i in range(2):
            image(cat / "test" / "ok" / f"{i:04d}.bmp", 100 + i)
        for i in range(3):
            image(cat / "test" / "ko" / f"{i:04d}.bmp", 200 + i, defect=True)
            mask(cat / "ground_truth" / "ko" / f"{i:04d}{mask_ext}", BOX)
    return root


def make_visa(root: Path) -> Path:
    """Two objects in split_csv/1cls.csv; masks hold class values 1 and 2, not 0/255."""
    rows = []
    for obj in ("candle", "pcb1"):
        data = root / obj / "Data"
        for i in range(8):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            image(root / rel, i)
            rows.append([obj, "train" if i < 6 else "test", "normal", rel, ""])
        for i in range(3):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            image(root / rel, 200 + i, defect=True)
            array = np.zeros((HEIGHT, WIDTH), np.uint8)
            array[BOX], array[BOX2] = 1, 2
            write(data / "Masks" / "Anomaly" / f"{i:03d}.png", array)
            rows.append([obj, "test", "anomaly", rel, f"{obj}/Data/Masks/Anomaly/{i:03d}.png"])
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def make_loco(root: Path) -> Path:
    """One category; logical anomaly 000 has two mask files (two regions) to merge."""
    cat = root / "breakfast_box"
    for i in range(6):
        image(cat / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        image(cat / "validation" / "good" / f"{i:03d}.png", 50 + i)
        image(cat / "test" / "good" / f"{i:03d}.png", 100 + i)
    for kind, seed in (("logical_anomalies", 200), ("structural_anomalies", 300)):
        for i in range(2):
            image(cat / "test" / kind / f"{i:03d}.png", seed + i, defect=True)
            mask(cat / "ground_truth" / kind / f"{i:03d}" / "000.png", BOX)
    mask(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", BOX2)
    return root


def make_mvtec2(root: Path) -> Path:
    """One object, with an unlabelled test_private folder that must be ignored."""
    cat = root / "can"
    for i in range(6):
        image(cat / "train" / "good" / f"{i:03d}_regular.png", i)
    for i in range(2):
        image(cat / "validation" / "good" / f"{i:03d}_regular.png", 50 + i)
        image(cat / "test_public" / "good" / f"{i:03d}_regular.png", 100 + i)
        image(cat / "test_private" / f"{i:03d}_regular.png", 400 + i)
    for i in range(3):
        image(cat / "test_public" / "bad" / f"{i:03d}_regular.png", 200 + i, defect=True)
        mask(cat / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", BOX)
    return root


MAKERS: dict[str, Callable[[Path], Path]] = {
    "mpdd": make_mpdd, "btad": make_btad, "visa": make_visa, "loco": make_loco,
    "mvtec2": make_mvtec2,
}
#: What auto-detection answers for each fixture (MPDD shares MVTec's layout and reader).
DETECTED = {"mpdd": "mvtec", "btad": "btad", "visa": "visa", "loco": "loco", "mvtec2": "mvtec2"}
CATEGORY = {"mpdd": "tubes", "btad": "01", "visa": "candle", "loco": "breakfast_box",
            "mvtec2": "can"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A profile for the tiny detector: one epoch at 32 px."""
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("model:\n  image_size: 32\ntrain:\n  epochs: 1\n  batch_size: 8\n"
                    "calibrate:\n  quantile: 1.0\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture, generated once per module (read-only for the tests)."""
    return {name: make(tmp_path_factory.mktemp(name)) for name, make in MAKERS.items()}


def summary(records: list[ImageRecord]) -> list[tuple[int, str, bool]]:
    return [(r.label, r.defect_type, r.mask_path is not None) for r in records]


# -- readers ---------------------------------------------------------------------------------


def test_mpdd_read_by_the_mvtec_reader(datasets: dict[str, Path]) -> None:
    root = datasets["mpdd"]
    assert list_categories(root, "mpdd") == ["tubes"]
    assert len(load_split(root, "tubes", "train", "mpdd")) == 6
    test = load_split(root, "tubes", "test", "mpdd")
    assert summary(test) == ([(0, "good", False)] * 2 + [(1, "anomalous", True)] * 2
                             + [(1, "flattening", True)] * 2)
    assert {r.path.suffix for r in test} == {".jpg", ".PNG"}
    flattening = [r for r in test if r.defect_type == "flattening"]
    assert [r.mask_path.name for r in flattening] == ["000.png", "001.png"]
    assert load_split(root, "tubes", "test", "mvtec") == test


def test_btad_ok_ko_and_bmp_masks(datasets: dict[str, Path]) -> None:
    root = datasets["btad"]
    assert list_categories(root, "btad") == ["01", "03"]
    train = load_split(root, "03", "train", "btad")
    assert summary(train) == [(0, "good", False)] * 6
    test = load_split(root, "03", "test", "btad")
    assert summary(test) == [(0, "good", False)] * 2 + [(1, "ko", True)] * 3
    masks = [r.mask_path for r in test if r.label == 1]
    assert {m.suffix for m in masks} == {".bmp"}
    binary = read_mask(masks[0])
    assert binary[BOX].all() and binary.sum() == binary[BOX].size
    assert {r.mask_path.suffix for r in load_split(root, "01", "test", "btad") if r.label} == {".png"}


def test_visa_split_csv_and_non_binary_masks(datasets: dict[str, Path]) -> None:
    root = datasets["visa"]
    assert list_categories(root, "visa") == ["candle", "pcb1"]
    train = load_split(root, "candle", "train", "visa")
    assert summary(train) == [(0, "good", False)] * 6
    test = load_split(root, "candle", "test", "visa")
    assert summary(test) == [(0, "good", False)] * 2 + [(1, "anomaly", True)] * 3
    assert all("candle" in r.path.parts for r in train + test)
    raw = cv2.imread(str(test[-1].mask_path), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(raw).tolist()) == {0, 1, 2}  # the fixture keeps VisA's class values
    binary = read_mask(test[-1].mask_path)
    assert set(np.unique(binary).tolist()) == {0, 1}
    assert binary[BOX].all() and binary[BOX2].all()


def test_loco_merges_each_images_mask_files(datasets: dict[str, Path]) -> None:
    root = datasets["loco"]
    assert list_categories(root, "loco") == ["breakfast_box"]
    assert len(load_split(root, "breakfast_box", "train", "loco")) == 6
    val = load_split(root, "breakfast_box", "val", "loco")
    assert summary(val) == [(0, "good", False)] * 2 and "validation" in val[0].path.parts
    test = load_split(root, "breakfast_box", "test", "loco")
    assert summary(test) == ([(0, "good", False)] * 2 + [(1, "logical_anomalies", True)] * 2
                             + [(1, "structural_anomalies", True)] * 2)
    gt = root / "breakfast_box" / "ground_truth" / "logical_anomalies"
    merged = test[2].mask_path  # logical 000: a folder of two files, read as their union
    assert merged == gt / "000" and merged.is_dir()
    union = read_mask(merged)
    assert union[BOX].all() and union[BOX2].all()
    assert union.sum() == union[BOX].size + union[BOX2].size
    single = read_mask(test[3].mask_path)  # a folder of one file: that file
    assert np.array_equal(single, read_mask(gt / "001" / "000.png"))


def test_mvtec2_test_public_and_validation(datasets: dict[str, Path]) -> None:
    root = datasets["mvtec2"]
    assert list_categories(root, "mvtec2") == ["can"]
    assert len(load_split(root, "can", "train", "mvtec2")) == 6
    assert len(load_split(root, "can", "val", "mvtec2")) == 2
    test = load_split(root, "can", "test", "mvtec2")
    assert summary(test) == [(0, "good", False)] * 2 + [(1, "bad", True)] * 3
    assert all("test_private" not in r.path.parts for r in test)
    assert test[-1].mask_path.name == "002_regular_mask.png"


def test_own_validation_split_replaces_the_carved_one(datasets: dict[str, Path], config: Path,
                                                     tmp_path: Path) -> None:
    result = train_detector(TINY, root=datasets["loco"], category="breakfast_box",
                            config=config, out_dir=tmp_path, device="cpu", progress=False)
    assert [r.path.parent.parent.name for r in result.val_records] == ["validation"] * 2
    assert len(result.train_records) == 6
    assert (result.meta["format"], result.meta["val_source"], result.meta["n_val"]) == (
        "loco", "dataset", 2)


# -- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAKERS)
def test_each_layout_is_detected(datasets: dict[str, Path], name: str) -> None:
    assert detect_format(datasets[name]) == DETECTED[name]
    assert list_categories(datasets[name]) == list_categories(datasets[name], name)


def test_mixed_layouts_are_ambiguous(tmp_path: Path) -> None:
    make_btad(tmp_path)
    make_mvtec2(tmp_path)
    with pytest.raises(DataError, match=r"ambiguous: it holds BTAD \(01, 03\); MVTec AD 2 "
                                        r"\(can\); pass --format"):
        detect_format(tmp_path)
    assert list_categories(tmp_path, "btad") == ["01", "03"]  # --format settles it


def test_unknown_layout_says_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match=r"cannot tell the dataset format of .*: it holds "
                                        r"notes, photos, .*pass --format"):
        detect_format(tmp_path)


def test_a_category_folder_given_as_root(datasets: dict[str, Path]) -> None:
    with pytest.raises(DataError, match=r"looks like one BTAD category.*--category 01"):
        detect_format(datasets["btad"] / "01")


def test_unknown_format_and_missing_validation_split(datasets: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="unknown dataset format 'mvtec3'; choose from auto, "
                                          "mvtec, mpdd, visa, loco, mvtec2, btad, folder"):
        scan_split(datasets["btad"], "01", "train", "mvtec3")
    with pytest.raises(ConfigError, match="BTAD has no validation split"):
        scan_split(datasets["btad"], "01", "val", "btad")


# -- malformed copies ------------------------------------------------------------------------


def copy_of(datasets: dict[str, Path], name: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(datasets[name], tmp_path / name))


def test_visa_without_split_csv(datasets: dict[str, Path], tmp_path: Path) -> None:
    root = copy_of(datasets, "visa", tmp_path)
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"VisA split file .*split_csv/1cls.csv does not exist"):
        load_split(root, "candle", "train", "visa")


def edit_visa_csv(root: Path, line: int, column: str, value: str) -> Path:
    """Set one cell of split_csv/1cls.csv (``line`` counts the header as 1)."""
    path = root / "split_csv" / "1cls.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows[line - 1][rows[0].index(column)] = value
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_visa_unknown_split_label_and_missing_mask(datasets: dict[str, Path],
                                                   tmp_path: Path) -> None:
    root = copy_of(datasets, "visa", tmp_path)
    path = edit_visa_csv(root, 3, "split", "validation")
    with pytest.raises(DataError, match=rf"{path} line 3: unknown split 'validation'"):
        load_split(root, "candle", "train", "visa")
    edit_visa_csv(root, 3, "split", "train")
    edit_visa_csv(root, 10, "mask", "")  # the first candle anomaly (header + 8 normal rows)
    with pytest.raises(DataError, match=r"anomaly image .*000.JPG \(.*line 10\) has no mask"):
        load_split(root, "candle", "test", "visa")


def test_mvtec2_image_without_mask(datasets: dict[str, Path], tmp_path: Path) -> None:
    root = copy_of(datasets, "mvtec2", tmp_path)
    (root / "can" / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png").unlink()
    with pytest.raises(DataError, match=r"image .*bad/001_regular.png has no mask"):
        load_split(root, "can", "test", "mvtec2")


def test_loco_image_without_mask_folder_and_masks_of_two_sizes(datasets: dict[str, Path],
                                                               tmp_path: Path) -> None:
    root = copy_of(datasets, "loco", tmp_path)
    gt = root / "breakfast_box" / "ground_truth" / "structural_anomalies"
    for file in (gt / "001").iterdir():
        file.unlink()
    (gt / "001").rmdir()
    with pytest.raises(DataError, match=r"structural_anomalies/001.png has no mask \(expected "
                                        r"the folder .*ground_truth/structural_anomalies/001"):
        load_split(root, "breakfast_box", "test", "loco")
    mask(gt / "001" / "000.png", BOX)
    bad = mask(gt / "001" / "001.png", BOX, shape=(HEIGHT, WIDTH + 4))
    with pytest.raises(DataError, match=rf"mask {bad} is 44x32 but .*000.png in the same"):
        load_split(root, "breakfast_box", "test", "loco")


def test_btad_mask_of_the_wrong_size(datasets: dict[str, Path], tmp_path: Path) -> None:
    root = copy_of(datasets, "btad", tmp_path)
    bad = mask(root / "03" / "ground_truth" / "ko" / "0001.bmp", BOX, shape=(HEIGHT + 2, WIDTH))
    with pytest.raises(DataError, match=rf"mask {bad} is 40x34 but image .*0001.bmp is 40x32"):
        load_split(root, "03", "test", "btad")


# -- command line ----------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr,
                                   result.exception)
    return result.stdout


@pytest.mark.parametrize("name", MAKERS)
def test_cli_benchmark_on_each_fixture(datasets: dict[str, Path], config: Path, name: str,
                                       tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # MPDD by name, the others detected.
    fmt = ["--format", "mpdd"] if name == "mpdd" else []
    invoke("benchmark", "--detectors", TINY, "--root", datasets[name], "--categories",
           CATEGORY[name], *fmt, "--config", config, "--no-onnx", "--out", out, "--device", "cpu",
           "--quiet")
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["category"], row["error"]) == (CATEGORY[name], "")
    n_test = len(load_split(datasets[name], CATEGORY[name], "test", DETECTED[name]))
    assert int(row["n_test"]) == n_test
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert np.isfinite(float(row[key])), key


def test_cli_benchmark_lists_the_categories_of_the_format(datasets: dict[str, Path],
                                                          config: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    invoke("benchmark", "--detectors", TINY, "--root", datasets["btad"], "--format", "btad",
           "--config", config, "--no-onnx", "--out", out, "--device", "cpu", "--quiet")
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        assert [r["category"] for r in csv.DictReader(f)] == ["01", "03"]


def test_cli_test_reads_the_recorded_format(datasets: dict[str, Path], config: Path,
                                            tmp_path: Path) -> None:
    """`anomalykit test` without --root finds the VisA data and layout the model was trained on."""
    invoke("train", TINY, "--root", datasets["visa"], "--category", "candle", "--config", config,
           "--out", tmp_path, "--device", "cpu", "--quiet")
    invoke("test", tmp_path / "model.ckpt", "--device", "cpu", "--quiet")
    payload = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert (payload["format"], payload["category"], payload["metrics"]["n_test"]) == (
        "visa", "candle", 5)


def test_cli_errors(datasets: dict[str, Path], config: Path, tmp_path: Path) -> None:
    make_btad(tmp_path)
    make_mvtec2(tmp_path)
    result = runner.invoke(app, ["benchmark", "--detectors", TINY, "--root", str(tmp_path),
                                 "--no-onnx", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "ambiguous" in result.stderr and "--format" in result.stderr
    result = runner.invoke(app, ["train", TINY, "--root", str(datasets["btad"]), "--category",
                                 "01", "--format", "folder", "--config", str(config),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--format folder needs --good-dir" in result.stderr
    result = runner.invoke(app, ["train", "--help"])
    for name in FORMAT_CHOICES:
        assert name in result.stdout
    assert set(FORMAT_CHOICES) == {"auto", "folder", *FORMATS}
