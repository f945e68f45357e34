"""Run configurations: YAML files whose keys mirror constructor and ``fit`` arguments.

A config has three sections::

    model:      # keyword arguments of the detector's constructor
      image_size: 64
    train:      # keyword arguments of anomalykit.training.fit, plus data options
      epochs: 30
      val_fraction: 0.1
    calibrate:  # keyword arguments of Detector.calibrate
      rule: fpr   # or quantile (with quantile: 1.0 = the highest good validation score)
      fpr: 0.01   # target false-alarm rate on good images
      tail: gpd   # tail model of the good scores: gpd, gaussian, lognormal

Named profiles are ``<detector>/<name>.yaml`` files: first in the directories of
``$ANOMALYKIT_CONFIGS`` (user profiles; several directories separated by ``os.pathsep``),
then in the ``anomalykit/configs/`` package data (``quick`` and ``paper``, shipped in the
wheel and read with :mod:`importlib.resources`). Any YAML path works too.
``--set section.key=value`` (or ``key=value`` when the key is in one section only)
overrides a value; values are parsed as YAML (``3``, ``1e-3``, ``true``, ``[1, 2]``).
"""

from __future__ import annotations

import copy
import inspect
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from anomalykit.errors import ConfigError

if TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11; only annotations use it
    from importlib.resources.abc import Traversable

SECTIONS = ("model", "train", "calibrate")
# Options of the data pipeline that live in the `train` section next to fit's arguments.
# The data layer's options in a profile's train section (AnomalyDataset's cache_bytes/cache_dir:
# the decode-once cache's memory budget, and a folder to keep resized copies across runs).
DATA_OPTIONS = {"val_fraction": 0.1, "augment": False, "cache_bytes": 2**30, "cache_dir": None}
# fit() arguments that are per-run choices (command-line options), never part of a profile.
RUN_OPTIONS = {"out_dir": "--out", "resume": "--resume", "progress": "--quiet",
               "epoch_callback": "--track"}
# Directories of user profiles, searched before the packaged ones.
CONFIGS_ENV = "ANOMALYKIT_CONFIGS"


def configs_dir() -> Traversable:
    """The profiles shipped inside the package (``anomalykit/configs/``)."""
    return resources.files("anomalykit") / "configs"


def profile_dirs() -> list[Traversable]:
    """Where named profiles are searched, in order: $ANOMALYKIT_CONFIGS, then the package's."""
    env = os.environ.get(CONFIGS_ENV, "")
    user = [Path(part).expanduser() for part in env.split(os.pathsep) if part.strip()]
    return [*user, configs_dir()]


def find_profile(detector: str, name: str) -> Traversable | None:
    """The first ``<dir>/<detector>/<name>.yaml`` of :func:`profile_dirs`, or None."""
    for folder in profile_dirs():
        candidate = folder / detector / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def available_profiles(detector: str) -> list[str]:
    """Profile names for ``detector`` over every searched directory."""
    names: set[str] = set()
    for folder in profile_dirs():
        sub = folder / detector
        if sub.is_dir():
            names |= {p.name[: -len(".yaml")] for p in sub.iterdir()
                      if p.name.endswith(".yaml") and p.is_file()}
    return sorted(names)


def _allowed_keys(detector: str) -> dict[str, set[str] | None]:
    from anomalykit.base import Detector
    from anomalykit.registry import get_class
    from anomalykit.training import fit

    cls = get_class(detector)

    def params(fn) -> set[str] | None:
        sig = inspect.signature(fn)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            return None  # accepts anything
        return {n for n in sig.parameters if n not in ("self", "args")}

    def init_params(klass) -> set[str] | None:
        """Constructor keywords; a ``**kwargs`` that is passed up to a base adds the base's."""
        names: set[str] = set()
        for base in klass.__mro__:
            if base is Detector or "__init__" not in base.__dict__:
                continue
            sig = inspect.signature(base.__init__)
            names |= {n for n, p in sig.parameters.items() if n != "self"
                      and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
                return names
        return None

    train = params(fit) - {"model", "train_data", "val_data", *RUN_OPTIONS}  # type: ignore[operator]
    train |= set(DATA_OPTIONS)
    calibrate = params(Detector.calibrate) - {"good_data"}  # type: ignore[operator]
    return {"model": init_params(cls), "train": train, "calibrate": calibrate}


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from exc
    return key.strip(), value


def load_config(detector: str, config: str | Path = "quick",
                overrides: list[str] | dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Read a profile name or YAML file, apply overrides, check every key.

    Unknown keys are an error that lists the valid ones, so a typo never trains
    silently with a default.
    """
    path: Path | Traversable = Path(config)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        found = find_profile(detector, str(config))
        if found is None:
            known = ", ".join(available_profiles(detector)) or "none"
            raise ConfigError(f"no config {config!r} for detector {detector!r} "
                              f"(profiles: {known}; or give a YAML file path)")
        path = found
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping with sections {SECTIONS}")
    extra = set(raw) - set(SECTIONS) - {"tracking"}  # tracking: see anomalykit.tracking
    if extra:
        raise ConfigError(f"config file {path}: unknown section(s) {sorted(extra)}; "
                          f"expected {list(SECTIONS)}")
    cfg = {s: copy.deepcopy(raw.get(s) or {}) for s in SECTIONS}
    allowed = _allowed_keys(detector)

    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"--set {key}: unknown section {section!r}; expected {list(SECTIONS)}")
        else:
            hits = [s for s in SECTIONS if allowed[s] is not None and key in allowed[s]]
            if not hits:
                valid = sorted(set().union(*(k for k in allowed.values() if k)))
                raise ConfigError(f"--set {key}: unknown option {key!r}; valid: {', '.join(valid)}")
            if len(hits) > 1:
                raise ConfigError(f"--set {key}: {key!r} is in sections {', '.join(hits)}; "
                                  f"write section.{key}")
            section, name = hits[0], key
        cfg[section][name] = value

    for section in SECTIONS:
        keys = allowed[section]
        if keys is None:
            continue
        unknown = set(cfg[section]) - keys
        run_keys = sorted(unknown & set(RUN_OPTIONS)) if section == "train" else []
        if run_keys:
            raise ConfigError(f"train.{run_keys[0]} cannot be set in a config; use the command-line "
                              f"option {RUN_OPTIONS[run_keys[0]]}")
        if unknown:
            raise ConfigError(f"{section} option(s) {sorted(unknown)} not accepted by {detector!r}; "
                              f"valid: {', '.join(sorted(keys))}")
    check_calibrate_section(cfg["calibrate"])
    cfg["source"] = str(path)  # type: ignore[assignment]
    cfg["tracking"] = dict(raw.get("tracking") or {})  # checked by anomalykit.tracking
    return cfg


# The calibrate keys that choose the image threshold (anomalykit.metrics.threshold).
THRESHOLD_KEYS = ("rule", "quantile", "margin", "fpr", "tail")


def check_calibrate_section(section: dict[str, Any]) -> None:
    """ConfigError naming the value for a bad threshold rule, rate or tail model, at load time
    (before any training), by running the rule on one dummy score."""
    from anomalykit.metrics.threshold import calibrate_threshold

    calibrate_threshold([0.0], **{k: section[k] for k in THRESHOLD_KEYS if k in section})
