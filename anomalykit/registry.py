"""Registry of detectors and generative models (the timm pattern).

A class becomes visible to the CLI, the benchmark and the contract tests by one
decorator::

    @register_detector("ae")
    class AEDetector(Detector): ...

``create("ae", **kwargs)`` builds it; ``list_detectors()`` lists names. The
modules that hold registered classes are imported lazily on first lookup, so
``import anomalykit`` stays cheap and free of torch.
"""

from __future__ import annotations

import importlib
from typing import Literal

from anomalykit.errors import ConfigError

Kind = Literal["detector", "generative"]

_REGISTRY: dict[str, dict[str, type]] = {"detector": {}, "generative": {}}

# Modules whose import registers classes. Adding a detector = one file + one line here.
_MODULES = (
    "anomalykit.generative.ae",
    "anomalykit.generative.flows",
    "anomalykit.generative.pca",
    "anomalykit.generative.gmm",
    "anomalykit.detectors.pca",
    "anomalykit.generative.vae",
    "anomalykit.generative.vqvae",
    "anomalykit.generative.autoregressive",
    "anomalykit.detectors.pixelcnn",
    "anomalykit.generative.gan",
    "anomalykit.generative.gan_inverse",
    "anomalykit.generative.pix2pix",
    "anomalykit.generative.cyclegan",
    "anomalykit.generative.stargan",
    "anomalykit.generative.singan",
    "anomalykit.generative.stylegan",
    "anomalykit.generative.biggan",
    "anomalykit.generative.vqgan",
    "anomalykit.detectors.ae",
    "anomalykit.detectors.vae",
    "anomalykit.detectors.fastflow",
    "anomalykit.detectors.differnet",
    "anomalykit.detectors.riad",
    "anomalykit.detectors.draem",
    "anomalykit.detectors.anogan",
    "anomalykit.detectors.fanogan",
    "anomalykit.detectors.ganomaly",
    "anomalykit.detectors.patchcore",
    "anomalykit.detectors.padim",
    "anomalykit.generative.diffusion",
    "anomalykit.detectors.diffusion",
)
_loaded = False


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in _MODULES:
            importlib.import_module(module)
        _loaded = True  # only once every module imported: a failed import fails again, loudly


def _register(kind: Kind, name: str):
    def decorator(cls: type) -> type:
        table = _REGISTRY[kind]
        if name in table and table[name] is not cls:
            raise ConfigError(f"{kind} name {name!r} is registered twice "
                              f"({table[name].__name__}, {cls.__name__})")
        table[name] = cls
        cls.registry_name = name
        cls.registry_kind = kind
        return cls

    return decorator


def register_detector(name: str):
    """Class decorator: make a :class:`~anomalykit.base.Detector` creatable by ``name``."""
    return _register("detector", name)


def register_generative(name: str):
    """Class decorator: make a :class:`~anomalykit.base.GenerativeModel` creatable by ``name``."""
    return _register("generative", name)


def list_detectors() -> list[str]:
    _load_all()
    return sorted(_REGISTRY["detector"])


def list_generative() -> list[str]:
    _load_all()
    return sorted(_REGISTRY["generative"])


def get_class(name: str, kind: Kind = "detector") -> type:
    """The registered class for ``name``; unknown names list the known ones."""
    _load_all()
    table = _REGISTRY[kind]
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ConfigError(f"unknown {kind} {name!r}; known: {known}")
    return table[name]


def create(name: str, kind: Kind = "detector", **kwargs):
    """Build a registered detector (or generative model) from keyword arguments."""
    cls = get_class(name, kind)
    return cls(**kwargs)
