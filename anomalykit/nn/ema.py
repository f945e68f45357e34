"""Exponential moving average of a network's weights (Polyak averaging), as diffusion models use.

:class:`ExponentialMovingAverage` holds a frozen copy of the network whose parameters are
turned into buffers: they are saved in the owner's checkpoint, move with ``.to(device)`` and
export as constants, yet no optimiser sees them and no "frozen parameter moved" check counts
them. After each optimiser step the owner calls :meth:`update` (from the training loop's
``on_after_optimizer_step`` hook)::

    decay_k = min(decay, (1 + k) / (10 + k))        (k = steps done, from 1)
    shadow  <- decay_k * shadow + (1 - decay_k) * weight

The warm-up factor (1 + k) / (10 + k) is diffusers' ``EMAModel`` default: early in training
the average follows the weights closely instead of staying near the random initialisation
for ~1 / (1 - decay) steps. Buffers of the network (none in a GroupNorm U-Net) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from anomalykit.errors import ConfigError


def _params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` (in place) into a buffer of the same name."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if param is None else param.detach().clone())
    return module


def ema_decay_at(step: int, decay: float, *, warmup: bool = True) -> float:
    """The decay used at optimiser step ``step`` (from 1): min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class ExponentialMovingAverage(nn.Module):
    """A frozen averaged copy of ``network``; ``self.module`` runs it.

    Args:
        network: the live network; copied at construction (the average starts at its weights).
        decay: the long-run decay in [0, 1) (0.999 in DDPM-style training; 0.99 for short runs).
        warmup: use min(decay, (1 + k) / (10 + k)) at step k (see the module docstring).
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = _params_to_buffers(copy.deepcopy(network)).requires_grad_(False)

    @torch.no_grad()
    def update(self, network: nn.Module, step: int) -> float:
        """Move the average towards ``network``'s current weights; returns the decay used."""
        decay = ema_decay_at(step, self.decay, warmup=self.warmup)
        shadow = dict(self.module.named_buffers())
        for name, param in network.named_parameters():
            shadow[name].lerp_(param.detach(), 1.0 - decay)
        for name, buffer in network.named_buffers():
            shadow[name].copy_(buffer)
        return decay

    @torch.no_grad()
    def copy_to(self, network: nn.Module) -> None:
        """Write the averaged weights into ``network`` (e.g. to fine-tune from them)."""
        shadow = dict(self.module.named_buffers())
        for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
            tensor.copy_(shadow[name])

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
