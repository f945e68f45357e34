"""pix2pix defect synthesis: the U-Net, the PatchGAN on (condition, image), mask compositing,
rendering on a painted mask, learning on synthetic triples, seeding, save/load, and
:func:`anomalykit.data.synthetic.defect_triples`."""

from __future__ import annotations

import pytest
import torch

from anomalykit.base import Estimator
from anomalykit.data.synthetic import defect_triples
from anomalykit.errors import ConfigError
from anomalykit.generative.pix2pix import Pix2Pix, Pix2PixUNet, load_pix2pix
from anomalykit.registry import create

SIZE = 32
TINY = {"width": 8, "depth": 5, "d_width": 8, "d_layers": 2}


def tiny_model(seed: int = 0, **kwargs) -> Pix2Pix:
    torch.manual_seed(seed)
    return Pix2Pix(**{**TINY, **kwargs})


def random_pair(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    good = torch.rand(n, 3, SIZE, SIZE, generator=generator)
    mask = (torch.rand(n, 1, SIZE, SIZE, generator=generator) > 0.7).float()
    return good, mask


def in_mask_l1(model: Pix2Pix, data: dict[str, torch.Tensor]) -> float:
    """Mean |rendered - real| over the mask's pixels and channels (no dropout noise)."""
    rendered = model.render_defects(data["good"], data["mask"])
    mask = data["mask"]
    return float(((rendered - data["image"]).abs() * mask).sum() / (3 * mask.sum()))


# --------------------------------------------------------------------------- data


def test_defect_triples_are_paired_deterministic_and_distinct():
    data = defect_triples(n=12, image_size=SIZE, seed=0)
    assert data["image"].shape == data["good"].shape == (12, 3, SIZE, SIZE)
    assert data["mask"].shape == (12, 1, SIZE, SIZE)
    assert set(data["mask"].unique().tolist()) == {0.0, 1.0}
    assert data["image"].min() >= 0 and data["image"].max() <= 1
    # The masks are exact: outside them the defective image is the good one.
    outside = (data["image"] - data["good"]).abs() * (1 - data["mask"])
    assert outside.max() == 0 and all(m.sum() > 0 for m in data["mask"])
    again = defect_triples(n=12, image_size=SIZE, seed=0)
    assert all(torch.equal(data[k], again[k]) for k in data)
    # Item k: category k % 6 at index start + k // 6, the same rendering in any call.
    brick = defect_triples(["brick"], 3, image_size=SIZE, seed=0)
    assert torch.equal(data["image"][6], brick["image"][1])
    later = defect_triples(n=6, image_size=SIZE, seed=0, start=2)
    assert torch.equal(later["image"][0], brick["image"][2])
    assert len({tuple(x.flatten()[:64].tolist()) for x in data["image"]}) == 12  # all distinct
    with pytest.raises(ConfigError, match="n=0"):
        defect_triples(n=0)


# --------------------------------------------------------------------------- networks


def test_unet_shapes_range_and_size_check():
    net = Pix2PixUNet(4, 3, 8, depth=3).eval()
    out = net(torch.rand(2, 4, 16, 16))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1
    assert net(torch.rand(1, 4, 24, 40)).shape == (1, 3, 24, 40)  # fully convolutional
    with pytest.raises(ConfigError, match=r"divisible by 8; got \(20, 20\)"):
        net(torch.rand(1, 4, 20, 20))
    model = tiny_model()
    good, mask = random_pair()
    with pytest.raises(ConfigError, match="divisible by 32; got size 48x48"):
        model.render_defects(torch.rand(1, 3, 48, 48), torch.ones(1, 1, 48, 48))
    assert model.render_defects(torch.rand(1, 3, 64, 96), torch.ones(1, 1, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ConfigError, match="mask"):
        model.render_defects(good, mask[:, :, :16])


def test_dropout_noise_is_the_generators_and_off_without_one():
    net = Pix2PixUNet(4, 3, 8, depth=3).eval()
    x = torch.rand(2, 4, 16, 16)
    assert torch.equal(net(x), net(x))
    a = net(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, net(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, net(x, torch.Generator().manual_seed(2)))
    assert not torch.equal(a, net(x))


def test_discriminator_judges_condition_and_image():
    model = tiny_model()
    assert model.discriminator.body[0].in_channels == 3 + 1 + 3  # good + mask + candidate
    good, mask = random_pair()
    logits = model._judge(good, mask, good)
    assert logits.shape == (4, 1, 6, 6)  # one logit per patch (2 strided layers at 32 px)
    # Same candidate image, another condition: another verdict.
    assert not torch.allclose(logits, model._judge(good, 1 - mask, good))


def test_composite_changes_only_the_masked_pixels():
    good, mask = random_pair()
    model = tiny_model()
    out = model.render_defects(good, mask)
    outside = mask.expand_as(good) == 0
    assert torch.equal(out[outside], good[outside])
    assert (out[~outside] - good[~outside]).abs().mean() > 0.05
    free = tiny_model(composite=False).render_defects(good, mask)
    assert not torch.equal(free[outside], good[outside])


def test_render_defects_on_a_painted_mask():
    good = defect_triples(["washer"], 2, image_size=SIZE)["good"]
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[:, :, 10:16, 12:20] = 1.0  # a painted rectangle
    model = tiny_model()
    noisy = model.render_defects(good, mask, generator=torch.Generator().manual_seed(0))
    assert noisy.shape == good.shape and noisy.min() >= 0 and noisy.max() <= 1
    changed = (noisy != good).any(1, keepdim=True)
    assert changed[mask == 0].sum() == 0 and changed[mask == 1].float().mean() > 0.9
    assert torch.equal(noisy, model.render_defects(good, mask, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(model.render_defects(good, mask), model.render_defects(good, mask))


# --------------------------------------------------------------------------- training


def test_batches_need_good_and_mask():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"'good' and 'mask'.*missing \['good', 'mask'\]"):
        model.fit(torch.rand(4, 3, SIZE, SIZE), epochs=1, max_steps=1, batch_size=4, progress=False)


def test_learns_to_render_the_defects():
    """On 16 synthetic triples (washer, pill) at 32 px, 150 steps: the rendering's L1 to the real
    defective images inside the masks. Measured (seed 0): 0.295 untrained, 0.081 trained, and
    0.261 for the good image itself (drawing no defect)."""
    data = defect_triples(["washer", "pill"], 16, image_size=SIZE)
    model = tiny_model()
    before = in_mask_l1(model, data)
    history = model.fit(data, epochs=75, batch_size=8, progress=False, seed=0)
    after = in_mask_l1(model, data)
    no_defect = float(((data["good"] - data["image"]).abs() * data["mask"]).sum() / (3 * data["mask"].sum()))
    assert history["steps"] == 150 and history["train_loss"][-1]["l1"] < history["train_loss"][0]["l1"]
    assert after < 0.5 * before, (before, after)
    assert after < 0.6 * no_defect, (no_defect, after)


def test_seeded_fits_are_identical_and_keep_examples(tmp_path):
    data = defect_triples(["pill"], 20, image_size=SIZE)
    models = []
    for _ in range(2):
        model = tiny_model(seed=3)
        model.fit(data, epochs=2, batch_size=8, progress=False, seed=5,
                  out_dir=tmp_path / f"run{len(models)}")
        models.append(model)
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = models[0].example_good_
    assert kept.shape == (16, 3, SIZE, SIZE) and torch.equal(kept, data["good"][:16])
    assert torch.equal(models[0].example_mask_, data["mask"][:16])
    grid = tmp_path / "run0" / "samples" / "epoch_002.png"
    assert grid.exists()
    picture = models[0].sample_grid()
    assert picture.shape == (16 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2, 3)  # good|mask|rendered|real


def test_sample_score_and_save_load(tmp_path):
    data = defect_triples(["washer"], 6, image_size=SIZE)
    model = tiny_model(examples=4)
    with pytest.raises(ConfigError, match="fit the model first"):
        model.sample(2)
    model.fit(data, epochs=1, batch_size=6, progress=False)
    samples = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (6, 3, SIZE, SIZE)
    outside = model.example_mask_[[0, 1]].expand(2, 3, SIZE, SIZE) == 0
    assert torch.equal(samples[4:][outside], model.example_good_[:2][outside])  # cycles the 4 pairs
    scores = model.score(data["image"])
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    path = tmp_path / "pix2pix.ckpt"
    model.save(path)
    loaded = Estimator.load(path)
    assert isinstance(loaded, Pix2Pix) and loaded.config == model.config
    assert torch.equal(loaded.sample(6, generator=torch.Generator().manual_seed(0)), samples)
    assert torch.equal(loaded.score(data["image"]), scores)
    assert load_pix2pix(path).example_good_.shape == (4, 3, SIZE, SIZE)


def test_registry_and_bad_options(tmp_path):
    model = create("pix2pix", "generative", **TINY)
    assert isinstance(model, Pix2Pix) and model.config["lambda_l1"] == 100.0
    assert model.config["betas"] == [0.5, 0.999] and model.lr == 2e-4
    with pytest.raises(ConfigError, match="loss must be one of .* got 'wgan'"):
        Pix2Pix(loss="wgan")
    with pytest.raises(ConfigError, match="examples"):
        Pix2Pix(examples=0)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pix2pix(tmp_path / "none.ckpt")
    other = create("dcgan", "generative", image_size=SIZE, latent_dim=4, width=4)
    other.save(tmp_path / "dcgan.ckpt")
    with pytest.raises(ConfigError, match="holds a dcgan model, not a pix2pix one"):
        load_pix2pix(tmp_path / "dcgan.ckpt")
