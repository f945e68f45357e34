"""VQGAN: the discriminator's start, the adaptive weight (eq. 7) against a manual computation,
the perceptual loss, learning, the code prior, determinism and save/load.

32-px images, tiny widths, the perceptual loss off or on a randomly initialised backbone (no
weight file read, nothing downloaded).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from anomalykit.base import Estimator
from anomalykit.errors import ConfigError
from anomalykit.generative.vqgan import VQGAN, PerceptualLoss, adaptive_gan_weight
from anomalykit.nn.adversarial import generator_loss
from anomalykit.nn.dcgan import to_tanh_range
from anomalykit.registry import create, list_generative

SIZE = 32
TINY = {"widths": [8, 16], "strides": [2, 2], "num_codes": 16, "code_dim": 8, "disc_width": 4,
        "perceptual_weight": 0.0, "prior_hidden": 8, "prior_layers": 1, "prior_epochs": 0}


def tiny(**kwargs) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(**{"image_size": SIZE, **TINY, **kwargs})


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """(192, 3, 32, 32) in [0, 1]: scikit-learn's 8x8 digits upsampled, grey to RGB."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:192], dtype=torch.float32)[:, None] / 16.0
    return F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def optimizers(model: VQGAN) -> list[torch.optim.Optimizer]:
    return model.configure_optimizers()


def fit(model: VQGAN, data, **options) -> dict:
    return model.fit(data, **{"epochs": 1, "batch_size": 8, "device": "cpu", "progress": False,
                              **options})


def test_registered_and_bad_options():
    assert "vqgan" in list_generative()
    assert isinstance(create("vqgan", "generative", image_size=SIZE, **TINY), VQGAN)
    with pytest.raises(ConfigError, match="disc_loss"):
        tiny(disc_loss="wgan")
    with pytest.raises(ConfigError, match="disc_layers 3"):
        tiny(image_size=16)
    with pytest.raises(ConfigError, match="perceptual_weight"):
        tiny(perceptual_weight=-1.0)
    with pytest.raises(ConfigError, match="score_by"):
        tiny(score_by="likelihood")


def test_discriminator_switches_on_at_disc_start():
    model = tiny(disc_start=2).train()
    opts = optimizers(model)
    calls = []
    model.discriminator.register_forward_hook(lambda *_: calls.append(1))
    x = images()
    for step in range(4):
        model.global_step = step
        before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
        calls.clear()
        logs = model.training_step({"image": x}, opts)
        changed = any(not torch.equal(v, before[k]) for k, v in model.discriminator.state_dict().items())
        if step < 2:  # off: never run, never stepped, no GAN term in the autoencoder's loss
            assert not calls and not changed
            assert float(logs["disc_active"]) == 0.0
            assert float(logs["g_loss"]) == float(logs["d_loss"]) == float(logs["gan_weight"]) == 0.0
            assert torch.allclose(logs["loss"], logs["rec_loss"] + logs["vq"])
        else:  # on: the autoencoder's GAN pass, then D on real and reconstructed images
            assert len(calls) == 3 and changed
            assert float(logs["disc_active"]) == 1.0 and float(logs["gan_weight"]) > 0.0
            assert torch.allclose(logs["loss"], logs["rec_loss"] + logs["vq"]
                                  + logs["gan_weight"] * logs["g_loss"])
    # Through the loop: one step per epoch, the history shows when it switched on.
    model = tiny(disc_start=2)
    history = fit(model, images(), epochs=4)
    assert [e["disc_active"] for e in history["train_loss"]] == [0.0, 0.0, 1.0, 1.0]


def test_adaptive_weight_formula():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    # d/dw sum(w a) = a: lambda = ||a|| / (||b|| + 1e-4)
    got = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert torch.allclose(got, a.norm() / (b.norm() + 1e-4))
    assert float(adaptive_gan_weight((w * a).sum(), (w * b).sum() * 0, w, max_weight=7.0)) == 7.0


