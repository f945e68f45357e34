"""SinGAN's defining pieces: the scale pyramid, coarse-to-fine training with the coarser scales
frozen, the reconstruction path pulled to the image, varied samples that keep its statistics,
seeded determinism, other output sizes, injection, save/load. Tiny: one 24-px image, 3
scales, width 8."""

from __future__ import annotations

import pytest
import torch

from anomalykit.base import Estimator
from anomalykit.data.synthetic import render_sample
from anomalykit.errors import ConfigError
from anomalykit.generative.singan import SinGAN, pyramid_sizes, variations
from anomalykit.training import fit

SIZE = 24
TINY = {"image_size": SIZE, "min_size": 14, "width": 8}  # scales of 14, 18, 24 px


def weave(size: int = SIZE, index: int = 0) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: a good image of the synthetic weave texture."""
    _, image, _ = render_sample("weave", split="train", index=index, image_size=size)
    return torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0


def trained_singan(steps_per_scale: int, seed: int = 0, **options) -> tuple[SinGAN, dict]:
    torch.manual_seed(seed)
    model = SinGAN(**{**TINY, "steps_per_scale": steps_per_scale, **options})
    history = fit(model, weave(), epochs=model.num_scales, batch_size=1, seed=seed,
                  device="cpu", progress=False)
    return model.eval(), history


@pytest.fixture(scope="module")
def trained():
    """3 scales x 40 iterations (a few seconds), and the untrained model it started from."""
    torch.manual_seed(0)
    untrained = SinGAN(**TINY, steps_per_scale=40)
    model, _ = trained_singan(40)
    return model, untrained


def test_pyramid_sizes():
    assert pyramid_sizes((24, 24), min_size=14, scale_factor=0.75) == [(14, 14), (18, 18), (24, 24)]
    # 64 px, the paper's coarsest 25 px and r = 0.75: 5 scales, the factor adjusted to 0.79
    assert pyramid_sizes((64, 64), min_size=25, scale_factor=0.75) == [
        (25, 25), (32, 32), (40, 40), (51, 51), (64, 64)]
    assert pyramid_sizes((32, 64), min_size=16, scale_factor=0.5) == [(16, 32), (32, 64)]
    assert pyramid_sizes((20, 30), min_size=25, scale_factor=0.75) == [(20, 30)]
    model = SinGAN(**TINY)
    assert model.num_scales == 3 and model.sizes[-1] == (SIZE, SIZE)
    # another output size keeps the ratios: twice as wide at every scale
    assert model.sizes_for((24, 48)) == [(14, 28), (18, 36), (24, 48)]
    # 9 scales (8 ... 64 px): the width doubles every 4 scales, up to max_width
    assert SinGAN(64, min_size=8, width=2, max_width=8).widths == [2, 2, 2, 2, 4, 4, 4, 4, 8]
    assert SinGAN(64, min_size=8, width=2, max_width=4).widths[-1] == 4


def test_bad_options_name_the_value():
    with pytest.raises(ConfigError, match="scale_factor"):
        SinGAN(**TINY, scale_factor=1.5)
    with pytest.raises(ConfigError, match="min_size"):
        SinGAN(SIZE, min_size=2)
    with pytest.raises(ConfigError, match="loss"):
        SinGAN(**TINY, loss="wasserstein")
    with pytest.raises(ConfigError, match="steps_per_scale"):
        SinGAN(**TINY, steps_per_scale=0)
    with pytest.raises(ConfigError, match="norm"):
        SinGAN(**TINY, d_norm="layer")


def test_critics_take_the_authors_batch_norm_as_an_option():
    plain, normed = SinGAN(**TINY), SinGAN(**TINY, d_norm="batch")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.critics.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in normed.critics.modules())
    history = fit(normed, weave(), epochs=1, max_steps=2, batch_size=1, device="cpu",
                  progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in history["train_loss"][0].values())


def test_coarser_scales_stay_frozen_while_a_finer_one_trains():
    torch.manual_seed(0)
    model = SinGAN(**TINY, steps_per_scale=2, d_steps=1, g_steps=1)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    fit(model, weave(), epochs=3, batch_size=1, device="cpu", progress=False,
        epoch_callback=lambda *_: states.append(
            {k: v.clone() for k, v in model.state_dict().items()}))
    start, after_scale0, after_scale1, after_scale2 = states

    def same(a, b, prefix):  # parameters AND BatchNorm running statistics
        keys = [k for k in a if k.startswith(prefix)]
        return keys and all(torch.equal(a[k], b[k]) for k in keys)

    for net in ("generators", "critics"):
        assert not same(start, after_scale0, f"{net}.0."), "scale 0 must train in epoch 1"
        assert same(after_scale0, after_scale2, f"{net}.0."), "scale 0 changed after epoch 1"
        assert same(start, after_scale0, f"{net}.1.") and same(start, after_scale1, f"{net}.2.")
        assert not same(after_scale0, after_scale1, f"{net}.1.")
        assert same(after_scale1, after_scale2, f"{net}.1."), "scale 1 changed after epoch 2"
        assert not same(after_scale1, after_scale2, f"{net}.2.")
    assert model.trained_steps_.tolist() == [2, 2, 2]
    assert model.noise_amp_[0] == 1.0 and (model.noise_amp_[1:] > 0).all()


def test_reconstruction_path_approaches_the_image(trained):
    model, untrained = trained
    image = weave()
    error = float((model.reconstruct() - image).pow(2).mean())
    error_before = float((untrained.reconstruct() - image).pow(2).mean())
    # Measured: 0.00033 after 3 x 40 iterations, 0.026 untrained; the image's own variance
    # (what its flat mean colour would score) is 0.025.
    assert error < 0.1 * float(image.var()) and error < 0.1 * error_before, (error, error_before)
    assert torch.allclose(model.image_, image)


def test_samples_vary_and_keep_the_image_statistics(trained):
    model, _ = trained
    image = weave()
    samples = model.sample(8, torch.Generator().manual_seed(1))
    assert samples.shape == (8, 3, SIZE, SIZE) and torch.isfinite(samples).all()
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
    # Measured (seed 1): spread 0.069, colour gap 0.005, contrast ratio 0.60 (3 x 40 iterations
    # leave the samples softer than the image; longer training sharpens them).
    spread = float((samples[:, None] - samples[None]).abs().mean((2, 3, 4)).sum() / (8 * 7))
    assert spread > 0.02, f"samples barely differ (mean |a - b| {spread:.4f})"
    colour_gap = (samples.mean((0, 2, 3)) - image.mean((0, 2, 3))).abs().max()
    assert colour_gap < 0.05, f"mean colour moved by {colour_gap:.3f}"
    std_ratio = float(samples.std((2, 3)).mean() / image.std((2, 3)).mean())
    assert 0.5 < std_ratio < 1.5, f"contrast ratio {std_ratio:.2f}"


def test_other_sizes_injection_and_scores(trained):
    model, _ = trained
    wide = model.sample(2, torch.Generator().manual_seed(0), size=(SIZE, 2 * SIZE))
    assert wide.shape == (2, 3, SIZE, 2 * SIZE) and torch.isfinite(wide).all()
    coarse = model.sample(2, torch.Generator().manual_seed(0), scale=0)
    assert coarse.shape == (2, 3, 14, 14)
    x = weave(index=3).repeat(2, 1, 1, 1)
    harmonised = model.reconstruct(x, start_scale=1)
    assert harmonised.shape == x.shape and torch.isfinite(harmonised).all()
    assert torch.equal(harmonised, model.reconstruct(x, start_scale=1))  # z = 0: deterministic
    with pytest.raises(ConfigError, match="start_scale"):
        model.reconstruct(x, start_scale=3)
    assert model.score(x).shape == (2,) and model.score_map(x).shape == (2, 1, SIZE, SIZE)


def test_seeded_fits_and_samples_are_identical(tmp_path):
    a, history = trained_singan(3, seed=5)
    b, _ = trained_singan(3, seed=5)
    assert history["steps"] == 9 and a.trained_steps_.tolist() == [3, 3, 3]
    g = torch.Generator
    assert torch.equal(a.sample(3, g().manual_seed(0)), b.sample(3, g().manual_seed(0)))
    assert not torch.equal(a.sample(3, g().manual_seed(0)), a.sample(3, g().manual_seed(1)))
    a.save(tmp_path / "singan.ckpt")
    loaded = Estimator.load(tmp_path / "singan.ckpt").eval()
    assert isinstance(loaded, SinGAN) and loaded.config == a.config
    assert torch.equal(loaded.sample(3, g().manual_seed(0)), a.sample(3, g().manual_seed(0)))
    assert torch.equal(loaded.reconstruct(), a.reconstruct())
    assert torch.equal(loaded.z_rec_, a.z_rec_) and torch.equal(loaded.noise_amp_, a.noise_amp_)


def test_several_images_train_on_the_first_with_a_warning():
    images = torch.cat([weave(), weave(index=1)])
    torch.manual_seed(0)
    model = SinGAN(**TINY, steps_per_scale=1, d_steps=1, g_steps=1)
    with pytest.warns(UserWarning, match="first of the 2"):
        fit(model, images, epochs=model.num_scales, batch_size=2, device="cpu", progress=False)
    assert torch.allclose(model.image_, images[:1])


def test_epoch_grid_per_scale(tmp_path):
    torch.manual_seed(0)
    model = SinGAN(**TINY, steps_per_scale=1, d_steps=1, g_steps=1)
    fit(model, weave(), epochs=model.num_scales, batch_size=1, device="cpu", progress=False,
        out_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "epoch_001.png", "epoch_002.png", "epoch_003.png"]


def test_variations_helper():
    out = variations(weave()[0], 4, seed=0, min_size=14, width=4, steps_per_scale=2,
                     d_steps=1, g_steps=1, size=(SIZE, 32))
    assert out.shape == (4, 3, SIZE, 32) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="one image"):
        variations(torch.rand(2, 3, 8, 8), 1)


def test_resume_continues_at_the_right_scale(tmp_path):
    def build() -> SinGAN:
        torch.manual_seed(0)
        return SinGAN(**TINY, steps_per_scale=3, d_steps=1, g_steps=1)

    straight = build()
    fit(straight, weave(), epochs=3, batch_size=1, device="cpu", progress=False)
    first = build()
    fit(first, weave(), epochs=2, batch_size=1, device="cpu", progress=False, out_dir=tmp_path)
    resumed = build()
    fit(resumed, weave(), epochs=3, batch_size=1, device="cpu", progress=False, out_dir=tmp_path,
        resume=True)
    expected = straight.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())
