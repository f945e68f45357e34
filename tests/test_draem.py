"""DRAEM and its anomaly synthesis: Perlin noise, masks, blending, texture sources, focal loss,
the learning-rate steps, and learning on the easy synthetic category."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalykit.data.anomaly_synthesis import (
    AnomalySource,
    AnomalySynthesizer,
    blend_anomaly,
    perlin_mask,
    perlin_noise_2d,
)
from anomalykit.detectors.draem import DraemDetector
from anomalykit.errors import ConfigError, DataError
from anomalykit.nn.functional import focal_loss


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- Perlin noise / masks


@pytest.mark.parametrize("shape,res", [((64, 64), (4, 8)), ((50, 37), (32, 3)), ((32, 32), (1, 1))])
def test_perlin_noise_reproducible_and_bounded(shape, res):
    a = perlin_noise_2d(shape, res, rng(3))
    b = perlin_noise_2d(shape, res, rng(3))
    c = perlin_noise_2d(shape, res, rng(4))
    assert a.shape == shape and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.abs(a) <= 1.0) and a.std() > 0.01


def test_perlin_noise_is_smooth_at_low_frequency():
    noise = perlin_noise_2d((64, 64), (2, 2), rng(0))
    assert np.abs(np.diff(noise, axis=0)).max() < 0.2  # 32-px cells: no jumps between pixels
    assert np.abs(noise[0, 0]) < 1e-6  # zero at the lattice points


def test_perlin_masks_binary_reproducible_and_nonempty_on_average():
    masks = [perlin_mask(64, rng(i)) for i in range(100)]
    for m in masks:
        assert m.shape == (64, 64) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
    assert np.array_equal(perlin_mask(64, rng(7)), perlin_mask(64, rng(7)))
    nonempty = np.mean([m.any() for m in masks])
    coverage = np.mean([m.mean() for m in masks])
    assert nonempty >= 0.8, nonempty
    assert 0.01 < coverage < 0.3, coverage
    assert perlin_mask((40, 56), rng(0), rotate=False).shape == (40, 56)


# --------------------------------------------------------------------------- synthesizer


def test_blend_formula_on_masked_and_unmasked_pixels():
    image = rng(0).random((3, 32, 32)).astype(np.float32)
    synth = AnomalySynthesizer(anomaly_prob=1.0)
    for seed in range(5):
        out, mask, has, info = synth.make(image, rng(seed))
        if not has:
            continue
        beta, texture = info["beta"], info["texture"]
        assert 0.0 <= beta < 0.8
        inside, outside = mask[0] > 0, mask[0] == 0
        assert np.allclose(out[:, outside], image[:, outside])
        expected = (1 - beta) * texture + beta * image
        assert np.allclose(out[:, inside], expected[:, inside], atol=1e-6)
        assert np.allclose(out, blend_anomaly(image, texture, mask, beta), atol=1e-6)
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert synth.make(image, rng(0))[2]  # seed 0 does give an anomaly


def test_synthesizer_reproducible_torch_and_numpy():
    synth = AnomalySynthesizer()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a_img, a_mask, a_has = synth(image, rng(11))
    b_img, b_mask, b_has = synth(image, rng(11))
    assert isinstance(a_img, torch.Tensor) and a_mask.shape == (1, 32, 32)
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask) and a_has == b_has
    n_img, n_mask, _ = synth(image.numpy(), rng(11))
    assert np.array_equal(n_img, a_img.numpy()) and np.array_equal(n_mask, a_mask.numpy())


def test_half_the_samples_are_clean_in_expectation():
    synth = AnomalySynthesizer()
    image = rng(1).random((3, 32, 32)).astype(np.float32)
    generator = rng(5)
    results = [synth(image, generator) for _ in range(300)]
    has = np.array([r[2] for r in results])
    for out, mask, flag in results:
        if not flag:  # clean: the image unchanged and an empty mask
            assert np.array_equal(out, image) and not mask.any()
        else:
            assert mask.any()
    # P(anomaly) = 0.5 * P(non-empty mask) ~ 0.47; 300 draws: sd ~ 0.03
    assert 0.35 <= has.mean() <= 0.58, has.mean()


# --------------------------------------------------------------------------- texture sources


def test_texture_folder_loading_and_errors(tmp_path):
    folder = tmp_path / "dtd" / "banded"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), np.full((40, 50, 3), (0, 0, 255), np.uint8))  # red (BGR)
    cv2.imwrite(str(folder / "b.png"), np.full((30, 30), 128, np.uint8))  # gray
    (folder / "notes.txt").write_text("not an image")
    source = AnomalySource(tmp_path / "dtd")
    assert len(source) == 2
    samples = [source.sample((16, 24), rng(i)) for i in range(10)]
    for s in samples:
        assert s.shape == (16, 24, 3) and s.dtype == np.uint8
    colours = {tuple(s[0, 0]) for s in samples}
    assert colours == {(255, 0, 0), (128, 128, 128)}  # RGB order, gray promoted

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        AnomalySource(empty)
    with pytest.raises(DataError, match="does not exist"):
        AnomalySource(tmp_path / "missing")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        AnomalySource(bad).sample(16, rng(0))


def test_default_source_is_offline_and_varied():
    source = AnomalySource()
    samples = [source.sample(32, rng(i)) for i in range(12)]
    assert all(s.shape == (32, 32, 3) and s.dtype == np.uint8 for s in samples)
    assert len({s.tobytes() for s in samples}) == 12
    assert np.array_equal(source.sample(32, rng(3)), samples[3])


# --------------------------------------------------------------------------- detector pieces


def test_focal_loss_is_cross_entropy_at_gamma_0_and_smaller_above():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    ce = F.cross_entropy(logits, target[:, 0].long())
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), ce, atol=1e-6)
    assert focal_loss(logits, target, gamma=2.0) < ce


def test_lr_steps_at_80_and_90_percent():
    model = DraemDetector(image_size=32, recon_base=4, disc_base=4, disc_levels=5, lr=1e-3)
    opt = model.configure_optimizers()
    rates = []
    for epoch in range(10):
        model.on_train_epoch_start(epoch, 10, [opt])
        rates.append(opt.param_groups[1]["lr"])
    assert rates[:8] == [1e-3] * 8
    assert rates[8] == pytest.approx(2e-4) and rates[9] == pytest.approx(4e-5)
    # round, not int: 0.29 * 100 = 28.999..., so the step is at epoch 29, not 28
    model = DraemDetector(image_size=32, recon_base=4, disc_base=4, disc_levels=5, lr=1.0,
                          lr_milestones=[0.29])
    assert model.lr_at(28, 100) == 1.0 and model.lr_at(29, 100) == pytest.approx(0.2)


@pytest.mark.parametrize("milestones", [[0.9, 0.8], [0.0, 0.5], [0.5, 1.5]])
def test_bad_lr_milestones_raise(milestones):
    with pytest.raises(ConfigError, match=rf"lr_milestones .* got \[{milestones[0]}, {milestones[1]}\]"):
        DraemDetector(image_size=32, recon_base=4, disc_base=4, disc_levels=5,
                      lr_milestones=milestones)


def test_validation_loss_is_deterministic():
    torch.manual_seed(0)
    model = DraemDetector(image_size=32, recon_base=4, disc_base=4, disc_levels=5).eval()
    batch = {"image": torch.rand(2, 3, 32, 32), "path": ["a.png", "b.png"]}
    assert torch.equal(model.validation_step(batch)["loss"], model.validation_step(batch)["loss"])


def test_example_figures(tmp_path):
    model = DraemDetector(image_size=32, recon_base=4, disc_base=4, disc_levels=5)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    paths = model.example_figures(images, tmp_path / "figs", n=2, seed=0)
    assert len(paths) == 2
    picture = cv2.imread(str(paths[0]))
    assert picture is not None and picture.shape[0] == 128 and picture.shape[1] > 4 * 128
    again = model.example_figures(images, tmp_path / "figs2", n=2, seed=0)
    assert again[0].read_bytes() == paths[0].read_bytes()


# --------------------------------------------------------------------------- anomaly source


def tiny_draem(**kwargs) -> DraemDetector:
    torch.manual_seed(0)
    return DraemDetector(image_size=32, recon_base=4, disc_base=4, disc_levels=5, **kwargs)


@pytest.fixture(scope="module")
def pix2pix_checkpoint(tmp_path_factory):
    """A tiny (untrained) pix2pix renderer's checkpoint: 32-px images need depth <= 5."""
    from anomalykit.generative.pix2pix import Pix2Pix

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pix2pix") / "pix2pix.ckpt"
    Pix2Pix(width=4, depth=5, d_width=4, d_layers=2).save(path)
    return str(path)


