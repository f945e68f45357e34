"""Invertible layers for normalizing flows (RealNVP, Glow, and the FastFlow/DifferNet detectors).

Every layer is a :class:`Flow`: ``forward(x, cond=None) -> (z, log_det_jacobian)``
with ``log_det_jacobian`` of shape (B,) equal to ``log |det dz/dx|`` per sample,
``inverse(z, cond=None) -> x``, and ``vjp(x, grad_z, cond=None) -> (dz/dx)^T grad_z``, the
vector-Jacobian product written with plain tensor ops (no autograd) so that a gradient
through a flow can be part of an exported ``forward`` (DifferNet's map). Layers work on
feature vectors (B, C) and on feature maps (B, C, H, W) unless stated otherwise; the
change-of-variables formula (Dinh et al. 2017, eq. 3) then gives ``log p(x) = log p(z) + log_det_jacobian``.

Layers:

* :class:`AffineCoupling` -- RealNVP's affine coupling (Dinh et al. 2017, sec. 3.2-3.3)
  with a pluggable subnet, FrEIA's soft clamp of the log-scale, optional conditioning.
* :class:`AdditiveCoupling` -- NICE's additive coupling (Dinh et al. 2015, sec. 3.2-3.3),
  volume preserving; the same subnets and conditioning as the affine one.
* :class:`DiagonalScaling` -- NICE's diagonal scaling layer ``z = x * exp(s)`` (sec. 3.3).
* :class:`ActNorm` -- Glow's activation normalisation (Kingma & Dhariwal 2018, sec. 3.1):
  a :class:`DiagonalScaling` plus a bias, initialised from the first batch.
* :class:`InvertibleConv1x1` -- Glow's invertible 1x1 convolution, optionally
  LU-decomposed (sec. 3.2).
* :class:`Permutation` -- a fixed channel permutation (random with a seed, reversal, or
  even-then-odd: NICE's odd/even partition).
* :class:`Squeeze` -- space-to-depth 2x2 (RealNVP sec. 3.6), maps only.
* :class:`FlowSequential` -- a chain of flows; log-dets add.

Subnet factories for the couplings: :func:`subnet_fc` (vectors) and
:func:`subnet_conv` (maps). Their last layer is zero-initialised by default so
each coupling starts as the identity (Glow sec. 3.3), which keeps deep flows stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError, DataError, check_choice

SubnetFactory = Callable[[int, int], nn.Module]

__all__ = [
    "PERMUTATIONS", "PERMUTATION_KINDS", "ActNorm", "AdditiveCoupling", "AffineCoupling",
    "DiagonalScaling", "Flow", "FlowSequential", "InvertibleConv1x1", "Permutation", "Squeeze",
    "SubnetFactory", "normal_log_prob", "standard_logistic_log_prob", "standard_normal_log_prob",
    "subnet_conv", "subnet_fc",
]

_LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """(B, ...) -> (B,) log N(z; 0, I), summed over every non-batch dimension."""
    return -0.5 * (z.pow(2) + _LOG_2PI).flatten(1).sum(1)


def standard_logistic_log_prob(z: Tensor) -> Tensor:
    """(B, ...) -> (B,) log of the standard logistic density, summed over non-batch dimensions.

    log p(z) = -(softplus(z) + softplus(-z)) (NICE sec. 3.4), written with softplus so that
    it stays finite for large |z|.
    """
    return -(F.softplus(z) + F.softplus(-z)).flatten(1).sum(1)


def normal_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """(B, ...) -> (B,) log N(z; mean, exp(log_std)^2) of a diagonal Gaussian, summed per sample."""
    return -0.5 * (((z - mean) * torch.exp(-log_std)).pow(2) + 2.0 * log_std + _LOG_2PI).flatten(1).sum(1)


def _spatial_size(x: Tensor) -> int:
    """Number of positions that share one per-channel parameter: 1 for (B, C), H*W for (B, C, H, W)."""
    return math.prod(x.shape[2:])


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """(C,) -> a view broadcastable against x of shape (B, C, *spatial)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class Flow(nn.Module):
    """An invertible layer with a tractable log-determinant.

    ``forward(x, cond=None)``: x (B, C, ...) -> (z (B, C', ...), log_det_jacobian (B,)).
    ``inverse(z, cond=None)``: z -> x. Layers that take no conditioning ignore ``cond``
    so that :class:`FlowSequential` can pass it to every layer.
    """

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        """(dz/dx)^T grad_z at the input x, without autograd (exports to ONNX).

        x: the layer's input; grad_z: a gradient with respect to its output z (z's shape).
        ``cond`` is held fixed (no gradient flows into it).
        """
        raise ConfigError(f"{type(self).__name__} has no explicit vector-Jacobian product")


