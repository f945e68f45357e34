"""anomalykit.export.quantize: INT8 static quantisation of a real (tiny) detector export."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from tiny_detector import TinyConvDetector

from anomalykit.data import SYNTHETIC_CATEGORIES, generate_synthetic
from anomalykit.errors import ConfigError, DataError
from anomalykit.export.onnx import export_onnx
from anomalykit.export.quantize import (
    QuantizationRefused,
    calibration_frames,
    network_nodes,
    quantize_checkpoint,
    quantize_onnx,
    summary_lines,
)
from anomalykit.export.runtime import OnnxDetector
from anomalykit.pipeline import train_detector
from anomalykit.registry import register_detector

NAME = "_quantize_test_tiny"
CATEGORY = SYNTHETIC_CATEGORIES[0]


@register_detector(NAME)
class TinyDetector(TinyConvDetector):
    reduction = "mean"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec-layout category at 32 px: train/good, test/{good,defects}, ground_truth."""
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, categories=[CATEGORY], seed=0, image_size=32, n_train=12,
                       n_test_good=4, n_test_defect=4)
    return root / CATEGORY


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A detector trained for a few steps and calibrated (and its checkpoint)."""
    work = tmp_path_factory.mktemp("run")
    config = work / "tiny.yaml"
    config.write_text("model:\n  image_size: 32\n"
                      "train:\n  epochs: 2\n  batch_size: 4\n  val_fraction: 0.25\n",
                      encoding="utf-8")
    return train_detector(NAME, root=data.parent, category=CATEGORY, config=config,
                          out_dir=work / "run", device="cpu", progress=False)


@pytest.fixture(scope="module")
def fp32(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained detector exported to FP32 ONNX."""
    return export_onnx(trained.detector, tmp_path_factory.mktemp("fp32") / "tiny.onnx")


