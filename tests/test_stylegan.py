"""StyleGAN's defining pieces: style mixing switches styles at the chosen layer, ProGAN's fade-in
weights and schedule, truncation, noise inputs, learning, determinism, save/load mid-growth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalykit.base import Estimator
from anomalykit.errors import ConfigError
from anomalykit.generative.stylegan import StyleGAN, growth_schedule, upsample2x
from anomalykit.nn.style import MinibatchStdDev, ModulatedConv2d, pixel_norm
from anomalykit.registry import create

SIZE = 16  # levels 4, 8, 16: L = 6 style layers
TINY = {"image_size": SIZE, "latent_dim": 8, "w_dim": 8, "mapping_layers": 2, "width": 8,
        "max_width": 16}


def build(**overrides) -> StyleGAN:
    torch.manual_seed(0)
    return create("stylegan", "generative", **{**TINY, **overrides})


def codes(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, TINY["latent_dim"], generator=torch.Generator().manual_seed(seed))


def flat_colour_images(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 16, 16) images of one colour, brightness jittered by +-0.05, and the colour."""
    colour = torch.tensor([0.9, 0.2, 0.3]).view(1, 3, 1, 1)
    jitter = 0.1 * (torch.rand(n, 1, 1, 1, generator=torch.Generator().manual_seed(0)) - 0.5)
    return (colour + jitter).expand(-1, -1, SIZE, SIZE).contiguous(), colour


