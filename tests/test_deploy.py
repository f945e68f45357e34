"""deploy/service.py end to end: a real subprocess, torch blocked, a hand-built ONNX model.

deploy/service.py is the thin entry point of :mod:`anomalykit.serve.app` (tests/test_serve.py
tests the service in depth); these tests run it as a line PC or the Docker image would.

The model is built with onnx.helper (no torch) and carries anomalykit's metadata; the
exporter itself is tested in test_export.py. Its map is the per-pixel mean intensity, so a
white frame scores 1 (anomalous) and a black one 0 (good) against a threshold of 0.5.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "deploy" / "service.py"
STARTUP_S = 30.0

# Runs service.py as __main__ with torch made unimportable: the service must not need it.
LAUNCH = ("import runpy, sys; sys.modules['torch'] = None; script = sys.argv[1]; "
          "sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')")


def build_model(path: Path) -> Path:
    """uint8 (N, H, W, 3) -> the five anomalykit outputs; map = mean intensity in [0, 1]."""
    f32 = TensorProto.FLOAT

    def const(name: str, values, dtype=f32):
        return helper.make_tensor(name, dtype, [len(values)] if len(values) > 1 else [],
                                  values)

    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=f32),
        helper.make_node("Div", ["xf", "c255"], ["x"]),
        helper.make_node("ReduceMean", ["x", "axis_c"], ["gray"], keepdims=1),
        helper.make_node("Transpose", ["gray"], ["anomaly_map"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMax", ["anomaly_map", "axes_chw"], ["score"], keepdims=0),
        helper.make_node("Sub", ["score", "thr"], ["centered"]),
        helper.make_node("Add", ["centered", "half"], ["shifted"]),
        helper.make_node("Clip", ["shifted", "zero", "one"], ["normalized_score"]),
        helper.make_node("Greater", ["score", "thr"], ["is_bad"]),
        helper.make_node("Cast", ["is_bad"], ["label"], to=TensorProto.INT64),
        helper.make_node("Greater", ["anomaly_map", "thr"], ["is_bad_px"]),
        helper.make_node("Cast", ["is_bad_px"], ["pred_mask"], to=TensorProto.UINT8),
    ]
    initializers = [
        const("c255", [255.0]), const("thr", [0.5]), const("half", [0.5]),
        const("zero", [0.0]), const("one", [1.0]),
        helper.make_tensor("axis_c", TensorProto.INT64, [1], [3]),
        helper.make_tensor("axes_chw", TensorProto.INT64, [3], [1, 2, 3]),
    ]
    nhw = ["N", 1, "H", "W"]
    graph = helper.make_graph(
        nodes, "mean_intensity",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("score", f32, ["N"]),
         helper.make_tensor_value_info("normalized_score", f32, ["N"]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("anomaly_map", f32, nhw),
         helper.make_tensor_value_info("pred_mask", TensorProto.UINT8, nhw)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    outputs = ["score", "normalized_score", "label", "anomaly_map", "pred_mask"]
    helper.set_model_props(model, {
        "anomalykit_version": "0.1.0", "detector": "mean_intensity", "config": "{}",
        "image_size": "32", "threshold": "0.5", "pixel_threshold": "0.5", "score_min": "0.0",
        "score_max": "1.0", "calibrated": "true", "outputs": json.dumps(outputs),
        "input_name": "images", "input_format": "uint8 NHWC RGB", "training": "{}",
    })
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def start_service(args: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen,
                                                                               str]:
    """Start the service on a free port; return it and its base URL once it listens."""
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, *args, "--port", "0", "--quiet"],
                               cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    # A reader thread, so waiting for the "serving" line is bounded even if nothing comes.
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_S)
    except queue.Empty:
        stop(process)
        pytest.fail(f"service did not start within {STARTUP_S}s: {process.stderr.read()}")
    if "serving" not in line:
        stop(process)
        pytest.fail(f"service failed to start: {line} {process.stderr.read()}")
    return process, line.rsplit(" ", 1)[-1].strip()


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("deploy") / "model.onnx")


@pytest.fixture(scope="module")
def service(model_path) -> Iterator[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process, url = start_service([str(SERVICE), str(model_path)], cwd=ROOT, env=env)
    try:
        yield url
    finally:
        stop(process)


def request(url: str, data: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers),
                                    timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def encode(image_rgb: np.ndarray, ext: str = ".png") -> bytes:
    ok, data = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def test_health_reports_model_metadata(service):
    status, body = request(f"{service}/health")
    assert status == 200 and body["status"] == "ok"
    assert body["detector"] == "mean_intensity" and body["model"] == "model.onnx"
    assert body["metadata"]["threshold"] == 0.5
    assert body["metadata"]["outputs"][0] == "score"
    assert "CPUExecutionProvider" in body["providers"]


def test_predict_png_and_jpeg(service):
    white = np.full((40, 52, 3), 255, np.uint8)
    status, body = request(f"{service}/predict", encode(white))
    assert status == 200
    assert body["label"] == 1 and body["score"] == pytest.approx(1.0)
    assert body["normalized_score"] == pytest.approx(1.0)
    assert body["threshold"] == 0.5 and body["detector"] == "mean_intensity"
    assert (body["width"], body["height"]) == (52, 40)
    assert "heatmap_png_base64" not in body

    status, body = request(f"{service}/predict", encode(np.zeros((30, 30, 3), np.uint8), ".jpg"))
    assert status == 200 and body["label"] == 0 and body["score"] == pytest.approx(0.0, abs=0.02)


def test_predict_with_heatmap(service):
    image = np.zeros((24, 36, 3), np.uint8)
    image[:, 18:] = 255
    status, body = request(f"{service}/predict?heatmap=1", encode(image))
    assert status == 200 and body["label"] == 1
    png = np.frombuffer(base64.b64decode(body["heatmap_png_base64"]), np.uint8)
    overlay = cv2.imdecode(png, cv2.IMREAD_COLOR)
    assert overlay is not None and overlay.shape == (24, 36, 3)


@pytest.mark.parametrize("body", [b"definitely not an image", b""])
def test_bad_body_is_400(service, body):
    status, answer = request(f"{service}/predict", body)
    assert status == 400 and "error" in answer


def test_unknown_path_is_404(service):
    assert request(f"{service}/nope")[0] == 404
    assert request(f"{service}/nope", b"x")[0] == 404


def docker_layout(target: Path) -> Path:
    """Copy what deploy/Dockerfile's COPY lines copy (sources relative to the repository root)
    into ``target``, the image's /app: the test runs the Dockerfile's layout without docker."""
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY":
            continue
        *sources, destination = [w for w in words[1:] if not w.startswith("--")]
        folder = target / destination
        for source in sources:
            source_path = ROOT / source
            if source_path.is_dir():
                shutil.copytree(source_path, folder, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(source_path, folder / source_path.name)
    return target


def test_runs_from_the_docker_layout_without_torch_or_the_installed_package(model_path, tmp_path):
    """The image's /app: service.py + the torch-free part of anomalykit, nothing else."""
    app = docker_layout(tmp_path / "app")
    assert (app / "service.py").is_file() and (app / "anomalykit" / "serve" / "page.html").is_file()
    assert not (app / "anomalykit" / "data").exists()  # torch-side code is left out
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process, url = start_service([str(app / "service.py"), str(model_path), "--max-batch", "1"],
                                 cwd=app, env=env)
    try:
        status, body = request(f"{url}/health")
        assert status == 200 and body["detector"] == "mean_intensity"
        assert body["limits"]["max_batch"] == 1
        white = np.full((6, 7, 3), 255, np.uint8)
        status, body = request(f"{url}/predict", encode(white))
        assert status == 200 and body["label"] == 1
        with urllib.request.urlopen(f"{url}/", timeout=30) as page:
            assert b'id="file"' in page.read()
    finally:
        stop(process)


def test_missing_model_exits_with_a_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(SERVICE), str(tmp_path / "absent.onnx")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "absent.onnx" in done.stderr


def test_service_decodes_like_training(service, tmp_path):
    """16-bit, RGBA and gray bodies reach the model as training's read_image decodes them
    (the model's score is the largest per-pixel channel mean)."""
    from anomalykit.data import read_image

    deep = np.full((8, 10, 3), 1000, np.uint16)
    deep[2, 3] = [25828, 25828, 25828]  # 257 * 100 + 128: 101 rounded, 100 truncated
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 2] = 200  # red in BGRA, fully transparent: dropped, not composited
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    for name, array in {"deep": deep, "rgba": rgba, "gray": gray}.items():
        path = tmp_path / f"{name}.png"
        assert cv2.imwrite(str(path), array)
        status, body = request(f"{service}/predict", path.read_bytes())
        expected = (read_image(path).astype(np.float32) / 255.0).mean(axis=-1).max()
        assert status == 200 and (body["width"], body["height"]) == (10, 8), name
        assert body["score"] == pytest.approx(float(expected), abs=1e-5), name