def _subnet_vjp(subnet: nn.Module, h: Tensor, grad_out: Tensor) -> Tensor:
    """(d subnet(h) / d h)^T grad_out for the subnets of :func:`subnet_fc` and :func:`subnet_conv`.

    Layers: Linear, ReLU, Dropout (the identity in eval mode; in training mode forward is
    random anyway), Identity, and stride-1 "same" Conv2d.
    """
    layers = list(subnet) if isinstance(subnet, nn.Sequential) else [subnet]
    inputs = []
    for layer in layers:
        inputs.append(h)
        h = layer(h)
    g = grad_out
    for layer, inp in zip(reversed(layers), reversed(inputs), strict=True):
        if isinstance(layer, nn.Linear):
            g = g @ layer.weight
        elif isinstance(layer, nn.ReLU):
            g = g * (inp > 0).to(g.dtype)
        elif isinstance(layer, nn.Conv2d) and layer.stride == (1, 1) and layer.dilation == (1, 1) \
                and layer.groups == 1 and layer.padding_mode == "zeros" \
                and not isinstance(layer.padding, str) \
                and all(2 * p + 1 == k for p, k in zip(layer.padding, layer.kernel_size, strict=True)):
            # The adjoint of a stride-1 "same" convolution is the transposed convolution.
            g = F.conv_transpose2d(g, layer.weight, padding=layer.padding)
        elif not isinstance(layer, (nn.Dropout, nn.Identity)):
            raise ConfigError(f"no vector-Jacobian product for subnet layer {layer}")
    return g


# -- subnet factories ---------------------------------------------------------------------


def subnet_fc(hidden: int, num_hidden_layers: int = 1, *, dropout: float = 0.0,
              zero_init: bool = True) -> SubnetFactory:
    """Factory of fully connected subnets (B, in_ch) -> (B, out_ch) for vector couplings.

    ``num_hidden_layers`` hidden layers of width ``hidden`` with ReLU (DifferNet's subnet is
    ``subnet_fc(2 * C, 1, dropout=...)``). With ``zero_init`` the output layer starts at zero,
    so the coupling starts as the identity.
    """
    if hidden < 1 or num_hidden_layers < 1:
        raise ConfigError(f"subnet_fc needs hidden >= 1 and num_hidden_layers >= 1; "
                          f"got hidden={hidden}, num_hidden_layers={num_hidden_layers}")

    def factory(in_ch: int, out_ch: int) -> nn.Module:
        layers: list[nn.Module] = []
        width = in_ch
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        last = nn.Linear(width, out_ch)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        return nn.Sequential(*layers, last)

    return factory


