"""Explicit vector-Jacobian products of ``nn.Sequential`` networks, in eval semantics.

``torch.autograd.grad`` inside a detector's ``forward`` does not export with the dynamo ONNX
exporter (torch 2.14; see :mod:`anomalykit.detectors.differnet`), and onnxruntime has no
autograd. A detector whose inference needs a gradient (AnoGAN's latent search) therefore
writes the backward pass out as plain tensor ops, layer by layer:

====================  ==================================================================
layer                 input gradient from the output gradient g
====================  ==================================================================
``Conv2d``            ``conv_transpose2d(g, W)``, same stride / padding / dilation, the
                      ``output_padding`` that restores the input size
``ConvTranspose2d``   ``conv2d(g, W)``, same stride / padding / dilation
``Linear``            ``g @ W``
``BatchNorm2d``       ``g * weight / sqrt(running_var + eps)`` (running statistics)
``GroupNorm``         (1 / sigma) (gh - mean(gh) - x_hat mean(gh x_hat)) per group, gh = g gamma
``ReLU``              ``g * (x > 0)``
``LeakyReLU``         ``g * where(x > 0, 1, negative_slope)``
``Tanh``              ``g * (1 - y^2)``
``Sigmoid``           ``g * y (1 - y)``
``Identity``          ``g``
``Flatten``           ``g`` reshaped to the input's shape
nested Sequential     the same, recursively
====================  ==================================================================

Every layer runs in EVAL semantics whatever ``module.training`` says: BatchNorm uses its
running statistics (:func:`sequential_forward` runs the layers itself, functionally, so a
caller's forward never depends on the mode and the in-place activations of the DCGAN nets
never overwrite a stored input). Any other layer type is refused with a :class:`ConfigError`
naming it. Plain functions: nothing here imports the toolkit's contracts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError

SUPPORTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm, nn.ReLU,
             nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten, nn.Sequential)


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, SUPPORTED):
        names = ", ".join(t.__name__ for t in SUPPORTED)
        raise ConfigError(f"sequential_vjp has no explicit vector-Jacobian product for "
                          f"{type(layer).__name__}; supported layers: {names}")
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and (
            layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        raise ConfigError(f"sequential_vjp supports {type(layer).__name__} with groups=1, "
                              f"numeric zero padding only; got groups={layer.groups}, "
                              f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
    if isinstance(layer, nn.BatchNorm2d) and layer.running_var is None:
        raise ConfigError("sequential_vjp needs BatchNorm2d with running statistics "
                          "(track_running_stats=True): eval semantics use them")


def layer_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """One layer in eval semantics, never in place (the input is kept for the backward pass)."""
    _check_layer(layer)
    if isinstance(layer, nn.Sequential):
        return sequential_forward(layer, x)[0]
    if isinstance(layer, nn.BatchNorm2d):
        return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                            training=False, eps=layer.eps)
    if isinstance(layer, nn.ReLU):
        return F.relu(x)
    if isinstance(layer, nn.LeakyReLU):
        return F.leaky_relu(x, layer.negative_slope)
    if isinstance(layer, nn.Tanh):
        return torch.tanh(x)
    if isinstance(layer, nn.Sigmoid):
        return torch.sigmoid(x)
    return layer(x)  # Conv2d, ConvTranspose2d, Linear, GroupNorm, Identity, Flatten: no mode


def sequential_forward(module: nn.Sequential, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Run ``module`` in eval semantics: x -> (output, [x, h_1, ..., output]).

    The list holds every layer's input and the final output, what :func:`sequential_vjp`
    needs to go back without running the layers again.
    """
    activations = [x]
    for layer in module:
        activations.append(layer_forward(layer, activations[-1]))
    return activations[-1], activations


def _conv_output_padding(layer: nn.Conv2d, x: Tensor, g: Tensor) -> tuple[int, int]:
    """What ``conv_transpose2d`` must add so that it returns the conv's input size (a strided
    conv drops the last rows/columns that do not fill a whole step)."""
    pads = []
    for axis in (0, 1):
        size_in, size_out = x.shape[2 + axis], g.shape[2 + axis]
        stride, pad = layer.stride[axis], layer.padding[axis]
        span = layer.dilation[axis] * (layer.kernel_size[axis] - 1) + 1
        pads.append(int(size_in - ((size_out - 1) * stride - 2 * pad + span)))
    return pads[0], pads[1]


