"""Export a trained detector to ONE self-contained ONNX file that takes raw camera frames.

The exported graph wraps the detector in :class:`InferenceWrapper`: it takes uint8 RGB
images (N, H, W, 3) of any size and returns the image score, the normalised score, the
label, the anomaly map at the input resolution and the binary pixel mask, so a line PC
only needs onnxruntime and numpy (see :mod:`anomalykit.export.runtime`).

Exporter choice: the ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``).
In torch 2.14 it is the default and the maintained path, and it is the one that works for
our detectors: the TorchScript exporter (``dynamo=False``, deprecated, announced for
removal) fails on ``ae_ssim`` with dynamic axes ("convolution for kernel of unknown
shape", from the reflect-padded depthwise Gaussian in ``anomalykit.nn.functional``).
The dynamo exporter also checks the dynamic dimensions: ``Dim("N")``, ``Dim("H")``,
``Dim("W")`` make the export *fail* if an op silently specialises one of them to the
example's size, instead of writing a model that only works at the traced resolution. It
keeps the names N, H, W in the ONNX signature, its output is byte-for-byte deterministic,
and it is quiet with ``verbose=False``. Its cost is time: about 2 s for a small model, but
it grows with the number of traced ops, so a detector that loops over tiles in Python
(one copy of the network per tile) exports far slower than one that batches its tiles.

Every export is checked by default: ``onnx.checker`` plus onnxruntime against the PyTorch
wrapper on random frames of two sizes different from the traced one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit import __version__
from anomalykit.errors import AnomalyKitError, ConfigError
from anomalykit.training.checkpoint import atomic_write, load_model

OUTPUT_NAMES = ("score", "normalized_score", "label", "anomaly_map", "pred_mask")
INPUT_NAME = "images"
INPUT_FORMAT = "uint8 NHWC RGB"

# Keys written by export_onnx; user metadata may not overwrite them.
RESERVED_KEYS = frozenset({
    "anomalykit_version", "detector", "config", "image_size", "threshold", "pixel_threshold",
    "score_min", "score_max", "calibrated", "outputs", "input_format", "input_name", "opset",
    "training", "threshold_rule", "target_fpr", "expected_fpr", "calibration",
})


class ExportError(AnomalyKitError, RuntimeError):
    """The exporter failed, or the exported model does not reproduce PyTorch."""


class InferenceWrapper(nn.Module):
    """Raw frames in, everything a line needs out.

    Input: ``images`` (N, H, W, 3) uint8 RGB; N, H and W are dynamic.
    Outputs, in this order (:data:`OUTPUT_NAMES`):

    - ``score`` (N,) float32: the detector's raw image score.
    - ``normalized_score`` (N,) float32 in [0, 1], 0.5 at the threshold.
    - ``label`` (N,) int64: 1 where ``score > threshold_``.
    - ``anomaly_map`` (N, 1, H, W) float32, upsampled back to the INPUT resolution.
    - ``pred_mask`` (N, 1, H, W) uint8: 1 where ``anomaly_map > pixel_threshold_``.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.image_size = int(detector.image_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        height, width = images.shape[1], images.shape[2]
        # (N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]; the detector normalises itself.
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        size = (self.image_size, self.image_size)
        # antialias=False: ONNX Resize (linear, half_pixel) is exactly this, so the line sees
        # the same pixels as training did when the data pipeline resizes the same way.
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        out = self.detector(x)
        score = out.score.to(torch.float32)
        anomaly_map = F.interpolate(out.anomaly_map.to(torch.float32), size=(height, width),
                                    mode="bilinear", align_corners=False)
        normalized = self.detector.normalized_score(score)
        label = (score > self.detector.threshold_).to(torch.int64)
        pred_mask = (anomaly_map > self.detector.pixel_threshold_).to(torch.uint8)
        return score, normalized, label, anomaly_map, pred_mask


def _as_float(detector: nn.Module, name: str) -> float:
    value = float(getattr(detector, name))
    if not math.isfinite(value):
        raise ConfigError(f"cannot export {type(detector).__name__}: {name} is {value}; "
                          "recalibrate the detector on good images first")
    return value


def _text(value: Any) -> str:
    """Metadata values are strings: keep strings, JSON-encode the rest."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _calibration_metadata(record: dict[str, Any]) -> dict[str, str]:
    """``threshold_rule``, ``target_fpr``, ``expected_fpr``, ``calibration`` from a detector's
    calibration record (``""`` where unknown: a model calibrated before records existed)."""
    def number(key: str) -> str:
        return repr(float(record[key])) if record.get(key) is not None else ""

    return {"threshold_rule": str(record.get("rule", "")), "target_fpr": number("target_fpr"),
            "expected_fpr": number("predicted_fpr"),
            "calibration": json.dumps(record, sort_keys=True)}


def build_metadata(detector: nn.Module, *, opset: int,
                   metadata: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported model (all strings, deterministic).

    Floats use ``repr`` so the runtime reads back exactly the float32 buffer values.
    """
    props = {
        "anomalykit_version": __version__,
        "detector": getattr(detector, "registry_name", "") or type(detector).__name__,
        "config": json.dumps(getattr(detector, "config", {}), sort_keys=True),
        "image_size": str(int(detector.image_size)),
        "threshold": repr(_as_float(detector, "threshold_")),
        "pixel_threshold": repr(_as_float(detector, "pixel_threshold_")),
        "score_min": repr(_as_float(detector, "score_min_")),
        "score_max": repr(_as_float(detector, "score_max_")),
        "calibrated": "true" if bool(getattr(detector, "calibrated_", False)) else "false",
        "outputs": json.dumps(list(OUTPUT_NAMES)),
        "input_name": INPUT_NAME,
        "input_format": INPUT_FORMAT,
        "opset": str(opset),
        "training": json.dumps(getattr(detector, "checkpoint_meta", None) or {}, sort_keys=True,
                               default=str),
        # What the line will experience: the threshold's rule, its target false-alarm rate on
        # good images (fpr rule; "" for the quantile rule), the rate the rule expects, and the
        # whole calibration record (tail model, parameters, number of good images) as JSON.
        **_calibration_metadata(getattr(detector, "calibration_record", None) or {}),
    }
    for key, value in (metadata or {}).items():
        if key in RESERVED_KEYS:
            raise ConfigError(f"metadata key {key!r} is reserved by the exporter")
        props[str(key)] = _text(value)
    return props


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence the exporter's prints and warnings; keep what it said for error messages."""
    buffer = io.StringIO()
    if verbose:
        yield buffer
        return
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), \
            contextlib.redirect_stderr(buffer):
        warnings.simplefilter("ignore")
        yield buffer