def subnet_conv(kernel_size: int, hidden_ratio: float = 1.0, *, hidden_channels: int | None = None,
                zero_init: bool = True) -> SubnetFactory:
    """Factory of conv subnets (B, in_ch, H, W) -> (B, out_ch, H, W): conv k -> ReLU -> conv k.

    The layout of FastFlow's subnet (Yu et al. 2021, which alternates k = 3 and k = 1).
    Hidden width is ``hidden_channels`` if given, else ``round(in_ch * hidden_ratio)``.
    ``kernel_size`` must be odd so "same" padding keeps H and W.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"subnet_conv kernel_size must be odd and positive; got {kernel_size}")
    if hidden_channels is None and hidden_ratio <= 0:
        raise ConfigError(f"subnet_conv hidden_ratio must be > 0; got {hidden_ratio}")
    if hidden_channels is not None and hidden_channels < 1:
        raise ConfigError(f"subnet_conv hidden_channels must be >= 1; got {hidden_channels}")

    def factory(in_ch: int, out_ch: int) -> nn.Module:
        hidden = hidden_channels if hidden_channels is not None else max(1, round(in_ch * hidden_ratio))
        pad = kernel_size // 2
        last = nn.Conv2d(hidden, out_ch, kernel_size, padding=pad)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Conv2d(in_ch, hidden, kernel_size, padding=pad), nn.ReLU(), last)

    return factory


# -- layers -------------------------------------------------------------------------------


class _Coupling(Flow):
    """What the coupling layers share: the split, the subnet and its conditioning input.

    The first ``channels // 2`` channels x1 pass unchanged and, with the optional
    conditioning, feed ``subnet``, whose output (``outputs_per_channel`` values per channel
    of the other part x2) says how x2 is transformed.
    """

    def __init__(self, channels: int, subnet_factory: SubnetFactory, *, cond_channels: int,
                 outputs_per_channel: int) -> None:
        super().__init__()
        name = type(self).__name__
        if channels < 2:
            raise ConfigError(f"{name} needs at least 2 channels to split; got {channels}")
        if cond_channels < 0:
            raise ConfigError(f"{name} cond_channels must be >= 0; got {cond_channels}")
        self.channels, self.cond_channels = channels, cond_channels
        self.split = channels // 2
        self.subnet = subnet_factory(self.split + cond_channels,
                                     outputs_per_channel * (channels - self.split))

    def _subnet_input(self, x1: Tensor, cond: Tensor | None) -> Tensor:
        if (cond is None) != (self.cond_channels == 0):
            raise ConfigError(f"{type(self).__name__} built with cond_channels={self.cond_channels} "
                              f"got cond={'None' if cond is None else tuple(cond.shape)}")
        if cond is None:
            return x1
        if cond.dim() == 2 and x1.dim() == 4:  # one vector per sample, shared by every position
            cond = cond[:, :, None, None].expand(-1, -1, *x1.shape[2:])
        return torch.cat([x1, cond], dim=1)

    def _subnet_vjp_x1(self, h: Tensor, grad_out: Tensor, has_cond: bool) -> Tensor:
        """(d subnet(h) / d x1)^T grad_out: the subnet's VJP restricted to x1's channels."""
        grad_h = _subnet_vjp(self.subnet, h, grad_out)
        return grad_h[:, :self.split] if has_cond else grad_h


class AffineCoupling(_Coupling):
    """Affine coupling (RealNVP, Dinh et al. 2017, eqs. 6-8) with a soft-clamped log-scale.

    The first ``channels // 2`` channels x1 pass unchanged and, with the optional
    conditioning, feed the subnet, which predicts a log-scale s and shift t for the rest x2:

        z1 = x1,    z2 = x2 * exp(s) + t,    log_det_jacobian = sum(s)

    ``s = clamp * tanh(s_raw / clamp)`` (the soft clamp of FrEIA and FastFlow) bounds each
    scale to [exp(-clamp), exp(clamp)], so a coupling can never blow up early in training.

    Args:
        channels: C of the (B, C) or (B, C, H, W) input, at least 2.
        subnet_factory: ``factory(in_ch, out_ch) -> nn.Module`` mapping (B, in_ch, ...) to
            (B, out_ch, ...), e.g. :func:`subnet_fc` or :func:`subnet_conv`; it is called with
            ``in_ch = channels // 2 + cond_channels`` and ``out_ch = 2 * (channels - channels // 2)``.
        cond_channels: channels of the conditioning tensor concatenated to x1 (0: none). For
            maps, ``cond`` may be (B, cond_channels, H, W) or a (B, cond_channels) vector that
            is broadcast over H and W.
        clamp: soft-clamp bound of the log-scale, > 0.
    """

    def __init__(self, channels: int, subnet_factory: SubnetFactory, *, cond_channels: int = 0,
                 clamp: float = 2.0) -> None:
        if clamp <= 0:
            raise ConfigError(f"AffineCoupling clamp must be > 0; got {clamp}")
        super().__init__(channels, subnet_factory, cond_channels=cond_channels, outputs_per_channel=2)
        self.clamp = float(clamp)

    def _scale_shift(self, x1: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        s_raw, t = self.subnet(self._subnet_input(x1, cond)).chunk(2, dim=1)
        return self.clamp * torch.tanh(s_raw / self.clamp), t

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        s, t = self._scale_shift(x1, cond)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=1), s.flatten(1).sum(1)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        z1, z2 = z[:, :self.split], z[:, self.split:]
        s, t = self._scale_shift(z1, cond)
        return torch.cat([z1, (z2 - t) * torch.exp(-s)], dim=1)

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        """(dz/dx)^T grad_z. With s = c tanh(s_raw / c) and (s_raw, t) = subnet(h), h = [x1, cond]:

        dL/dx2 = g2 exp(s); dL/ds_raw = g2 x2 exp(s) (1 - tanh^2(s_raw / c)); dL/dt = g2;
        dL/dx1 = g1 + (subnet^T [dL/ds_raw, dL/dt]) restricted to x1's channels.
        """
        x1, x2 = x[:, :self.split], x[:, self.split:]
        g1, g2 = grad_z[:, :self.split], grad_z[:, self.split:]
        h = self._subnet_input(x1, cond)
        s_raw, _ = self.subnet(h).chunk(2, dim=1)
        tanh = torch.tanh(s_raw / self.clamp)
        scale = torch.exp(self.clamp * tanh)
        grad_s_raw = g2 * x2 * scale * (1.0 - tanh * tanh)
        grad_x1 = self._subnet_vjp_x1(h, torch.cat([grad_s_raw, g2], dim=1), cond is not None)
        return torch.cat([g1 + grad_x1, g2 * scale], dim=1)


class AdditiveCoupling(_Coupling):
    """Additive coupling (NICE, Dinh et al. 2015, sec. 3.2-3.3, eq. 4).

    The first ``channels // 2`` channels x1 pass unchanged and, with the optional
    conditioning, feed the coupling function m (the subnet), which shifts the rest x2:

        z1 = x1,    z2 = x2 + m(x1),    log_det_jacobian = 0

    The Jacobian is unit triangular, so the layer preserves volume and the inverse is
    x2 = z2 - m(z1). A flow of additive couplings alone cannot change density, hence NICE's
    :class:`DiagonalScaling` on top. Args as :class:`AffineCoupling`'s (no clamp); the subnet
    is called with ``out_ch = channels - channels // 2``.
    """

    def __init__(self, channels: int, subnet_factory: SubnetFactory, *,
                 cond_channels: int = 0) -> None:
        super().__init__(channels, subnet_factory, cond_channels=cond_channels, outputs_per_channel=1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        shift = self.subnet(self._subnet_input(x1, cond))
        return torch.cat([x1, x2 + shift], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        z1, z2 = z[:, :self.split], z[:, self.split:]
        return torch.cat([z1, z2 - self.subnet(self._subnet_input(z1, cond))], dim=1)

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        """dL/dx2 = g2; dL/dx1 = g1 + (m^T g2) restricted to x1's channels."""
        g1, g2 = grad_z[:, :self.split], grad_z[:, self.split:]
        h = self._subnet_input(x[:, :self.split], cond)
        return torch.cat([g1 + self._subnet_vjp_x1(h, g2, cond is not None), g2], dim=1)


