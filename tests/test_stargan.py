"""StarGAN: the discriminator's two heads, the generator conditioned on the target domain,
one model learning to render each domain (3 colour domains), the critic schedule, stored
examples for sampling, seeding and save/load, options.

Data: 16 x 16 smooth grey patterns tinted red, green or blue (domain = colour), so every fit
takes seconds on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalykit.base import Estimator
from anomalykit.errors import ConfigError
from anomalykit.generative.stargan import StarGAN

SIZE = 16
COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9]])
TINY = {"num_domains": 3, "width": 8, "blocks": 1, "downsamples": 1, "d_width": 8,
        "d_layers": 2, "num_examples": 4}


def tinted(n: int, seed: int) -> dict[str, torch.Tensor]:
    """{"image": (n, 3, SIZE, SIZE) in [0, 1], "domain": (n,)}: a smooth grey pattern times
    the domain's colour; domains 0, 1, 2, 0, ..."""
    g = torch.Generator().manual_seed(seed)
    grey = F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=SIZE, mode="bilinear",
                         align_corners=False)
    domain = torch.arange(n) % 3
    return {"image": (0.3 + 0.7 * grey) * COLOURS[domain][:, :, None, None], "domain": domain}


def nearest_colour(images: torch.Tensor) -> torch.Tensor:
    """(B,) index of the colour in COLOURS nearest each image's mean colour."""
    return torch.cdist(images.mean((2, 3)), COLOURS).argmin(1)


def build(**kwargs) -> StarGAN:
    torch.manual_seed(0)
    return StarGAN(SIZE, **{**TINY, **kwargs})


def fit(model: StarGAN, data, epochs: int, batch_size: int = 16, **options):
    return model.fit(data, epochs=epochs, batch_size=batch_size, device="cpu", progress=False,
                     seed=0, **options)


def test_the_discriminator_has_a_patch_map_and_a_domain_classifier():
    model = build(num_domains=5)
    src, cls = model.discriminator(torch.rand(4, 3, SIZE, SIZE) * 2 - 1)
    assert src.shape == (4, 1, 2, 2)  # 16 px, 2 strided layers: 4 -> 3 -> 2 patches a side
    assert cls.shape == (4, 5)
    bigger = StarGAN(32, **{**TINY, "num_domains": 5, "d_layers": 3})
    src, cls = bigger.discriminator(torch.rand(2, 3, 32, 32))
    assert src.shape == (2, 1, 2, 2) and cls.shape == (2, 5)


