"""ONNX export and the torch-free runtime, on a tiny test-only detector."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

from anomalykit import __version__, registry
from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError
from anomalykit.export import onnx as export_module
from anomalykit.export.onnx import (
    OUTPUT_NAMES,
    ExportError,
    InferenceWrapper,
    compare_with_torch,
    export_checkpoint,
    export_onnx,
)
from anomalykit.export.runtime import (
    OnnxDetector,
    available_providers,
    overlay_heatmap,
    read_image,
)
from anomalykit.registry import register_detector
from anomalykit.training.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


@register_detector("_export_test_tiny")
class TinyDetector(Detector):
    """One conv; map = conv output squared (B, 1, S, S), score = map max (B,)."""

    def __init__(self, image_size: int = 32, normalization: str = "imagenet") -> None:
        super().__init__()
        self.image_size = image_size
        self.set_normalization(normalization)
        self.conv = nn.Conv2d(3, 1, kernel_size=3, padding=1)

    def forward(self, images: Tensor) -> AnomalyOutput:
        anomaly_map = self.conv(self.normalize_input(images)) ** 2
        return AnomalyOutput(anomaly_map.flatten(1).amax(1), anomaly_map)


def make_detector(seed: int = 0) -> TinyDetector:
    """A calibrated tiny detector whose threshold splits random frames roughly in half."""
    torch.manual_seed(seed)
    detector = TinyDetector().eval()
    with torch.no_grad():  # calibrate on frames like the ones the tests feed
        score, _, _, anomaly_map, _ = InferenceWrapper(detector)(
            torch.from_numpy(frames(16, 48, 48, seed=seed + 100)))
    detector.threshold_.fill_(float(score.median()))
    detector.score_min_.fill_(float(score.min()))
    detector.score_max_.fill_(float(score.max()))
    detector.pixel_threshold_.fill_(float(anomaly_map.flatten().quantile(0.9)))
    detector.calibrated_.fill_(True)
    return detector


def frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[TinyDetector, Path]:
    detector = make_detector()
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(detector, path, metadata={"line": "A3", "station": 7})
    return detector, path


# -- export -------------------------------------------------------------------------------
def test_export_writes_one_self_contained_file(exported):
    _, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    model = onnx.load(str(path), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t)
                   for t in model.graph.initializer)
    (graph_input,) = model.graph.input
    assert graph_input.name == "images"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["N", "H", "W", 3]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_metadata_is_complete_and_exact(exported):
    detector, path = exported
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert all(isinstance(v, str) for v in props.values())
    assert props["anomalykit_version"] == __version__
    assert props["detector"] == "_export_test_tiny"
    assert json.loads(props["config"]) == {"image_size": 32, "normalization": "imagenet"}
    assert props["input_format"] == "uint8 NHWC RGB"
    assert json.loads(props["outputs"]) == list(OUTPUT_NAMES)
    assert props["line"] == "A3" and props["station"] == "7"

    meta = OnnxDetector(path).metadata
    for key, buffer in [("threshold", "threshold_"), ("pixel_threshold", "pixel_threshold_"),
                        ("score_min", "score_min_"), ("score_max", "score_max_")]:
        # Bit-exact: the runtime must threshold exactly where PyTorch does.
        assert meta[key] == float(getattr(detector, buffer)), key
    assert meta["image_size"] == 32 and meta["calibrated"] is True
    assert meta["config"]["normalization"] == "imagenet"
    assert meta["training"] == {}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(40, 52), (64, 64)])
def test_onnxruntime_matches_torch(exported, batch, size):
    detector, path = exported
    diffs = compare_with_torch(detector, path, frames(batch, *size, seed=batch))
    assert set(diffs) == set(OUTPUT_NAMES)
    assert diffs["score"] <= TOL and diffs["anomaly_map"] <= TOL
    assert diffs["normalized_score"] <= TOL
    assert diffs["label"] == 0 and diffs["pred_mask"] == 0


def test_labels_and_masks_follow_thresholds(exported):
    _, path = exported
    model = OnnxDetector(path, device="cpu", threads=1)
    out = model.predict(frames(12, 40, 52, seed=5))
    assert out["score"].shape == (12,) and out["label"].dtype == np.int64
    assert out["anomaly_map"].shape == (12, 1, 40, 52) and out["anomaly_map"].dtype == np.float32
    assert out["pred_mask"].shape == (12, 1, 40, 52) and out["pred_mask"].dtype == np.uint8
    np.testing.assert_array_equal(out["label"], out["score"] > model.threshold)
    np.testing.assert_array_equal(out["pred_mask"], out["anomaly_map"] > model.pixel_threshold)
    assert 0 < out["label"].sum() < 12, "the fixture threshold should split the batch"
    meta = model.metadata
    expected = np.clip((out["score"] - meta["threshold"])
                       / max(meta["score_max"] - meta["score_min"], 1e-12) + 0.5, 0, 1)
    np.testing.assert_allclose(out["normalized_score"], expected, atol=1e-6)


def test_export_is_deterministic(exported, tmp_path):
    detector, path = exported
    again = export_onnx(detector, tmp_path / "again.onnx", metadata={"line": "A3", "station": 7})
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("buffer", ["threshold_", "pixel_threshold_", "score_max_"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_is_refused(tmp_path, buffer, value):
    detector = make_detector()
    getattr(detector, buffer).fill_(value)
    with pytest.raises(ConfigError, match=buffer):
        export_onnx(detector, tmp_path / "model.onnx")
    assert not any(tmp_path.iterdir())


def test_reserved_metadata_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="threshold"):
        export_onnx(make_detector(), tmp_path / "model.onnx", metadata={"threshold": 1})


def test_parity_failure_raises_and_writes_nothing(tmp_path, monkeypatch):
    def broken_parity(wrapper, session, images):
        diffs = dict.fromkeys(OUTPUT_NAMES, 0.0) | {"score": 0.125, "anomaly_map": 0.0625}
        return diffs, {"score": 1.0, "anomaly_map": 1.0}

    monkeypatch.setattr(export_module, "_parity", broken_parity)
    with pytest.raises(ExportError, match=r"score 0\.125.*anomaly_map 0\.0625"):
        export_onnx(make_detector(), tmp_path / "model.onnx")
    assert not any(tmp_path.iterdir())


def test_the_check_allows_the_detector_s_own_tolerance(tmp_path, monkeypatch):
    """A detector whose inference amplifies rounding (AnoGAN's unrolled search) sets
    export_tolerance; an explicit tolerance still wins."""
    def parity(wrapper, session, images):
        diffs = dict.fromkeys(OUTPUT_NAMES, 0.0) | {"score": 1e-5, "anomaly_map": 2e-3}
        return diffs, {"score": 1.0, "anomaly_map": 1.0}

    monkeypatch.setattr(export_module, "_parity", parity)
    detector = make_detector()
    with pytest.raises(ExportError, match=r"anomaly_map 0\.002 \(allowed 0\.0001\)"):
        export_onnx(detector, tmp_path / "a.onnx")
    detector.export_tolerance = 1e-2
    export_onnx(detector, tmp_path / "b.onnx")
    with pytest.raises(ExportError, match=r"allowed 0\.001\)"):
        export_onnx(detector, tmp_path / "c.onnx", tolerance=1e-3)
    assert registry.get_class("anogan").export_tolerance == 1e-2
    assert all(registry.get_class(name).export_tolerance == 1e-4
               for name in registry.list_detectors() if name != "anogan")


def test_uncalibrated_export_warns_and_leaves_model_untouched(tmp_path):
    detector = TinyDetector().train()
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    with pytest.warns(UserWarning, match="uncalibrated"):
        export_onnx(detector, tmp_path / "model.onnx", check=False)
    assert detector.training
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())
    assert OnnxDetector(tmp_path / "model.onnx").metadata["calibrated"] is False


@pytest.fixture
def registry_of_present_modules(monkeypatch):
    """load_model looks names up in the registry, which imports every detector module it
    lists; modules other engineers are still writing must not break this round trip."""

    def present(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    monkeypatch.setattr(registry, "_MODULES", tuple(m for m in registry._MODULES if present(m)))
    monkeypatch.setattr(registry, "_loaded", False)


def test_export_checkpoint(tmp_path, registry_of_present_modules):
    detector = make_detector(seed=3)
    meta = {"category": "bottle", "dataset": "mvtec", "image_auroc": 0.97}
    checkpoint = save_checkpoint(tmp_path / "tiny.ckpt", detector, meta=meta)
    path = export_checkpoint(checkpoint, tmp_path / "tiny.onnx", metadata={"line": "B1"})
    model = OnnxDetector(path)
    assert model.metadata["training"] == meta
    assert model.metadata["line"] == "B1" and model.detector == "_export_test_tiny"
    assert model.threshold == float(detector.threshold_)
    diffs = compare_with_torch(detector, path, frames(2, 48, 40))
    assert diffs["score"] <= TOL and diffs["anomaly_map"] <= TOL


# -- runtime ------------------------------------------------------------------------------
def test_predict_files_reads_color_and_gray_pngs(exported, tmp_path):
    _, path = exported
    model = OnnxDetector(path)
    rgb = frames(3, 40, 52, seed=11)
    gray = frames(1, 64, 64, seed=12)[0, :, :, 0]
    files, expected_inputs = [], []
    for i, image in enumerate(rgb):
        cv2.imwrite(str(tmp_path / f"color{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        files.append(tmp_path / f"color{i}.png")
        expected_inputs.append(image)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    files.insert(1, tmp_path / "gray.png")  # mixed sizes inside one batch
    expected_inputs.insert(1, np.repeat(gray[:, :, None], 3, axis=2))

    results = model.predict_files(files, batch_size=3)
    assert [r["path"] for r in results] == [str(f) for f in files]
    for result, image in zip(results, expected_inputs, strict=True):
        reference = model.predict(image)  # (H, W, 3) -> batch of one
        assert result["anomaly_map"].shape == image.shape[:2]
        assert result["pred_mask"].shape == image.shape[:2]
        assert result["pred_mask"].dtype == np.uint8
        assert isinstance(result["score"], float) and isinstance(result["label"], int)
        assert abs(result["score"] - float(reference["score"][0])) <= 1e-6
        np.testing.assert_allclose(result["anomaly_map"], reference["anomaly_map"][0, 0],
                                   atol=1e-6)
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png")[..., 2], gray)


def test_unreadable_and_missing_images_are_named(exported, tmp_path):
    _, path = exported
    model = OnnxDetector(path)
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), frames(1, 40, 40)[0])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        model.predict_files([good, bad])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        model.predict_files([tmp_path / "missing.png"])


def test_predict_validates_input(exported):
    _, path = exported
    model = OnnxDetector(path)
    assert model.predict(frames(1, 33, 35)[0])["anomaly_map"].shape == (1, 1, 33, 35)
    with pytest.raises(ValueError, match="uint8"):
        model.predict(frames(1, 32, 32).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        model.predict(frames(1, 32, 32)[..., :1])


def test_bad_models_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.onnx"):
        OnnxDetector(tmp_path / "nothing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf")
    with pytest.raises(ValueError, match=r"garbage\.onnx"):
        OnnxDetector(garbage)
    # A valid ONNX model that anomalykit did not make: no metadata.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    foreign = tmp_path / "foreign.onnx"
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                   ir_version=8)  # one every onnxruntime reads
    onnx.save(model, str(foreign))
    with pytest.raises(ValueError, match="not exported by anomalykit"):
        OnnxDetector(foreign)


def test_available_providers():
    import onnxruntime as ort

    assert available_providers("cpu") == ["CPUExecutionProvider"]
    assert available_providers("auto")[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert available_providers("auto")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            available_providers("cuda")
    with pytest.raises(ValueError, match="device"):
        available_providers("tpu")


def test_overlay_heatmap():
    image = frames(1, 30, 40)[0]
    heat = np.linspace(0, 1, 15 * 20, dtype=np.float32).reshape(15, 20)  # resized to the image
    overlay = overlay_heatmap(image, heat, alpha=0.5)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    np.testing.assert_array_equal(overlay_heatmap(image, heat, alpha=0.0), image)
    red_corner = overlay_heatmap(np.zeros_like(image), heat, alpha=1.0)[-1, -1]
    assert red_corner[0] > 100 and red_corner[2] < 50  # high values are red in RGB
    flat = overlay_heatmap(image, np.full((30, 40), np.nan), vmin=0.0, vmax=1.0)
    assert flat.shape == image.shape
    with pytest.raises(ValueError):
        overlay_heatmap(image.astype(np.float32), heat)


def test_runtime_runs_with_torch_blocked(exported):
    _, path = exported
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "import anomalykit.export.runtime as rt\n"
        f"model = rt.OnnxDetector({str(path)!r})\n"
        "out = model.predict(np.zeros((2, 20, 30, 3), np.uint8))\n"
        "assert out['anomaly_map'].shape == (2, 1, 20, 30)\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules"
        " if sys.modules[m] is not None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- one decoder ---------------------------------------------------------------------------


def write_decoder_cases(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """16-bit, RGBA, gray and gray+alpha PNGs of one size -> (file, expected RGB pixels)."""
    import struct
    import zlib

    h, w = 6, 7
    rng = np.random.default_rng(5)
    cases: dict[str, tuple[Path, np.ndarray]] = {}
    deep = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    deep[0, 0] = [25828, 0, 65535]  # 257 * 100 + 128: 101 when rounded, 100 when truncated
    cv2.imwrite(str(folder / "deep.png"), deep[..., ::-1])
    cases["16-bit"] = (folder / "deep.png", ((deep.astype(np.uint32) + 128) // 257).astype(np.uint8))
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # transparent: the colour must survive (dropped, not composited)
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    cases["RGBA"] = (folder / "rgba.png", rgba[..., :3])
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    cv2.imwrite(str(folder / "gray.png"), gray)
    cases["gray"] = (folder / "gray.png", np.repeat(gray[..., None], 3, axis=2))
    # Gray+alpha (PNG colour type 4), written by hand: OpenCV cannot encode it.
    la = np.stack([gray[::-1], np.full_like(gray, 128)], axis=-1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + row.tobytes() for row in la)
    (folder / "la.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 4, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    cases["gray+alpha"] = (folder / "la.png", np.repeat(gray[::-1, :, None], 3, axis=2))
    return cases


def test_training_and_runtime_decode_identically(exported, tmp_path, monkeypatch):
    """Training (the dataset's read_image), OnnxDetector.predict_files and decode_image of
    the raw bytes (deploy/service.py's path) give the model the same pixels."""
    from anomalykit.data import dataset as dataset_module
    from anomalykit.data import io as data_io
    from anomalykit.export import runtime

    assert dataset_module.read_image is data_io.read_image
    assert data_io.decode_image is runtime.decode_image
    cases = write_decoder_cases(tmp_path)
    model = OnnxDetector(exported[1])
    fed: list[np.ndarray] = []
    original = model.predict
    monkeypatch.setattr(model, "predict", lambda images: fed.append(images.copy()) or original(images))
    paths = [path for path, _ in cases.values()]
    model.predict_files(paths, batch_size=len(paths))  # one batch: all are 6x7
    assert len(fed) == 1 and fed[0].shape == (len(paths), 6, 7, 3)
    for row, (name, (path, expected)) in enumerate(cases.items()):
        training = dataset_module.read_image(path)
        assert training.dtype == np.uint8 and training.shape == (6, 7, 3), name
        np.testing.assert_array_equal(training, expected, err_msg=name)
        np.testing.assert_array_equal(fed[0][row], training, err_msg=name)
        np.testing.assert_array_equal(runtime.decode_image(path.read_bytes()), training,
                                      err_msg=name)
