"""VAE, VQ-VAE, denoising and masked autoencoders: invariants, a few epochs of learning on
scikit-learn's digits, and the ``vae`` detector on the easy synthetic category."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalykit.errors import ConfigError, DataError
from anomalykit.generative.ae import DenoisingAutoEncoder, MaskedAutoEncoder
from anomalykit.generative.vae import CVAE, VAE, kl_divergence, reparameterize
from anomalykit.generative.vqvae import VQVAE, VectorQuantizer
from anomalykit.registry import create, list_generative

SIZE = 16
SMALL = {"widths": [16, 32], "strides": [2, 2]}


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """(256, 3, 16, 16) in [0, 1]: scikit-learn's 8x8 digits (0..16) upsampled, grey to RGB."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:256], dtype=torch.float32)[:, None] / 16.0
    return F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def train(model, data, epochs: int = 6) -> list[dict[str, float]]:
    # the loop ends with on_fit_end: VQVAE counts its code histogram, AutoEncoder fits its prior
    return model.fit(data, epochs=epochs, batch_size=32, device="cpu", progress=False)["train_loss"]


def test_all_registered():
    assert {"ae", "denoising_ae", "masked_ae", "vae", "cvae", "vqvae"} <= set(list_generative())


# -- VAE ---------------------------------------------------------------------------------------


def test_reparameterisation_gradients_flow_to_mu_and_logvar():
    mu = torch.randn(4, 6, requires_grad=True)
    logvar = torch.randn(4, 6, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    z = reparameterize(mu, logvar, generator=generator)
    z.sum().backward()
    eps = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, mu + torch.exp(0.5 * logvar) * eps)
    assert torch.allclose(mu.grad, torch.ones_like(mu))  # dz/dmu = 1
    assert torch.allclose(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)

    torch.manual_seed(0)
    model = VAE(SIZE, latent_dim=4, **SMALL)
    model.training_step({"image": torch.rand(2, 3, SIZE, SIZE)})["loss"].backward()
    first = model.encoder.features[0].weight.grad
    assert first is not None and first.abs().sum() > 0


@pytest.mark.parametrize("kind", ["generative", "detector"])
def test_vae_validation_loss_is_deterministic(kind):
    from anomalykit.detectors.vae import VAEDetector

    torch.manual_seed(0)
    model = (VAE(SIZE, latent_dim=4, **SMALL) if kind == "generative"
             else VAEDetector(SIZE, latent_dim=4, **SMALL)).eval()
    batch = {"image": torch.rand(2, 3, SIZE, SIZE)}
    torch.manual_seed(0)
    a = model.validation_step(batch)
    torch.manual_seed(1)  # validation must not depend on the global generator
    b = model.validation_step(batch)
    assert all(torch.equal(a[key], b[key]) for key in a), (a, b)
    # z = mu: the recon term is the NLL of the posterior-mean decode, as in VAE.score
    vae = model if kind == "generative" else model.vae
    with torch.no_grad():
        mu, _ = vae.encode(batch["image"])
        expected = vae.reconstruction_nll(batch["image"], vae.decode(mu)).mean()
    assert torch.allclose(a["recon"], expected)


