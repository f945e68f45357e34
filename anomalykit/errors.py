"""Errors that carry a one-line message naming the offending file or value.

The CLI prints ``str(error)`` for these and exits with status 2, so every message
must stand on its own without a traceback.
"""


class AnomalyKitError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class DataError(AnomalyKitError, ValueError):
    """Bad input data: missing folder, empty split, corrupt image, mask mismatch."""


class ConfigError(AnomalyKitError, ValueError):
    """Unknown detector, unknown config key, bad option value."""


class TrainingError(AnomalyKitError, RuntimeError):
    """Training cannot go on (a loss became NaN or infinite, a checkpoint is unusable)."""
