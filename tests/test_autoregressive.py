"""Autoregressive models: causality of the masks (by gradients: exhaustive over inputs), the
colour ordering, no blind spot in the Gated PixelCNN, exact normalisation, windowed sampling
equal to the full pass, seeded sampling, learning on digits, and the VQ-VAE's PixelCNN prior.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from anomalykit.errors import ConfigError
from anomalykit.generative.autoregressive import (
    CodePixelCNN,
    GatedPixelCNN,
    PixelCNN,
    PixelRNN,
    levels_to_input,
)
from anomalykit.generative.vqvae import VQVAE
from anomalykit.nn.masked import MaskedConv2d, causal_mask
from anomalykit.training import fit

SMALL = {"hidden": 12, "head_hidden": 24, "num_levels": 5}
MODELS = {
    "pixelcnn": lambda c, **kw: PixelCNN(8, in_channels=c, **{"layers": 2, **SMALL, **kw}),
    "gated_pixelcnn": lambda c, **kw: GatedPixelCNN(8, in_channels=c, **{"layers": 3, **SMALL, **kw}),
    "pixelrnn": lambda c, **kw: PixelRNN(8, in_channels=c, **{"layers": 2, **SMALL, **kw}),
}


def build(name: str, channels: int = 3, **kwargs):
    torch.manual_seed(0)
    return MODELS[name](channels, **kwargs).eval()


def input_gradient(model, i: int, j: int, c: int, size: int = 8, channels: int = 3) -> torch.Tensor:
    """(C, H, W) sum over 8 random inputs of |d logits(i, j, c) / d input|: which sub-pixels the
    logits of (i, j, c) see (several inputs, so that a ReLU off at one input hides no path)."""
    x = torch.randn(8, channels, size, size, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    logits = model.logits_from_input(x).view(8, channels, -1, size, size)
    logits[:, c, :, i, j].sum().backward()
    return x.grad.abs().sum(0)


def future(i: int, j: int, c: int, size: int = 8, channels: int = 3) -> torch.Tensor:
    """(C, H, W) bool: the sub-pixels at or after (i, j, c) in raster order, colour by colour."""
    order = torch.arange(size * size * channels).view(size, size, channels).permute(2, 0, 1)
    return order >= (i * size + j) * channels + c


POSITIONS = [(0, 0, 0), (0, 0, 2), (3, 4, 0), (3, 4, 1), (3, 4, 2), (7, 7, 2), (5, 0, 1), (2, 7, 0)]


def test_masks_type_a_and_b_with_rgb_groups():
    a = causal_mask(6, 3, (3, 3), "A", groups=3)
    b = causal_mask(6, 3, (3, 3), "B", groups=3)
    assert a[:, :, 0].eq(1).all() and a[:, :, 1, 0].eq(1).all()  # rows above, left
    assert a[:, :, 2].eq(0).all() and a[:, :, 1, 2].eq(0).all()  # below, right
    # centre tap: output groups (2 channels each) R, G, B; input channels R, G, B
    assert a[:, :, 1, 1].tolist() == [[0, 0, 0]] * 2 + [[1, 0, 0]] * 2 + [[1, 1, 0]] * 2
    assert b[:, :, 1, 1].tolist() == [[1, 0, 0]] * 2 + [[1, 1, 0]] * 2 + [[1, 1, 1]] * 2
    with pytest.raises(ConfigError, match="mask_type"):
        MaskedConv2d(3, 6, 3, "C")
    with pytest.raises(ConfigError, match="odd"):
        MaskedConv2d(3, 6, 4, "A")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels", [3, 1])
def test_logits_never_depend_on_the_current_or_later_sub_pixels(name, channels):
    model = build(name, channels)
    for i, j, c in POSITIONS:
        if c >= channels:
            continue
        grad = input_gradient(model, i, j, c, channels=channels)
        later = future(i, j, c, channels=channels)
        assert grad[later].max() == 0, f"{name}: logits of {(i, j, c)} depend on later sub-pixels"
        assert grad[~later].sum() > 0 or (i, j, c) == (0, 0, 0)
    # and the colour ordering is used, not just "previous pixels": G sees R of its own pixel,
    # B sees R and G, R sees neither
    if channels == 3:
        assert input_gradient(model, 3, 4, 0)[:, 3, 4].tolist() == [0, 0, 0]
        g = input_gradient(model, 3, 4, 1)[:, 3, 4]
        b = input_gradient(model, 3, 4, 2)[:, 3, 4]
        assert g[0] > 0 and g[1:].eq(0).all()
        assert b[:2].gt(0).all() and b[2] == 0


def test_plain_pixelcnn_has_the_blind_spot_gated_does_not():
    # Up-right of (i, j): (i-1, j+2) and beyond is never reached by stacks of 3x3 masked layers,
    # at any depth; three gated layers reach 3 columns either way in the rows above.
    plain = build("pixelcnn", layers=4, first_kernel=3)
    gated = build("gated_pixelcnn", first_kernel=3)
    for model, blind in ((plain, True), (gated, False)):
        grad = input_gradient(model, 5, 3, 0)
        for di, dj in ((-1, 2), (-1, 3), (-2, 3)):
            seen = bool(grad[:, 5 + di, 3 + dj].sum() > 0)
            assert seen != blind, f"{type(model).__name__} at offset {(di, dj)}: seen={seen}"


@pytest.mark.parametrize("name", list(MODELS))
def test_windowed_sampling_logits_equal_the_full_pass(name):
    # 12x12 with 3x3 kernels: the crops (reach 3-4) are much smaller than the image
    model = build(name, first_kernel=3)
    levels = torch.randint(0, 5, (2, 3, 12, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.logits(levels)
        pixel_logits = model.pixel_logits_fn()
        for i, j in itertools.product(range(12), range(12)):  # raster order, as sampling calls it
            # float rounding only (measured <= 6e-8); a window one row/column too small is off
            # by 5e-5 (pixelcnn) to 8e-4 (gated)
            torch.testing.assert_close(pixel_logits(levels, i, j), full[..., i, j],
                                       rtol=0, atol=1e-6)


def test_code_pixelcnn_is_causal_and_its_windows_match():
    torch.manual_seed(0)
    prior = CodePixelCNN(4, 6, hidden=6, layers=2, head_hidden=6).eval()
    codes = torch.randint(0, 4, (1, 6, 6), generator=torch.Generator().manual_seed(0))
    base = prior.logits(codes)
    for i, j in [(0, 0), (2, 3), (5, 5)]:
        changed = codes.clone().view(1, -1)
        changed[0, i * 6 + j:] = (changed[0, i * 6 + j:] + 1) % 4
        after = prior.logits(changed.view(1, 6, 6)).flatten(2)
        assert torch.equal(after[..., :i * 6 + j + 1], base.flatten(2)[..., :i * 6 + j + 1])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_log_prob_normalises_over_every_binary_2x2_image(name, channels):
    torch.manual_seed(0)
    model = MODELS[name](channels, num_levels=2, hidden=6, head_hidden=6)
    model.image_size = 2
    every = torch.tensor(list(itertools.product([0, 1], repeat=channels * 4)), dtype=torch.float32)
    with torch.no_grad():
        total = model.log_prob(every.view(-1, channels, 2, 2)).double().exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-4)


def test_code_prior_normalises():
    torch.manual_seed(0)
    prior = CodePixelCNN(3, 2, hidden=4, layers=1, head_hidden=4)
    every = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 2, 2)
    with torch.no_grad():
        assert float(prior.log_prob(every).double().exp().sum()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_sampling_is_seeded_and_on_the_level_grid(name):
    model = build(name, 1)
    model.image_size = 4
    a = model.sample(3, generator=torch.Generator().manual_seed(0))
    b = model.sample(3, generator=torch.Generator().manual_seed(0))
    c = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    levels = a * (model.num_levels - 1)
    assert torch.equal(levels, levels.round()) and a.min() >= 0 and a.max() <= 1


def test_class_conditional_gated_pixelcnn():
    model = build("gated_pixelcnn", 1, num_classes=3)
    model.image_size = 4
    x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        lp0 = model.log_prob(x, torch.tensor([0, 0]))
        lp1 = model.log_prob(x, torch.tensor([1, 1]))
    assert not torch.allclose(lp0, lp1)  # the label changes the likelihood
    samples = model.sample(2, labels=torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 4, 4)
    with pytest.raises(ConfigError, match="labels"):
        model.sample(2)
    history = fit(model, {"image": x, "label": torch.tensor([0, 1])}, epochs=1, batch_size=2,
                  device="cpu", progress=False)
    assert math.isfinite(history["train_loss"][0]["loss"])


def digits(num_levels: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:1500]], images[order[1500:]]


@pytest.mark.parametrize("name", list(MODELS))
def test_learns_digits_bits_per_dim_falls(name):
    # Held-out bits/dim at 17 levels (uniform: log2 17 = 4.09) after 2 epochs of 1500 digits
    # (60 steps, about a second): measured 4.06 -> 2.51 (pixelcnn), 4.17 -> 2.44 (gated),
    # 4.07 -> 2.44 (pixelrnn) at seed 0.
    train, held_out = digits()
    torch.manual_seed(0)
    model = MODELS[name](1, num_levels=17, hidden=16, head_hidden=32, lr=3e-3)
    with torch.no_grad():
        before = float(model.bits_per_dim(held_out).mean())
    fit(model, train, epochs=2, batch_size=50, device="cpu", progress=False)
    with torch.no_grad():
        after = float(model.bits_per_dim(held_out).mean())
    assert before > 3.5, before
    assert after < 3.0, (before, after)


def test_vqvae_pixelcnn_prior_fits_samples_and_scores(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = VQVAE(16, widths=[8, 8], strides=[2, 2], num_codes=8, code_dim=4,
                  code_prior="pixelcnn", prior_hidden=4, prior_layers=1, prior_epochs=2)
    before = {k: v.clone() for k, v in model.prior.named_parameters()}
    fit(model, images, epochs=1, batch_size=6, device="cpu", progress=False)  # on_fit_end fits it
    assert any(not torch.equal(v, before[k]) for k, v in model.prior.named_parameters())
    model.eval()
    samples = model.sample(3, generator=torch.Generator().manual_seed(0))  # default: pixelcnn
    assert samples.shape == (3, 3, 16, 16) and torch.isfinite(samples).all()
    assert torch.equal(samples, model.sample(3, generator=torch.Generator().manual_seed(0)))
    assert model.sample(3, prior="empirical").shape == (3, 3, 16, 16)
    with torch.no_grad():
        uniform = model.code_log_prob(images, "uniform")
        assert torch.allclose(uniform, torch.full((6,), -16 * math.log(8)))
        assert model.code_log_prob(images).shape == (6,)
    path = tmp_path / "vqvae.ckpt"
    model.save(path)
    loaded = VQVAE.load(path).eval()
    assert torch.equal(loaded.sample(3, generator=torch.Generator().manual_seed(0)), samples)
    plain = VQVAE(16, widths=[8, 8], strides=[2, 2], num_codes=8, code_dim=4)
    with pytest.raises(ConfigError, match="code_prior"):
        plain.sample(2, prior="pixelcnn")
    with pytest.raises(ConfigError, match="code_prior"):
        VQVAE(16, code_prior="uniform")


def test_levels_to_input_spans_minus_one_to_one():
    assert levels_to_input(torch.tensor([0, 8, 16]), 17).tolist() == [-1.0, 0.0, 1.0]
