"""Contracts every registered generative model keeps, driven by the registry.

Each model builds with tiny settings (32x32 RGB images, or vectors for the models of
vectors), takes one training step through the toolkit's loop (closed-form models solve in
that same call), samples the right shape without NaN, scores where its family allows, and
survives a save/load round trip with identical outputs and identical seeded samples.

A model registered later is picked up automatically and fails here until it has an entry
in ``TINY`` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from anomalykit.base import Estimator, GenerativeModel
from anomalykit.registry import create, list_generative
from anomalykit.training import fit

SIZE = 32
DIM = 6  # width of the vectors the models of vectors see
N_TRAIN = 8
MODELS = [name for name in list_generative() if not name.startswith("_")]

SMALL_CONV = {"widths": [8, 16], "strides": [2, 2]}


@dataclass(frozen=True)
class Tiny:
    """How a model is built small, what data it takes, and (closed form) what its fit sets."""

    kwargs: dict[str, Any]
    data: str = "image"  # "image": (N, 3, size, size) in [0, 1]; "vector": (N, DIM)
    size: int = SIZE  # image side; the autoregressive models sample one pass per sub-pixel
    fitted_buffers: list[str] = field(default_factory=list)  # closed-form models only
    # Further batch entries for the models that train on more than images (paired or labelled
    # data): key -> "image" (like the images), "mask" ((N, 1, S, S) in {0, 1}) or "label:K"
    # ((N,) int64 in [0, K)). Scores and samples still take / give plain images.
    extra: dict[str, str] = field(default_factory=dict)


TINY: dict[str, Tiny] = {
    "ae": Tiny({"image_size": SIZE, "latent_dim": 8, **SMALL_CONV}),
    "denoising_ae": Tiny({"image_size": SIZE, "latent_dim": 8, **SMALL_CONV}),
    "masked_ae": Tiny({"image_size": SIZE, "latent_dim": 8, "patch_size": 8, **SMALL_CONV}),
    "vae": Tiny({"image_size": SIZE, "latent_dim": 4, **SMALL_CONV}),
    "vqvae": Tiny({"image_size": SIZE, "num_codes": 16, "code_dim": 8, **SMALL_CONV}),
    "glow": Tiny({"image_size": SIZE, "in_channels": 3, "levels": 2, "steps": 1,
                  "hidden_channels": 8}),
    "realnvp": Tiny({"dim": DIM, "num_layers": 2, "hidden": 8}, data="vector"),
    "nice": Tiny({"dim": DIM, "num_layers": 2, "hidden": 8, "num_hidden_layers": 1,
                  "dequantize": False}, data="vector"),
    "cvae": Tiny({"image_size": SIZE, "num_classes": 1, "latent_dim": 4, **SMALL_CONV}),
    "pca": Tiny({"n_components": 2}, data="vector",
                fitted_buffers=["mean_", "components_", "explained_variance_", "n_samples_seen_"]),
    "gmm": Tiny({"n_components": 2, "covariance_type": "full"}, data="vector",
                fitted_buffers=["means_", "precisions_cholesky_", "n_samples_seen_"]),
    "gan": Tiny({"dim": DIM, "latent_dim": 2, "hidden": 8, "layers": 2}, data="vector"),
    "dcgan": Tiny({"image_size": SIZE, "latent_dim": 8, "width": 4}),
    "lsgan": Tiny({"image_size": SIZE, "latent_dim": 8, "width": 4}),
    "wgan": Tiny({"image_size": SIZE, "latent_dim": 8, "width": 4}),
    "wgan_gp": Tiny({"image_size": SIZE, "latent_dim": 8, "width": 4}),
    "cgan": Tiny({"image_size": SIZE, "num_classes": 1, "latent_dim": 8, "embed_dim": 4,
                  "width": 4}),
    "infogan": Tiny({"image_size": SIZE, "noise_dim": 4, "num_categories": 3,
                     "continuous_dim": 1, "q_hidden": 8, "width": 4}),
    "bigan": Tiny({"image_size": SIZE, "latent_dim": 8, "width": 4, "joint_hidden": 8}),
    "biggan": Tiny({"image_size": SIZE, "num_classes": 3, "latent_dim": 8, "embed_dim": 4,
                    "width": 4, "ema_decay": 0.9}, extra={"class": "label:3"}),
    "vqgan": Tiny({"image_size": SIZE, "num_codes": 16, "code_dim": 8, **SMALL_CONV, "disc_width": 4,
                   "disc_start": 0, "perceptual_weight": 0.0, "prior_hidden": 4, "prior_layers": 1,
                   "prior_epochs": 1}),
    "stylegan": Tiny({"image_size": SIZE, "latent_dim": 8, "w_dim": 8, "mapping_layers": 2, "width": 4,
                      "max_width": 8, "fade_steps": 2, "stable_steps": 1}),
    "cyclegan": Tiny({"image_size": SIZE, "width": 4, "blocks": 1, "d_width": 4, "num_examples": 4},
                     extra={"image_b": "image"}),
    "stargan": Tiny({"image_size": SIZE, "num_domains": 3, "width": 4, "blocks": 1, "d_width": 4,
                     "num_examples": 4}, extra={"domain": "label:3"}),
    "pix2pix": Tiny({"width": 4, "depth": 5, "d_width": 4, "d_layers": 2},
                    extra={"good": "image", "mask": "mask"}),
    "singan": Tiny({"image_size": SIZE, "min_size": 18, "width": 4, "steps_per_scale": 2,
                    "d_steps": 1, "g_steps": 1}),
    # Autoregressive: sampling is one pass per sub-pixel, so 8x8 images (192 passes, not 3072).
    "pixelcnn": Tiny({"image_size": 8, "num_levels": 8, "hidden": 3, "layers": 1,
                      "first_kernel": 3, "head_hidden": 4}, size=8),
    "gated_pixelcnn": Tiny({"image_size": 8, "num_levels": 8, "hidden": 3, "layers": 1,
                            "first_kernel": 3, "head_hidden": 4}, size=8),
    "pixelrnn": Tiny({"image_size": 8, "num_levels": 8, "hidden": 3, "layers": 1,
                      "first_kernel": 3, "head_hidden": 4}, size=8),
    "ddpm": Tiny({"image_size": SIZE, "widths": [8, 16], "blocks_per_level": 1,
                  "attention_levels": [1], "groups": 4, "timesteps": 20}),
    "latent_diffusion": Tiny({"autoencoder": "vae",
                              "autoencoder_kwargs": {"image_size": SIZE, "latent_dim": 4, **SMALL_CONV},
                              "diffusion_kwargs": {"widths": [8], "groups": 4, "timesteps": 20}}),
}


def tiny(name: str) -> Tiny:
    if name not in TINY:
        pytest.fail(f"generative model {name!r} is registered but has no entry in TINY in "
                    f"tests/test_generative_contracts.py: add one (tiny constructor kwargs, "
                    f"'image' or 'vector' data, and for a closed-form model its fitted buffers)")
    return TINY[name]


def data(name: str, n: int = N_TRAIN, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if tiny(name).data == "vector":
        return torch.randn(n, DIM, generator=generator)
    size = tiny(name).size
    return torch.rand(n, 3, size, size, generator=generator)


def training_data(name: str, n: int = N_TRAIN, seed: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
    """What ``fit`` gets: the images, or a dict of them and :attr:`Tiny.extra`'s entries."""
    images = data(name, n, seed)
    if not tiny(name).extra:
        return images
    generator = torch.Generator().manual_seed(seed + 1000)
    batch = {"image": images}
    for key, kind in tiny(name).extra.items():
        if kind == "image":
            batch[key] = torch.rand(images.shape, generator=generator)
        elif kind == "mask":
            batch[key] = (torch.rand(n, 1, *images.shape[2:], generator=generator) > 0.7).float()
        elif kind.startswith("label:"):
            batch[key] = torch.randint(int(kind.split(":")[1]), (n,), generator=generator)
        else:
            raise ValueError(f"unknown extra kind {kind!r} for {name}")
    return batch