def test_default_anomaly_source_is_the_papers_perlin_textures():
    model = tiny_draem()
    assert model.anomaly_source == "perlin" and model.config["pix2pix_checkpoint"] is None
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    augmented, masks = model.synthesize(images, rng(4))
    reference = AnomalySynthesizer(AnomalySource(None))  # what DRAEM did before the option
    generator = rng(4)
    for image, out, mask in zip(images, augmented, masks, strict=True):
        ref_out, ref_mask, _ = reference(image.numpy(), generator)
        assert np.array_equal(out.numpy(), ref_out) and np.array_equal(mask.numpy(), ref_mask)
    # A checkpoint written before the option existed has neither key: it rebuilds as perlin.
    old_config = {k: v for k, v in model.config.items()
                  if k not in ("anomaly_source", "pix2pix_checkpoint")}
    assert DraemDetector(**old_config).anomaly_source == "perlin"


def test_pix2pix_source_paints_perlin_regions(pix2pix_checkpoint):
    model = tiny_draem(anomaly_source="pix2pix", pix2pix_checkpoint=pix2pix_checkpoint)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    augmented, masks = model.synthesize(images, rng(1))
    again, masks_again = model.synthesize(images, rng(1))
    assert torch.equal(augmented, again) and torch.equal(masks, masks_again)
    painted = masks.flatten(1).any(1)
    assert 0 < painted.sum() < 8  # anomaly_prob 0.5: some clean, some painted
    outside = masks.expand_as(images) == 0
    assert torch.equal(augmented[outside], images[outside])
    assert (augmented - images).abs()[~outside].mean() > 0.05
    assert "_renderer" not in dict(model.named_modules()) and not any(
        k.startswith("_renderer") for k in model.state_dict())