class DiagonalScaling(Flow):
    """Per-channel scaling ``z = x * exp(log_scale)`` (NICE's scaling layer, Dinh et al. 2015,
    sec. 3.3): the only volume change in a NICE flow.

    ``log_scale`` (C,) starts at 0 (the identity). Parametrising the scale by its log keeps it
    positive (the paper's "exponentially parametrised" S). log_det_jacobian = sum(log_scale)
    for vectors, H * W * sum(log_scale) for maps.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def _log_det(self, x: Tensor) -> Tensor:
        return (self.log_scale.sum() * _spatial_size(x)).expand(x.shape[0])

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x * _per_channel(torch.exp(self.log_scale), x), self._log_det(x)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return z * _per_channel(torch.exp(-self.log_scale), z)

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        return grad_z * _per_channel(torch.exp(self.log_scale), grad_z)


class ActNorm(DiagonalScaling):
    """Per-channel affine ``z = x * exp(log_scale) + bias`` (Glow, Kingma & Dhariwal 2018, sec. 3.1).

    A :class:`DiagonalScaling` followed by a per-channel shift (which changes no volume).
    Data-dependent initialisation: the first forward call in training mode sets
    ``log_scale`` and ``bias`` so that this batch comes out with zero mean and unit variance
    per channel. Whether that happened lives in the buffer ``initialized_``, so it is saved
    in checkpoints and a loaded model is not re-initialised. Forward calls in eval mode and
    ``inverse`` never initialise (before initialisation the layer is the identity).

    log_det_jacobian = H * W * sum(log_scale) for maps, sum(log_scale) for vectors (Glow table 1).
    """

    def __init__(self, channels: int, *, eps: float = 1e-6) -> None:
        super().__init__(channels)
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized_", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters from a batch x (B, C, ...) so that forward(x) is standardised."""
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.bias.copy_(-mean * torch.exp(self.log_scale))
        self.initialized_.fill_(True)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized_):
            self.initialize(x)
        z, log_det = super().forward(x)
        return z + _per_channel(self.bias, x), log_det

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return super().inverse(z - _per_channel(self.bias, z))