def _example(image_size: int, example_size: int | None) -> Tensor:
    """(2, H, W, 3) uint8 with N, H, W all different, so no dimension is tied to another."""
    height = int(example_size or image_size)
    if height < 2:
        raise ConfigError(f"example_size must be at least 2, got {height}")
    width = height + max(1, height // 4)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8, generator=generator)


def _to_onnx_proto(wrapper: InferenceWrapper, example: Tensor, opset: int, verbose: bool):
    dim = torch.export.Dim
    dynamic_shapes = {INPUT_NAME: {0: dim("N", min=1), 1: dim("H", min=1), 2: dim("W", min=1)}}
    with _quiet(verbose) as said:
        try:
            program = torch.onnx.export(
                wrapper, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes,
                opset_version=opset, external_data=False, verbose=verbose, optimize=True,
            )
        except Exception as exc:
            tail = said.getvalue().strip().splitlines()[-5:]
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(
                f"torch.onnx.export failed for {type(wrapper.detector).__name__}: "
                f"{type(exc).__name__}: {detail}" + ("\n" + "\n".join(tail) if tail else "")
            ) from exc
    return program.model_proto


def _session(path: str | os.PathLike):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _max_diffs(torch_out: tuple[Tensor, ...], onnx_out: list[np.ndarray]) -> dict[str, float]:
    diffs = {}
    for name, ref_tensor, got in zip(OUTPUT_NAMES, torch_out, onnx_out, strict=True):
        ref = ref_tensor.detach().cpu().numpy()
        if ref.shape != got.shape:
            raise ExportError(f"ONNX output {name} has shape {got.shape}, PyTorch {ref.shape}")
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        diffs[name] = float(diff.max()) if diff.size else 0.0
    return diffs


def _cpu_wrapper(detector: nn.Module) -> InferenceWrapper:
    # A float32 CPU copy: the export never moves or casts the caller's model.
    model = copy.deepcopy(detector).to(device="cpu", dtype=torch.float32).eval()
    return InferenceWrapper(model).eval()


def _parity(wrapper: InferenceWrapper, session, images: np.ndarray) -> tuple[dict, dict]:
    """Max abs diff per output, and the largest |PyTorch value| of score and map."""
    with torch.no_grad():
        ref = wrapper(torch.from_numpy(np.ascontiguousarray(images)))
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images)})
    scale = {"score": float(ref[0].abs().max()), "anomaly_map": float(ref[3].abs().max())}
    return _max_diffs(ref, got), scale


def compare_with_torch(detector: nn.Module, onnx_path: str | os.PathLike,
                       images_uint8: np.ndarray | Tensor) -> dict[str, float]:
    """Max abs difference per output between onnxruntime (CPU) and the PyTorch wrapper.

    images_uint8: (N, H, W, 3) or (H, W, 3) uint8 RGB. Returns ``{output name: diff}``;
    for ``label`` and ``pred_mask`` a diff of 1 means at least one decision flipped.
    """
    images = images_uint8.cpu().numpy() if isinstance(images_uint8, Tensor) else images_uint8
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    diffs, _ = _parity(_cpu_wrapper(detector), _session(onnx_path), images)
    return diffs