def test_kl_is_zero_at_the_prior_and_matches_torch_distributions():
    assert torch.equal(kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(kl_divergence(mu, logvar), expected, atol=1e-5)
    assert (kl_divergence(mu, logvar) > 0).all()


def test_vae_losses_fall_on_digits(digits):
    torch.manual_seed(0)
    model = VAE(SIZE, latent_dim=8, **SMALL)
    history = train(model, digits)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["mse"] < 0.7 * history[0]["mse"], history
    assert history[-1]["kl"] > 0  # the posterior did not collapse onto the prior
    model.eval()
    with torch.no_grad():
        elbo = model.elbo(digits[:8], generator=torch.Generator().manual_seed(0))
        bound = model.log_prob(digits[:8], n_samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(elbo).all() and torch.isfinite(bound).all()


@pytest.fixture(scope="module")
def small_vae(digits) -> VAE:
    torch.manual_seed(0)
    model = VAE(SIZE, latent_dim=8, **SMALL)
    train(model, digits, epochs=2)
    return model.eval()


def test_importance_weighted_bound_is_above_the_elbo(small_vae, digits):
    x = digits[:16]
    with torch.no_grad():
        elbo = small_vae.elbo(x, n_samples=32, generator=torch.Generator().manual_seed(0))
        iwae = small_vae.log_prob(x, n_samples=32, generator=torch.Generator().manual_seed(1))
        deterministic = -small_vae.score(x)
    assert float(iwae.mean()) > float(elbo.mean())  # Burda et al.: L_k >= L_1 = ELBO
    assert torch.isfinite(deterministic).all()


def test_interpolation_endpoints_are_the_reconstructions(small_vae, digits):
    x_a, x_b = digits[:3], digits[3:6]
    frames = small_vae.interpolate(x_a, x_b, steps=5)
    assert frames.shape == (3, 5, 3, SIZE, SIZE)
    with torch.no_grad():
        rec_a, rec_b = small_vae.reconstruct(x_a), small_vae.reconstruct(x_b)
    assert torch.allclose(frames[:, 0], rec_a, atol=1e-5)
    assert torch.allclose(frames[:, -1], rec_b, atol=1e-5)
    assert small_vae.interpolate(x_a[0], x_b[0], steps=4).shape == (4, 3, SIZE, SIZE)


def test_attribute_vector_arithmetic(small_vae, digits):
    x_with, x_without = digits[:10], digits[10:20]
    vector = small_vae.attribute_vector(x_with, x_without)
    assert vector.shape == (8,)
    with torch.no_grad():
        mu_with, mu_without = small_vae.encode(x_with)[0], small_vae.encode(x_without)[0]
        assert torch.allclose(vector, mu_with.mean(0) - mu_without.mean(0), atol=1e-6)
        assert torch.allclose(small_vae.attribute_vector(x_with, x_with), torch.zeros(8))
        # weight 0 is the plain reconstruction; the vector added to "without" codes moves
        # their mean exactly onto the "with" mean
        assert torch.allclose(small_vae.apply_attribute(x_without, vector, 0.0),
                              small_vae.reconstruct(x_without), atol=1e-6)
        shifted = mu_without + vector
        assert torch.allclose(shifted.mean(0), mu_with.mean(0), atol=1e-5)
    out = small_vae.apply_attribute(x_without, vector, 1.0)
    assert out.shape == x_without.shape and out.min() >= 0 and out.max() <= 1


def test_seeded_sampling_is_reproducible(small_vae):
    a = small_vae.sample(4, generator=torch.Generator().manual_seed(3))
    b = small_vae.sample(4, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, SIZE, SIZE) and torch.equal(a, b)
    cold = small_vae.sample(3, generator=torch.Generator().manual_seed(3), temperature=0.0)
    assert torch.allclose(cold, small_vae.decode(torch.zeros(1, 8)).expand(3, -1, -1, -1))

    torch.manual_seed(0)
    vq = VQVAE(SIZE, num_codes=8, code_dim=4, **SMALL).eval()
    for prior in ("uniform", "empirical"):
        a = vq.sample(2, generator=torch.Generator().manual_seed(1), prior=prior)
        b = vq.sample(2, generator=torch.Generator().manual_seed(1), prior=prior)
        assert a.shape == (2, 3, SIZE, SIZE) and torch.equal(a, b)


def test_bad_options_raise():
    with pytest.raises(ConfigError, match="likelihood"):
        VAE(SIZE, likelihood="poisson", **SMALL)
    with pytest.raises(ConfigError, match="multiple"):
        VAE(18, **SMALL)
    with pytest.raises(ConfigError, match="patch_size"):
        MaskedAutoEncoder(SIZE, patch_size=5, **SMALL)
    with pytest.raises(ConfigError, match="mask_ratio"):
        MaskedAutoEncoder(SIZE, mask_ratio=1.0, **SMALL)
    with pytest.raises(ConfigError, match="prior"):
        VQVAE(SIZE, **SMALL).sample(1, prior="pixelcnn")


# -- conditional VAE ---------------------------------------------------------------------------

DIGIT_LAYOUT = {"in_channels": 1, "widths": [16, 32], "strides": [2, 2]}


@pytest.fixture(scope="module")
def labelled_digits() -> dict[str, torch.Tensor]:
    """scikit-learn's 8x8 digits in [0, 1] with their classes, split 1500 train / 297 held out."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(raw.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held = order[:1500], order[1500:]
    return {"image": images[train], "label": labels[train],
            "held_image": images[held], "held_label": labels[held]}


def test_cvae_shapes_labels_and_the_vae_networks_it_shares():
    torch.manual_seed(0)
    model = CVAE(SIZE, 10, latent_dim=6, **SMALL).eval()
    x, y = torch.rand(4, 3, SIZE, SIZE), torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        mu, logvar = model.encode(x, y)
        assert mu.shape == logvar.shape == (4, 6)
        assert model.decode(mu, y).shape == model.reconstruct(x, y).shape == x.shape
        assert model.elbo(x, y).shape == model.log_prob(x, y, n_samples=2).shape == (4,)
        assert model.score(x, y).shape == (4,)
    # the VAE's encoder / decoder, widened by K label channels / inputs
    assert model.encoder.features[0].in_channels == 3 + 10
    assert model.decoder.from_latent[0].in_channels == 6 + 10
    g = torch.Generator().manual_seed(0)
    samples = model.sample(12, generator=g)  # default labels 0..9, 0, 1
    assert samples.shape == (12, 3, SIZE, SIZE) and samples.min() >= 0 and samples.max() <= 1
    again = model.sample(12, torch.arange(12) % 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)
    assert model.sample(2, 7, generator=torch.Generator().manual_seed(0)).shape == (2, 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match="num_classes=10 needs labels"):
        model.encode(x)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
        model.sample(2, torch.tensor([1, 10]))
    with pytest.raises(DataError, match=r"labels must have shape \(4,\)"):
        model.score(x, torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="num_classes must be >= 1"):
        CVAE(SIZE, 0, **SMALL)
    one = CVAE(SIZE, 1, latent_dim=6, **SMALL).eval()  # one class: labels may be left out
    with torch.no_grad():
        torch.testing.assert_close(one.reconstruct(x), one.reconstruct(x, torch.zeros(4, dtype=torch.long)))


def test_cvae_batches_take_label_or_class_keys():
    torch.manual_seed(0)
    model = CVAE(8, 10, latent_dim=4, **DIGIT_LAYOUT).eval()
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    a = model.validation_step({"image": x, "label": y})
    b = model.validation_step({"image": x, "class": y})
    c = model.validation_step({"image": x, "label": (y + 1) % 10})
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["loss"], c["loss"])
    with pytest.raises(ConfigError, match="needs labels"):
        model.training_step({"image": x})


@pytest.fixture(scope="module")
def digit_classifier(labelled_digits):
    """A logistic regression on the raw 8x8 training digits (about 0.96 held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression

    d = labelled_digits
    return LogisticRegression(max_iter=2000).fit(d["image"].flatten(1).numpy(), d["label"].numpy())


def test_cvae_learns_and_samples_the_asked_class(labelled_digits, digit_classifier):
    d = labelled_digits
    held = (d["held_image"], d["held_label"])
    torch.manual_seed(0)
    model = CVAE(8, 10, latent_dim=8, lr=2e-3, **DIGIT_LAYOUT)
    with torch.no_grad():
        before = float(model.eval().elbo(*held, generator=torch.Generator().manual_seed(0)).mean())
    history = model.fit({"image": d["image"], "label": d["label"]}, epochs=10, batch_size=32,
                        device="cpu", progress=False)["train_loss"]
    model.eval()
    with torch.no_grad():
        after = float(model.elbo(*held, generator=torch.Generator().manual_seed(0)).mean())
        z = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
        three, seven = model.decode(z, 3), model.decode(z, 7)
    labels = torch.arange(200) % 10
    samples = model.sample(200, labels, generator=torch.Generator().manual_seed(0))
    accuracy = float((digit_classifier.predict(samples.flatten(1).numpy()) == labels.numpy()).mean())
    print(f"cvae held-out ELBO {before:.1f} -> {after:.1f} nats; loss {history[0]['loss']:.1f} -> "
          f"{history[-1]['loss']:.1f}; samples classified as asked: {accuracy:.3f}")
    assert history[-1]["loss"] < history[0]["loss"] - 100.0
    assert after > before + 100.0
    assert float((three - seven).abs().mean()) > 0.05  # one z, two labels, two different images
    assert accuracy > 0.5  # chance is 0.1


# -- VQ-VAE ------------------------------------------------------------------------------------


def test_quantizer_outputs_nearest_codebook_rows_with_straight_through_gradient():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4)
    z_e = (0.05 * torch.randn(2, 4, 3, 3)).requires_grad_()
    out = quantizer(z_e)
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, quantizer.codebook.detach()).argmin(1)
    assert torch.equal(out.indices.flatten(), nearest)
    rows = out.quantized.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(rows, quantizer.codebook.detach()[nearest], atol=1e-6)
    out.quantized.sum().backward()
    assert torch.allclose(z_e.grad, torch.ones_like(z_e))  # straight-through: identity gradient
    assert 1.0 <= float(out.perplexity) <= 16.0
    # the codebook term trains the codebook, the commitment term the encoder side
    assert quantizer.embedding.grad is None
    quantizer(z_e.detach()).loss.backward()
    assert quantizer.embedding.grad.abs().sum() > 0


def test_gradient_reaches_the_encoder_through_the_quantizer():
    torch.manual_seed(0)
    model = VQVAE(SIZE, num_codes=8, code_dim=4, **SMALL)
    x = torch.rand(2, 3, SIZE, SIZE)
    q = model.quantizer(model.encoder(x))
    F.mse_loss(model.decoder(q.quantized), x).backward()  # reconstruction only, no VQ loss
    first = model.encoder[0][0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_perplexity_bounds():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 2, data_init=False)
    same = quantizer(torch.zeros(1, 2, 4, 4))
    assert float(same.perplexity) == pytest.approx(1.0, abs=1e-4)  # one code used
    # every code once: the inputs are the codebook rows themselves
    grid = quantizer.codebook.detach().t().reshape(1, 2, 2, 4)
    assert float(quantizer(grid).perplexity) == pytest.approx(8.0, rel=1e-4)


def test_ema_updates_move_used_codes_to_their_cluster_means():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 2, ema=True, decay=0.5, data_init=False)
    assert not any(p.requires_grad for p in quantizer.parameters())
    z_e = torch.randn(2, 2, 4, 4)
    before = quantizer.codebook.clone()
    quantizer.eval()
    quantizer(z_e)
    assert torch.equal(quantizer.codebook, before)  # no update outside training
    quantizer.train()
    out = quantizer(z_e)
    used = out.indices.unique()
    assert not torch.allclose(quantizer.codebook[used], before[used])
    unused = torch.tensor([k for k in range(8) if k not in used.tolist()])
    if len(unused):
        assert torch.allclose(quantizer.codebook[unused], before[unused], rtol=1e-3)
    # decay 0: a used code becomes the mean of its assigned vectors (up to Laplace smoothing)
    exact = VectorQuantizer(8, 2, ema=True, decay=0.0, eps=1e-9, data_init=False)
    out = exact(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in out.indices.unique():
        mean = flat[out.indices.flatten() == k].mean(0)
        assert torch.allclose(exact.codebook[k], mean, atol=1e-4)


def test_data_init_seeds_the_codebook_with_encoder_outputs_once():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 2)
    z_e = torch.randn(1, 2, 4, 4)
    quantizer.eval()
    quantizer(z_e)
    assert not quantizer.initialized_  # only a training batch initialises
    quantizer.train()
    quantizer(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    assert quantizer.initialized_
    assert torch.cdist(quantizer.codebook.detach(), flat).min(1).values.max() < 1e-6
    seeded = quantizer.codebook.detach().clone()
    quantizer(torch.randn(1, 2, 4, 4))
    assert torch.equal(quantizer.codebook.detach(), seeded)  # gradients move it, not re-seeding


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_on_encoder_outputs(ema):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 2, ema=ema, decay=0.5, data_init=False, dead_code_threshold=0.3)
    z_e = torch.randn(1, 2, 4, 4) + 10.0  # far from every initial code: one code takes all
    first = quantizer(z_e)
    assert len(first.indices.unique()) == 1
    for _ in range(3):  # unused codes' usage decays 1 -> 0.5 -> 0.25 < 0.3, then they restart
        out = quantizer(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    distance = torch.cdist(quantizer.codebook.detach(), flat).min(1).values
    restarted = torch.ones(8, dtype=torch.bool)
    restarted[first.indices.unique()] = False
    assert (distance[restarted] < 1.0).all()  # restarted codes sit on (EMA: near) the data
    assert float(out.perplexity) > 1.5
    without = VectorQuantizer(8, 2, ema=ema, decay=0.5, data_init=False)
    for _ in range(4):
        without(z_e)
    # without restarts the codes the first batch did not pick stay far from the data
    assert (torch.cdist(without.codebook.detach(), flat).min(1).values > 5.0).sum() >= 5


@pytest.mark.parametrize("ema", [False, True])
def test_vqvae_losses_fall_on_digits(digits, ema):
    torch.manual_seed(0)
    model = VQVAE(SIZE, num_codes=32, code_dim=8, ema=ema, **SMALL)
    history = train(model, digits, epochs=10)
    assert history[-1]["recon"] < 0.7 * history[0]["recon"], history
    assert all(1.0 <= h["perplexity"] <= 32.0 + 1e-4 for h in history)
    assert 1.0 <= model.code_perplexity() < 31.0  # fit() counted the code histogram
    model.eval()
    with torch.no_grad():
        assert model.encode(digits[:2]).shape == (2, SIZE // 4, SIZE // 4)


def test_the_loop_ends_by_fitting_the_priors_on_the_training_data(digits):
    from anomalykit.generative.ae import AutoEncoder
    from anomalykit.training import fit

    data = digits[:40]
    torch.manual_seed(0)
    ae = AutoEncoder(SIZE, latent_dim=8, **SMALL)
    vq = VQVAE(SIZE, num_codes=8, code_dim=4, **SMALL)
    for model in (ae, vq):
        fit(model, data, epochs=1, batch_size=16, device="cpu", progress=False)
        assert model.training  # the prior pass ran in eval mode and gave the mode back
    with torch.no_grad():
        codes = ae.eval().encode(data)
    torch.testing.assert_close(ae.latent_mean_, codes.mean(0))
    torch.testing.assert_close(ae.latent_std_, codes.std(0, unbiased=False).clamp_min(1e-6))
    # one Laplace count per code plus one per position of every training image
    assert float(vq.code_counts_.sum()) == 8 + len(data) * (SIZE // 4) ** 2


# -- denoising and masked autoencoders ---------------------------------------------------------


def test_denoising_ae_loss_falls_and_corrupts_only_in_training(digits):
    torch.manual_seed(0)
    model = DenoisingAutoEncoder(SIZE, latent_dim=16, noise_std=0.2, salt_pepper=0.05,
                                 lr=2e-3, **SMALL)
    x = digits[:4]
    noisy = model.corrupt(x, generator=torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, x)
    history = train(model, digits, epochs=10)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
    with torch.no_grad():
        assert torch.equal(model.reconstruct(x), model.decode(model.encode(x)))


def test_masked_ae_loss_falls_and_ignores_unmasked_patches(digits):
    torch.manual_seed(0)
    model = MaskedAutoEncoder(SIZE, latent_dim=16, mask_ratio=0.5, patch_size=4, lr=2e-3,
                              **SMALL)
    mask = model.random_mask(3, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 1, SIZE, SIZE)
    assert torch.equal(mask.flatten(1).mean(1), torch.full((3,), 0.5))
    x = digits[:3]
    assert torch.equal(model.mask_input(x, mask) * mask, torch.zeros_like(x))
    wrong_outside = x + (1 - mask) * torch.rand_like(x)
    assert float(model.masked_loss(x, wrong_outside, mask)) == 0.0
    wrong_inside = x + mask * 0.5
    assert float(model.masked_loss(x, wrong_inside, mask)) == pytest.approx(0.25)

    history = train(model, digits, epochs=10)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
    model.test_draws = 3
    with torch.no_grad():
        a, b = model.reconstruct(x), model.reconstruct(x)
    assert a.shape == x.shape and torch.equal(a, b)  # seeded draws: deterministic


def test_generative_round_trip_keeps_learned_state(tmp_path):
    from anomalykit.base import Estimator

    torch.manual_seed(0)
    for model in (MaskedAutoEncoder(SIZE, patch_size=4, learned_fill=True, **SMALL),
                  VQVAE(SIZE, num_codes=8, code_dim=4, ema=True, **SMALL)):
        model.train()
        model.training_step({"image": torch.rand(2, 3, SIZE, SIZE)})
        model.save(tmp_path / "m.ckpt")
        loaded = Estimator.load(tmp_path / "m.ckpt")
        assert type(loaded) is type(model) and loaded.config == model.config
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert isinstance(create(model.registry_name, kind="generative", **model.config), type(model))


# -- the detector ------------------------------------------------------------------------------