def _group_norm_vjp(layer: nn.GroupNorm, x: Tensor, g: Tensor) -> Tensor:
    """d/dx of GroupNorm: (1 / sigma) (gh - mean(gh) - x_hat mean(gh x_hat)) within each group."""
    b, c = x.shape[:2]
    if layer.weight is not None:
        g = g * layer.weight.view(1, c, *([1] * (x.dim() - 2)))
    xg, gg = x.reshape(b, layer.num_groups, -1), g.reshape(b, layer.num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    inv_sigma = torch.rsqrt(xg.var(-1, unbiased=False, keepdim=True) + layer.eps)
    x_hat = (xg - mean) * inv_sigma
    dx = inv_sigma * (gg - gg.mean(-1, keepdim=True) - x_hat * (gg * x_hat).mean(-1, keepdim=True))
    return dx.reshape(x.shape)


def batchnorm_scale(layer: nn.BatchNorm2d) -> Tensor:
    """(1, C, 1, 1) d output / d input of BatchNorm2d on its running statistics."""
    scale = torch.rsqrt(layer.running_var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    return scale.view(1, -1, 1, 1)


def vjp_constants(module: nn.Sequential) -> list[Any]:
    """What :func:`sequential_vjp` would recompute on every call and that depends on the
    weights only (BatchNorm's scale): compute it once before a loop of many vjps."""
    constants: list[Any] = []
    for layer in module:
        _check_layer(layer)
        if isinstance(layer, nn.Sequential):
            constants.append(vjp_constants(layer))
        elif isinstance(layer, nn.BatchNorm2d):
            constants.append(batchnorm_scale(layer))
        else:
            constants.append(None)
    return constants


def layer_vjp(layer: nn.Module, x: Tensor, y: Tensor, g: Tensor, constant: Any = None) -> Tensor:
    """(dy/dx)^T g for one layer with input x and output y (eval semantics).

    ``constant``: this layer's entry of :func:`vjp_constants` (None: computed here).
    """
    _check_layer(layer)
    if isinstance(layer, nn.Sequential):
        return sequential_vjp(layer, x, g, constants=constant)
    if isinstance(layer, nn.Conv2d):
        return F.conv_transpose2d(g, layer.weight, stride=layer.stride, padding=layer.padding,
                                  output_padding=_conv_output_padding(layer, x, g),
                                  dilation=layer.dilation)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv2d(g, layer.weight, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation)
    if isinstance(layer, nn.Linear):
        return g @ layer.weight
    if isinstance(layer, nn.BatchNorm2d):
        return g * (batchnorm_scale(layer) if constant is None else constant)
    if isinstance(layer, nn.GroupNorm):
        return _group_norm_vjp(layer, x, g)
    if isinstance(layer, nn.ReLU):
        return torch.where(x > 0, g, 0.0)
    if isinstance(layer, nn.LeakyReLU):
        return torch.where(x > 0, g, g * layer.negative_slope)
    if isinstance(layer, nn.Tanh):
        return g * (1.0 - y * y)
    if isinstance(layer, nn.Sigmoid):
        return g * y * (1.0 - y)
    if isinstance(layer, nn.Flatten):
        return g.reshape(x.shape)
    return g  # Identity


def sequential_vjp(module: nn.Sequential, x: Tensor, grad_out: Tensor, *,
                   activations: list[Tensor] | None = None,
                   constants: list[Any] | None = None) -> Tensor:
    """(d module(x) / dx)^T grad_out, in eval semantics, by explicit tensor ops (exportable).

    x: the input (B, ...); grad_out: shaped like ``module(x)``. ``activations``: the list
    :func:`sequential_forward` returned for this x, to skip running the layers again;
    ``constants``: :func:`vjp_constants` of ``module``, to compute them once for many calls
    (each one is a node of an exported graph: an unrolled loop repeats them otherwise).
    Returns a tensor shaped like x. Unsupported layers raise a ConfigError naming them.
    """
    if activations is None:
        _, activations = sequential_forward(module, x)
    layers = list(module)
    if len(activations) != len(layers) + 1:
        raise ConfigError(f"activations must hold {len(layers) + 1} tensors (the input and every "
                          f"layer's output); got {len(activations)}")
    if constants is None:
        constants = [None] * len(layers)
    g = grad_out
    for i in range(len(layers) - 1, -1, -1):
        g = layer_vjp(layers[i], activations[i], activations[i + 1], g, constants[i])
    return g
