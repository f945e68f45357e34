"""BigGAN's ingredients, each checked on its own: the projection discriminator's outputs, spectral
norm's largest singular value, class-conditional BatchNorm, truncation, the hinge loss; then the
model: it generates the asked class on a toy, is seeded and survives save/load.

Toy data: the 16 x 16 flat colour squares of 3 classes of ``tests/test_gan.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from anomalykit.base import Estimator
from anomalykit.errors import ConfigError
from anomalykit.generative.biggan import (
    BigGAN,
    ConcatDiscriminator,
    ConditionalBatchNorm2d,
    spectral_norm_matrix,
    truncated_normal_codes,
)
from anomalykit.generative.gan import ProjectionDiscriminator
from anomalykit.nn.adversarial import batch_spread, discriminator_loss, generator_loss
from anomalykit.registry import create

sys.path.insert(0, str(Path(__file__).parent))
from test_gan import COLOURS, SIZE, seeded, squares  # noqa: E402

SMALL = {"image_size": SIZE, "num_classes": 3, "latent_dim": 16, "embed_dim": 8, "width": 16}


def build(**kwargs) -> BigGAN:
    torch.manual_seed(0)
    return create("biggan", "generative", **{**SMALL, **kwargs})


def fit(model: BigGAN, epochs: int, seed: int = 0, n: int = 96) -> dict:
    x, y = squares(n, classes=True)
    return model.fit({"image": x, "class": y}, epochs=epochs, batch_size=32, device="cpu",
                     progress=False, seed=seed)


def spectrally_normalised(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "parametrizations")]


# -- the ingredients -------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [True, False])
def test_discriminator_output_shapes_and_per_class_outputs(projection):
    model = build(projection=projection)
    d = model.discriminator
    assert isinstance(d, ProjectionDiscriminator if projection else ConcatDiscriminator)
    x, y = torch.rand(5, 3, SIZE, SIZE) * 2 - 1, torch.tensor([0, 1, 2, 1, 0])
    model.eval()
    assert d(x, y).shape == (5, 1)
    every = d.all_classes(x)
    assert every.shape == (5, 3)
    # Column k is D(x, k): the per-class outputs agree with the one-class path.
    for k in range(3):
        assert torch.allclose(every[:, k], d(x, torch.full((5,), k)).squeeze(1), atol=1e-5)
    assert model.score(torch.rand(5, 3, SIZE, SIZE)).shape == (5,)


def test_projection_is_the_inner_product_with_the_class_embedding():
    d = build().discriminator.eval()
    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    out, features = d.encoder.forward_with_features(x)
    y = torch.tensor([2, 0, 1, 2])
    expected = out + (d.embed(y) * features.sum((2, 3))).sum(1, keepdim=True)
    assert torch.allclose(d(x, y), expected, atol=1e-5)


def test_spectral_norm_makes_the_largest_singular_value_one():
    model = build(image_size=32, width=8)
    layers = spectrally_normalised(model.generator) + spectrally_normalised(model.discriminator)
    # Every conv / linear of G and D (not G's shared embedding), and D's class embedding.
    kinds = {type(m).__name__ for m in layers}
    assert {"Conv2d", "ConvTranspose2d", "Linear", "Embedding"} <= {k.replace("Parametrized", "")
                                                                     for k in kinds}
    assert not hasattr(model.generator.embed, "parametrizations")
    model.train()
    with torch.no_grad():  # a few power iterations: one per forward pass in training mode
        for _ in range(10):
            z, y = torch.randn(8, 16), torch.randint(3, (8,))
            model.discriminator(model.generator(z, y), y)
    for layer in layers:
        sigma = torch.linalg.matrix_norm(spectral_norm_matrix(layer).detach(), ord=2)
        assert abs(float(sigma) - 1.0) < 0.05, f"{type(layer).__name__}: sigma {float(sigma):.3f}"
    # Without the switch the weights keep their initial scale, far from 1.
    plain = build(image_size=32, width=8, spectral_norm=False)
    assert not spectrally_normalised(plain)
    sigma = torch.linalg.matrix_norm(spectral_norm_matrix(plain.discriminator.encoder.head).detach(), ord=2)
    assert float(sigma) < 0.5


def test_conditional_bn_gains_follow_the_class_with_z_fixed():
    model = build().eval()
    g = model.generator
    assert all(isinstance(norm, ConditionalBatchNorm2d) for norm in g.norms)
    assert sum(g.z_sizes) == 16 and len(g.z_sizes) == len(g.norms) + 1  # skip-z: a chunk per norm
    z = torch.randn(4, 16, generator=seeded())
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    with torch.no_grad():
        (_, conds_0), (_, conds_1) = g.conditions(z, zeros), g.conditions(z, ones)
        for norm, c0, c1 in zip(g.norms, conds_0, conds_1, strict=True):
            gain_0, bias_0 = norm.gain_and_bias(c0)
            gain_1, bias_1 = norm.gain_and_bias(c1)
            assert gain_0.shape == (4, norm.norm.num_features)
            assert not torch.allclose(gain_0, gain_1) and not torch.allclose(bias_0, bias_1)
        assert not torch.allclose(g(z, zeros), g(z, ones), atol=1e-4)
        # The z chunk of a norm moves its gains too (the hierarchical latent), the class fixed.
        other = z.clone()
        other[:, g.z_sizes[0]:] += 1.0
        assert not torch.allclose(g.norms[0].gain_and_bias(g.conditions(other, zeros)[1][0])[0],
                                  g.norms[0].gain_and_bias(conds_0[0])[0])


def test_without_conditional_bn_the_norms_are_plain_and_the_class_enters_at_the_input():
    g = build(conditional_bn=False).generator
    assert all(type(norm) is nn.BatchNorm2d for norm in g.norms)
    assert g.fc.in_features == 16 + 8  # [z, embed(y)]
    with pytest.raises(ConfigError, match="latent_dim"):
        build(latent_dim=2)  # 3 chunks at 16 px: 2 norms + the input


def test_truncation_bounds_z_and_lowers_the_spread_of_samples():
    z = truncated_normal_codes(500, 16, torch.zeros(1), seeded(), 0.5)
    assert z.abs().max() <= 0.5 and z.std() > 0.2  # within, but not collapsed onto 0
    assert torch.equal(z, truncated_normal_codes(500, 16, torch.zeros(1), seeded(), 0.5))
    model = build()
    fit(model, epochs=5)
    spread = {t: batch_spread(model.sample(64, seeded(), truncation=t)) for t in (0.1, 0.5, None)}
    assert spread[0.1] < spread[0.5] < spread[None], spread
    with pytest.raises(ConfigError, match="truncation"):
        model.sample(4, truncation=0.0)


def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    # D: mean relu(1 - D(x)) + mean relu(1 + D(G(z))) = (0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(5.5 / 3)
    assert generator_loss(fake, "hinge").item() == pytest.approx(2.0 / 3)  # -mean D(G(z))
    model = build()
    assert model.loss == "hinge"
    losses = model.adversarial_losses({"image": torch.rand(4, 3, SIZE, SIZE), "class": torch.arange(4) % 3})
    assert losses["d_loss"] >= 0  # a sum of hinges


def test_ttur_learning_rates_and_options():
    model = build()
    opt_g, opt_d = model.configure_optimizers()
    assert opt_d.param_groups[0]["lr"] == pytest.approx(4 * opt_g.param_groups[0]["lr"])
    assert opt_g.param_groups[0]["betas"] == (0.0, 0.999)
    for bad in ({"loss": "wgan"}, {"d_lr": 0.0}, {"n_critic": 0}, {"num_classes": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build(**bad)
    with pytest.raises(ConfigError, match="class"):
        build().fit(torch.rand(8, 3, SIZE, SIZE), epochs=1, batch_size=8, device="cpu", progress=False)


# -- the model -------------------------------------------------------------------------------------
def test_generates_the_asked_class():
    model = build()
    classes = torch.arange(96) % 3

    def accuracy() -> float:
        means = model.sample(96, seeded(), classes=classes).mean((2, 3))
        return float((torch.cdist(means, COLOURS).argmin(1) == classes).float().mean())

    before = accuracy()
    fit(model, epochs=40)
    after = accuracy()
    assert after >= 0.8 and after > before, f"class accuracy {before:.2f} -> {after:.2f}"
    grid = model.sample_grid(per_class=2)  # one column per class
    assert grid.shape == (2 + 2 * (SIZE + 2), 2 + 3 * (SIZE + 2), 3)


def test_seeded_fits_are_identical():
    a, b = build(), build()
    fit(a, epochs=2, n=32)
    fit(b, epochs=2, n=32)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(a.sample(6, seeded(), truncation=0.7), b.sample(6, seeded(), truncation=0.7))


def test_ema_of_the_generator_is_what_samples():
    model = build(ema_decay=0.9)
    fit(model, epochs=2, n=32)
    assert model.generator_ema is not None
    live = dict(model.generator.named_parameters())
    shadow = dict(model.generator_ema.module.named_buffers())
    assert any(not torch.equal(p, shadow[k]) for k, p in live.items())  # averaged, not a copy
    with torch.no_grad():
        z = torch.randn(4, 16, generator=seeded())
        y = torch.arange(4) % 3
        model.eval()
        expected = ((model.generator_ema(z, y) + 1) * 0.5).clamp(0, 1)
    assert torch.allclose(model.sample(4, seeded(), classes=y), expected)


@pytest.mark.parametrize("options", [{}, {"projection": False, "conditional_bn": False,
                                          "spectral_norm": False, "ema_decay": 0.9}])
def test_save_load_round_trip(options, tmp_path):
    model = build(**options)
    fit(model, epochs=1, n=32)
    model.eval()
    path = tmp_path / "biggan.ckpt"
    model.save(path)
    loaded = Estimator.load(path).eval()
    assert type(loaded) is BigGAN and loaded.config == model.config
    x = torch.rand(3, 3, SIZE, SIZE)
    assert torch.equal(loaded.score(x), model.score(x))
    assert torch.equal(loaded.sample(5, seeded(), truncation=0.5), model.sample(5, seeded(), truncation=0.5))
