"""GANomaly: it learns good images, scores per image, checks its weights, re-inits D."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomalykit.detectors.ganomaly import GANomalyDetector
from anomalykit.errors import ConfigError
from anomalykit.training import fit

SIZE = 32


GOOD_COLOUR = (0.7, 0.5, 0.3)
# As far from mid-grey as the good colour: an untrained generator (output ~ grey) has the
# same residual on both, so only a model that learned the good colour tells them apart.
SQUARE_COLOUR = (0.3, 0.5, 0.7)


def flat_textures(n: int, seed: int) -> torch.Tensor:
    """(n, 3, S, S) good images: one flat colour (jittered per image) plus faint noise."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.tensor(GOOD_COLOUR).view(1, 3, 1, 1)
    colour = colour + 0.05 * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    return (colour + 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def with_square(images: torch.Tensor, seed: int) -> torch.Tensor:
    """The same images with an 8x8 square of another colour pasted at a random place."""
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    for img in out:
        y, x = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
        img[:, y:y + 8, x:x + 8] = torch.tensor(SQUARE_COLOUR).view(3, 1, 1)
    return out


def small(**kwargs) -> GANomalyDetector:
    return GANomalyDetector(SIZE, latent_dim=32, width=16, **kwargs)


def image_auroc(detector: GANomalyDetector, good: torch.Tensor, bad: torch.Tensor) -> float:
    with torch.no_grad():
        scores = torch.cat([detector.eval()(good).score, detector(bad).score])
    labels = [0] * len(good) + [1] * len(bad)
    return roc_auc_score(labels, scores.numpy())


@pytest.mark.parametrize("seed", [0, 1])
def test_learns_to_score_pasted_squares_above_good_images(seed):
    """The residual score (the quick profile's). Untrained it scored 0.57 / 0.59 AUROC on
    these sets, trained 1.0 (seeds 0, 1; seed 2: 0.53 -> 1.0). The paper's latent score does
    not learn this in a few seconds (0.45, 0.33, 0.29 after the same fit): not asserted."""
    train = flat_textures(32, seed=100 + seed)
    good, bad = flat_textures(20, seed=200 + seed), with_square(flat_textures(20, 300 + seed), seed)
    torch.manual_seed(seed)
    detector = small(score="residual", map_sigma=1.0, lr=1e-3)
    untrained = image_auroc(detector, good, bad)
    history = fit(detector, train, epochs=15, batch_size=8, device="cpu", seed=seed,
                  progress=False)
    trained = image_auroc(detector, good, bad)
    assert trained >= 0.9, (untrained, trained)
    assert trained > untrained + 0.2, (untrained, trained)
    assert set(history["train_loss"][-1]) >= {"loss", "d_loss", "g_loss", "adv", "con", "enc"}
    # the reconstruction term fell: the generator learned the good images
    assert history["train_loss"][-1]["con"] < 0.5 * history["train_loss"][0]["con"]


@pytest.mark.parametrize("score", ["latent", "residual"])
def test_batch_scores_equal_one_image_at_a_time(score):
    torch.manual_seed(0)
    detector = small(score=score, map_sigma=1.0)
    fit(detector, flat_textures(16, seed=0), epochs=1, batch_size=8, device="cpu",
        progress=False)
    x = torch.cat([flat_textures(3, seed=1), with_square(flat_textures(2, seed=2), 0)])
    with torch.no_grad():
        batch = detector.eval()(x)
        single = [detector(x[i:i + 1]) for i in range(len(x))]
    torch.testing.assert_close(batch.score, torch.cat([s.score for s in single]))
    torch.testing.assert_close(batch.anomaly_map, torch.cat([s.anomaly_map for s in single]))
    assert batch.anomaly_map.shape == (5, 1, SIZE, SIZE)


@pytest.mark.parametrize("option", ["w_adv", "w_con", "w_enc", "map_sigma", "d_reinit_loss"])
def test_negative_weights_are_config_errors(option):
    with pytest.raises(ConfigError, match=option):
        small(**{option: -1.0})


def test_unknown_score_is_a_config_error():
    with pytest.raises(ConfigError, match="latent"):
        small(score="median")


def test_paper_loss_weights_by_default():
    detector = GANomalyDetector(SIZE)
    assert (detector.w_adv, detector.w_con, detector.w_enc) == (1.0, 50.0, 1.0)
    assert detector.score == "latent"


def test_discriminator_reinitialised_when_its_loss_collapses():
    """A threshold above any loss makes every step count as a collapse; 0 disables it."""
    torch.manual_seed(0)
    detector = small(d_reinit_loss=1e9)
    optimizers = detector.configure_optimizers()
    batch = {"image": flat_textures(4, seed=0)}
    detector.train()
    logs = detector.training_step(batch, optimizers)
    assert int(detector.d_reinits_) == 1
    assert not optimizers[1].state  # the collapsed network's Adam moments are dropped
    assert optimizers[0].state  # the generator's are kept
    bn = [m for m in detector.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 0 for m in bn)
    assert {"d_loss", "g_loss", "adv", "con", "enc"} <= set(logs)

    torch.manual_seed(0)
    never = small(d_reinit_loss=0.0)
    fit(never, flat_textures(8, seed=0), epochs=2, batch_size=4, device="cpu", progress=False)
    assert int(never.d_reinits_) == 0


def test_monitor_warns_when_reconstructions_collapse(monkeypatch):
    """The AdversarialMonitor sees every step: a generator whose output ignores the input
    (a constant image) is reported as collapsed."""
    torch.manual_seed(0)
    detector = small(monitor_patience=2, d_reinit_loss=0.0)
    optimizers = detector.configure_optimizers()
    constant = torch.zeros(1, 3, SIZE, SIZE, requires_grad=True)
    monkeypatch.setattr(detector.decoder, "forward", lambda z: constant.expand(len(z), -1, -1, -1))
    batch = {"image": flat_textures(8, seed=0)}
    detector.train()
    with pytest.warns(RuntimeWarning, match="collapsed"):
        for _ in range(2):
            detector.training_step(batch, optimizers)
    assert any("collapsed" in w for w in detector.monitor.warnings)


def test_validation_step_changes_nothing():
    torch.manual_seed(0)
    detector = small()
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    detector.eval()
    logs = detector.validation_step({"image": flat_textures(4, seed=0)})
    assert set(logs) == {"loss", "g_loss", "adv", "con", "enc"}
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())
    expected = logs["adv"] + 50.0 * logs["con"] + logs["enc"]
    torch.testing.assert_close(logs["loss"], expected)
