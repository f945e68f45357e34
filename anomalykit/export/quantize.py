"""INT8 models for CPUs on the line: onnxruntime static quantisation, guarded by AUROC.

:func:`quantize_onnx` takes an exported anomalykit model (FP32, from
:func:`anomalykit.export.export_onnx`) and writes an INT8 copy that
:class:`~anomalykit.export.runtime.OnnxDetector` loads like any other export::

    result = quantize_onnx("tile.onnx", "tile_int8.onnx", "data/tile/train/good",
                           check="data/tile")     # MVTec-layout category: test/, ground_truth/
    result.auroc, result.speedup

How:

- Calibration: up to ``max_images`` good images of the ``calibration`` folder (evenly
  spaced in name order, so the same folder always gives the same set), decoded with the
  toolkit's one decoder, resized to the model's ``image_size`` as training does and fed as
  uint8 (1, S, S, 3) frames, exactly what the line feeds. MinMax ranges by default
  (``calibrate_method``: percentile, entropy).
- Only the network's heavy ops (:data:`DEFAULT_OP_TYPES`: Conv, ConvTranspose, MatMul,
  Gemm, inside the detector's child modules: :func:`network_nodes`) are quantised, in QDQ
  format, weights per channel: the resize and normalisation in front, the detector's own
  scoring arithmetic (distances, map smoothing) and the map upsampling, score normalisation
  and thresholds behind stay float, so ``threshold``/``pixel_threshold`` keep their
  meaning. Activations uint8, weights int8 (what onnxruntime's x86 kernels are fastest with).
- The guard. Without defective images nobody can tell whether INT8 still separates good
  from bad, so: (a) FP32 and INT8 are always compared on the calibration images (largest
  change of ``normalized_score``, label flips); (b) with a labelled ``check`` set, image and
  pixel AUROC of both are measured and the INT8 model is REFUSED (:class:`QuantizationRefused`,
  nothing written) when either drops by more than ``max_auroc_drop``, unless ``force=True``
  (written, a loud warning, the drop recorded in the metadata). Without a check set a
  warning says the drop was not measured.
- The output keeps every anomalykit metadata key and adds ``quantization`` (JSON: method,
  calibration folder, image count, onnxruntime version, the guard's numbers). Written
  atomically, after every check passed.

Measured on magnetic_tile (``benchmarks/results/int8_magnetic_tile/``, quick profiles, a
shared 2-core AVX-512 VNNI machine): RIAD and AE stay within 0.01 AUROC (RIAD x1.2 at one
thread); PaDiM, PatchCore, FastFlow, DRAEM and DifferNet lose 0.02-0.38 and are refused.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalykit.atomic import atomic_write
from anomalykit.errors import AnomalyKitError, ConfigError, DataError, check_choice

__all__ = ["CALIBRATION_METHODS", "DEFAULT_OP_TYPES", "METHODS", "QuantizationError",
           "QuantizationRefused", "QuantizeResult", "calibration_frames", "evaluate_onnx",
           "network_nodes", "quantize_checkpoint", "quantize_onnx", "result_summary",
           "summary_lines"]

METHODS = ("int8",)
#: Activation range estimators: MinMax (the whole range seen), Percentile (clips the top
#: 0.01 % of values: finer steps for the bulk of them), Entropy (KL-divergence optimal).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
SCOPES = ("network", "all")
#: The ops that hold the arithmetic of a network; everything else stays float.
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
DEFAULT_MAX_IMAGES = 64


class QuantizationError(AnomalyKitError, RuntimeError):
    """onnxruntime could not quantise the model, or the INT8 model does not run."""


class QuantizationRefused(AnomalyKitError, ValueError):
    """The INT8 model loses more AUROC than allowed; nothing was written.

    ``result`` holds the measurements (:class:`QuantizeResult`, ``path`` None).
    """

    def __init__(self, message: str, result: QuantizeResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class QuantizeResult:
    """What :func:`quantize_onnx` measured and wrote.

    Attributes:
        path: The INT8 file written (None when refused).
        source: The FP32 model.
        method: ``"int8"``.
        calibration: The calibration folder; ``n_calibration`` images were used.
        calibration_diff: INT8 vs FP32 on the calibration frames: ``max_abs_normalized_score``,
            ``mean_abs_normalized_score``, ``max_abs_score_over_threshold`` (largest raw score
            change / threshold), ``label_flips`` (count), ``n_images``.
        auroc: With a check set: ``{"fp32": {"image_auroc", "pixel_auroc"}, "int8": {...},
            "drop": {...}}`` (drop = FP32 - INT8; positive = INT8 worse); else None.
        ms_fp32, ms_int8: Median ms per frame at batch 1 on the calibration frames, the two
            models taking turns in blocks (same run, same ``threads``); NaN when not timed.
        speedup: ``ms_fp32 / ms_int8`` (> 1: INT8 faster).
        threads: onnxruntime intra-op threads used for the comparison and the timing.
        forced: Written despite an AUROC drop above the limit.
        warnings: What the user was warned about.
    """

    path: Path | None
    source: Path
    method: str
    calibration: Path
    n_calibration: int
    calibration_diff: dict[str, float]
    auroc: dict[str, dict[str, float]] | None
    ms_fp32: float
    ms_int8: float
    speedup: float
    threads: int
    forced: bool = False
    warnings: list[str] = field(default_factory=list)


# -- calibration data ------------------------------------------------------------------------


def calibration_frames(folder: str | os.PathLike[str], image_size: int, *,
                       max_images: int = DEFAULT_MAX_IMAGES) -> tuple[np.ndarray, list[Path]]:
    """Good images of ``folder`` as model-size frames: ((K, S, S, 3) uint8 RGB, their paths).

    K = min(``max_images``, images in the folder), evenly spaced in natural name order
    (deterministic: no seed involved). Not searched recursively. Each image is decoded with
    :func:`~anomalykit.export.runtime.decode_image` and resized bilinearly, as training does.

    Raises:
        DataError: the folder is missing, not a folder, holds no images, or one of the chosen
            images cannot be decoded; the message names the folder or the file.
    """
    from anomalykit.data.io import IMAGE_EXTENSIONS, read_image
    from anomalykit.data.records import list_images
    from anomalykit.data.transforms import resize_image

    if max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    root = Path(folder)
    if not root.exists():
        raise DataError(f"calibration folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"calibration folder {root} is not a folder")
    paths = list_images(root)
    if not paths:
        raise DataError(f"calibration folder {root} holds no images (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)} directly inside it, not in subfolders)")
    keep = np.unique(np.linspace(0, len(paths) - 1, min(max_images, len(paths))).round())
    chosen = [paths[int(i)] for i in keep]
    frames = np.empty((len(chosen), image_size, image_size, 3), dtype=np.uint8)
    for row, path in enumerate(chosen):
        try:
            frames[row] = resize_image(read_image(path), image_size)
        except DataError as exc:
            raise DataError(f"calibration folder {root}: {exc}") from None
    return frames, chosen


class _FrameReader:
    """onnxruntime's CalibrationDataReader protocol over (K, S, S, 3) frames, one at a time.

    ``__len__`` and ``set_range`` let the calibrator reduce the ranges chunk by chunk
    (``CalibStridedMinMax``); otherwise it keeps every intermediate tensor of every frame
    until the end (GBs for a backbone at 256 px).
    """

    def __init__(self, input_name: str, frames: np.ndarray) -> None:
        self.input_name = input_name
        self.frames = frames
        self.position, self.end = 0, len(frames)

    def __len__(self) -> int:
        return len(self.frames)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.frames))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        frame = self.frames[self.position:self.position + 1]
        self.position += 1
        return {self.input_name: np.ascontiguousarray(frame)}

    def rewind(self) -> None:
        self.position, self.end = 0, len(self.frames)


def _stride(count: int, largest: int = 8) -> int:
    """The largest chunk size <= ``largest`` that divides ``count`` (the calibrator's rule)."""
    return max(d for d in range(1, largest + 1) if count % d == 0)


# -- evaluation ------------------------------------------------------------------------------


def _predict_all(detector: Any, frames: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """``detector.predict`` over (K, S, S, 3) frames in batches; outputs concatenated."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(frames), batch_size):
        for name, value in detector.predict(frames[start:start + batch_size]).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _calibration_diff(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray],
                      threshold: float) -> dict[str, float]:
    delta = np.abs(fp32["normalized_score"].astype(np.float64)
                   - int8["normalized_score"].astype(np.float64))
    # normalized_score is clipped to [0, 1]; the raw score change, relative to the
    # threshold, also shows changes among clearly good (or clearly bad) images.
    score_delta = np.abs(fp32["score"].astype(np.float64) - int8["score"].astype(np.float64))
    return {
        "n_images": int(len(delta)),
        "max_abs_score_over_threshold": float(score_delta.max() / max(abs(threshold), 1e-12)),
        "max_abs_normalized_score": float(delta.max()),
        "mean_abs_normalized_score": float(delta.mean()),
        "label_flips": int((fp32["label"] != int8["label"]).sum()),
    }


def evaluate_onnx(detectors: Sequence[Any], check: str | os.PathLike[str], *,
                  batch_size: int = 8) -> list[dict[str, float]]:
    """Image and pixel AUROC of each ONNX model on an MVTec-layout category's test split.

    detectors: :class:`~anomalykit.export.runtime.OnnxDetector` objects of one image size.
    check: the category folder (``test/good``, ``test/<defect>``, ``ground_truth/<defect>``).
    Every test image is decoded once, resized to the models' ``image_size`` as training does,
    and given to every model (the maps are compared with the masks at that size, nearest
    resize, as :func:`anomalykit.pipeline.evaluate_detector` does). Defects without a mask
    are left out of the pixel AUROC; NaN when no defect has one.
    Returns one ``{"image_auroc", "pixel_auroc", "n_test"}`` per model, in order.
    """
    from anomalykit.data import scan_mvtec
    from anomalykit.data.io import read_image, read_mask
    from anomalykit.data.transforms import resize_image, resize_mask
    from anomalykit.metrics import image_auroc, pixel_auroc

    folder = Path(check)
    if not (folder / "test").is_dir():
        raise DataError(f"check set {folder} has no test/ folder; expected an MVTec-layout "
                        "category (test/good, test/<defect>, ground_truth/<defect>)")
    records = scan_mvtec(folder.parent, folder.name, "test")
    size = int(detectors[0].image_size)
    labels = np.array([r.label for r in records], dtype=np.int64)
    pixel_rows = [i for i, r in enumerate(records) if r.label == 0 or r.mask_path is not None]
    has_masks = any(r.label == 1 and r.mask_path is not None for r in records)
    masks = np.zeros((len(pixel_rows), size, size), dtype=np.uint8)
    scores = [np.empty(len(records), dtype=np.float64) for _ in detectors]
    maps = [np.empty((len(pixel_rows), size, size), dtype=np.float32) for _ in detectors]
    pixel_slot = {row: slot for slot, row in enumerate(pixel_rows)}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        frames = np.stack([resize_image(read_image(r.path), size) for r in chunk])
        for k, detector in enumerate(detectors):
            out = detector.predict(frames)
            for j in range(len(chunk)):
                scores[k][start + j] = out["score"][j]
                if start + j in pixel_slot:
                    maps[k][pixel_slot[start + j]] = out["anomaly_map"][j, 0]
        for j, record in enumerate(chunk):
            if record.mask_path is not None and start + j in pixel_slot:
                mask = resize_mask(read_mask(record.mask_path), size)
                masks[pixel_slot[start + j]] = mask > 0
    results = []
    for k in range(len(detectors)):
        results.append({
            "image_auroc": float(image_auroc(labels, scores[k])),
            "pixel_auroc": float(pixel_auroc(masks, maps[k])) if has_masks else math.nan,
            "n_test": len(records),
        })
    return results


def _auroc_drops(fp32: dict[str, float], int8: dict[str, float]) -> dict[str, float]:
    return {key: fp32[key] - int8[key] for key in ("image_auroc", "pixel_auroc")}


def _too_large(drops: dict[str, float], limit: float) -> dict[str, float]:
    """The drops over ``limit`` (NaN drops, i.e. unmeasurable metrics, never count)."""
    return {key: value for key, value in drops.items() if math.isfinite(value) and value > limit}


# -- quantisation ----------------------------------------------------------------------------


def _preprocess(source: Path, out: Path) -> tuple[Path, str]:
    """onnxruntime's ``quant_pre_process`` (shape inference + graph optimisation), which the
    quantiser wants; falls back to the model as it is when symbolic shape inference cannot
    follow the dynamic N/H/W dimensions. Returns (model to quantise, what happened)."""
    from onnxruntime.quantization import quant_pre_process

    source, out = source.resolve(), out.resolve()
    # Symbolic shape inference writes scratch files (sym_shape_infer_temp.onnx and a
    # <uuid>.data) into the current folder and leaves them there when it fails: run it in
    # the scratch folder of ``out``.
    with contextlib.chdir(out.parent):
        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=False)
            return out, "quant_pre_process"
        except Exception as exc:  # noqa: BLE001 - any failure here only costs some speed
            try:
                quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
                return out, f"quant_pre_process without symbolic shapes ({type(exc).__name__})"
            except Exception as exc2:  # noqa: BLE001
                return source, f"none ({type(exc2).__name__} in quant_pre_process)"


SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def _scope_list(value: str) -> list[str]:
    """The exporter writes the scope list as a Python literal (``['', 'detector']``)."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return [value]
    return [str(v) for v in parsed] if isinstance(parsed, (list, tuple)) else [str(parsed)]


def network_nodes(model: Any, op_types: Sequence[str],
                  module: str = "detector.") -> list[str] | None:
    """Names of the ``op_types`` nodes that belong to a network inside the detector.

    The exporter records each node's module path (``SCOPE_KEY``: ``['', 'detector',
    'detector.backbone', ...]``). Ops inside a child module of the detector (backbone,
    encoder, decoder, flow, ...) are the network; ops the detector's own ``forward`` calls
    directly are its scoring arithmetic (Mahalanobis or kNN distances, Gaussian smoothing
    of the map): they stay float, because 8 bits are too coarse for a difference of large
    numbers (PaDiM on magnetic_tile lost 0.1 image AUROC with its Mahalanobis MatMul in
    INT8, 0.04 without). ``module``: a module path prefix; the default takes every child
    module, ``"detector.backbone"`` only the backbone. None when the model carries no scope
    information (then: every node of the types).
    """
    names, scoped = [], False
    for node in model.graph.node:
        scopes = next((_scope_list(p.value) for p in node.metadata_props if p.key == SCOPE_KEY),
                      None)
        scoped = scoped or scopes is not None
        if node.op_type in op_types and scopes and any(s.startswith(module) for s in scopes):
            names.append(node.name)
    return names if scoped else None


def _quantize_file(source: Path, out: Path, frames: np.ndarray, input_name: str, *,
                   op_types: Sequence[str], per_channel: bool,
                   nodes_to_exclude: Sequence[str], scope: str,
                   calibrate_method: str) -> tuple[str, int]:
    """Static QDQ quantisation of ``source`` into ``out``.

    Returns (the pre-processing used, the number of nodes selected for quantisation).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    prepared, how = _preprocess(source, out.with_name(out.stem + "_prep.onnx"))
    prepared_names = {n.name: n.op_type for n in
                      onnx.load(str(prepared), load_external_data=False).graph.node}
    nodes = None
    if scope != "all":
        # Scopes are read from the exported file (pre-processing drops node metadata but
        # keeps node names); a node it fused away under a new name stays float.
        module = "detector." if scope == "network" else scope
        nodes = network_nodes(onnx.load(str(source), load_external_data=False), op_types,
                              module)
        if nodes is not None:
            nodes = [name for name in nodes if name in prepared_names]
            if not nodes:
                raise ConfigError(f"{source} has no {', '.join(op_types)} node inside "
                                  f"{'a network module' if scope == 'network' else scope} to "
                                  "quantise (try scope='all')")
    selected = nodes if nodes is not None else [
        name for name, op in prepared_names.items() if op in op_types]
    selected = [name for name in selected if name not in set(nodes_to_exclude)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _quantize_static(
                str(prepared), str(out), _FrameReader(input_name, frames),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                per_channel=per_channel, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=list(nodes_to_exclude),
                nodes_to_quantize=nodes,
                calibrate_method=methods[calibrate_method],
                calibration_providers=["CPUExecutionProvider"],
                # Ranges (or histograms) are reduced chunk by chunk: without this the
                # calibrator keeps every intermediate tensor of every frame (GBs for a
                # backbone at 256 px). The option's name says MinMax; the chunking is generic.
                extra_options={"CalibStridedMinMax": _stride(len(frames)),
                               "CalibPercentile": 99.99},
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types here
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise QuantizationError(f"onnxruntime could not quantise {source}: "
                                    f"{type(exc).__name__}: {first}") from exc
    return how, len(selected)


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(path))


def _count_quantized(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type in ("QuantizeLinear", "DequantizeLinear") or
               node.op_type.startswith("QLinear") for node in graph.node)


def _time_pair(fp32: Any, int8: Any, frames: np.ndarray, repeats: int) -> tuple[float, float]:
    """Median ms per frame at batch 1, the two models taking turns (one run, same load)."""
    from anomalykit.benchmark.timing import median_ms

    def cycling(detector: Any):
        position = [0]

        def predict(_: np.ndarray) -> Any:
            frame = frames[position[0] % len(frames)][None]
            position[0] += 1
            return detector.predict(frame)

        return predict

    ms = median_ms([cycling(fp32), cycling(int8)], frames[:1], warmup=3, repeats=repeats)
    return ms[0], ms[1]


def quantize_onnx(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  calibration: str | os.PathLike[str], *, method: str = "int8",
                  check: str | os.PathLike[str] | None = None, max_auroc_drop: float = 0.01,
                  force: bool = False, max_images: int = DEFAULT_MAX_IMAGES,
                  op_types: Sequence[str] = DEFAULT_OP_TYPES, per_channel: bool = True,
                  nodes_to_exclude: Sequence[str] = (), scope: str = "network",
                  calibrate_method: str = "minmax", threads: int = 1,
                  time_repeats: int = 30) -> QuantizeResult:
    """Quantise an exported anomalykit model to INT8, calibrated on good images.

    Args:
        model_path: FP32 ``.onnx`` written by :func:`~anomalykit.export.export_onnx`.
        out_path: The INT8 ``.onnx`` to write (atomically; nothing on failure or refusal).
        calibration: Folder of good images (not the test set), read directly inside it.
        method: ``"int8"`` (static QDQ, activations uint8, weights int8).
        check: Optional MVTec-layout category folder with ``test/`` and ``ground_truth/``:
            image and pixel AUROC of both models are measured on its test split.
        max_auroc_drop: Refuse when image or pixel AUROC falls by more than this.
        force: Write even when the drop is larger (warns; the drop goes into the metadata).
        max_images: At most this many calibration images (evenly spaced).
        op_types: Op types to quantise (default: :data:`DEFAULT_OP_TYPES`).
        per_channel: Per-output-channel weight scales (better accuracy for convolutions).
        nodes_to_exclude: Node names to keep float in addition.
        scope: ``"network"``: only the ``op_types`` nodes inside the detector's child modules
            (:func:`network_nodes`; the scoring arithmetic stays float); ``"all"``: every
            node of those types; a module path such as ``"detector.backbone"``: only the
            nodes inside it (e.g. a flow or a memory-bank search kept float).
        calibrate_method: How activation ranges are estimated (:data:`CALIBRATION_METHODS`).
        threads: onnxruntime intra-op threads for the comparison and the timing.
        time_repeats: Timed calls per model for the speed-up (0: not timed).

    Returns:
        :class:`QuantizeResult`.

    Raises:
        DataError: bad calibration folder or check set (names it).
        ConfigError: bad option, or ``model_path`` is not an anomalykit export.
        QuantizationRefused: AUROC dropped by more than ``max_auroc_drop`` and not ``force``.
        QuantizationError: onnxruntime failed to quantise the graph or to load the result.
    """
    import onnx
    import onnxruntime

    from anomalykit.export.runtime import OnnxDetector

    if method not in METHODS:
        raise ConfigError(f"quantization method must be one of {', '.join(METHODS)}; got {method!r}")
    if not math.isfinite(max_auroc_drop):
        raise ConfigError(f"max_auroc_drop must be a finite number, got {max_auroc_drop}")
    if scope not in SCOPES and not scope.startswith("detector."):
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)} or a module path "
                          f"starting with 'detector.' (e.g. detector.backbone); got {scope!r}")
    check_choice("calibrate_method", calibrate_method, CALIBRATION_METHODS)
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    source, out = Path(model_path), Path(out_path)
    if source.resolve() == out.resolve():
        raise ConfigError(f"the INT8 model would overwrite its source {source}; choose "
                          "another output path")
    try:
        fp32 = OnnxDetector(source, device="cpu", threads=threads)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if check is not None and not (Path(check) / "test").is_dir():
        raise DataError(f"check set {check} has no test/ folder; expected an MVTec-layout "
                        "category (test/good, test/<defect>, ground_truth/<defect>)")
    frames, paths = calibration_frames(calibration, fp32.image_size, max_images=max_images)
    raw_props = dict(fp32.session.get_modelmeta().custom_metadata_map)
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="anomalykit-quantize-") as tmp:
        staged = Path(tmp) / "int8.onnx"
        preprocessing, n_nodes = _quantize_file(source, staged, frames, fp32.input_name,
                                                op_types=op_types, per_channel=per_channel,
                                                nodes_to_exclude=nodes_to_exclude, scope=scope,
                                                calibrate_method=calibrate_method)
        record: dict[str, Any] = {
            "method": method, "format": "QDQ", "activations": "uint8", "weights": "int8",
            "per_channel": per_channel, "op_types": list(op_types), "scope": scope,
            "calibration": str(Path(calibration).resolve()), "calibration_images": len(paths),
            "calibration_method": calibrate_method, "preprocessing": preprocessing,
            "quantized_nodes": n_nodes,
            "onnxruntime_version": onnxruntime.__version__,
        }
        _set_metadata(staged, {**raw_props, "quantization": json.dumps(record, sort_keys=True)})
        if _count_quantized(staged) == 0:
            raise ConfigError(f"{source} has no {', '.join(op_types)} node to quantise")
        try:
            int8 = OnnxDetector(staged, device="cpu", threads=threads)
        except ValueError as exc:
            raise QuantizationError(f"the INT8 model of {source} does not load in onnxruntime: "
                                    f"{exc}") from exc

        diff = _calibration_diff(_predict_all(fp32, frames), _predict_all(int8, frames),
                                 fp32.threshold)
        if diff["label_flips"]:
            notes.append(f"INT8 and FP32 disagree on {diff['label_flips']} of {diff['n_images']} "
                         "calibration image label(s)")
        auroc = None
        forced = False
        if check is not None:
            fp32_metrics, int8_metrics = evaluate_onnx([fp32, int8], check)
            drops = _auroc_drops(fp32_metrics, int8_metrics)
            auroc = {"fp32": fp32_metrics, "int8": int8_metrics, "drop": drops}
            over = _too_large(drops, max_auroc_drop)
            if over:
                what = ", ".join(f"{key.replace('_', ' ')} {fp32_metrics[key]:.4f} -> "
                                 f"{int8_metrics[key]:.4f} ({-value:+.4f})"
                                 for key, value in over.items())
                if not force:
                    refused = QuantizeResult(None, source, method, Path(calibration), len(paths),
                                             diff, auroc, math.nan, math.nan, math.nan, threads,
                                             warnings=notes)
                    raise QuantizationRefused(
                        f"INT8 model refused: {what} on {check} exceeds max_auroc_drop="
                        f"{max_auroc_drop}; nothing written to {out} (force=True / --force "
                        "writes it anyway)", refused)
                forced = True
                notes.append(f"WRITTEN DESPITE AN AUROC DROP ABOVE {max_auroc_drop}: {what} "
                             f"on {check} (forced)")
        else:
            notes.append("the AUROC drop was not measured (no check set with defects given); "
                         "pass check=<MVTec category folder> (--check) to measure and guard it")

        ms_fp32 = ms_int8 = math.nan
        if time_repeats > 0:
            ms_fp32, ms_int8 = _time_pair(fp32, int8, frames, time_repeats)
        speedup = ms_fp32 / ms_int8 if ms_int8 > 0 else math.nan

        record.update({
            "calibration_diff": diff,
            "check": str(Path(check).resolve()) if check is not None else None,
            "auroc": auroc, "max_auroc_drop": max_auroc_drop, "forced": forced,
        })
        _set_metadata(staged, {**raw_props, "quantization": json.dumps(record, sort_keys=True,
                                                                       default=float)})
        onnx.checker.check_model(str(staged))
        OnnxDetector(staged, device="cpu")  # the file as written loads

        def write(tmp_path: str) -> None:
            with open(staged, "rb") as src, open(tmp_path, "wb") as dst:
                dst.write(src.read())

        written = atomic_write(out, write)

    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return QuantizeResult(written, source, method, Path(calibration), len(paths), diff, auroc,
                          ms_fp32, ms_int8, speedup, threads, forced, notes)


def quantize_checkpoint(checkpoint: str | os.PathLike[str], out_path: str | os.PathLike[str],
                        calibration: str | os.PathLike[str], *,
                        fp32_path: str | os.PathLike[str] | None = None, opset: int = 18,
                        **kwargs: Any) -> QuantizeResult:
    """Export a checkpoint (FP32, checked against PyTorch) and quantise it in one step.

    The FP32 model goes to ``fp32_path`` when given (kept), else to a temporary folder.
    ``kwargs`` go to :func:`quantize_onnx` (check, max_auroc_drop, force, ...).
    """
    from anomalykit.export.onnx import export_checkpoint

    if fp32_path is not None:
        export_checkpoint(checkpoint, fp32_path, opset=opset)
        return quantize_onnx(fp32_path, out_path, calibration, **kwargs)
    with tempfile.TemporaryDirectory(prefix="anomalykit-export-") as tmp:
        fp32 = export_checkpoint(checkpoint, Path(tmp) / "fp32.onnx", opset=opset)
        result = quantize_onnx(fp32, out_path, calibration, **kwargs)
    result.source = Path(checkpoint)
    return result


def summary_lines(result: QuantizeResult) -> list[str]:
    """Plain-text lines describing a result, for the command line."""
    diff = result.calibration_diff
    lines = [f"INT8 model: {result.path}" if result.path else "INT8 model: not written",
             f"calibration: {result.n_calibration} image(s) from {result.calibration}; INT8 vs "
             f"FP32 there: max |d normalized_score| {diff['max_abs_normalized_score']:.4f}, "
             f"{diff['label_flips']} label flip(s)"]
    if result.auroc is not None:
        for key in ("image_auroc", "pixel_auroc"):
            before, after = result.auroc["fp32"][key], result.auroc["int8"][key]
            lines.append(f"{key.replace('_', ' ')}: FP32 {before:.4f} -> INT8 {after:.4f} "
                         f"({after - before:+.4f})")
    if math.isfinite(result.speedup):
        lines.append(f"speed ({result.threads} thread(s), batch 1, interleaved): FP32 "
                     f"{result.ms_fp32:.2f} ms, INT8 {result.ms_int8:.2f} ms per image, "
                     f"x{result.speedup:.2f}")
    return lines + [f"warning: {note}" for note in result.warnings]


def result_summary(result: QuantizeResult) -> dict[str, Any]:
    """A JSON-ready dict of a :class:`QuantizeResult` (paths as strings)."""
    return json.loads(json.dumps(asdict(result), default=str))