def test_the_generator_sees_the_target_domain():
    # Constant one-hot channels must survive the stem's instance norm (zero padding).
    model = build()
    x = tinted(4, seed=0)["image"]
    outputs = [model.translate(x, k) for k in range(3)]
    assert all(out.shape == x.shape and out.min() >= 0 and out.max() <= 1 for out in outputs)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    per_image = model.translate(x, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(per_image[1], outputs[1][1]) and torch.equal(per_image[2], outputs[2][2])
    for bad in (3, -1, torch.tensor([0, 1])):
        with pytest.raises(ConfigError, match="domain"):
            model.translate(x, bad)
    with pytest.raises(ConfigError, match="domain"):
        model.score(x, domain=3)


@pytest.mark.slow
def test_one_model_learns_to_render_each_colour_domain():
    # Measured (fit seeds 0, 1, 2; lsgan, 36 steps): d_cls 1.09 -> 0.003 / 0.005 / 0.005,
    # g_cls 1.09 -> 0.003 / 0.004 / 0.004; real and translated held-out images classified
    # 100% right, translations' colour the target's for 100%. Before the generator's stem
    # padded with zeros, the translations kept their input's colour (33%, chance, after 180
    # steps): the domain channels never reached it.
    model = build(loss="lsgan", n_critic=1, lr=2e-3)
    history = fit(model, tinted(96, seed=0), epochs=6)
    losses = history["train_loss"]
    assert losses[-1]["d_cls"] < 0.1 * losses[0]["d_cls"], losses
    assert losses[-1]["g_cls"] < 0.1 * losses[0]["g_cls"], losses
    held_out = tinted(30, seed=9)
    x, domain = held_out["image"], held_out["domain"]
    assert (model.classify(x).argmax(1) == domain).float().mean() >= 0.9
    target = (domain + 1) % 3
    translated = model.translate(x, target)
    assert (nearest_colour(translated) == target).float().mean() >= 0.9
    assert (model.classify(translated).argmax(1) == target).float().mean() >= 0.9
    # score: -log p(domain 0 | x), low for domain-0 images, high for the others
    scores = model.score(x)
    assert scores[domain != 0].min() > scores[domain == 0].max()


def test_the_generator_steps_every_n_critic_steps():
    def parameters(module):
        return [p.detach().clone() for p in module.parameters()]

    data, snapshots = tinted(8, seed=0), []
    for steps in (1, 2, 3):
        model = build(n_critic=2)  # wgan_gp
        history = fit(model, data, epochs=3, batch_size=4, max_steps=steps)
        assert "gp" in history["train_loss"][0]
        snapshots.append((parameters(model.generator), parameters(model.discriminator)))
    (g1, d1), (g2, d2), (g3, _) = snapshots

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    # Steps count from 0: step 0 trains both, step 1 the critic only, step 2 both again.
    assert same(g1, g2) and not same(d1, d2)
    assert not same(g2, g3)


def test_sampling_from_stored_examples_and_the_grid(tmp_path):
    model = build()
    with pytest.raises(ConfigError, match="call fit first"):
        model.sample(2)
    data = tinted(8, seed=0)
    history = model.fit(data, tinted(4, seed=1), epochs=1, batch_size=4, max_steps=1,
                        out_dir=tmp_path, device="cpu", progress=False)
    assert torch.isfinite(torch.tensor(history["val_loss"])).all()
    assert torch.equal(model.examples_, data["image"][:4])
    assert torch.equal(model.example_domains_, data["domain"][:4])
    samples = model.sample(5, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (5, 3, SIZE, SIZE) and torch.isfinite(samples).all()
    assert torch.equal(samples, model.sample(5, generator=torch.Generator().manual_seed(3)))
    # One row per example: the input, then each of the 3 domains.
    assert model.sample_grid().shape == (4 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2, 3)
    assert (tmp_path / "samples" / "epoch_001.png").exists()


def test_seeded_fits_agree_and_save_load_round_trips(tmp_path):
    data = tinted(8, seed=0)
    names = ["red", "green", "blue"]
    first, second = build(domain_names=names), build(domain_names=names)
    fit(first, data, epochs=1, batch_size=4)
    fit(second, data, epochs=1, batch_size=4)
    state = first.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in second.state_dict().items())
    first.save(tmp_path / "stargan.ckpt")
    loaded = Estimator.load(tmp_path / "stargan.ckpt")
    assert type(loaded) is StarGAN and loaded.config == first.config
    assert loaded.domain_names == ["red", "green", "blue"]
    x = tinted(3, seed=2)["image"]
    assert torch.equal(loaded.translate(x, 2), first.translate(x, 2))
    assert torch.equal(loaded.score(x), first.score(x))
    assert torch.equal(loaded.example_domains_, first.example_domains_)


def test_batches_need_domains_and_options_are_checked():
    model = build()
    with pytest.raises(ConfigError, match="domain"):
        fit(model, tinted(4, seed=0)["image"], epochs=1)
    bad_labels = {**tinted(4, seed=0), "domain": torch.tensor([0, 1, 2, 3])}
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        fit(build(), bad_labels, epochs=1)
    for bad in ({"loss": "wgan"}, {"num_domains": 1}, {"n_critic": 0}, {"lambda_cls": -1.0},
                {"d_norm": "batch"}, {"d_layers": 3}, {"num_examples": 0},
                {"domain_names": ["good", "crack"]}):
        with pytest.raises(ConfigError):
            build(**bad)