def trained(steps: int, **overrides) -> StyleGAN:
    model = build(**overrides)
    images, _ = flat_colour_images()
    model.fit(images, epochs=steps // 2, batch_size=16, device="cpu", progress=False, seed=0)
    return model


# -- progressive growing -------------------------------------------------------------------


def test_growth_schedule_alpha_goes_0_to_1_over_each_fade():
    schedule = [growth_schedule(s, 3, fade_steps=4, stable_steps=2) for s in range(20)]
    assert schedule[:2] == [(0, 1.0), (0, 1.0)]  # 4x4 stabilises first, no fade
    # level 1 starts at step 2 with alpha 0, reaches 1 at the fade's end (step 6), then stabilises
    assert schedule[2:9] == [(1, 0.0), (1, 0.25), (1, 0.5), (1, 0.75), (1, 1.0), (1, 1.0), (2, 0.0)]
    assert schedule[12] == (2, 1.0) and schedule[19] == (2, 1.0)  # the last level stays
    assert growth_schedule(1000, 3, fade_steps=4, stable_steps=2) == (2, 1.0)
    assert build(progressive=False).growth() == (2, 1.0)


def test_fade_in_output_is_the_upsampled_lower_resolution_at_alpha_0_and_the_new_block_at_1():
    model = build()
    synthesis, g = model.generator.synthesis, torch.Generator().manual_seed(0)
    ws = model.broadcast(model.mapping(codes(3, 1)))
    noise = model.make_noise(3, generator=g)
    with torch.no_grad():
        for level in (1, 2):
            lower = synthesis(ws, noise, level - 1, 1.0)
            at = {a: synthesis(ws, noise, level, a) for a in (0.0, 0.3, 1.0)}
            assert torch.equal(at[0.0], upsample2x(lower))
            assert not torch.allclose(at[1.0], upsample2x(lower))
            # in between: (1 - alpha) upsampled old + alpha new
            assert torch.allclose(at[0.3], 0.7 * at[0.0] + 0.3 * at[1.0], atol=1e-6)
    # The model's step counter picks the weights: its first fade step shows the 4x4 picture.
    model.growth_step_.fill_(model.stable_steps - 1)
    assert model.growth() == (0, 1.0)
    before = model.synthesize(ws, noise=noise)
    model.growth_step_.fill_(model.stable_steps)
    assert model.growth() == (1, 0.0)
    assert torch.equal(model.synthesize(ws, noise=noise), before)
    model.growth_step_.fill_(model.stable_steps + model.fade_steps)
    assert model.growth() == (1, 1.0) and not torch.equal(model.synthesize(ws, noise=noise), before)


def test_discriminator_fade_in_mirrors_the_generator():
    model = build()
    d, x = model.discriminator, torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        # alpha 0: the new block is skipped, D sees the half-resolution image
        assert torch.allclose(d(x, 2, 0.0), d(F.avg_pool2d(x, 2), 1, 1.0), atol=1e-6)
        mid = d(x, 2, 0.5)
        assert not torch.allclose(mid, d(x, 2, 1.0)) and not torch.allclose(mid, d(x, 2, 0.0))
    # the real images are faded like the generator's output
    real = model.real_at(x, 2, 0.0)
    assert torch.allclose(real, upsample2x(F.avg_pool2d(x, 2)))
    assert torch.equal(model.real_at(x, 2, 1.0), x)
    assert model.real_at(x, 0).shape == (4, 3, 4, 4)


# -- styles --------------------------------------------------------------------------------


def test_style_mixing_switches_styles_at_the_crossover_layer():
    model = build(progressive=False)
    layers = model.num_layers
    assert layers == 6
    z1, z2, other = codes(2, 1), codes(2, 2), codes(2, 3)
    noise = model.make_noise(2, generator=torch.Generator().manual_seed(0))
    # crossover after the last layer: z2 is never used; crossover 0: z1 is never used
    assert torch.equal(model.mix(z1, z2, layers, noise=noise), model.mix(z1, other, layers, noise=noise))
    assert not torch.equal(model.mix(z1, z2, 0, noise=noise), model.mix(z1, other, 0, noise=noise))
    assert torch.equal(model.mix(z1, z2, 0, noise=noise), model.generate(z2, noise=noise))
    # crossover k: the same as synthesising the explicit per-layer ws, and each layer's style
    # affine sees w1 before k and w2 from k on (hooks on the modulations)
    w1, w2 = model.mapping(z1), model.mapping(z2)
    seen: dict[int, torch.Tensor] = {}
    hooks = [conv.conv.affine.register_forward_hook(
        lambda module, inputs, output, layer=layer: seen.__setitem__(layer, inputs[0].detach()))
        for layer, conv in enumerate(model.generator.synthesis.convs)]
    for k in (1, 3, 5):
        mixed = model.mix(z1, z2, k, noise=noise)
        for layer in range(layers):
            assert torch.allclose(seen[layer], w1 if layer < k else w2), (k, layer)
        explicit = torch.stack([w1 if layer < k else w2 for layer in range(layers)], dim=1)
        assert torch.equal(mixed, model.synthesize(explicit, noise=noise))
    for hook in hooks:
        hook.remove()
    with pytest.raises(ConfigError, match="crossover_layer"):
        model.mix(z1, z2, layers + 1)


def test_truncation_psi_0_gives_the_average_w_image_for_every_z():
    model = build(progressive=False)
    model.w_avg_.copy_(torch.randn(TINY["w_dim"], generator=torch.Generator().manual_seed(5)))
    noise = model.make_noise(1, generator=torch.Generator().manual_seed(0))  # shared by the batch
    images = model.generate(codes(4, 1), truncation_psi=0.0, noise=noise)
    expected = model.synthesize(model.broadcast(model.w_avg_[None]), noise=noise)
    assert torch.allclose(images, expected.expand(4, -1, -1, -1), atol=1e-6)
    untruncated = model.generate(codes(4, 1), noise=noise)
    assert (untruncated[0] - untruncated[1]).abs().max() > 0
    half = model.truncate(model.mapping(codes(4, 1)), 0.5)
    assert torch.allclose(half, 0.5 * model.w_avg_ + 0.5 * model.mapping(codes(4, 1)), atol=1e-6)


def test_w_avg_is_the_moving_average_of_the_mapped_codes():
    model = build(w_avg_decay=0.75, style_mixing=0.0)  # no mixing: one mapping call per step
    batch_means = []
    model.generator.mapping.register_forward_hook(
        lambda module, inputs, output: batch_means.append(output.detach().mean(0)))
    images, _ = flat_colour_images(16)
    model.fit(images, epochs=3, batch_size=8, device="cpu", progress=False, seed=0)
    assert len(batch_means) == 6
    expected = torch.zeros(TINY["w_dim"])
    for mean in batch_means:
        expected = 0.75 * expected + 0.25 * mean
    assert torch.allclose(model.w_avg_, expected, atol=1e-6)


def test_noise_inputs_change_details_only():
    model = build(progressive=False)
    z, z_other = codes(16, 1), codes(16, 2)
    n1 = model.make_noise(16, generator=torch.Generator().manual_seed(0))
    n2 = model.make_noise(16, generator=torch.Generator().manual_seed(1))
    # strengths start at 0: noise has no effect until training turns it on
    assert torch.equal(model.generate(z, noise=n1), model.generate(z, noise=n2))
    for conv in model.generator.synthesis.convs:
        conv.noise.strength.data.fill_(0.3)
    a = model.generate(z, noise=n1)
    assert torch.equal(a, model.generate(z, noise=n1))  # noise fixed: the same images
    new_noise, new_code = model.generate(z, noise=n2), model.generate(z_other, noise=n1)
    assert (new_noise - a).abs().mean() > 1e-3

    def low_share(diff: torch.Tensor) -> float:  # share of a change left after a 4x4 blur
        return float(F.avg_pool2d(diff, 4).abs().mean() / diff.abs().mean())

    # noise changes local detail: less of its change survives a blur than of a new code's
    assert low_share(new_noise - a) < low_share(new_code - a)


def test_sample_options_and_grids():
    model = build()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = model.sample(4, g())
    assert plain.shape == (4, 3, SIZE, SIZE) and plain.min() >= 0 and plain.max() <= 1
    assert torch.equal(plain, model.sample(4, generator=g()))
    assert not torch.equal(plain, model.sample(4, g(), truncation_psi=0.5))
    assert model.sample(4, g(), mixing=2).shape == plain.shape
    picture = model.style_mixing_grid(2, rows=2, cols=3)
    assert picture.dtype.name == "uint8" and picture.shape[2] == 3
    assert model.sample_grid().shape[2] == 3
    assert model.score(plain).shape == (4,)


# -- training ------------------------------------------------------------------------------


def test_learns_a_flat_colour_while_growing():
    images, colour = flat_colour_images()
    model = build(fade_steps=4, stable_steps=4)

    def distance() -> float:  # mean |sample - the data's colour|
        return float((model.sample(64, torch.Generator().manual_seed(1)) - colour).abs().mean())

    before = distance()
    model.fit(images, epochs=40, batch_size=16, device="cpu", progress=False, seed=0)
    assert model.growth() == (2, 1.0) and int(model.growth_step_) == 80
    after = distance()
    # measured: 0.408 -> 0.096 (seed 0)
    assert after < 0.5 * before, (before, after)


def test_seeded_training_is_deterministic():
    a, b = trained(6, fade_steps=2, stable_steps=2), trained(6, fade_steps=2, stable_steps=2)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(a.sample(3, torch.Generator().manual_seed(0)),
                       b.sample(3, torch.Generator().manual_seed(0)))


def test_save_load_and_resume_mid_growth(tmp_path):
    images, _ = flat_colour_images(16)
    options = {"batch_size": 8, "device": "cpu", "progress": False, "seed": 0}
    grow = {"fade_steps": 4, "stable_steps": 2, "grid_every": 100}
    model = build(**grow)
    model.fit(images, epochs=2, out_dir=tmp_path / "run", **options)  # 4 steps: mid-fade of level 1
    assert model.growth() == (1, 0.5)
    model.save(tmp_path / "model.ckpt")
    loaded = Estimator.load(tmp_path / "model.ckpt")
    assert loaded.growth() == (1, 0.5)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded.sample(3, g()), model.sample(3, g()))
    # resuming continues the growth exactly as an uninterrupted run
    resumed = build(**grow)
    resumed.fit(images, epochs=4, out_dir=tmp_path / "run", resume=True, **options)
    straight = build(**grow)
    straight.fit(images, epochs=4, **options)
    assert int(resumed.growth_step_) == int(straight.growth_step_) == 8
    for (name, p), q in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# -- layers and options --------------------------------------------------------------------


def test_layers():
    x = torch.randn(6, 5, 4, 4)
    assert torch.allclose(pixel_norm(x).pow(2).mean(1), torch.ones(6, 4, 4), atol=1e-4)
    out = MinibatchStdDev(4)(x)  # 6 samples: groups of 3
    assert out.shape == (6, 6, 4, 4) and torch.equal(out[:, :5], x)
    conv = ModulatedConv2d(5, 7, 3, w_dim=8)
    y = conv(torch.randn(2, 5, 8, 8), torch.randn(2, 8))
    assert y.shape == (2, 7, 8, 8)
    # demodulation: each output map has about unit variance for unit-variance input
    with torch.no_grad():
        assert 0.5 < float(conv(torch.randn(64, 5, 8, 8), torch.randn(64, 8)).var()) < 2.0


@pytest.mark.parametrize("bad, match", [
    ({"image_size": 24}, "image_size"), ({"style_mixing": 1.5}, "style_mixing"),
    ({"fade_steps": 0, "stable_steps": 0}, "fade_steps"), ({"max_width": 4}, "max_width"),
    ({"loss": "nope"}, "loss"), ({"r1_gamma": -1.0}, "r1_gamma"),
])
def test_bad_options_raise_config_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        build(**bad)
