"""Tests of the data layer: readers, records, validation, transforms and the dataset."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalykit.data import (
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    ImageRecord,
    build_transform,
    list_mvtec_categories,
    read_image,
    read_mask,
    scan_folder,
    scan_mvtec,
    split_train_val,
    validate_records,
)
from anomalykit.data import io as data_io
from anomalykit.errors import ConfigError, DataError

# --------------------------------------------------------------------------- helpers


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB (or gray, or any cv2-writable) array; creates parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    assert cv2.imwrite(str(path), array)
    return path


def solid(h: int = 24, w: int = 32, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def write_mask(path: Path, h: int = 24, w: int = 32) -> Path:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[4:10, 5:12] = 255
    return write_rgb(path, mask)


def write_tiff(path: Path, array: np.ndarray) -> Path:
    """Minimal uncompressed little-endian TIFF with any number of 8-bit samples per pixel."""
    h, w, c = array.shape
    data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    n_tags, ifd = 10, 8
    bps_at = ifd + 2 + n_tags * 12 + 4
    extra_at = bps_at + 2 * c
    data_at = extra_at + 2 * (c - 1)

    def tag(code: int, kind: int, values: list[int], offset: int = 0) -> bytes:
        head = struct.pack("<HHI", code, kind, len(values))
        if kind == 4:
            return head + struct.pack("<I", values[0])
        if len(values) <= 2:  # two shorts fit in the entry itself
            return head + struct.pack("<HH", *(values + [0, 0])[:2])
        return head + struct.pack("<I", offset)

    tags = [
        tag(256, 4, [w]),
        tag(257, 4, [h]),
        tag(258, 3, [8] * c, bps_at),
        tag(259, 3, [1]),
        tag(262, 3, [1]),
        tag(273, 4, [data_at]),
        tag(277, 3, [c]),
        tag(278, 4, [h]),
        tag(279, 4, [len(data)]),
        tag(338, 3, [0] * (c - 1), extra_at),
    ]
    path.write_bytes(
        b"II*\x00"
        + struct.pack("<I", ifd)
        + struct.pack("<H", n_tags)
        + b"".join(tags)
        + struct.pack("<I", 0)
        + struct.pack(f"<{c}H", *[8] * c)
        + struct.pack(f"<{c - 1}H", *[0] * (c - 1))
        + data
    )
    return path


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """A hand-made MVTec tree: category 'bottle' (+ an incomplete 'cable' without train/good)."""
    root = tmp_path / "mvtec"
    cat = root / "bottle"
    for i in (0, 1, 2, 10):  # 10 checks natural order (2 before 10)
        write_rgb(cat / "train" / "good" / f"{i}.png", solid(value=90 + i))
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"junk")
    write_rgb(cat / "test" / "good" / "000.png", solid())
    write_rgb(cat / "test" / "scratch" / "000.png", solid())
    write_rgb(cat / "test" / "scratch" / "001.jpg", solid())
    write_rgb(cat / "test" / "scratch" / "002.BMP", solid())
    write_mask(cat / "ground_truth" / "scratch" / "000_mask.png")
    write_mask(cat / "ground_truth" / "scratch" / "001_mask.bmp")
    write_mask(cat / "ground_truth" / "scratch" / "002_mask.tif")
    write_rgb(cat / "test" / "crack" / "000.png", solid())
    write_mask(cat / "ground_truth" / "crack" / "000_mask.png")
    write_rgb(cat / "test" / "unlabelled" / "000.png", solid())  # no ground_truth folder
    (root / "cable" / "test").mkdir(parents=True)
    return root


# --------------------------------------------------------------------------- reading


def test_image_extensions_constant() -> None:
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def test_read_image_colour_order_and_formats(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 30
    for ext in (".png", ".bmp", ".tif", ".TIFF", ".webp"):
        out = read_image(write_rgb(tmp_path / f"x{ext}", rgb))
        assert out.shape == (6, 7, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, rgb)
    jpg = read_image(write_rgb(tmp_path / "x.jpeg", rgb))
    assert jpg.shape == (6, 7, 3) and abs(int(jpg[..., 0].mean()) - 200) < 8


def test_read_image_promotes_gray_rgba_16bit(tmp_path: Path) -> None:
    gray = np.arange(42, dtype=np.uint8).reshape(6, 7)
    out = read_image(write_rgb(tmp_path / "gray.png", gray))
    assert out.shape == (6, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    bgra = np.zeros((6, 7, 4), dtype=np.uint8)
    bgra[..., 2] = 250  # red in BGRA order
    bgra[..., 3] = 0  # fully transparent: alpha must be dropped, not composited
    out = read_image(write_rgb(tmp_path / "rgba.png", bgra))
    assert out.shape == (6, 7, 3) and (out[..., 0] == 250).all() and (out[..., 1:] == 0).all()

    g16 = np.array([[0, 257, 65535, 32768]], dtype=np.uint16)
    out = read_image(write_rgb(tmp_path / "g16.png", g16))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])
    c16 = np.full((2, 3, 3), 65535, dtype=np.uint16)
    c16[..., 0] = 0  # no red (write_rgb takes RGB)
    out = read_image(write_rgb(tmp_path / "c16.png", c16))
    assert (out[..., 0] == 0).all() and (out[..., 1:] == 255).all()


def test_read_image_gray_alpha(tmp_path: Path) -> None:
    from PIL import Image as pil
    la = np.zeros((5, 4, 2), dtype=np.uint8)
    la[..., 0] = 77
    la[..., 1] = 255
    pil.fromarray(la, "LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out.shape == (5, 4, 3) and (out == 77).all()


def test_read_image_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"image .*nothere\.png does not exist"):
        read_image(tmp_path / "nothere.png")
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG garbage garbage garbage")
    with pytest.raises(DataError, match=r"cannot read image .*x\.png: corrupt or unsupported file"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: corrupt or unsupported"):
        read_image(empty)
    # OpenCV refuses TIFFs with more than 4 samples per pixel outright.
    five = write_tiff(tmp_path / "five.tif", np.zeros((4, 5, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"cannot read image .*five\.tif: corrupt or unsupported"):
        read_image(five)
    # A decoder that does return 5 channels must still be caught, naming path and count.
    ok = write_rgb(tmp_path / "ok.png", solid())
    monkeypatch.setattr(data_io.cv2, "imdecode", lambda *a: np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(DataError, match=r"image .*ok\.png has 5 channels"):
        read_image(ok)
    with pytest.raises(DataError, match=r"mask .*ok\.png has 5 channels"):
        read_mask(ok)
    monkeypatch.setattr(data_io.cv2, "imdecode", lambda *a: np.zeros((4, 5), np.float32))
    with pytest.raises(DataError, match=r"ok\.png: unsupported pixel type float32"):
        read_image(ok)


def test_read_image_two_sample_tiff(tmp_path: Path) -> None:
    # OpenCV decodes a gray+extra-sample TIFF to its first plane; it must come out as gray RGB.
    array = np.zeros((4, 5, 2), dtype=np.uint8)
    array[..., 0] = 40
    array[..., 1] = 255
    out = read_image(write_tiff(tmp_path / "two.tif", array))
    assert out.shape == (4, 5, 3) and (out == 40).all()


def test_read_mask_binarises(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(read_mask(write_rgb(tmp_path / "m.png", values)), [[0, 1, 1, 1]])
    colour = np.zeros((1, 3, 3), dtype=np.uint8)
    colour[0, 1, 2] = 9  # only one channel set: max reduction still marks it
    out = read_mask(write_rgb(tmp_path / "c.png", colour))
    assert out.dtype == np.uint8 and out.shape == (1, 3)
    np.testing.assert_array_equal(out, [[0, 1, 0]])
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque alpha must not turn the whole mask on
    rgba[0, 1, 0] = 255
    np.testing.assert_array_equal(read_mask(write_rgb(tmp_path / "a.png", rgba)), [[0, 1]])
    m16 = np.array([[0, 3]], dtype=np.uint16)
    np.testing.assert_array_equal(read_mask(write_rgb(tmp_path / "m16.png", m16)), [[0, 1]])
    with pytest.raises(DataError, match=r"mask .*gone\.png does not exist"):
        read_mask(tmp_path / "gone.png")


# --------------------------------------------------------------------------- MVTec reader


def test_scan_mvtec_train(mvtec: Path) -> None:
    records = scan_mvtec(mvtec, "bottle", "train")
    assert [r.path.name for r in records] == ["0.png", "1.png", "2.png", "10.png"]
    assert all(r.label == 0 and r.defect_type == "good" and r.mask_path is None for r in records)
    assert list_mvtec_categories(mvtec) == ["bottle"]


def test_scan_mvtec_test(mvtec: Path) -> None:
    records = scan_mvtec(str(mvtec), "bottle", "test")
    summary = [
        (r.defect_type, r.path.name, r.label, r.mask_path and r.mask_path.name) for r in records
    ]
    assert summary == [
        ("good", "000.png", 0, None),
        ("crack", "000.png", 1, "000_mask.png"),
        ("scratch", "000.png", 1, "000_mask.png"),
        ("scratch", "001.jpg", 1, "001_mask.bmp"),
        ("scratch", "002.BMP", 1, "002_mask.tif"),
        ("unlabelled", "000.png", 1, None),
    ]
    assert all(isinstance(r.path, Path) for r in records)
    assert scan_mvtec(mvtec, "bottle", "test") == records  # deterministic
    validate_records(records)


def test_scan_mvtec_missing_root_category_split(mvtec: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset root .*nowhere does not exist"):
        scan_mvtec(tmp_path / "nowhere", "bottle", "train")
    with pytest.raises(DataError, match=r"dataset root .*nowhere does not exist"):
        list_mvtec_categories(tmp_path / "nowhere")
    with pytest.raises(
        DataError, match=r"category 'screw' not found in .*mvtec; available: bottle$"
    ):
        scan_mvtec(mvtec, "screw", "train")
    with pytest.raises(DataError, match=r"split folder .*cable[/\\]train does not exist"):
        scan_mvtec(mvtec, "cable", "train")
    with pytest.raises(DataError, match="split is 'val'"):
        scan_mvtec(mvtec, "bottle", "val")  # type: ignore[arg-type]


def test_scan_mvtec_empty_split(mvtec: Path) -> None:
    train_good = mvtec / "bottle" / "train" / "good"
    for p in train_good.glob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match=r"^no images in .*train[/\\]good$"):
        scan_mvtec(mvtec, "bottle", "train")
    (mvtec / "bottle" / "test" / "empty_defect").mkdir()
    with pytest.raises(DataError, match=r"^no images in .*empty_defect$"):
        scan_mvtec(mvtec, "bottle", "test")


def test_scan_mvtec_mask_errors(mvtec: Path) -> None:
    gt = mvtec / "bottle" / "ground_truth" / "scratch"
    write_mask(gt / "007_mask.png")
    with pytest.raises(DataError, match=r"mask .*007_mask\.png matches no image"):
        scan_mvtec(mvtec, "bottle", "test")
    (gt / "007_mask.png").unlink()
    (gt / "001_mask.bmp").unlink()
    with pytest.raises(
        DataError, match=r"image .*001\.jpg has no mask \(expected .*scratch[/\\]001_mask\.png\)"
    ):
        scan_mvtec(mvtec, "bottle", "test")
    write_mask(gt / "001_mask.bmp")
    write_mask(gt / "001_mask.png")
    with pytest.raises(DataError, match=r"masks .*001_mask.* and .*001_mask.* both match image"):
        scan_mvtec(mvtec, "bottle", "test")


def test_scan_mvtec_on_synthetic(tmp_path: Path) -> None:
    from anomalykit.data import generate_synthetic

    root = generate_synthetic(
        tmp_path / "syn",
        categories=["pill"],
        image_size=32,
        n_train=3,
        n_test_good=2,
        n_test_defect=4,
    )
    assert list_mvtec_categories(root) == ["pill"]
    test = scan_mvtec(root, "pill", "test")
    assert [r.label for r in test] == [0, 0, 1, 1, 1, 1]
    assert all((r.mask_path is None) == (r.label == 0) for r in test)
    assert all(r.mask_path.name == f"{r.path.stem}_mask.png" for r in test if r.mask_path)
    validate_records(scan_mvtec(root, "pill", "train") + test)


# --------------------------------------------------------------------------- folder reader


def test_scan_folder_layouts(tmp_path: Path) -> None:
    good, defects, masks = tmp_path / "good", tmp_path / "bad", tmp_path / "masks"
    for i in range(3):
        write_rgb(good / f"g{i}.png", solid())
    write_rgb(defects / "a.png", solid())
    write_rgb(defects / "dent" / "b.jpg", solid())
    write_mask(masks / "a_mask.png")
    write_mask(masks / "dent" / "b.png")  # bare stem also matches

    only_good = scan_folder(good)
    assert [r.label for r in only_good] == [0, 0, 0]
    no_masks = scan_folder(good, defects)
    assert [(r.defect_type, r.mask_path) for r in no_masks[3:]] == [
        ("defect", None),
        ("dent", None),
    ]
    records = scan_folder(good, defects, masks)
    assert [(r.defect_type, r.label, r.mask_path) for r in records[3:]] == [
        ("defect", 1, masks / "a_mask.png"),
        ("dent", 1, masks / "dent" / "b.png"),
    ]
    write_mask(masks / "c-gt.png")
    write_rgb(defects / "c.png", solid())
    (masks / "a_mask.png").rename(masks / "a-gt.png")
    records = scan_folder(good, defects, masks, mask_suffix="-gt")
    assert {r.path.name: r.mask_path.name for r in records if r.mask_path} == {
        "a.png": "a-gt.png",
        "c.png": "c-gt.png",
        "b.jpg": "b.png",
    }


def test_scan_folder_errors(tmp_path: Path) -> None:
    good, defects, masks = tmp_path / "good", tmp_path / "bad", tmp_path / "masks"
    with pytest.raises(DataError, match=r"good image folder .*good does not exist"):
        scan_folder(good)
    good.mkdir()
    with pytest.raises(DataError, match=r"^no images in .*good$"):
        scan_folder(good)
    write_rgb(good / "g.png", solid())
    defects.mkdir()
    with pytest.raises(DataError, match=r"^no images in .*bad$"):
        scan_folder(good, defects)
    write_rgb(defects / "a.png", solid())
    with pytest.raises(DataError, match=r"mask folder .*masks does not exist"):
        scan_folder(good, defects, masks)
    with pytest.raises(DataError, match="given without a defect image folder"):
        scan_folder(good, None, masks)
    masks.mkdir()
    with pytest.raises(DataError, match=r"image .*a\.png has no mask"):
        scan_folder(good, defects, masks)
    write_mask(masks / "a_mask.png")
    write_mask(masks / "z_mask.png")
    with pytest.raises(DataError, match=r"mask .*z_mask\.png matches no image"):
        scan_folder(good, defects, masks)
    (masks / "z_mask.png").unlink()
    write_rgb(defects / "a.jpg", solid())
    with pytest.raises(DataError, match=r"share the stem 'a'"):
        scan_folder(good, defects, masks)


# --------------------------------------------------------------------------- records


def test_image_record_normalises_paths(tmp_path: Path) -> None:
    record = ImageRecord(str(tmp_path / "a.png"), 1, "dent", str(tmp_path / "m.png"))
    assert record.path == tmp_path / "a.png" and record.mask_path == tmp_path / "m.png"
    assert record == ImageRecord(tmp_path / "a.png", 1, "dent", tmp_path / "m.png")
    with pytest.raises(DataError, match=r"label of .*a\.png is 2"):
        ImageRecord(tmp_path / "a.png", 2, "dent", None)


def test_split_train_val() -> None:
    records = [ImageRecord(Path(f"{i}.png"), 0, "good", None) for i in range(50)]
    train, val = split_train_val(records, 0.2, seed=3)
    assert (len(train), len(val)) == (40, 10)
    assert not set(train) & set(val) and set(train) | set(val) == set(records)
    assert split_train_val(records, 0.2, seed=3) == (train, val)
    assert split_train_val(records, 0.2, seed=4)[1] != val
    assert train == sorted(train, key=records.index)  # input order kept
    assert split_train_val(records, 0.0) == (records, [])
    assert [len(p) for p in split_train_val(records[:2], 0.01)] == [1, 1]
    assert [len(p) for p in split_train_val(records[:1], 0.5)] == [1, 0]
    assert [len(p) for p in split_train_val(records[:3], 0.9)] == [1, 2]
    with pytest.raises(DataError, match=r"good images only, got .*bad\.png"):
        split_train_val([*records, ImageRecord(Path("bad.png"), 1, "dent", None)])
    with pytest.raises(DataError, match="empty"):
        split_train_val([])
    with pytest.raises(ConfigError, match="val_fraction is 1.0"):
        split_train_val(records, 1.0)


def test_validate_records_errors(mvtec: Path, tmp_path: Path) -> None:
    records = scan_mvtec(mvtec, "bottle", "test")
    validate_records(records)
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"garbage" * 20)
    bad = ImageRecord(corrupt, 0, "good", None)
    with pytest.raises(DataError, match=r"cannot read image .*x\.png: corrupt or unsupported file"):
        validate_records([*records, bad, ImageRecord(tmp_path / "gone.png", 0, "good", None)])
    small = write_mask(tmp_path / "small_mask.png", h=80, w=100)
    image = write_rgb(tmp_path / "big.png", solid(128, 128))
    mismatch = ImageRecord(image, 1, "dent", small)
    with pytest.raises(
        DataError,
        match=r"mask .*small_mask\.png is 100x80 but image .*big\.png is "
        r"128x128$",
    ):
        validate_records([mismatch])
    validate_records([mismatch], check_masks=False)
    corrupt_mask = ImageRecord(image, 1, "dent", corrupt)
    with pytest.raises(DataError, match=r"cannot read mask .*x\.png"):
        validate_records([corrupt_mask])
    with pytest.raises(DataError, match="no records"):
        validate_records([])


# --------------------------------------------------------------------------- transform + dataset


def test_build_transform_output() -> None:
    transform = build_transform(16)
    out = transform(image=solid(30, 50, 255), mask=np.ones((30, 50), np.uint8))
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
    assert np.allclose(out["image"], 1.0) and out["mask"].shape == (16, 16)
    with pytest.raises(ConfigError, match="image_size is 0"):
        build_transform(0)


def test_dataset_items(mvtec: Path) -> None:
    records = scan_mvtec(mvtec, "bottle", "test")
    dataset = AnomalyDataset(records, 20)
    assert len(dataset) == len(records) and dataset.has_masks
    assert not AnomalyDataset(scan_mvtec(mvtec, "bottle", "train"), 20).has_masks
    for i, record in enumerate(records):
        item = dataset[i]
        assert item["image"].shape == (3, 20, 20) and item["image"].dtype == torch.float32
        assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
        assert item["mask"].shape == (1, 20, 20) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert int(item["label"]) == record.label
        assert item["path"] == str(record.path) and item["defect_type"] == record.defect_type
        assert (float(item["mask"].max()) == 1.0) == (record.mask_path is not None)
    assert float(dataset[0]["image"][0, 0, 0]) == pytest.approx(100 / 255, abs=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 20, 20) and batch["label"].shape == (4,)


def test_dataset_mask_mismatch(tmp_path: Path) -> None:
    image = write_rgb(tmp_path / "i.png", solid(128, 128))
    mask = write_mask(tmp_path / "m.png", h=80, w=100)
    dataset = AnomalyDataset([ImageRecord(image, 1, "dent", mask)], 32)
    with pytest.raises(DataError, match=r"mask .*m\.png is 100x80 but image .*i\.png is 128x128"):
        dataset[0]


@pytest.mark.parametrize("augment", [False, True])
def test_transform_keeps_mask_aligned(tmp_path: Path, augment: bool) -> None:
    h, w = 90, 120  # not square and not a multiple of the output size
    image = np.full((h, w, 3), 20, dtype=np.uint8)
    image[10:40, 70:110] = 240  # bright rectangle in the top-right
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[10:40, 70:110] = 255
    record = ImageRecord(
        write_rgb(tmp_path / "i.png", image), 1, "dent", write_rgb(tmp_path / "m.png", mask)
    )
    flips_seen = set()
    for seed in range(12 if augment else 1):
        item = AnomalyDataset([record], 30, augment=augment, seed=seed)[0]
        img, msk = item["image"].mean(0), item["mask"][0]
        inside, outside = img[msk == 1], img[msk == 0]
        # Nearest-neighbour mask vs bilinear image: allow the 1-px border to blend.
        assert msk.sum() > 0.5 * 30 * 30 * (30 * 40) / (h * w)
        assert float(inside.median()) > 0.75 and float(outside.median()) < 0.2
        ys, xs = torch.nonzero(msk, as_tuple=True)
        flips_seen.add((bool(ys.float().mean() > 15), bool(xs.float().mean() > 15)))
    if augment:
        assert len(flips_seen) > 1  # the flips did move image and mask, together
    else:
        assert flips_seen == {(False, True)}


def test_reading_needs_no_torch(tmp_path: Path) -> None:
    """ONNX deployment reads images through anomalykit.data without torch or albumentations."""
    import subprocess
    import sys

    import anomalykit.data as data

    assert sorted(data.__all__) == sorted(data._EXPORTS)
    image = write_rgb(tmp_path / "i.png", solid())
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "albumentations"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from anomalykit.data import read_image, scan_mvtec, validate_records, generate_synthetic
assert read_image({str(image)!r}).shape == (24, 32, 3)
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_image_grid_lays_out_channels_first_or_last_and_grey(tmp_path):
    from anomalykit.data.io import image_grid, read_image, write_png

    images = np.zeros((5, 3, 4, 6), np.float32)
    images[1] = 1.0  # the second tile white
    grid = image_grid(images, nrow=3, pad=1, background=0)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:5, 8:14] == 255).all() and grid[1:5, 1:7].max() == 0
    np.testing.assert_array_equal(image_grid(images.transpose(0, 2, 3, 1), nrow=3, pad=1,
                                             background=0), grid)
    grey = image_grid(images[:, :1], nrow=3, pad=1, background=0)
    np.testing.assert_array_equal(grey, grid)
    path = write_png(tmp_path / "grid.png", grid)
    np.testing.assert_array_equal(read_image(path), grid)
    with pytest.raises(DataError, match="image_grid needs"):
        image_grid(np.zeros((2, 3)))
