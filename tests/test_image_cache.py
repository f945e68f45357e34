"""The decode-once cache of AnomalyDataset: same pixels, one decode, invalidation, budget, disk."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anomalykit.data import (
    AnomalyDataset,
    ImageCache,
    ImageRecord,
    build_transform,
    read_image,
    read_mask,
)
from anomalykit.data import dataset as dataset_module
from anomalykit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 24


def write(path: Path, array: np.ndarray) -> Path:
    """cv2.imwrite with RGB -> BGR for 3-channel arrays."""
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    assert cv2.imwrite(str(path), bgr)
    return path


def make_records(folder: Path) -> list[ImageRecord]:
    """Non-square colour, gray, 16-bit, already-at-size and masked records."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (h, w) in enumerate([(90, 120), (61, 47), (SIZE, SIZE), (200, 150)]):
        image = write(folder / f"c{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 3: w // 2 + 3] = 255
        mask_path = write(folder / f"c{i}_mask.png", mask) if i % 2 else None
        records.append(ImageRecord(image, int(mask_path is not None), "dent", mask_path))
    gray = write(folder / "g.png", rng.integers(0, 256, (70, 33), dtype=np.uint8))
    deep = write(folder / "d16.png", rng.integers(0, 65536, (40, 52, 3), dtype=np.uint16))
    records += [ImageRecord(gray, 0, "good"), ImageRecord(deep, 0, "good")]
    return records


def reference_item(record: ImageRecord, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline before the cache: decode at full size, resize inside the transform."""
    image = read_image(record.path)
    mask = (np.zeros(image.shape[:2], np.uint8) if record.mask_path is None
            else read_mask(record.mask_path))
    out = build_transform(size)(image=image, mask=mask)
    return (torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            torch.from_numpy(out["mask"].astype(np.float32)[None]))


def assert_same_items(a: AnomalyDataset, b: AnomalyDataset) -> None:
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert int(x["label"]) == int(y["label"]) and x["path"] == y["path"]


@pytest.fixture
def records(tmp_path: Path) -> list[ImageRecord]:
    return make_records(tmp_path / "images")


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths decoded by AnomalyDataset, in order (the module-level read_image is counted)."""
    seen: list[str] = []

    def counting(path):
        seen.append(str(path))
        return read_image(path)

    monkeypatch.setattr(dataset_module, "read_image", counting)
    return seen


def test_cached_items_are_exactly_the_uncached_ones(records: list[ImageRecord]) -> None:
    cached = AnomalyDataset(records, SIZE)
    assert cached.cache is not None and AnomalyDataset(records, SIZE, cache=False).cache is None
    for _ in range(2):  # the second pass is served from memory
        for i, record in enumerate(records):
            image, mask = reference_item(record, SIZE)
            item = cached[i]
            assert torch.equal(item["image"], image) and torch.equal(item["mask"], mask)
    assert cached.cache.hits == len(records) and cached.cache.misses == len(records)
    assert_same_items(cached, AnomalyDataset(records, SIZE, cache=False))
    # Augmentation runs on the cached copy and draws the same random stream as before.
    assert_same_items(AnomalyDataset(records, SIZE, augment=True, seed=3),
                      AnomalyDataset(records, SIZE, augment=True, seed=3, cache=False))


def test_cached_arrays_are_read_only_and_survive_augmentation(
        records: list[ImageRecord]) -> None:
    shared = ImageCache()
    augmenting = AnomalyDataset(records, SIZE, augment=True, seed=0, cache=shared)
    for _ in range(3):
        for i in range(len(augmenting)):
            augmenting[i]
    assert shared.misses == len(records)
    entry = next(iter(shared._entries.values()))[1]
    assert not entry["image"].flags.writeable
    assert_same_items(AnomalyDataset(records, SIZE, cache=shared),
                      AnomalyDataset(records, SIZE, cache=False))


def test_second_epoch_does_not_decode(records: list[ImageRecord], decodes: list[str]) -> None:
    dataset = AnomalyDataset(records, SIZE, augment=True, seed=0)
    loader = DataLoader(dataset, batch_size=3, shuffle=True)
    for _ in loader:
        pass
    assert sorted(decodes) == sorted(str(r.path) for r in records)
    for _ in loader:
        pass
    assert len(decodes) == len(records)
    uncached = AnomalyDataset(records, SIZE, cache=False)
    uncached[0], uncached[0]
    assert len(decodes) == len(records) + 2


def test_a_changed_file_is_decoded_again(records: list[ImageRecord],
                                         decodes: list[str]) -> None:
    dataset = AnomalyDataset(records, SIZE)
    masked = next(i for i, r in enumerate(records) if r.mask_path is not None)
    first = dataset[masked]
    # Replace the image with another one of the same size; a later mtime even if the
    # filesystem clock is coarse.
    path = records[masked].path
    write(path, np.full((*read_image(path).shape[:2], 3), 7, np.uint8))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = dataset[masked]
    assert len(decodes) == 2 and not torch.equal(first["image"], second["image"])
    assert torch.equal(second["image"], reference_item(records[masked], SIZE)[0])
    dataset[masked]
    assert len(decodes) == 2 and len(dataset.cache) == 1  # replaced in place, not added
    # A touched mask invalidates its record too.
    mask_path = records[masked].mask_path
    stat = os.stat(mask_path)
    os.utime(mask_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    dataset[masked]
    assert len(decodes) == 3
    # A deleted file is reported as before, not as a stale cache hit.
    os.remove(path)
    with pytest.raises(DataError, match="does not exist"):
        dataset[masked]


def test_the_byte_budget_is_respected(records: list[ImageRecord],
                                      decodes: list[str]) -> None:
    per_image = SIZE * SIZE * 3
    budget = 2 * per_image + per_image // 2  # room for two unmasked records
    unmasked = [r for r in records if r.mask_path is None]
    dataset = AnomalyDataset(unmasked, SIZE, cache_bytes=budget)
    for _ in range(2):
        for i in range(len(dataset)):
            dataset[i]
        assert dataset.cache.nbytes <= budget and len(dataset.cache) == 2
    # Full: the first two stay, the rest are decoded on every pass.
    assert len(decodes) == len(unmasked) + (len(unmasked) - 2)
    assert_same_items(dataset, AnomalyDataset(unmasked, SIZE, cache=False))
    nothing = AnomalyDataset(unmasked, SIZE, cache_bytes=0)
    nothing[0]
    assert len(nothing.cache) == 0 and nothing.cache.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(-1)


def test_the_disk_cache_survives_a_new_dataset_and_process(
        records: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    first = AnomalyDataset(records, SIZE, cache_dir=cache_dir)
    expected = [first[i] for i in range(len(first))]
    files = sorted(cache_dir.iterdir())
    assert len(files) == len(records) and all(f.suffix == ".npz" for f in files)

    def no_decode(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(dataset_module, "read_image", no_decode)
    again = AnomalyDataset(records, SIZE, cache_dir=cache_dir)
    for i, item in enumerate(expected):
        assert torch.equal(again[i]["image"], item["image"])
        assert torch.equal(again[i]["mask"], item["mask"])
    assert again.cache.disk_hits == len(records) and again.cache.misses == 0
    monkeypatch.undo()

    # A new process reads the same files and decodes nothing.
    torch.save(torch.stack([item["image"] for item in expected]), tmp_path / "expected.pt")
    code = f"""
import torch
from anomalykit.data import AnomalyDataset, ImageRecord
from anomalykit.data import dataset as module
def no_decode(path):
    raise AssertionError("decoded " + str(path))
module.read_image = no_decode
records = [ImageRecord(p, l, d, m) for p, l, d, m in {[
    (str(r.path), r.label, r.defect_type, r.mask_path and str(r.mask_path)) for r in records]!r}]
dataset = AnomalyDataset(records, {SIZE}, cache_dir={str(cache_dir)!r})
images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
assert torch.equal(images, torch.load({str(tmp_path / "expected.pt")!r}))
assert dataset.cache.disk_hits == len(records) and dataset.cache.misses == 0
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    # A changed source overwrites its own entry (no orphan); a torn file is a miss.
    path = records[0].path
    write(path, np.zeros((30, 30, 3), np.uint8))
    changed = AnomalyDataset(records, SIZE, cache_dir=cache_dir)
    assert float(changed[0]["image"].max()) == 0.0 and changed.cache.misses == 1
    files[0].write_bytes(b"torn")
    torn = AnomalyDataset(records, SIZE, cache_dir=cache_dir)
    for i in range(len(torn)):
        torn[i]
    assert torn.cache.misses == 1 and torn.cache.disk_hits == len(records) - 1
    assert len(list(cache_dir.iterdir())) == len(records)  # no temporary files left


def test_workers_start_from_a_preloaded_cache(records: list[ImageRecord],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = AnomalyDataset(records, SIZE)
    dataset.preload(threads=2)
    assert dataset.cache.misses == len(records) and len(dataset.cache) == len(records)
    copy = pickle.loads(pickle.dumps(dataset))  # spawn-started workers get a pickled copy
    assert len(copy.cache) == len(records)

    def no_decode(path):
        raise AssertionError(f"decoded {path} in a worker")

    # Forked workers inherit both the patch and the filled cache: any decode would fail.
    monkeypatch.setattr(dataset_module, "read_image", no_decode)
    loader = DataLoader(dataset, batch_size=2, num_workers=2,
                        multiprocessing_context="fork")
    images = torch.cat([batch["image"] for batch in loader])
    monkeypatch.undo()
    expected = torch.stack([reference_item(r, SIZE)[0] for r in records])
    assert torch.equal(images, expected)