@pytest.fixture(scope="module")
def quantized(fp32: Path, data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("int8") / "tiny_int8.onnx"
    with pytest.warns(UserWarning, match="not measured"):
        result = quantize_onnx(fp32, out, data / "train" / "good", time_repeats=3)
    return result


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_int8_model_loads_and_keeps_metadata(quantized, fp32: Path, data: Path) -> None:
    assert quantized.path.is_file()
    detector = OnnxDetector(quantized.path, device="cpu")
    original = _metadata(fp32)
    written = _metadata(quantized.path)
    assert {k: written[k] for k in original} == original  # every anomalykit key, unchanged
    record = json.loads(written["quantization"])
    assert record["method"] == "int8"
    assert record["calibration"] == str((data / "train" / "good").resolve())
    assert record["calibration_images"] == quantized.n_calibration == 12
    assert record["onnxruntime_version"]
    assert record["auroc"] is None and record["forced"] is False
    assert detector.metadata["threshold"] == OnnxDetector(fp32).metadata["threshold"]
    assert quantized.auroc is None
    assert quantized.ms_fp32 > 0 and quantized.ms_int8 > 0 and quantized.speedup > 0


def test_int8_graph_quantizes_only_the_network(quantized) -> None:
    graph = onnx.load(str(quantized.path)).graph
    ops = [node.op_type for node in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    dequantized = [out for node in graph.node if node.op_type == "DequantizeLinear"
                   for out in node.output]
    readers = {op for name in dequantized for op in consumers.get(name, [])}
    # The conv reads INT8 (weights and input); the map upsampling, score normalisation and
    # thresholds (Resize, Div, Greater, reductions) are never themselves quantised.
    assert "Conv" in readers
    assert not readers & {"Resize", "Div", "Greater", "ReduceMax", "ReduceMean", "Cast"}
    quantized_inputs_of = {node.op_type for node in graph.node
                           if any(name.endswith("_DequantizeLinear_Output") or
                                  name in dequantized for name in node.input)
                           and node.op_type in ("Conv", "MatMul", "Gemm", "Resize")}
    assert quantized_inputs_of == {"Conv"}
    assert {o.name: o.type.tensor_type.elem_type for o in graph.output}["score"] == \
        onnx.TensorProto.FLOAT


def test_int8_outputs_close_to_fp32(quantized, fp32: Path, data: Path) -> None:
    frames, _ = calibration_frames(data / "train" / "good", 32)
    reference = OnnxDetector(fp32, device="cpu").predict(frames)
    got = OnnxDetector(quantized.path, device="cpu").predict(frames)
    scale = np.abs(reference["score"]).max()
    assert np.abs(got["score"] - reference["score"]).max() <= 0.1 * scale
    assert got["anomaly_map"].shape == reference["anomaly_map"].shape
    assert quantized.calibration_diff["n_images"] == len(frames)
    assert quantized.calibration_diff["max_abs_normalized_score"] <= 0.1


def test_check_set_measures_auroc_of_both(fp32: Path, data: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's shape inference writes scratch files into the cwd
    result = quantize_onnx(fp32, tmp_path / "int8.onnx", data / "train" / "good", check=data,
                           max_auroc_drop=1.0, time_repeats=0)
    assert list(cwd.iterdir()) == []
    for model in ("fp32", "int8"):
        assert 0.0 <= result.auroc[model]["image_auroc"] <= 1.0
        assert 0.0 <= result.auroc[model]["pixel_auroc"] <= 1.0
    assert result.auroc["drop"]["image_auroc"] == pytest.approx(
        result.auroc["fp32"]["image_auroc"] - result.auroc["int8"]["image_auroc"])
    record = json.loads(_metadata(result.path)["quantization"])
    assert record["auroc"]["int8"]["image_auroc"] == result.auroc["int8"]["image_auroc"]
    assert record["check"] == str(data.resolve())


def test_auroc_drop_refuses_and_writes_nothing(fp32: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    with pytest.raises(QuantizationRefused, match="refused.*max_auroc_drop=-1.0") as info:
        quantize_onnx(fp32, out, data / "train" / "good", check=data, max_auroc_drop=-1.0,
                      time_repeats=0)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either
    assert info.value.result.path is None and info.value.result.auroc is not None


def test_force_writes_despite_the_drop_and_records_it(fp32: Path, data: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    with pytest.warns(UserWarning, match="WRITTEN DESPITE AN AUROC DROP"):
        result = quantize_onnx(fp32, out, data / "train" / "good", check=data,
                               max_auroc_drop=-1.0, force=True, time_repeats=0)
    assert result.forced and out.is_file()
    record = json.loads(_metadata(out)["quantization"])
    assert record["forced"] is True and record["max_auroc_drop"] == -1.0
    assert record["auroc"]["drop"]["image_auroc"] == result.auroc["drop"]["image_auroc"]


def test_quantize_checkpoint_exports_then_quantizes(trained, data: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not measured"):
        result = quantize_checkpoint(trained.checkpoint, tmp_path / "int8.onnx",
                                     data / "train" / "good", fp32_path=tmp_path / "fp32.onnx",
                                     time_repeats=0)
    assert (tmp_path / "fp32.onnx").is_file() and result.path == tmp_path / "int8.onnx"
    assert OnnxDetector(result.path).detector == NAME
    text = "\n".join(summary_lines(result))
    assert "INT8 model:" in text and "label flip" in text and "not measured" in text


def test_bad_calibration_folders_name_the_problem(fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    with pytest.raises(DataError, match="calibration folder .*nowhere does not exist"):
        quantize_onnx(fp32, out, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(DataError, match="calibration folder .*empty holds no images"):
        quantize_onnx(fp32, out, empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    cv2.imwrite(str(broken / "000.png"), np.zeros((8, 8, 3), np.uint8))
    (broken / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="001.png"):
        quantize_onnx(fp32, out, broken)
    assert not out.exists()


def test_bad_options_and_models(fp32: Path, data: Path, tmp_path: Path) -> None:
    good = data / "train" / "good"
    with pytest.raises(ConfigError, match="method"):
        quantize_onnx(fp32, tmp_path / "x.onnx", good, method="int4")
    with pytest.raises(ConfigError, match="scope must be"):
        quantize_onnx(fp32, tmp_path / "x.onnx", good, scope="backbone")
    with pytest.raises(ConfigError, match="no Conv, .* node inside detector.nowhere"):
        quantize_onnx(fp32, tmp_path / "x.onnx", good, scope="detector.nowhere")
    with pytest.raises(ConfigError, match="overwrite its source"):
        quantize_onnx(fp32, fp32, good)
    with pytest.raises(ConfigError, match="does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx", good)
    with pytest.raises(DataError, match="no test/ folder"):
        quantize_onnx(fp32, tmp_path / "x.onnx", good, check=good)


def test_calibration_frames_are_evenly_spaced_and_capped(data: Path) -> None:
    frames, paths = calibration_frames(data / "train" / "good", 16, max_images=4)
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8
    names = sorted(p.name for p in (data / "train" / "good").iterdir())
    assert [p.name for p in paths] == [names[0], names[4], names[7], names[11]]
    again, _ = calibration_frames(data / "train" / "good", 16, max_images=4)
    assert np.array_equal(frames, again)


def test_network_nodes_leave_the_detectors_own_arithmetic_float() -> None:
    def node(name: str, op: str, scopes: list[str]) -> onnx.NodeProto:
        made = onnx.helper.make_node(op, ["a", "b"], [name + "_out"], name=name)
        entry = made.metadata_props.add()
        entry.key, entry.value = "pkg.torch.onnx.name_scopes", repr(scopes)
        return made

    graph = onnx.helper.make_graph([
        node("backbone_conv", "Conv", ["", "detector", "detector.backbone"]),
        node("flow_conv", "Conv", ["", "detector", "detector.flows", "detector.flows.0"]),
        node("mahalanobis", "MatMul", ["", "detector", "matmul"]),
        node("smoothing", "Conv", ["", "detector", "conv2d_48"]),
        node("resize", "Resize", ["", "interpolate"]),
    ], "g", [], [])
    model = onnx.helper.make_model(graph)
    assert network_nodes(model, ("Conv", "MatMul")) == ["backbone_conv", "flow_conv"]
    assert network_nodes(model, ("Conv",), "detector.backbone") == ["backbone_conv"]