def test_example_figures_show_the_configured_source(pix2pix_checkpoint, tmp_path):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    perlin = tiny_draem().example_figures(images, tmp_path / "perlin", n=3)
    painted = tiny_draem(anomaly_source="pix2pix", pix2pix_checkpoint=pix2pix_checkpoint
                         ).example_figures(images, tmp_path / "pix2pix", n=3)
    assert len(perlin) == len(painted) == 3
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(perlin, painted, strict=True))


def test_both_sources_mix_textures_and_pix2pix(pix2pix_checkpoint):
    model = tiny_draem(anomaly_source="both", pix2pix_checkpoint=pix2pix_checkpoint, anomaly_prob=1.0)
    images = torch.full((16, 3, 32, 32), 0.5)
    calls = []
    render = model.renderer.render_defects

    def counted(good, mask, **options):
        calls.append(len(good))
        return render(good, mask, **options)

    model.renderer.render_defects = counted
    _, masks = model.synthesize(images, rng(2))
    assert len(calls) == 1 and 0 < calls[0] < 16  # one batched call, for some of the images
    assert masks.flatten(1).any(1).sum() > calls[0]  # the others got Perlin textures


def test_draem_trains_with_pix2pix_anomalies_and_loads_without_them(pix2pix_checkpoint, tmp_path):
    import shutil

    from anomalykit.base import Estimator

    copy = tmp_path / "renderer.ckpt"
    shutil.copy(pix2pix_checkpoint, copy)
    model = tiny_draem(anomaly_source="pix2pix", pix2pix_checkpoint=str(copy))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = model.fit(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                        epochs=1, max_steps=1, batch_size=4, progress=False)
    assert np.isfinite(history["train_loss"][0]["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.save(tmp_path / "draem.ckpt")
    copy.unlink()  # the renderer is only needed to train
    loaded = Estimator.load(tmp_path / "draem.ckpt")
    assert loaded.anomaly_source == "pix2pix"
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x).anomaly_map, model.eval()(x).anomaly_map)
    with pytest.raises(ConfigError, match="draem pix2pix_checkpoint .*renderer.ckpt.* does not exist"):
        loaded.synthesize(x, rng(0))
    # It exports without the renderer too, onnxruntime matching PyTorch (export_onnx checks).
    from anomalykit.export.onnx import export_onnx

    loaded.calibrate(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert export_onnx(loaded, tmp_path / "draem.onnx").is_file()


def test_bad_anomaly_source_options(tmp_path):
    with pytest.raises(ConfigError, match="anomaly_source must be one of perlin, pix2pix, both; got 'gan'"):
        tiny_draem(anomaly_source="gan")
    with pytest.raises(ConfigError, match="set pix2pix_checkpoint"):
        tiny_draem(anomaly_source="both")
    from anomalykit.registry import create

    create("dcgan", "generative", image_size=32, latent_dim=4, width=4).save(tmp_path / "dcgan.ckpt")
    model = tiny_draem(anomaly_source="pix2pix", pix2pix_checkpoint=str(tmp_path / "dcgan.ckpt"))
    with pytest.raises(ConfigError, match="holds a dcgan model, not a pix2pix one"):
        model.synthesize(torch.rand(2, 3, 32, 32), rng(0))


# --------------------------------------------------------------------------- learning
