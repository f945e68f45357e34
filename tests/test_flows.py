"""Normalizing flows: exact inverses, log-dets against autograd Jacobians, likelihood training.

Layer checks run in float64 on small random inputs with every parameter perturbed away
from its (identity) initialisation, so a wrong scale, sign or transpose cannot hide.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from anomalykit.errors import ConfigError, DataError
from anomalykit.generative.flows import NICE, Glow, RealNVP
from anomalykit.nn.coupling import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    DiagonalScaling,
    FlowSequential,
    InvertibleConv1x1,
    Permutation,
    Squeeze,
    subnet_conv,
    subnet_fc,
)
from anomalykit.registry import create, list_generative
from anomalykit.training import fit, load_model, save_checkpoint

torch.set_num_threads(1)


def perturbed(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """float64 copy-in-place with every parameter moved by Gaussian noise (zero-inits included)."""
    module.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def initialised_actnorm(channels: int, shape: tuple[int, ...]) -> ActNorm:
    layer = ActNorm(channels).double()
    layer.train()(torch.randn(16, *shape, dtype=torch.float64) * 3 + 1)
    return perturbed(layer, 0.1).eval()


VEC, MAP = (5,), (4, 2, 2)  # odd D checks the uneven coupling split; maps flatten to 16
LAYERS = {
    "coupling-vec": (lambda: perturbed(AffineCoupling(5, subnet_fc(8, 2))), VEC),
    "coupling-map-3x3": (lambda: perturbed(AffineCoupling(4, subnet_conv(3, 2.0))), MAP),
    "coupling-map-1x1": (lambda: perturbed(AffineCoupling(4, subnet_conv(1, hidden_channels=6))), MAP),
    "actnorm-vec": (lambda: initialised_actnorm(5, VEC), VEC),
    "actnorm-map": (lambda: initialised_actnorm(4, MAP), MAP),
    "invconv-vec": (lambda: perturbed(InvertibleConv1x1(5)), VEC),
    "invconv-map": (lambda: perturbed(InvertibleConv1x1(4)), MAP),
    "invconv-lu-vec": (lambda: perturbed(InvertibleConv1x1(5, lu=True)), VEC),
    "invconv-lu-map": (lambda: perturbed(InvertibleConv1x1(4, lu=True)), MAP),
    "additive-coupling-vec": (lambda: perturbed(AdditiveCoupling(5, subnet_fc(8, 2))), VEC),
    "additive-coupling-map": (lambda: perturbed(AdditiveCoupling(4, subnet_conv(3, hidden_channels=6))),
                              MAP),
    "scaling-vec": (lambda: perturbed(DiagonalScaling(5)), VEC),
    "scaling-map": (lambda: perturbed(DiagonalScaling(4)), MAP),
    "permutation-vec": (lambda: Permutation(5, seed=3).double(), VEC),
    "permutation-vec-odd-even": (lambda: Permutation(5, kind="odd_even").double(), VEC),
    "permutation-map-reverse": (lambda: Permutation(4, kind="reverse").double(), MAP),
    "squeeze": (lambda: Squeeze().double(), (1, 4, 4)),
    "sequential-map": (lambda: perturbed(FlowSequential(
        Squeeze(), InvertibleConv1x1(8, lu=True), AffineCoupling(8, subnet_conv(3, 1.0)),
        Permutation(8, seed=1), AffineCoupling(8, subnet_conv(1, 1.0)))), (2, 2, 2)),
}


def jacobian_log_det(fn, x: torch.Tensor) -> float:
    """log|det| of the Jacobian of fn at x (one sample), computed by autograd on flattened tensors."""
    flat = x.flatten()
    jac = jacobian(lambda v: fn(v.view(x.shape)).flatten(), flat)
    return float(torch.linalg.slogdet(jac)[1])


@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverse_undoes_forward(name):
    build, shape = LAYERS[name]
    layer = build().eval()
    x = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, log_det = layer(x)
        assert log_det.shape == (3,)
        assert not torch.allclose(z.flatten(1), x.flatten(1)) or name.startswith("permutation")
        torch.testing.assert_close(layer.inverse(z), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_log_det_matches_autograd_jacobian(name):
    build, shape = LAYERS[name]
    layer = build().eval()
    x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = jacobian_log_det(lambda v: layer(v)[0], x)
    with torch.no_grad():
        _, log_det = layer(x)
    assert float(log_det[0]) == pytest.approx(expected, abs=1e-6)
    if not name.startswith(("permutation", "squeeze", "additive")):  # those preserve volume
        assert abs(expected) > 1e-2, "a trivial Jacobian would not test anything"


@pytest.mark.parametrize("name", LAYERS)
def test_layer_vjp_matches_autograd(name):
    """Each layer's explicit (exportable) vector-Jacobian product is autograd's."""
    build, shape = LAYERS[name]
    layer = build().eval()
    x = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4),
                    requires_grad=True)
    z, _ = layer(x)
    grad_z = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (expected,) = torch.autograd.grad((z * grad_z).sum(), x)
    with torch.no_grad():
        got = layer.vjp(x.detach(), grad_z)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_coupling_vjp_holds_the_conditioning_fixed_and_refuses_unknown_layers():
    layer = perturbed(AffineCoupling(4, subnet_conv(3, hidden_channels=8), cond_channels=3)).eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    for cond in (torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)):
        z, _ = layer(x, cond)
        grad_z = torch.randn(z.shape, dtype=torch.float64)
        (expected,) = torch.autograd.grad((z * grad_z).sum(), x)
        torch.testing.assert_close(layer.vjp(x.detach(), grad_z, cond), expected, rtol=1e-10,
                                   atol=1e-10)
    odd = AffineCoupling(4, lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.Tanh(), nn.Linear(8, o)))
    with pytest.raises(ConfigError, match="Tanh"):
        odd.vjp(torch.randn(2, 4), torch.randn(2, 4))


def test_coupling_with_conditioning_vector_and_map():
    layer = perturbed(AffineCoupling(4, subnet_conv(3, hidden_channels=8), cond_channels=3)).eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for cond in (torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)):
        with torch.no_grad():
            z, log_det = layer(x, cond)
            torch.testing.assert_close(layer.inverse(z, cond), x, atol=1e-10, rtol=0)
        # x -> z at fixed cond is what the log-det is of
        expected = jacobian_log_det(lambda v, c=cond[:1]: layer(v, c)[0], x[:1])
        assert float(log_det[0]) == pytest.approx(expected, abs=1e-8)
    with pytest.raises(ConfigError, match="cond_channels=3"):
        layer(x)


def test_soft_clamp_bounds_the_log_scale():
    layer = AffineCoupling(2, subnet_fc(4), clamp=2.0)
    with torch.no_grad():
        layer.subnet[-1].bias.fill_(100.0)  # a huge raw log-scale
    _, log_det = layer(torch.randn(3, 2))
    assert torch.all(log_det <= 2.0) and torch.all(log_det > 1.99)


def test_actnorm_initialises_on_the_first_training_batch_only():
    layer = ActNorm(3)
    assert "initialized_" in dict(layer.named_buffers())
    x = torch.randn(64, 3, 4, 4) * torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1) + 3.0
    layer.eval()(x)  # eval mode: no initialisation
    assert not layer.initialized_
    z, _ = layer.train()(x)
    assert layer.initialized_
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    before = layer.log_scale.detach().clone()
    layer(x * 10)
    assert torch.equal(layer.log_scale.detach(), before)


def test_permutation_is_seeded_and_reverse_alternates():
    assert torch.equal(Permutation(16, seed=5).perm, Permutation(16, seed=5).perm)
    assert not torch.equal(Permutation(16, seed=5).perm, Permutation(16, seed=6).perm)
    assert Permutation(2, kind="reverse").perm.tolist() == [1, 0]
    assert Permutation(5, kind="odd_even").perm.tolist() == [0, 2, 4, 1, 3]


def test_additive_coupling_preserves_volume_exactly():
    layer = perturbed(AdditiveCoupling(6, subnet_fc(8, 2))).eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        z, log_det = layer(x)
    assert torch.equal(log_det, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(z[:, :3], x[:, :3]) and not torch.allclose(z[:, 3:], x[:, 3:])
    for i in range(2):  # the Jacobian is unit lower-triangular: log|det| = 0 at any x
        assert jacobian_log_det(lambda v: layer(v)[0], x[i:i + 1]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [VEC, MAP])
def test_scaling_log_det_matches_a_finite_difference_jacobian(shape):
    layer = perturbed(DiagonalScaling(shape[0])).eval()
    x = torch.randn(1, *shape, dtype=torch.float64)
    flat, eps = x.flatten(), 1e-6
    columns = []
    with torch.no_grad():
        for i in range(flat.numel()):  # central differences, one input coordinate at a time
            step = torch.zeros_like(flat)
            step[i] = eps
            up, down = layer((flat + step).view(x.shape))[0], layer((flat - step).view(x.shape))[0]
            columns.append((up - down).flatten() / (2 * eps))
        _, log_det = layer(x)
    numerical = float(torch.linalg.slogdet(torch.stack(columns, dim=1))[1])
    assert float(log_det[0]) == pytest.approx(numerical, abs=1e-6)
    spatial = math.prod(shape[1:])
    assert float(log_det[0]) == pytest.approx(spatial * float(layer.log_scale.detach().sum()), abs=1e-12)


# -- whole models -------------------------------------------------------------------------


def small_realnvp(**kw) -> RealNVP:
    torch.manual_seed(0)
    model = RealNVP(4, num_layers=3, hidden=8, permutation="random", **kw)
    model.train().log_prob(torch.randn(32, 4))  # ActNorm data-dependent init
    return perturbed(model, 0.2).eval()


def small_glow(**kw) -> Glow:
    torch.manual_seed(0)
    model = Glow(4, in_channels=2, levels=2, steps=2, hidden_channels=4, dequantize=False, **kw)
    model.train().log_prob(torch.rand(16, 2, 4, 4))
    return perturbed(model, 0.1).eval()


def small_nice(**kw) -> NICE:
    torch.manual_seed(0)
    model = NICE(6, num_layers=4, hidden=8, num_hidden_layers=2, dequantize=False, **kw)
    return perturbed(model, 0.3).eval()


@pytest.mark.parametrize("partition", ["odd_even", "halves"])
def test_nice_is_four_alternating_additive_couplings_and_a_scaling(partition):
    model = small_nice(partition=partition)
    kinds = [type(layer).__name__ for layer in model.flow]
    core = ["AdditiveCoupling", "Permutation"] * 3 + ["AdditiveCoupling", "DiagonalScaling"]
    assert kinds == (["Permutation"] if partition == "odd_even" else []) + core
    # consecutive couplings shift complementary halves: coupling 2 shifts what coupling 1 read
    x = torch.randn(1, 6, dtype=torch.float64)
    flow = model.flow
    first = 1 if partition == "odd_even" else 0
    with torch.no_grad():
        h = flow[0](x)[0] if first else x
        after_one = flow[first](h)[0]
        assert torch.equal(after_one[:, :3], h[:, :3])
        reversed_h = flow[first + 1](after_one)[0]
        after_two = flow[first + 2](reversed_h)[0]
        assert torch.equal(after_two[:, :3], reversed_h[:, :3])
    if partition == "odd_even":  # the first coupling reads the even components
        assert flow[0].perm.tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nice_inverse_undoes_forward_to_float_precision(dtype):
    model = small_nice().to(dtype)
    x = torch.randn(16, 6, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z, _ = model(x)
        assert not torch.allclose(z, x)
        back = model.inverse(z)
        forth = model(model.inverse(x))[0]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(back, x, atol=tol, rtol=0)
    torch.testing.assert_close(forth, x, atol=tol, rtol=0)


@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_nice_log_prob_is_the_brute_force_change_of_variables(prior):
    model = small_nice(prior=prior)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.log_prob(x)
        z, log_det = model(x)
    # the couplings are volume preserving: only the scaling layer changes volume
    torch.testing.assert_close(log_det, model.flow[-1].log_scale.sum().expand(3))
    for i in range(3):
        if prior == "logistic":  # log of the logistic density sigma(z) (1 - sigma(z))
            log_pz = (torch.sigmoid(z[i]).log() + torch.sigmoid(-z[i]).log()).sum()
        else:
            log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z[i]).sum()
        expected = float(log_pz) + jacobian_log_det(lambda v: model(v)[0], x[i:i + 1])
        assert float(got[i]) == pytest.approx(expected, abs=1e-8)


def test_nice_logistic_samples_follow_the_prior():
    torch.manual_seed(0)
    model = NICE(4, num_layers=2, hidden=4, num_hidden_layers=1, dequantize=False)  # f = identity
    samples = model.sample(20000, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()
    # standard logistic: mean 0, variance pi^2 / 3
    assert float(samples.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(samples.var()) == pytest.approx(math.pi ** 2 / 3, rel=0.03)


def test_realnvp_inverse_and_log_det():
    model = small_realnvp()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        z, log_det = model(x)
        torch.testing.assert_close(model.inverse(z), x, atol=1e-5, rtol=0)
    assert float(log_det[0]) == pytest.approx(jacobian_log_det(lambda v: model(v)[0], x[:1]), abs=1e-6)


@pytest.mark.parametrize("learned_prior", [False, True])
def test_glow_inverse_and_log_det(learned_prior):
    model = small_glow(learned_prior=learned_prior)
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        zs, log_det = model(x)
        assert [tuple(z.shape[1:]) for z in zs] == [(4, 2, 2), (16, 1, 1)] == model.latent_shapes
        torch.testing.assert_close(model.inverse(zs), x, atol=1e-5, rtol=0)
    expected = jacobian_log_det(lambda v: torch.cat([z.flatten(1) for z in model(v)[0]], 1), x[:1])
    assert float(log_det[0]) == pytest.approx(expected, abs=1e-6)


def test_realnvp_density_integrates_to_one():
    torch.manual_seed(0)
    model = perturbed(RealNVP(2, num_layers=4, hidden=8, actnorm=False), 0.2).eval()
    grid = torch.linspace(-15, 15, 601, dtype=torch.float64)  # wide: the perturbed flow has long tails
    xy = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        mass = model.log_prob(xy).exp().sum() * (grid[1] - grid[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)


def test_dequantization_counts_the_bin_volume():
    model = small_glow()
    x = torch.randint(0, 256, (2, 2, 4, 4), dtype=torch.float64) / 255
    discrete = Glow(**{**model.config, "dequantize": True, "num_bins": 256}).double().eval()
    discrete.load_state_dict(model.state_dict())
    centres = (x * 255 + 0.5) / 256
    with torch.no_grad():
        expected = model.log_prob(centres) - 32 * math.log(256)
        torch.testing.assert_close(discrete.log_prob(x), expected)
        torch.testing.assert_close(discrete.bits_per_dim(x), -expected / (32 * math.log(2)))


# -- sampling, checkpoints, config -------------------------------------------------------


@pytest.mark.parametrize("kind", ["realnvp", "nice", "glow"])
def test_sample_shapes_and_zero_temperature(kind):
    model = {"realnvp": small_realnvp, "nice": small_nice,
             "glow": lambda: small_glow(learned_prior=True)}[kind]()
    dim = model.dim if kind != "glow" else None
    shape = (dim,) if kind != "glow" else (2, 4, 4)
    g = torch.Generator().manual_seed(0)
    samples = model.sample(6, generator=g)
    assert samples.shape == (6, *shape) and torch.isfinite(samples).all()
    cold = model.sample(3, temperature=0.0, generator=g)
    assert torch.equal(cold, model.sample(3, temperature=0.0))
    assert torch.equal(cold[0], cold[2])
    if kind != "glow":
        torch.testing.assert_close(cold, model.inverse(torch.zeros(3, dim, dtype=torch.float64)))


def test_glow_samples_lie_in_the_unit_interval_when_dequantized():
    torch.manual_seed(0)
    samples = Glow(8).sample(4, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("kind", ["realnvp", "glow"])
def test_save_load_round_trip_keeps_log_prob(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "realnvp":
        model, x = RealNVP(3, num_layers=2, hidden=8, permutation="random"), torch.randn(8, 3)
    else:
        model = Glow(4, in_channels=1, steps=2, hidden_channels=4, learned_prior=True)
        x = torch.rand(8, 1, 4, 4)
    fit(model, x, epochs=1, batch_size=8, progress=False, device="cpu")  # initialises ActNorm
    save_checkpoint(tmp_path / "flow.ckpt", model)
    loaded = load_model(tmp_path / "flow.ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), model.eval().log_prob(x))
    actnorms = [m for m in loaded.modules() if isinstance(m, ActNorm)]
    assert actnorms and all(bool(m.initialized_) for m in actnorms)
    before = [m.bias.detach().clone() for m in actnorms]
    loaded.train().log_prob(x * 5)  # an initialised ActNorm must not re-initialise
    assert all(torch.equal(m.bias.detach(), b) for m, b in zip(actnorms, before, strict=True))


def test_registered_and_bad_options():
    assert {"realnvp", "nice", "glow"} <= set(list_generative())
    assert isinstance(create("nice", "generative", dim=4, hidden=4), NICE)
    with pytest.raises(ConfigError, match="prior must be one of logistic, gaussian; got 'cauchy'"):
        NICE(4, prior="cauchy")
    with pytest.raises(ConfigError, match="partition must be one of odd_even, halves; got 'checker'"):
        NICE(4, partition="checker")
    with pytest.raises(ConfigError, match="NICE needs dim >= 2"):
        NICE(1)
    with pytest.raises(DataError, match=r"expects \(B, 4\); got \(2, 5\)"):
        NICE(4, hidden=4).log_prob(torch.rand(2, 5))
    assert isinstance(create("glow", "generative", steps=1), Glow)
    with pytest.raises(ConfigError, match="permutation must be one of random, reverse; got 'shuffle'"):
        RealNVP(permutation="shuffle")
    with pytest.raises(ConfigError, match="image_size 12 must be a multiple of 8"):
        Glow(12, levels=3)
    with pytest.raises(ConfigError, match="clamp must be > 0"):
        AffineCoupling(4, subnet_fc(4), clamp=0.0)
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        subnet_conv(2)
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        RealNVP().sample(2, temperature=-1.0)
    with pytest.raises(DataError, match=r"expects \(B, 1, 8, 8\); got \(2, 3, 8, 8\)"):
        Glow().log_prob(torch.rand(2, 3, 8, 8))
    with pytest.raises(DataError, match="even H and W"):
        Squeeze()(torch.rand(1, 1, 3, 4))


# -- learning -----------------------------------------------------------------------------


@pytest.mark.slow
def test_realnvp_learns_two_moons():
    from sklearn.datasets import make_moons

    points, _ = make_moons(1200, noise=0.05, random_state=0)
    points = torch.tensor(points, dtype=torch.float32)
    train, held_out = points[:1000], points[1000:]
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    gaussian_ll = float(gaussian.log_prob(held_out).mean())

    torch.manual_seed(0)
    model = RealNVP(2, num_layers=6, hidden=32, lr=3e-3)
    with torch.no_grad():
        before = float(model.eval().log_prob(held_out).mean())
    fit(model, train, epochs=100, max_steps=300, batch_size=100, progress=False, device="cpu")
    with torch.no_grad():
        after = float(model.eval().log_prob(held_out).mean())
    print(f"moons held-out log p: before {before:.3f}, after {after:.3f}, Gaussian {gaussian_ll:.3f}")
    assert after > before + 1.0
    assert after > gaussian_ll + 0.5  # two moons are far from Gaussian; a flow must see that


@pytest.mark.slow
def test_glow_bits_per_dim_fall_on_digits():
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0  # 17 levels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held_out = images[order[:1500]], images[order[1500:]]

    torch.manual_seed(0)
    model = Glow(8, in_channels=1, levels=2, steps=4, hidden_channels=32, num_bins=17)
    with torch.no_grad():
        before = float(model.eval().bits_per_dim(held_out).mean())
    history = fit(model, train, epochs=3, batch_size=64, progress=False, device="cpu")
    with torch.no_grad():
        after = float(model.eval().bits_per_dim(held_out).mean())
    print(f"digits held-out bits/dim: before {before:.3f}, after {after:.3f}")
    epoch_bpd = [e["bits_per_dim"] for e in history["train_loss"]]
    assert epoch_bpd == sorted(epoch_bpd, reverse=True)
    assert after < before - 1.0
    assert after < math.log2(17) - 0.5  # clearly better than uniform over the 17 levels
    assert np.isfinite(after)


def test_nice_bits_per_dim_fall_on_held_out_digits():
    from sklearn.datasets import load_digits

    vectors = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0  # (N, 64), 17 levels
    order = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))
    train, held_out = vectors[order[:1500]], vectors[order[1500:]]
    torch.manual_seed(0)
    # lr 1e-2: the scaling layer starts at the identity and must grow by several nats per
    # dimension, which Adam's steps of about lr each take long to do at the paper's 1e-3
    model = NICE(64, hidden=128, num_hidden_layers=3, num_bins=17, lr=1e-2)
    with torch.no_grad():
        before = float(model.eval().bits_per_dim(held_out).mean())
    history = fit(model, train, epochs=10, batch_size=64, progress=False, device="cpu")
    with torch.no_grad():
        after = float(model.eval().bits_per_dim(held_out).mean())
    print(f"NICE digit vectors held-out bits/dim: before {before:.3f}, after {after:.3f}")
    epoch_bpd = [e["bits_per_dim"] for e in history["train_loss"]]
    assert epoch_bpd[-1] < epoch_bpd[0] - 1.0
    assert after < before - 2.0
    assert after < math.log2(17) - 0.5  # clearly better than uniform over the 17 levels
    samples = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 64) and samples.min() >= 0 and samples.max() <= 1


@pytest.mark.slow
def test_dequantized_realnvp_on_digit_vectors():
    from sklearn.datasets import load_digits

    vectors = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0  # (N, 64), 17 levels
    order = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))
    train, held_out = vectors[order[:1500]], vectors[order[1500:]]
    torch.manual_seed(0)
    model = RealNVP(64, num_layers=4, hidden=64, permutation="random", dequantize=True, num_bins=17)
    with torch.no_grad():
        before = float(model.eval().bits_per_dim(held_out).mean())
    fit(model, train, epochs=2, batch_size=64, progress=False, device="cpu")
    with torch.no_grad():
        after = float(model.eval().bits_per_dim(held_out).mean())
    print(f"digit vectors held-out bits/dim: before {before:.3f}, after {after:.3f}")
    assert after < math.log2(17) - 0.5 < before
    samples = model.sample(4, temperature=0.8)
    assert samples.shape == (4, 64) and samples.min() >= 0 and samples.max() <= 1
