"""The GAN suite learns: each model, after one short fit through the loop, is measurably
closer to its data than untrained; the loss is an option, not a network; the sample grids,
seeding and the health monitor work.

Data are tiny on purpose: a ring of 8 Gaussians (the 2-D GAN) and 16 x 16 flat colour squares
(the image GANs), so every fit takes seconds on one CPU thread.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anomalykit.errors import ConfigError, DataError
from anomalykit.generative.gan import DCGAN, GAN
from anomalykit.nn.dcgan import DCGANGenerator
from anomalykit.registry import create
from anomalykit.training.inference import as_loader

SIZE = 16
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9]])
SMALL = {"image_size": SIZE, "latent_dim": 16, "width": 16}


def ring(n: int, seed: int = 0, radius: float = 2.0, std: float = 0.02) -> torch.Tensor:
    """(n, 2) points from 8 Gaussians on a circle (the classic mode-collapse test)."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.randint(8, (n,), generator=g).float() * 2 * math.pi / 8
    return (torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
            + std * torch.randn(n, 2, generator=g))


def modes_reached(samples: torch.Tensor, radius: float = 2.0, tol: float = 0.2,
                  min_count: int = 10) -> int:
    """How many of the ring's 8 centres have >= min_count samples within tol."""
    angle = torch.arange(8).float() * 2 * math.pi / 8
    centres = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    nearest = torch.cdist(samples, centres).min(1)
    counts = torch.bincount(nearest.indices[nearest.values < tol], minlength=8)
    return int((counts >= min_count).sum())