class InvertibleConv1x1(Flow):
    """Invertible 1x1 convolution ``z = W x`` per position (Glow sec. 3.2).

    W starts as a random rotation (QR of a Gaussian matrix, from torch's global RNG), so
    log|det W| starts at 0. With ``lu=True`` W is kept as ``P L (U + diag(sign_s * exp(log_s)))``
    (Glow eq. 10): P is a fixed permutation, L unit lower- and U strictly upper-triangular,
    and log|det W| = sum(log_s) costs O(C) instead of an O(C^3) determinant.

    log_det_jacobian = H * W * log|det W| for maps, log|det W| for vectors.
    """

    def __init__(self, channels: int, *, lu: bool = False) -> None:
        super().__init__()
        self.channels, self.lu = channels, lu
        w_init = torch.linalg.qr(torch.randn(channels, channels))[0]
        if not lu:
            self.weight = nn.Parameter(w_init)
            return
        p, lower, upper = torch.linalg.lu(w_init)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight_and_log_det(self) -> tuple[Tensor, Tensor]:
        """(C, C) W and the scalar log|det W|."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        eye = torch.eye(self.channels, dtype=self.log_s.dtype, device=self.log_s.device)
        # tril/triu again so that gradients never leak into the fixed zero / unit parts
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper, self.log_s.sum()

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return x @ w.T
        return F.conv2d(x, w[:, :, None, None])

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w, log_det = self.weight_and_log_det()
        return self._mix(w, x), (log_det * _spatial_size(x)).expand(x.shape[0])

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        w, _ = self.weight_and_log_det()
        return self._mix(torch.linalg.inv(w), z)

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        w, _ = self.weight_and_log_det()
        return self._mix(w.T, grad_z)  # z = W x per position, so dL/dx = W^T dL/dz


# The permutations a flow puts between its coupling steps.
PERMUTATIONS = ("random", "reverse")
# Every kind :class:`Permutation` builds: also NICE's odd/even partition, used once in front.
PERMUTATION_KINDS = (*PERMUTATIONS, "odd_even")


class Permutation(Flow):
    """A fixed channel permutation; volume preserving, so log_det_jacobian = 0.

    ``kind="random"``: a random permutation drawn from ``torch.Generator().manual_seed(seed)``
    (the same seed gives the same permutation everywhere); ``kind="reverse"``: channel order
    reversed, which guarantees that consecutive couplings transform alternating halves
    (RealNVP's alternating masks), even for C = 2; ``kind="odd_even"``: channels 0, 2, 4, ...
    then 1, 3, 5, ..., so that a coupling's halves are the even and the odd components (NICE
    sec. 5.1's partition). The index buffers are saved with the model.
    """

    def __init__(self, channels: int, *, seed: int = 0, kind: str = "random") -> None:
        super().__init__()
        check_choice("kind", kind, PERMUTATION_KINDS)
        self.channels, self.kind = channels, kind
        if kind == "random":
            perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        elif kind == "reverse":
            perm = torch.arange(channels - 1, -1, -1)
        else:
            perm = torch.cat([torch.arange(0, channels, 2), torch.arange(1, channels, 2)])
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return z[:, self.inv_perm]

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        return grad_z[:, self.inv_perm]


class Squeeze(Flow):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2) (RealNVP sec. 3.6, Glow's squeeze).

    Each 2x2 block of a channel becomes 4 channels (``pixel_unshuffle``), so channel c of
    the input maps to channels 4c .. 4c+3. A permutation of entries: log_det_jacobian = 0.
    """

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise DataError(f"Squeeze needs (B, C, H, W) with even H and W; got {tuple(x.shape)}")
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return F.pixel_shuffle(z, 2)

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        return F.pixel_shuffle(grad_z, 2)  # a permutation P of entries: P^T = P^-1


class FlowSequential(nn.Sequential, Flow):
    """A chain of flows: forward runs them in order and sums their log-dets; inverse runs back.

    ``cond`` is handed to every layer (layers without conditioning ignore it).
    """

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in self:
            x, layer_log_det = layer(x, cond)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        for layer in reversed(self):
            z = layer.inverse(z, cond)
        return z

    def vjp(self, x: Tensor, grad_z: Tensor, cond: Tensor | None = None) -> Tensor:
        """Chain rule: one forward pass records each layer's input, then the layers' VJPs in reverse."""
        inputs = []
        for layer in self:
            inputs.append(x)
            x, _ = layer(x, cond)
        g = grad_z
        for layer, inp in zip(reversed(self), reversed(inputs), strict=True):
            g = layer.vjp(inp, g, cond)
        return g