def build(name: str) -> GenerativeModel:
    torch.manual_seed(0)
    return create(name, "generative", **tiny(name).kwargs)


def trained(name: str) -> tuple[GenerativeModel, dict[str, Any]]:
    model = build(name)
    history = fit(model, training_data(name), epochs=1, max_steps=1, batch_size=N_TRAIN, device="cpu",
                  progress=False)
    return model.eval(), history


def overrides(model: GenerativeModel, method: str) -> bool:
    """Whether the family implements ``method`` (GenerativeModel's raises NotImplementedError)."""
    return getattr(type(model), method) is not getattr(GenerativeModel, method)


def outputs(model: GenerativeModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every scoring output the family has, each from the same global seed (VAE's log_prob
    draws z), plus seeded samples."""
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for method in ("log_prob", "reconstruct"):
            if overrides(model, method):
                torch.manual_seed(0)
                got[method] = getattr(model, method)(x)
        if hasattr(model, "score"):
            torch.manual_seed(0)
            got["score"] = model.score(x)
        got["sample"] = model.sample(3, generator=torch.Generator().manual_seed(0))
    return got


def test_every_registered_model_has_a_tiny_entry():
    missing = sorted(set(MODELS) - set(TINY))
    assert not missing, (f"add entries to TINY in tests/test_generative_contracts.py for {missing}")
    stale = sorted(set(TINY) - set(MODELS))
    assert not stale, f"TINY names models that are not registered: {stale}"


@pytest.mark.parametrize("name", MODELS)
def test_builds_from_the_registry(name):
    model = build(name)
    assert isinstance(model, GenerativeModel)
    assert model.registry_name == name and model.registry_kind == "generative"
    assert model.config == {**model.config, **tiny(name).kwargs}  # recorded for checkpoints
    if model.closed_form:
        assert tiny(name).fitted_buffers, (
            f"closed-form {name!r}: list the buffers its fit sets in TINY's fitted_buffers")


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_changes_the_model(name):
    model = build(name)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = [k for k, v in model.named_parameters() if v.requires_grad]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    history = fit(model, training_data(name), epochs=1, max_steps=1, batch_size=N_TRAIN, device="cpu",
                  progress=False)
    assert math.isfinite(history["train_loss"][0]["loss"]), history
    if model.closed_form:
        assert not trainable, f"closed-form {name} has trainable parameters {trainable[:5]}"
        after = dict(model.named_buffers())
        unchanged = [k for k in tiny(name).fitted_buffers
                     if after[k].shape == buffers[k].shape and torch.equal(after[k], buffers[k])]
        assert not unchanged, f"fitting {name} left its fitted buffers {unchanged} unchanged"
    else:
        # Trainable parameters, not the state dict: a running statistic or a buffer set after
        # fitting (a latent prior) would change even if the optimiser never stepped.
        assert trainable, f"{name} has no trainable parameters"
        after = dict(model.named_parameters())
        changed = [k for k in trainable if not torch.equal(after[k], params[k])]
        assert changed, f"one training step left all {len(trainable)} parameters of {name} unchanged"


@pytest.mark.parametrize("name", MODELS)
def test_sample_shape_and_finite(name):
    model, _ = trained(name)
    samples = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, *data(name).shape[1:])
    assert torch.isfinite(samples).all(), f"{name} sampled NaN/inf"
    again = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again), "the same generator seed must give the same samples"


@pytest.mark.parametrize("name", MODELS)
def test_scores_where_the_family_allows(name):
    model, _ = trained(name)
    x = data(name, n=3, seed=1)
    got = outputs(model, x)
    assert {"log_prob", "reconstruct", "score"} & set(got), (
        f"{name} neither scores (score / log_prob) nor reconstructs")
    if "log_prob" in got:
        assert got["log_prob"].shape == (3,)
    if "reconstruct" in got:
        assert got["reconstruct"].shape == x.shape
    if "score" in got:
        assert got["score"].shape == (3,)
    for key, value in got.items():
        assert torch.isfinite(value).all(), f"{name}.{key} is not finite"
    for method in ("log_prob", "reconstruct"):
        if not overrides(model, method):  # what the family lacks says so, clearly
            with pytest.raises(NotImplementedError):
                getattr(model, method)(x)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(name, tmp_path):
    model, _ = trained(name)
    x = data(name, n=3, seed=2)
    expected = outputs(model, x)
    path = tmp_path / f"{name}.ckpt"
    model.save(path)
    loaded = Estimator.load(path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    state = model.state_dict()
    assert set(loaded.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    got = outputs(loaded, x)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{name}.{key} differs after save/load"
