"""``anomalykit data train-renderer`` / ``data augment``: real checkpoints and image files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from anomalykit.cli import app
from anomalykit.data.augment import augment, draw_mask, stargan_domains, train_renderer
from anomalykit.data.io import read_image, read_mask, write_png
from anomalykit.data.synthetic import DEFECTS, render_sample
from anomalykit.errors import ConfigError, DataError

SIZE = 32
TINY_PIX2PIX = {"width": 4, "depth": 3, "d_width": 4, "d_layers": 2}


@pytest.fixture(scope="module")
def pix2pix_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("renderer") / "pix2pix.ckpt"
    return train_renderer("pix2pix", out, image_size=SIZE, n_train=12, epochs=1, batch_size=6,
                          model_options=TINY_PIX2PIX, device="cpu", progress=False)


@pytest.fixture()
def good_dir(tmp_path) -> Path:
    folder = tmp_path / "good"
    for i in range(2):
        _, image, _ = render_sample("weave", split="train", index=i, image_size=48)
        write_png(folder / f"g{i}.png", image)  # 48 px: augment resizes to the renderer's 32
    return folder


def test_pix2pix_renders_defects_only_inside_the_written_masks(pix2pix_ckpt, good_dir, tmp_path):
    out = tmp_path / "aug"
    reports = []
    result = augment(pix2pix_ckpt, good_dir, out, per_image=3, masks="perlin", seed=0,
                     progress=lambda done, total: reports.append((done, total)))
    assert result.model == "pix2pix" and result.counts == {"test/pix2pix": 6}
    assert reports == [(1, 2), (2, 2)]  # once per good image
    for image_path in sorted((out / "test" / "pix2pix").glob("*.png")):
        image = read_image(image_path)
        mask = read_mask(out / "ground_truth" / "pix2pix" / f"{image_path.stem}_mask.png")
        good = read_image(good_dir / f"{image_path.stem.split('_')[0]}.png")
        import cv2

        good = cv2.resize(good, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE) and mask.any()
        outside = mask == 0
        np.testing.assert_array_equal(image[outside], good[outside])
    manifest = json.loads((out / "augment.json").read_text())
    assert manifest["model"] == "pix2pix" and manifest["counts"] == {"test/pix2pix": 6}
    assert len(manifest["checkpoint_sha256"]) == 64


def test_same_seed_same_images(pix2pix_ckpt, good_dir, tmp_path):
    a = augment(pix2pix_ckpt, good_dir, tmp_path / "a", per_image=2, masks="synthetic", seed=3)
    b = augment(pix2pix_ckpt, good_dir, tmp_path / "b", per_image=2, masks="synthetic", seed=3)
    files = sorted(p.relative_to(a.out) for p in a.out.rglob("*.png"))
    assert files == sorted(p.relative_to(b.out) for p in b.out.rglob("*.png")) and files
    for f in files:
        assert (a.out / f).read_bytes() == (b.out / f).read_bytes()


def test_a_painted_mask_is_used_for_every_image(pix2pix_ckpt, good_dir, tmp_path):
    painted = np.zeros((SIZE, SIZE), np.uint8)
    painted[10:20, 5:25] = 255
    write_png(tmp_path / "painted.png", painted)
    out = tmp_path / "aug"
    augment(pix2pix_ckpt, good_dir, out, per_image=1, masks=str(tmp_path / "painted.png"))
    for mask_path in (out / "ground_truth" / "pix2pix").glob("*_mask.png"):
        np.testing.assert_array_equal(read_mask(mask_path) > 0, painted > 0)
    empty = tmp_path / "empty.png"
    write_png(empty, np.zeros((SIZE, SIZE), np.uint8))
    with pytest.raises(DataError, match="empty"):
        augment(pix2pix_ckpt, good_dir, tmp_path / "aug2", masks=str(empty))


def test_bad_inputs_name_the_problem(pix2pix_ckpt, good_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        augment(pix2pix_ckpt, good_dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(DataError, match="does not exist"):
        augment(tmp_path / "missing.ckpt", good_dir, tmp_path / "o1")
    with pytest.raises(DataError, match="no image files"):
        (tmp_path / "nothing").mkdir()
        augment(pix2pix_ckpt, tmp_path / "nothing", tmp_path / "o2")
    with pytest.raises(ConfigError, match="masks must be one of"):
        augment(pix2pix_ckpt, good_dir, tmp_path / "o3", masks="stars")
    from anomalykit.registry import create

    vae = create("vae", "generative", image_size=SIZE, latent_dim=2, widths=[4], strides=[2])
    vae.save(tmp_path / "vae.ckpt")
    with pytest.raises(ConfigError, match="'vae' model"):
        augment(tmp_path / "vae.ckpt", good_dir, tmp_path / "o4")


def test_masks_are_never_empty():
    rng = np.random.default_rng(0)
    for kind in ("perlin", "synthetic"):
        for _ in range(5):
            mask = draw_mask(kind, SIZE, rng)
            assert mask.shape == (SIZE, SIZE) and mask.any() and set(np.unique(mask)) <= {0.0, 1.0}


def test_stargan_domains_are_good_then_each_defect_type():
    data, names = stargan_domains("brick", 10, image_size=SIZE, seed=0)
    assert names == ["good", *DEFECTS["brick"]]
    assert data["image"].shape == (10, 3, SIZE, SIZE)
    assert data["domain"].tolist() == [k % len(names) for k in range(10)]


def test_stargan_renders_each_defect_type(tmp_path, good_dir):
    ckpt = train_renderer("stargan", tmp_path / "star.ckpt", categories=["washer"], image_size=SIZE,
                          n_train=8, epochs=1, batch_size=4, device="cpu", progress=False,
                          model_options={"width": 4, "blocks": 1, "d_width": 4, "d_layers": 2,
                                         "n_critic": 1})
    out = tmp_path / "aug"
    result = augment(ckpt, good_dir, out)
    assert result.counts == {f"test/{d}": 2 for d in DEFECTS["washer"]}
    for defect in DEFECTS["washer"]:
        assert sorted(p.name for p in (out / "ground_truth" / defect).iterdir()) == [
            "g0_mask.png", "g1_mask.png"]


def test_singan_variations_become_good_training_images(good_dir, tmp_path):
    out = tmp_path / "aug"
    result = augment("singan", good_dir / "g0.png", out, per_image=3, image_size=24,
                     singan_options={"steps_per_scale": 2, "width": 4, "min_size": 12})
    assert result.counts == {"train/good": 3}
    images = [read_image(p) for p in sorted((out / "train" / "good").glob("g0_singan_*.png"))]
    assert len(images) == 3 and all(i.shape == (24, 24, 3) for i in images)


def test_cli_trains_a_renderer_and_augments(tmp_path, good_dir):
    runner = CliRunner()
    ckpt = tmp_path / "p.ckpt"
    sets = [arg for k, v in TINY_PIX2PIX.items() for arg in ("--model-set", f"{k}={v}")]
    result = runner.invoke(app, ["data", "train-renderer", "pix2pix", "--out", str(ckpt),
                                 "--image-size", str(SIZE), "--n-train", "6", "--epochs", "1",
                                 "--batch-size", "6", "--device", "cpu", "--quiet", *sets])
    assert result.exit_code == 0, result.output
    assert ckpt.is_file()
    result = runner.invoke(app, ["data", "augment", str(ckpt), "--good", str(good_dir), "--out",
                                 str(tmp_path / "aug"), "--per-image", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "test/pix2pix: 4 image(s)" in result.output
    result = runner.invoke(app, ["data", "augment", str(ckpt), "--good", str(good_dir), "--out",
                                 str(tmp_path / "aug"), "--quiet"])
    assert result.exit_code == 2 and "not empty" in result.output


def test_overwrite_adds_to_a_folder_and_keeps_other_files(pix2pix_ckpt, good_dir, tmp_path):
    out = tmp_path / "aug"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = augment(pix2pix_ckpt, good_dir, out, per_image=1, overwrite=True)
    assert result.counts == {"test/pix2pix": 2} and (out / "notes.txt").read_text() == "mine"


def test_cli_rejects_a_malformed_singan_option(good_dir, tmp_path):
    result = CliRunner().invoke(app, ["data", "augment", "singan", "--good", str(good_dir),
                                      "--out", str(tmp_path / "aug"), "--singan-set", "width"])
    assert result.exit_code == 2 and "--singan-set takes KEY=VALUE; got 'width'" in result.output
    assert not (tmp_path / "aug").exists()


def test_an_unknown_model_option_names_the_options(good_dir, tmp_path):
    result = CliRunner().invoke(app, ["data", "train-renderer", "pix2pix", "--out",
                                      str(tmp_path / "p.ckpt"), "--model-set", "wdith=4", "-q"])
    assert result.exit_code == 2, result.output
    assert "Pix2Pix: got an unexpected keyword argument 'wdith'; its options:" in result.output
    assert "width" in result.output
