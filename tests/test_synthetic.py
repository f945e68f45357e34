"""Tests of the deterministic synthetic dataset generator."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from anomalykit import __version__
from anomalykit.data import (
    DEFECTS,
    EASY_CATEGORY,
    SYNTHETIC_CATEGORIES,
    ensure_synthetic,
    generate_synthetic,
    list_mvtec_categories,
    read_image,
    read_mask,
    scan_mvtec,
    synthetic,
    validate_records,
)
from anomalykit.errors import ConfigError, DataError

TEXTURES = ("brick", "grass", "gravel", "weave")
SMALL = {"image_size": 64, "n_train": 3, "n_test_good": 2, "n_test_defect": 8}


def tree_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "a", **SMALL)


def test_constants() -> None:
    assert set(SYNTHETIC_CATEGORIES) == set(DEFECTS)
    assert EASY_CATEGORY in SYNTHETIC_CATEGORIES
    all_defects = {d for ds in DEFECTS.values() for d in ds}
    assert all_defects == {"scratch", "crack", "hole", "stain", "missing", "contamination"}


def test_same_seed_same_bytes_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "b", **SMALL)
    assert tree_hashes(again) == tree_hashes(small)
    other = tree_hashes(generate_synthetic(tmp_path / "c", seed=1, **SMALL))
    reference = tree_hashes(small)
    images = [k for k in reference if k.endswith(".png") and "ground_truth" not in k]
    assert images and all(other[k] != reference[k] for k in images)


def test_category_does_not_depend_on_others(small: Path, tmp_path: Path) -> None:
    alone = generate_synthetic(tmp_path / "pill", categories=["pill"], **SMALL)
    full = tree_hashes(small)
    for rel, digest in tree_hashes(alone).items():
        if rel != "synthetic.json":
            assert full[rel] == digest, rel


def test_layout_readable(small: Path) -> None:
    assert list_mvtec_categories(small) == sorted(SYNTHETIC_CATEGORIES)
    for category in SYNTHETIC_CATEGORIES:
        train = scan_mvtec(small, category, "train")
        test = scan_mvtec(small, category, "test")
        assert len(train) == SMALL["n_train"] and all(r.label == 0 for r in train)
        good = [r for r in test if r.label == 0]
        defect = [r for r in test if r.label == 1]
        assert len(good) == SMALL["n_test_good"] and len(defect) == SMALL["n_test_defect"]
        assert {r.defect_type for r in defect} == set(DEFECTS[category])
        assert all(r.mask_path is not None for r in defect)
        validate_records(train + test)
        image = read_image(train[0].path)
        assert image.shape == (64, 64, 3)


def test_masks_are_exact(small: Path) -> None:
    """Every mask is non-empty, a few % of the image, and equals the altered pixels."""
    size = SMALL["image_size"]
    for category in SYNTHETIC_CATEGORIES:
        defects = DEFECTS[category]
        for i in range(SMALL["n_test_defect"]):
            clean, image, mask = synthetic.render_sample(category, index=i, image_size=size)
            assert mask is not None
            defect = defects[i % len(defects)]
            stem = f"{i // len(defects):03d}"
            on_disk = read_image(small / category / "test" / defect / f"{stem}.png")
            disk_mask = read_mask(small / category / "ground_truth" / defect / f"{stem}_mask.png")
            np.testing.assert_array_equal(on_disk, image)
            np.testing.assert_array_equal(disk_mask, mask)
            changed = np.any(image != clean, axis=2)
            np.testing.assert_array_equal(changed, mask.astype(bool), err_msg=f"{category} {i}")
            area = mask.mean()
            assert 0.004 <= area <= 0.12, (category, defect, area)
            # Visible, not a 1-level nudge. A flat patch on a texture differs from it only by
            # the texture's own contrast, hence the lower bar there.
            delta = np.abs(image.astype(int) - clean.astype(int)).max(axis=2)[mask.astype(bool)]
            low = 8 if defect == "missing" and category in TEXTURES else 20
            assert delta.mean() > low, (category, defect, delta.mean())


def test_good_images_vary(small: Path) -> None:
    for category in SYNTHETIC_CATEGORIES:
        a, b = (read_image(r.path) for r in scan_mvtec(small, category, "train")[:2])
        assert not np.array_equal(a, b)
        assert 20 < a.mean() < 235  # neither black nor blown out


def test_manifest(small: Path) -> None:
    manifest = json.loads((small / "synthetic.json").read_text())
    assert manifest["toolkit_version"] == __version__
    assert manifest["arguments"] == {"categories": list(SYNTHETIC_CATEGORIES), "seed": 0, **SMALL}
    assert not [p for p in small.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_ensure_synthetic_reuses_and_regenerates(tmp_path: Path) -> None:
    args = {"categories": ["washer"], **SMALL}
    root = ensure_synthetic(tmp_path / "d", **args)
    marker = root / "washer" / "train" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    os.utime(marker, ns=(1, 1))  # a regeneration would write a fresh file
    assert ensure_synthetic(tmp_path / "d", **args) == root
    assert marker.stat().st_mtime_ns == 1 != stamp
    ensure_synthetic(tmp_path / "d", **{**args, "n_train": 4})
    assert marker.stat().st_mtime_ns != 1
    assert len(scan_mvtec(root, "washer", "train")) == 4
    # A populated folder without manifest is not ours (a run that dies leaves only a hidden
    # temp folder), so it is never deleted.
    (root / "synthetic.json").unlink()
    with pytest.raises(DataError, match=r"refusing to replace .*d: it exists and has no synthetic"):
        ensure_synthetic(tmp_path / "d", **args)
    assert marker.is_file()


def test_ensure_synthetic_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALYKIT_SYNTHETIC_ROOT", str(tmp_path / "env"))
    assert ensure_synthetic(categories=["pill"], **SMALL) == tmp_path / "env"
    assert (tmp_path / "env" / "pill" / "train" / "good").is_dir()
    monkeypatch.delenv("ANOMALYKIT_SYNTHETIC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert ensure_synthetic(categories=["pill"], **SMALL) == Path("data") / "synthetic"
    assert (tmp_path / "data" / "synthetic" / "synthetic.json").is_file()


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic._write_category

    def fail_on_second(tmp: Path, category: str, args: dict) -> None:
        if category == "grass":
            raise KeyboardInterrupt
        real(tmp, category, args)

    monkeypatch.setattr(synthetic, "_write_category", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "e", categories=["brick", "grass"], **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_folder_and_bad_arguments(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match=r"refusing to replace .*mine: .*synthetic\.json"):
        generate_synthetic(foreign, **SMALL)
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(ConfigError, match="'carpet'"):
        generate_synthetic(tmp_path / "x", categories=["carpet"])
    with pytest.raises(ConfigError, match="image_size is 8"):
        generate_synthetic(tmp_path / "x", image_size=8)
    with pytest.raises(ConfigError, match="seed is -1"):
        ensure_synthetic(tmp_path / "x", seed=-1)
    assert not (tmp_path / "x").exists()
