"""f-AnoGAN: learns a bright-square defect, phase 2 trains only the encoder, per-image scores,
exact resume across the phase boundary, config errors."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomalykit.errors import ConfigError
from anomalykit.registry import create
from anomalykit.training import fit

SIZE = 32
TINY = dict(image_size=SIZE, latent_dim=16, width=8, max_width=32)


def tiny(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create("fanogan", **{**TINY, **kwargs})


def flat_textures(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 32, 32) in [0, 1]: one flat colour per image (0.3-0.7 per channel) + mild noise."""
    g = torch.Generator().manual_seed(seed)
    colour = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    return (colour + 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def bright_square(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A white 8x8 square pasted at a random place in each image."""
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    for img in out:
        y, x = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
        img[:, y:y + 8, x:x + 8] = 1.0
    return out


def auroc(model, good: torch.Tensor, bad: torch.Tensor) -> float:
    with torch.no_grad():
        scores = torch.cat([model.eval()(good).score, model(bad).score])
    labels = [0] * len(good) + [1] * len(bad)
    return float(roc_auc_score(labels, scores.numpy()))


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_learns_a_bright_square():
    train = flat_textures(48, seed=0)
    good, bad = flat_textures(16, seed=1), bright_square(flat_textures(16, seed=2), seed=3)
    untrained = auroc(tiny(), good, bad)
    model = tiny(gan_epochs=6, encoder_epochs=6, lr=1e-3, encoder_lr=2e-3)
    history = fit(model, train, epochs=12, batch_size=8, seed=0, device="cpu", progress=False)
    trained = auroc(model, good, bad)
    # measured: untrained 0.78, trained 0.94 (seed 0)
    assert trained >= 0.9, (untrained, trained)
    assert trained > untrained + 0.1, (untrained, trained)
    assert history["train_loss"][-1]["izi_f"] < history["train_loss"][6]["izi_f"]


def test_phase_two_trains_only_the_encoder():
    model = tiny(gan_epochs=2, encoder_epochs=2)
    snapshots = {}
    start_epoch = model.on_train_epoch_start

    def record(epoch, epochs, optimizers):  # the state each epoch starts from
        snapshots[epoch] = {part: snapshot(getattr(model, part))
                            for part in ("generator", "critic", "encoder")}
        start_epoch(epoch, epochs, optimizers)

    model.on_train_epoch_start = record
    history = fit(model, flat_textures(8, seed=0), epochs=4, batch_size=4, seed=0, device="cpu",
                  progress=False)
    end = {part: snapshot(getattr(model, part)) for part in ("generator", "critic", "encoder")}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # phase 1 (epochs 0-1): G and D learn, E untouched
    assert not same(snapshots[0]["generator"], snapshots[2]["generator"])
    assert not same(snapshots[0]["critic"], snapshots[2]["critic"])
    assert same(snapshots[0]["encoder"], snapshots[2]["encoder"])
    # phase 2 (epochs 2-3): exactly the same G (BatchNorm statistics included) and D; E learns
    assert same(snapshots[2]["generator"], end["generator"])
    assert same(snapshots[2]["critic"], end["critic"])
    assert not same(snapshots[2]["encoder"], end["encoder"])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again after phase 2
    logs = [set(epoch) for epoch in history["train_loss"]]
    assert logs[0] >= {"d_loss", "g_loss", "gp"} and logs[1] == logs[0]
    assert logs[2] >= {"izi", "izi_f"} and not logs[2] & {"d_loss", "g_loss", "gp"}


def test_phase_split_of_the_loop_epochs():
    model = tiny(gan_epochs=30, encoder_epochs=10)
    assert model.gan_epochs_of(40) == 30  # the profile's train.epochs = the sum: exact
    assert model.gan_epochs_of(8) == 6  # another count: the same proportion
    assert model.gan_epochs_of(2) == 1  # both phases get an epoch
    assert model.gan_epochs_of(1) == 1  # one epoch (contract tests): the GAN only


def test_score_of_a_batch_is_the_score_of_each_image():
    model = tiny(gan_epochs=1, encoder_epochs=1, map_sigma=1.0)  # BatchNorm in G: trained stats
    fit(model, flat_textures(8, seed=0), epochs=2, batch_size=4, seed=0, device="cpu",
        progress=False)
    x = torch.cat([flat_textures(3, seed=1), bright_square(flat_textures(2, seed=2), seed=3)])
    with torch.no_grad():
        batch = model.eval()(x)
        single = [model(img[None]) for img in x]
    torch.testing.assert_close(batch.score, torch.cat([s.score for s in single]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(batch.anomaly_map, torch.cat([s.anomaly_map for s in single]),
                               rtol=1e-5, atol=1e-7)
    # izi_f = pixel MSE + kappa x critic-feature MSE, in the [-1, 1] range
    with torch.no_grad():
        xt = x * 2 - 1
        recon = model.generator(model.encoder(xt))
        f = model.critic.features
        expected = ((xt - recon) ** 2).mean((1, 2, 3)) + ((f(xt) - f(recon)) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(batch.score, expected, rtol=1e-5, atol=1e-7)
    assert batch.anomaly_map.shape == (5, 1, SIZE, SIZE)


def test_resume_across_the_phase_boundary_is_exact(tmp_path):
    data = flat_textures(8, seed=0)  # 2 steps of 4 per epoch
    options = dict(epochs=4, batch_size=4, seed=1, device="cpu", progress=False)
    straight = tiny(gan_epochs=2, encoder_epochs=2)
    fit(straight, data, **options)

    first = tiny(gan_epochs=2, encoder_epochs=2)
    fit(first, data, out_dir=tmp_path, max_steps=4, **options)  # stops after phase 1
    resumed = tiny(seed=5, gan_epochs=2, encoder_epochs=2)  # a fresh process: other weights
    history = fit(resumed, data, out_dir=tmp_path, resume=True, **options)
    assert history["epochs_run"] == 4 and "izi_f" in history["train_loss"][-1]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("kwargs, word", [
    (dict(critic_norm="batch"), "critic_norm"),
    (dict(latent_activation="relu"), "latent_activation"),
    (dict(gan_epochs=0), "gan_epochs"),
    (dict(encoder_epochs=2.5), "encoder_epochs"),
    (dict(n_critic=0), "n_critic"),
    (dict(kappa=-1.0), "kappa"),
    (dict(gp_weight=-1.0), "gp_weight"),
    (dict(betas=[0.0]), "betas"),
    (dict(encoder_lr=0.0), "encoder_lr"),
    (dict(image_size=48), "48"),
    (dict(score="max"), "score"),
])
def test_config_errors_name_the_value(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        create("fanogan", **{**TINY, **kwargs})


def test_residual_score_is_the_max_of_the_map_and_the_default_is_izi_f():
    x = flat_textures(3, seed=5)
    paper, residual = tiny().eval(), tiny(score="residual").eval()
    assert paper.score == "izi_f"
    with torch.no_grad():
        out = residual(x)
        recon, pixel, feature = paper.izi_f(x * 2 - 1)
        torch.testing.assert_close(paper(x).score, pixel + paper.kappa * feature)
    torch.testing.assert_close(out.score, out.anomaly_map.flatten(1).amax(1))
