"""Errors that carry a one-line message naming the offending file or value.

The CLI prints ``str(error)`` for these and exits with status 2, so every message
must stand on its own without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class AnomalyKitError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class DataError(AnomalyKitError, ValueError):
    """Bad input data: missing folder, empty split, corrupt image, mask mismatch."""


class ConfigError(AnomalyKitError, ValueError):
    """Unknown detector, unknown config key, bad option value."""


class TrainingError(AnomalyKitError, RuntimeError):
    """Training cannot go on (a loss became NaN or infinite, a checkpoint is unusable)."""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """The one check for string options: a ConfigError (a ValueError) listing the choices.

    Lives here, below every layer (``nn/`` included), because string options appear at all
    of them (``Permutation(kind=...)``, ``UNet(upsample=...)``, detectors' options).
    """
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