def _check(path: str, wrapper: InferenceWrapper, example: Tensor, tolerance: float) -> None:
    """onnx.checker + onnxruntime vs PyTorch at two sizes other than the traced one."""
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        raise ExportError(f"exported model fails onnx.checker: {exc}") from exc
    session = _session(path)
    _, height, width, _ = example.shape
    rng = np.random.default_rng(0)
    worst = {"score": (0.0, 0.0), "anomaly_map": (0.0, 0.0)}  # (diff, scale)
    for shape in [(3, height + 7, width - 1, 3), (1, max(2, height // 2), width + 5, 3)]:
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
        diffs, scale = _parity(wrapper, session, images)
        for name in worst:
            if diffs[name] >= worst[name][0]:
                worst[name] = (diffs[name], scale[name])
    # Absolute tolerance for values of order 1; relative for detectors whose raw scores are
    # large (distances in the hundreds), where float32 rounding alone exceeds 1e-4.
    bad = {name: (diff, tolerance * max(1.0, scale)) for name, (diff, scale) in worst.items()}
    if any(diff > bound for diff, bound in bad.values()):
        raise ExportError(
            "onnxruntime does not reproduce PyTorch: max abs diff "
            f"score {bad['score'][0]:.3g} (allowed {bad['score'][1]:.3g}), "
            f"anomaly_map {bad['anomaly_map'][0]:.3g} (allowed {bad['anomaly_map'][1]:.3g})"
        )


def export_onnx(detector: nn.Module, path: str | os.PathLike, *, opset: int = 18,
                example_size: int | None = None, metadata: dict[str, Any] | None = None,
                check: bool = True, tolerance: float | None = None, verbose: bool = False) -> Path:
    """Write ``detector`` wrapped in :class:`InferenceWrapper` to ONE ONNX file, atomically.

    detector: a :class:`~anomalykit.base.Detector` (any device/dtype; a float32 CPU copy is
        exported, the model itself is left untouched).
    example_size: height of the example frame used for tracing (default ``image_size``);
        the graph accepts any (N, H, W) anyway.
    metadata: extra ``metadata_props`` (non-string values are JSON-encoded).
    check: run ``onnx.checker`` and compare onnxruntime with PyTorch on random frames;
        raise :class:`ExportError` if score or map differ by more than ``tolerance``
        (times the output's magnitude when that exceeds 1; default: the detector's
        ``export_tolerance``, 1e-4 for all but AnoGAN). Nothing is written on failure.
    Returns the path written.
    """
    if not hasattr(detector, "image_size") or not hasattr(detector, "threshold_"):
        raise ConfigError(f"{type(detector).__name__} is not a Detector "
                          "(needs image_size and calibration buffers)")
    limit = getattr(detector, "export_tolerance", 1e-4) if tolerance is None else tolerance
    props = build_metadata(detector, opset=opset, metadata=metadata)
    if props["calibrated"] != "true":
        warnings.warn(f"exporting an uncalibrated {props['detector']} detector: label and "
                      "pred_mask use threshold 0; run detector.calibrate(good_images) first",
                      UserWarning, stacklevel=2)
    wrapper = _cpu_wrapper(detector)
    example = _example(wrapper.image_size, example_size)
    proto = _to_onnx_proto(wrapper, example, opset, verbose)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"anomalykit {__version__} {props['detector']} detector; input "
                        f"{INPUT_NAME} {INPUT_FORMAT} (N, H, W, 3); "
                        f"outputs {', '.join(OUTPUT_NAMES)}")
    if proto.ByteSize() >= 2**31 - 1:
        raise ExportError(f"{props['detector']} is larger than 2 GB, the limit of a "
                          "single-file ONNX model")

    def write(tmp: str) -> None:
        import onnx

        onnx.save_model(proto, tmp, save_as_external_data=False)
        # mkstemp creates 0600 files; a model is shipped to other users and containers.
        os.chmod(tmp, 0o644)
        if check:
            _check(tmp, wrapper, example, limit)

    return atomic_write(path, write)


def export_checkpoint(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike,
                      **kwargs: Any) -> Path:
    """Load a checkpoint (:func:`~anomalykit.training.checkpoint.load_model`) and export it.

    The checkpoint's ``meta`` (category, dataset, metrics...) lands under ``"training"``.
    ``kwargs`` go to :func:`export_onnx`.
    """
    model = load_model(checkpoint_path, map_location="cpu")
    return export_onnx(model, out_path, **kwargs)