def squares(n: int = 96, *, classes: bool = False, seed: int = 0):
    """(n, 3, SIZE, SIZE) flat colour squares in [0, 1] with a little pixel noise.

    classes=False: each colour uniform in a red box (R 0.6-1, G 0-0.3, B 0.2-0.5), one mode.
    classes=True: one of 3 fixed colours per image, returned with the labels (n,).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    if classes:
        colours = COLOURS[labels]
    else:
        low, high = torch.tensor([0.6, 0.0, 0.2]), torch.tensor([1.0, 0.3, 0.5])
        colours = low + (high - low) * torch.rand(n, 3, generator=g)
    x = colours[:, :, None, None].expand(n, 3, SIZE, SIZE)
    x = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return (x, labels) if classes else x


def colour_stats(images: torch.Tensor) -> torch.Tensor:
    """(6,) per-channel mean and per-channel std across images of the image means."""
    means = images.mean((2, 3))
    return torch.cat([means.mean(0), means.std(0)])


def seeded(n: int = 96) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def fit(model, data, epochs: int, batch_size: int = 32, **options):
    return model.fit(data, epochs=epochs, batch_size=batch_size, device="cpu", progress=False,
                     seed=0, **options)


def build(name: str, **kwargs):
    torch.manual_seed(0)
    return create(name, "generative", **kwargs)


# -- data --------------------------------------------------------------------------------------
def test_as_loader_accepts_a_dict_of_equal_length_tensors():
    x, y = torch.rand(5, 3, 4, 4), torch.arange(5)
    batches = list(as_loader({"image": x, "class": y}, batch_size=2))
    assert [len(b["image"]) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["class"] for b in batches]), y)
    assert torch.equal(batches[0]["image"], x[:2])
    with pytest.raises(DataError, match="one length"):
        as_loader({"image": x, "class": torch.arange(4)}, batch_size=2)


# -- each model learns ---------------------------------------------------------------------------
def test_gan_covers_the_modes_of_a_ring_of_gaussians():
    model = build("gan", dim=2, latent_dim=4, hidden=128, layers=3)
    untrained = modes_reached(model.sample(2000, generator=seeded(0)))
    history = fit(model, ring(2048), epochs=40, batch_size=128)
    trained = modes_reached(model.sample(2000, generator=seeded(0)))
    assert untrained <= 1
    assert trained >= 6, f"the GAN reached {trained} of 8 modes"
    assert {"d_loss", "g_loss"} <= set(history["train_loss"][-1])


@pytest.mark.parametrize("name, kwargs", [
    ("dcgan", {}),
    ("lsgan", {}),
    # the papers' Wasserstein learning rates need thousands of steps; 1e-3 shows it in 180
    ("wgan", {"lr": 1e-3}),
    ("wgan_gp", {"lr": 1e-3}),
])
def test_image_gans_move_towards_the_data_colours(name, kwargs):
    data = squares()
    target = colour_stats(data)
    model = build(name, **SMALL, **kwargs)
    before = float((colour_stats(model.sample(96, generator=seeded())) - target).abs().sum())
    fit(model, data, epochs=60)
    after = float((colour_stats(model.sample(96, generator=seeded())) - target).abs().sum())
    assert after < 0.6 * before, f"{name}: colour-statistics distance {before:.3f} -> {after:.3f}"
    assert not model.adversarial_warnings


def test_cgan_generates_the_asked_class():
    x, y = squares(classes=True)
    model = build("cgan", num_classes=3, embed_dim=8, **SMALL)
    classes = torch.arange(96) % 3

    def accuracy() -> float:
        means = model.sample(96, generator=seeded(), classes=classes).mean((2, 3))
        return float((torch.cdist(means, COLOURS).argmin(1) == classes).float().mean())

    before = accuracy()
    fit(model, {"image": x, "class": y}, epochs=60)
    after = accuracy()
    assert after >= 0.6 and after > before, f"class accuracy {before:.2f} -> {after:.2f}"
    grid = model.sample_grid(per_class=2)
    assert grid.shape == (2 + 2 * (SIZE + 2), 2 + 3 * (SIZE + 2), 3)


def test_cgan_needs_labels_when_there_are_several_classes():
    model = build("cgan", num_classes=3, embed_dim=8, **SMALL)
    with pytest.raises(ConfigError, match="class"):
        fit(model, squares(8), epochs=1, batch_size=8)


def test_infogan_categorical_code_is_recoverable_from_its_samples():
    x, _ = squares(classes=True)
    model = build("infogan", image_size=SIZE, noise_dim=8, num_categories=3, continuous_dim=1,
                  width=16, q_hidden=32)
    codes = torch.arange(96) % 3
    fit(model, x, epochs=30)
    probs, means = model.infer_codes(model.sample(96, generator=seeded(), codes=codes))
    assert probs.shape == (96, 3) and means.shape == (96, 1)
    assert torch.allclose(probs.sum(1), torch.ones(96))
    accuracy = float((probs.argmax(1) == codes).float().mean())
    assert accuracy > 0.6, f"categorical code read back {accuracy:.2f} (chance 0.33)"


def test_bigan_reconstruction_improves():
    data = squares()
    model = build("bigan", joint_hidden=32, **SMALL)
    before = float((model.reconstruct(data) - data).pow(2).mean())
    fit(model, data, epochs=60)
    after = float((model.reconstruct(data) - data).pow(2).mean())
    assert model.encode(data).shape == (96, 16)
    assert after < 0.5 * before, f"BiGAN reconstruction MSE {before:.4f} -> {after:.4f}"


# -- the loss is an option ----------------------------------------------------------------------
def test_the_loss_is_an_option_not_a_network():
    models = {name: build(name, **SMALL) for name in ("dcgan", "lsgan", "wgan", "wgan_gp")}
    shapes = {name: {k: v.shape for k, v in m.generator.state_dict().items()}
              for name, m in models.items()}
    for name, model in models.items():
        assert isinstance(model, DCGAN) and type(model.generator) is DCGANGenerator
        assert shapes[name] == shapes["dcgan"], name
    assert models["lsgan"].loss == "lsgan"
    wgan = models["wgan"]
    assert (wgan.loss, wgan.clip, wgan.n_critic, wgan.optimizer, wgan.lr) == (
        "wgan", 0.01, 5, "rmsprop", 5e-5)
    gp = models["wgan_gp"]
    assert (gp.loss, gp.gp_weight, gp.n_critic, gp.lr, gp.betas) == (
        "wgan_gp", 10.0, 5, 1e-4, (0.0, 0.9))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gp.discriminator.modules())
    assert isinstance(wgan.configure_optimizers()[1], torch.optim.RMSprop)
    # the same class takes any loss by name
    assert build("dcgan", loss="hinge", **SMALL).loss == "hinge"
    with pytest.raises(ConfigError, match="loss"):
        build("dcgan", loss="nope", **SMALL)
    with pytest.raises(ConfigError, match="d_norm"):
        build("dcgan", loss="wgan_gp", d_norm="batch", **SMALL)


def test_wgan_clips_the_critic():
    model = build("wgan", **SMALL)
    fit(model, squares(16), epochs=1, batch_size=8)
    assert max(float(p.detach().abs().max()) for p in model.discriminator.parameters()) <= 0.01 + 1e-7


@pytest.mark.parametrize("loss", ["minimax", "non_saturating", "lsgan", "wgan", "wgan_gp",
                                  "hinge"])
@pytest.mark.parametrize("name", ["gan", "cgan", "infogan", "bigan"])
def test_every_model_takes_every_loss_and_validates(name, loss):
    options = {"loss": loss, "n_critic": 2}
    if loss == "wgan":
        options["clip"] = 0.01
    if name == "gan":
        model, train = build("gan", dim=2, hidden=8, **options), ring(16)
    else:
        options["d_norm"] = "layer" if loss == "wgan_gp" else "batch"
        kwargs = {"image_size": 8, "width": 4}
        if name == "cgan":
            x, y = squares(16, classes=True)
            train = {"image": x[:, :, :8, :8], "class": y}
            kwargs |= {"num_classes": 3, "latent_dim": 4, "embed_dim": 2}
        elif name == "infogan":
            train = squares(16)[:, :, :8, :8]
            kwargs |= {"noise_dim": 2, "num_categories": 3, "continuous_dim": 1, "q_hidden": 4}
        else:
            train = squares(16)[:, :, :8, :8]
            kwargs |= {"latent_dim": 4, "joint_hidden": 4}
        model = build(name, **kwargs, **options)
    history = fit(model, train, epochs=1, batch_size=8, val_data=train)
    losses = history["train_loss"][0]
    assert {"loss", "d_loss", "g_loss"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())
    assert math.isfinite(history["val_loss"][0])


# -- grids, seeds, monitor -------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, data", [
    ("dcgan", SMALL, "image"),
    ("cgan", {"num_classes": 3, **SMALL}, "classes"),
    ("infogan", {"image_size": SIZE, "noise_dim": 4, "num_categories": 3, "width": 8}, "image"),
    ("bigan", {"joint_hidden": 8, **SMALL}, "image"),
    ("gan", {"dim": 2, "hidden": 16}, "ring"),
])
def test_sample_grid_is_written_every_epoch(name, kwargs, data, tmp_path):
    if data == "classes":
        x, y = squares(16, classes=True)
        train = {"image": x, "class": y}
    else:
        train = ring(16) if data == "ring" else squares(16)
    model = build(name, **kwargs, grid_every=2)
    fit(model, train, epochs=3, batch_size=8, out_dir=tmp_path)
    written = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert written == ["epoch_002.png", "epoch_003.png"]  # every 2nd epoch and the last


@pytest.mark.parametrize("name, kwargs", [("dcgan", SMALL), ("gan", {"dim": 2})])
def test_same_seed_same_samples_after_fit(name, kwargs):
    data = ring(64) if name == "gan" else squares(32)
    samples = []
    for _ in range(2):
        model = build(name, **kwargs)
        fit(model, data, epochs=2, batch_size=16)
        samples.append(model.sample(8, generator=seeded(0)))
    assert torch.equal(samples[0], samples[1])


class ConstantGenerator(nn.Module):
    """A collapsed generator: one learnable point, whatever the noise."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.point = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.point.expand(len(z), -1)


def test_monitor_warns_when_the_samples_collapse():
    model = build("gan", dim=2, hidden=16)
    assert isinstance(model, GAN)
    model.generator = ConstantGenerator(2)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        fit(model, ring(512), epochs=1, batch_size=8)  # 64 steps > the monitor's patience (50)
    assert any("collapsed" in w for w in model.adversarial_warnings)
    assert "adversarial_warnings" not in dict(model.named_buffers())
    assert not any("monitor" in k or "warning" in k for k in model.state_dict())