def test_adaptive_weight_uses_the_last_decoder_layer():
    model = tiny(disc_start=0, disc_weight=0.5).train()
    last = model.last_layer
    final_conv = list(model.vqvae.decoder.modules())[-2]  # the conv before the sigmoid
    assert last is final_conv.weight
    x = images()
    # By hand, on a copy in the same state and the same RNG: the two gradients at GL.
    manual = copy.deepcopy(model)
    torch.manual_seed(0)
    terms = manual.reconstruction_terms(x)
    g_loss = generator_loss(manual.discriminator(to_tanh_range(terms["recon"])), "hinge")
    (rec_grad,) = torch.autograd.grad(terms["rec_loss"], manual.last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(g_loss, manual.last_layer)
    expected = 0.5 * rec_grad.norm() / (gan_grad.norm() + 1e-4)
    torch.manual_seed(0)
    logs = model.training_step({"image": x}, optimizers(model))
    assert 0.0 < float(expected) < 1e4
    assert torch.allclose(logs["gan_weight"], expected, rtol=1e-5)
    assert torch.allclose(logs["g_loss"], g_loss.detach())

    fixed = tiny(disc_start=0, disc_weight=0.5, adaptive_weight=False).train()
    assert float(fixed.training_step({"image": x}, optimizers(fixed))["gan_weight"]) == 0.5


def test_perceptual_loss_zero_for_identical_images_and_frozen():
    loss = PerceptualLoss(stages=(0, 1, 2), weights="random")
    x, y = images(4, seed=1), images(4, seed=2)
    assert torch.equal(loss(x, x), torch.zeros(4))
    d = loss(x, y)
    assert d.shape == (4,) and (d > 0).all()
    assert (loss(x[:, :1], y[:, :1]) > 0).all()  # grey images too
    assert not any(p.requires_grad for p in loss.parameters())
    x.requires_grad_(True)
    loss(x, y).sum().backward()
    assert x.grad.abs().sum() > 0  # it trains the decoder through the images

    model = tiny(perceptual_weight=1.0, perceptual_stages=[0, 1], perceptual_weights="random",
                 disc_start=0)
    frozen = {k: v.clone() for k, v in model.perceptual.state_dict().items()}
    history = fit(model, images(), max_steps=2)
    assert history["train_loss"][0]["perceptual"] > 0
    assert all(torch.equal(v, frozen[k]) for k, v in model.perceptual.state_dict().items())
    assert all(p.grad is None for p in model.perceptual.parameters())
    assert not model.perceptual.backbone.training  # BatchNorm statistics stay ImageNet's
    assert tiny().perceptual is None  # weight 0: no backbone built


def test_reconstruction_error_falls(digits):
    train, held_out = digits[:160], digits[160:]
    model = tiny(widths=[16, 32], num_codes=32, lr=1e-3, disc_start=40)
    with torch.no_grad():
        before = F.mse_loss(model.eval().reconstruct(held_out), held_out).item()
    history = fit(model, train, epochs=6, batch_size=16)  # 60 steps, the last 20 with D
    with torch.no_grad():
        after = F.mse_loss(model.eval().reconstruct(held_out), held_out).item()
    assert after < 0.5 * before, (before, after)
    losses = [e["pixel"] for e in history["train_loss"]]
    assert losses[-1] < losses[0]


def test_prior_fit_then_sample():
    model = tiny()
    fit(model, images(16), max_steps=2)
    model.eval()
    assert not bool(model.prior_fitted_)
    # Before a prior: uniform codes.
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(2, generator=g()), model.sample(2, generator=g(), prior="uniform"))
    with pytest.raises(ConfigError, match="fitted prior"):
        tiny(score_by="prior").score(images(2))

    history = model.fit_prior(images(16), epochs=2)
    assert bool(model.prior_fitted_) and len(history["train_loss"]) == 2
    codes = model.vqvae.prior.sample(5, generator=g())
    assert codes.shape == (5, model.vqvae.grid, model.vqvae.grid) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 16
    samples = model.sample(5, generator=g())
    assert samples.shape == (5, 3, SIZE, SIZE) and samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(samples, model.decode(codes))  # the prior's codes, decoded

    model.score_by = "prior"
    nll = model.score(images(3, seed=5))
    assert torch.allclose(nll, -model.code_log_prob(images(3, seed=5)))
    assert nll.shape == (3,) and (nll > 0).all()


def test_prior_fitted_by_fit_with_prior_epochs():
    model = tiny(prior_epochs=1, disc_start=0)
    fit(model, images(8), max_steps=1)
    assert bool(model.prior_fitted_)


def test_seeded_determinism():
    def run(seed: int) -> tuple[dict, torch.Tensor]:
        model = tiny(disc_start=1)
        fit(model, images(16), epochs=2, seed=seed)
        return model.state_dict(), model.eval().sample(4, generator=torch.Generator().manual_seed(0))

    (a, sa), (b, sb), (c, _) = run(0), run(0), run(1)
    assert all(torch.equal(v, b[k]) for k, v in a.items()) and torch.equal(sa, sb)
    assert not all(torch.equal(v, c[k]) for k, v in a.items())


@pytest.mark.parametrize("fit_the_prior", [False, True])
def test_save_load(tmp_path, fit_the_prior):
    model = tiny(disc_start=0)
    fit(model, images(8), max_steps=1)
    if fit_the_prior:
        model.fit_prior(images(8), epochs=1)
    model.eval()
    x = images(3, seed=7)
    path = tmp_path / "vqgan.ckpt"
    model.save(path)
    loaded = Estimator.load(path).eval()
    assert type(loaded) is VQGAN and bool(loaded.prior_fitted_) is fit_the_prior
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
    assert torch.equal(model.score(x), loaded.score(x))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(model.sample(3, generator=g()), loaded.sample(3, generator=g()))


def test_epoch_grid_shows_reconstructions_and_samples(tmp_path):
    from anomalykit.data.io import read_image

    model = tiny(disc_start=0)
    fit(model, images(8), out_dir=tmp_path)
    picture = read_image(tmp_path / "samples" / "epoch_001.png")
    # 8 x 8 tiles of 32 px with 2-px gaps: real, reconstructed, then 6 rows of samples.
    assert picture.shape[:2] == (8 * 34 + 2, 8 * 34 + 2)
