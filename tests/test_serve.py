"""anomalykit.serve: the inspection service on a real uvicorn server on 127.0.0.1.

Each server runs in a thread of this process on a socket bound to port 0, and is driven
with httpx and raw sockets. The model is test_deploy's tiny hand-built ONNX file (map = mean
intensity, threshold 0.5). Where a test needs the model to hold still (queue full, batching,
readiness), :class:`GatedDetector` wraps the real OnnxDetector and waits on an Event before
each call: the inference boundary is the only thing not real.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web stack (pip install anomalykit[serve]) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (a dev dependency) is not installed")

import uvicorn  # noqa: E402
from test_deploy import build_model  # noqa: E402

from anomalykit.export.runtime import OnnxDetector, decode_image  # noqa: E402
from anomalykit.serve.app import create_app, uvicorn_config  # noqa: E402
from anomalykit.serve.limits import ServiceSettings, UploadError, image_size_from_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0  # upper bound for anything to happen; tests never wait this long when passing


class LiveServer:
    """uvicorn serving ``app`` in a thread on 127.0.0.1:<free port>."""

    def __init__(self, app, settings: ServiceSettings) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # see app.run
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        until(lambda: self.server.started, "the server to start")

    @property
    def service(self):
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        self.sock.close()


class GatedDetector(OnnxDetector):
    """The real detector, but each call waits for ``gate``; frames 13 px high make it fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, device="cpu", threads=1)
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, images):
        assert self.gate.wait(WAIT_S), "gate never opened"
        if np.asarray(images).shape[-3] == 13:
            raise RuntimeError("simulated inference failure")
        return super().predict(images)


def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    """(H, W, C) array in OpenCV's channel order -> file bytes."""
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def expected_score(data: bytes) -> float:
    """What the tiny model answers: the largest per-pixel channel mean, in [0, 1]."""
    return float((decode_image(data).astype(np.float32) / 255.0).mean(axis=-1).max())


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, a tiny IDAT, IEND: a few dozen
    bytes that claim a huge image (nothing of that size is allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def raw_http(url: str, head: bytes, parts: list[bytes] = (), *, pause_s: float = 0.0) -> tuple[int, dict]:
    """Send ``head`` then ``parts`` on a plain socket and read the whole answer (server closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as conn:
        conn.sendall(head)
        for part in parts:
            conn.sendall(part)
            time.sleep(pause_s)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.split(b"\r\n\r\n", 1)[1]
    return int(status_line.split()[1]), json.loads(body)


def metric_value(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, if any) in Prometheus text."""
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


def good_request_works(url: str) -> None:
    answer = httpx.post(f"{url}/predict", content=encode(np.zeros((8, 8, 3), np.uint8)), timeout=WAIT_S)
    assert answer.status_code == 200 and answer.json()["label"] == 0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("serve") / "model.onnx")


SETTINGS = ServiceSettings(max_body_bytes=100_000, max_pixels=1_000_000, body_timeout_s=0.5,
                           header_timeout_s=0.5, device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(model_path) -> Iterator[LiveServer]:
    live = LiveServer(create_app(model_path, SETTINGS), SETTINGS)
    until(lambda: live.service.ready, "the warm-up")
    yield live
    live.stop()


@pytest.fixture
def gated(model_path) -> Iterator[tuple[LiveServer, GatedDetector]]:
    detector = GatedDetector(model_path)
    settings = ServiceSettings(max_batch=8, batch_wait_ms=0, max_queue=9, request_timeout_s=5,
                               device="cpu", threads=1)
    live = LiveServer(create_app(detector, settings), settings)
    until(lambda: live.service.ready, "the warm-up")
    yield live, detector
    detector.gate.set()
    live.stop()


# ---- answers --------------------------------------------------------------------------------

def test_raw_and_multipart_uploads_of_png_and_jpeg(server):
    white = np.full((40, 52, 3), 255, np.uint8)
    answer = httpx.post(f"{server.url}/predict", content=encode(white), timeout=WAIT_S)
    assert answer.status_code == 200
    body = answer.json()
    assert body == {"score": pytest.approx(1.0), "normalized_score": pytest.approx(1.0), "label": 1,
                    "threshold": 0.5, "detector": "mean_intensity", "width": 52, "height": 40}
    assert answer.headers["x-request-id"]

    dark = encode(np.full((30, 20, 3), 40, np.uint8), ".jpg")
    answer = httpx.post(f"{server.url}/predict", files={"file": ("frame.jpg", dark, "image/jpeg")},
                        timeout=WAIT_S)
    assert answer.status_code == 200
    body = answer.json()
    assert body["label"] == 0 and (body["width"], body["height"]) == (20, 30)
    assert body["score"] == pytest.approx(expected_score(dark), abs=1e-6)


def test_heatmap_overlay(server):
    image = np.zeros((24, 36, 3), np.uint8)
    image[:, 18:] = 255
    answer = httpx.post(f"{server.url}/predict?heatmap=1", content=encode(image), timeout=WAIT_S)
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(answer.json()["heatmap_png_base64"]), np.uint8),
                           cv2.IMREAD_COLOR)
    assert overlay is not None and overlay.shape == (24, 36, 3)


def test_16_bit_rgba_and_gray_are_served_like_the_runtime_decodes_them(server):
    deep = np.full((8, 10, 3), 1000, np.uint16)
    deep[2, 3] = 25828  # 257 * 100 + 128: 101 when rounded
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 2] = 200  # red, fully transparent: the alpha is dropped, not composited
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    for name, array in {"16-bit": deep, "rgba": rgba, "gray": gray}.items():
        data = encode(array)
        answer = httpx.post(f"{server.url}/predict", content=data, timeout=WAIT_S)
        assert answer.status_code == 200, name
        assert (answer.json()["width"], answer.json()["height"]) == (10, 8), name
        assert answer.json()["score"] == pytest.approx(expected_score(data), abs=1e-6), name


# ---- bad uploads: a 4xx JSON error each, and the service keeps serving -----------------------

BAD_UPLOADS = {
    "empty body": (b"", 400, "empty"),
    "text file": (b"temperature,pressure\n21.5,1013\n", 400, "not an image"),
    "truncated png": (encode(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[:300],
                      400, "corrupt"),
    "1-gigapixel png": (png_header_only(40_000, 25_000), 413, "40000 x 25000"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_4xx_json_error(server, case):
    data, status, words = BAD_UPLOADS[case]
    answer = httpx.post(f"{server.url}/predict", content=data, timeout=WAIT_S)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    good_request_works(server.url)


def test_pixel_cap_is_read_from_the_header_and_names_the_numbers():
    with pytest.raises(UploadError) as error:
        image_size_from_header(png_header_only(40_000, 25_000), max_pixels=40_000_000)
    assert error.value.status == 413
    assert "40000 x 25000" in error.value.message and "40,000,000" in error.value.message
    assert image_size_from_header(png_header_only(100, 50), max_pixels=5000) == (100, 50)


def test_body_over_the_cap_is_413_without_reading_it(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 5000000\r\n\r\n")
    status, body = raw_http(server.url, head)
    assert status == 413 and "100,000" in body["error"]
    good_request_works(server.url)


def test_chunked_body_over_the_cap_is_413_while_streaming(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 30_000 + b"\0" * 30_000 + b"\r\n"
    status, body = raw_http(server.url, head, [chunk] * 4)  # 120 kB > 100 kB, no Content-Length
    assert status == 413 and "more than 100,000" in body["error"]
    good_request_works(server.url)


def test_a_client_that_stalls_mid_body_gets_408_and_frees_its_slot(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n")
    status, body = raw_http(server.url, head, [b"\x89PNG\r\n\x1a\n"])  # then nothing: stalls
    assert status == 408 and "0.5 s" in body["error"] and "8 of 1000 bytes" in body["error"]
    good_request_works(server.url)


def test_a_client_that_trickles_its_headers_gets_408_and_is_closed(server):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"  # no blank line
    status, body = raw_http(server.url, head, [b"X-Slow: 1\r\n"] * 2, pause_s=0.2)
    assert status == 408 and "headers did not arrive within 0.5 s" in body["error"]
    good_request_works(server.url)


def test_the_head_deadline_does_not_fire_on_a_busy_keep_alive_connection(server):
    with httpx.Client(timeout=WAIT_S) as client:
        for _ in range(3):  # the head deadline is re-armed between requests, not fired
            assert client.post(f"{server.url}/predict", content=encode(np.zeros((4, 4, 3), np.uint8))
                               ).status_code == 200
            time.sleep(0.3)
        assert client.get(f"{server.url}/health").status_code == 200


def test_multipart_without_a_file_field_names_the_field(server):
    answer = httpx.post(f"{server.url}/predict", files={"image": ("a.png", encode(np.zeros((4, 4, 3),
                                                                                           np.uint8)))},
                        timeout=WAIT_S)
    assert answer.status_code == 400 and "'file'" in answer.json()["error"]


def test_unknown_route_is_json_404(server):
    answer = httpx.get(f"{server.url}/nope", timeout=WAIT_S)
    assert answer.status_code == 404 and "/nope" in answer.json()["error"]


# ---- health, readiness, metrics, logs, page -------------------------------------------------

def test_health_ready_docs_and_page(server):
    health = httpx.get(f"{server.url}/health", timeout=WAIT_S).json()
    assert health["status"] == "ok" and health["ready"] is True
    assert health["detector"] == "mean_intensity" and health["metadata"]["threshold"] == 0.5
    assert httpx.get(f"{server.url}/ready", timeout=WAIT_S).status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json", timeout=WAIT_S).json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{server.url}/docs", timeout=WAIT_S).status_code == 200
    page = httpx.get(f"{server.url}/", timeout=WAIT_S)
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "<script src" not in page.text and "<link" not in page.text  # offline: nothing external


def test_metrics_count_requests_latency_and_anomalies(server):
    httpx.post(f"{server.url}/predict", content=encode(np.full((6, 6, 3), 255, np.uint8)), timeout=WAIT_S)
    httpx.post(f"{server.url}/predict", content=b"nonsense", timeout=WAIT_S)
    text = httpx.get(f"{server.url}/metrics", timeout=WAIT_S).text
    for line in ('anomalykit_requests_total{route="/predict",status="200"}',
                 'anomalykit_requests_total{route="/predict",status="400"}',
                 'anomalykit_request_latency_seconds_bucket{le="0.005",route="/predict"}',
                 "anomalykit_queue_depth 0.0", "anomalykit_batch_size_count",
                 "anomalykit_anomalies_flagged_total"):
        assert line in text, line
    assert metric_value(text, "anomalykit_anomalies_flagged_total") >= 1


def test_one_structured_log_record_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="anomalykit.serve"):
        answer = httpx.post(f"{server.url}/predict", content=encode(np.full((5, 5, 3), 255, np.uint8)),
                            timeout=WAIT_S)
        until(lambda: any(getattr(r, "fields", {}).get("request_id") == answer.headers["x-request-id"]
                          for r in caplog.records), "the log record")
    record = next(r for r in caplog.records
                  if getattr(r, "fields", {}).get("request_id") == answer.headers["x-request-id"])
    fields = record.fields
    assert fields["route"] == "/predict" and fields["status"] == 200 and fields["label"] == 1
    assert fields["score"] == pytest.approx(1.0) and fields["batch_size"] == 1
    assert fields["latency_ms"] > 0 and fields["client"].startswith("127.0.0.1:")
    from anomalykit.serve.app import JsonFormatter

    assert json.loads(JsonFormatter().format(record))["request_id"] == answer.headers["x-request-id"]


def test_ready_is_503_until_the_warm_up_frame_ran(model_path):
    detector = GatedDetector(model_path)
    detector.gate.clear()  # the warm-up frame blocks in the model
    settings = ServiceSettings(device="cpu", threads=1)
    live = LiveServer(create_app(detector, settings), settings)
    try:
        answer = httpx.get(f"{live.url}/ready", timeout=WAIT_S)
        assert answer.status_code == 503 and "warming up" in answer.json()["error"]
        assert httpx.get(f"{live.url}/health", timeout=WAIT_S).json()["ready"] is False
        detector.gate.set()
        until(lambda: httpx.get(f"{live.url}/ready", timeout=WAIT_S).status_code == 200, "readiness")
    finally:
        detector.gate.set()
        live.stop()


# ---- batching and the queue -----------------------------------------------------------------

def post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: httpx.post(f"{url}/predict", content=body, timeout=WAIT_S),
                             bodies))


def batch_histogram(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=WAIT_S).text
    return metric_value(text, "anomalykit_batch_size_count"), metric_value(text, "anomalykit_batch_size_sum")


def test_concurrent_requests_are_scored_in_one_call_per_shape(gated):
    live, detector = gated
    assert batch_histogram(live.url) == (1.0, 1.0)  # the warm-up frame
    detector.gate.clear()
    # One frame occupies the model; 6 of one size and 2 of another queue up behind it.
    bodies = [encode(np.full((16, 16, 3), 10 * i, np.uint8)) for i in range(7)]
    bodies += [encode(np.full((20, 12, 3), 200 + i, np.uint8)) for i in range(2)]
    with ThreadPoolExecutor(1) as first:
        pending_first = first.submit(post_all, live.url, bodies[:1])
        until(lambda: live.service.batcher.depth == 1, "the first frame to reach the model")
        with ThreadPoolExecutor(1) as rest:
            pending_rest = rest.submit(post_all, live.url, bodies[1:])
            until(lambda: live.service.batcher.depth == 9, "8 more frames to queue")
            detector.gate.set()
            answers = pending_first.result() + pending_rest.result()
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status_code == 200
        assert answer.json()["score"] == pytest.approx(expected_score(body), abs=1e-6)
    # warm-up (1) + the first frame (1) + 6 same-size frames in one call + 2 in another
    assert batch_histogram(live.url) == (4.0, 10.0)


def test_a_full_queue_answers_503_with_retry_after(model_path):
    detector = GatedDetector(model_path)
    settings = ServiceSettings(max_batch=1, max_queue=1, device="cpu", threads=1)
    live = LiveServer(create_app(detector, settings), settings)
    try:
        until(lambda: live.service.ready, "the warm-up")
        detector.gate.clear()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post_all, live.url, [encode(np.zeros((8, 8, 3), np.uint8))])
            until(lambda: "anomalykit_queue_depth 1.0" in httpx.get(f"{live.url}/metrics").text,
                  "the queue to fill")
            answer = httpx.post(f"{live.url}/predict", content=encode(np.zeros((8, 8, 3), np.uint8)),
                                timeout=WAIT_S)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert "limit 1" in answer.json()["error"]
            detector.gate.set()
            assert pending.result()[0].status_code == 200
        good_request_works(live.url)
    finally:
        detector.gate.set()
        live.stop()


def test_a_failing_batch_is_500_for_its_requests_only(gated):
    live, _ = gated
    answer = httpx.post(f"{live.url}/predict", content=encode(np.zeros((13, 8, 3), np.uint8)), timeout=WAIT_S)
    assert answer.status_code == 500 and "simulated inference failure" in answer.json()["error"]
    good_request_works(live.url)


def test_a_request_over_the_request_timeout_is_504(model_path):
    detector = GatedDetector(model_path)
    settings = ServiceSettings(request_timeout_s=0.3, device="cpu", threads=1)
    live = LiveServer(create_app(detector, settings), settings)
    try:
        until(lambda: live.service.ready, "the warm-up")
        detector.gate.clear()
        answer = httpx.post(f"{live.url}/predict", content=encode(np.zeros((8, 8, 3), np.uint8)),
                            timeout=WAIT_S)
        assert answer.status_code == 504 and "0.3 s" in answer.json()["error"]
        detector.gate.set()
        until(lambda: live.service.batcher.depth == 0, "the abandoned frame to finish")
        good_request_works(live.url)
    finally:
        detector.gate.set()
        live.stop()


# ---- torch-free, settings, scripts ----------------------------------------------------------

def test_the_service_imports_no_torch_and_only_the_runtime_from_anomalykit():
    code = ("import sys; sys.modules['torch'] = None; import anomalykit.serve.app; "
            "print(sorted(m for m in sys.modules if m.startswith('anomalykit')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    modules = set(eval(done.stdout))  # noqa: S307 - our own printed list
    assert modules == {"anomalykit", "anomalykit.export", "anomalykit.export.runtime", "anomalykit.serve",
                       "anomalykit.serve.app", "anomalykit.serve.batching", "anomalykit.serve.limits"}


def test_the_serve_package_imports_without_the_web_stack():
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['torch'] = None; "
            "import anomalykit.serve, anomalykit.serve.limits, anomalykit.serve.batching")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"max_pixels": -1}, {"batch_wait_ms": -1.0},
                                 {"log_format": "xml"}])
def test_bad_settings_name_the_value(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        ServiceSettings(**bad)


def test_bad_uploads_script_writes_its_table(model_path, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "service_bad_uploads.py"),
                           str(model_path), "--out", str(tmp_path), "--body-timeout", "0.5",
                           "--header-timeout", "0.5"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout
    table = (tmp_path / "service_bad_uploads.md").read_text()
    rows = json.loads((tmp_path / "service_bad_uploads.json").read_text())
    assert len(rows) == 10 and all(row["good_request_after"] == 200 for row in rows)
    assert {row["case"]: row["status"] for row in rows if row["expect"] == "4xx"} == {
        "empty body": 400, "truncated PNG": 400, "text file": 400, "1-gigapixel PNG bomb": 413,
        "slow client (stalls mid-body)": 408, "body over the size cap": 413,
        "chunked body over the size cap": 413, "slow headers (never finished)": 408}
    assert "| 16-bit PNG | 200 |" in table


def test_load_script_runs_both_modes(model_path, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "service_load.py"), str(model_path),
                           "--clients", "2", "--duration", "1", "--frame-size", "32", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout
    rows = json.loads((tmp_path / "service_load.json").read_text())["runs"]
    assert [row["max_batch"] for row in rows] == [8, 1]
    assert all(row["requests"] > 0 and row["errors"] == 0 and row["rss_end_mb"] > 0 for row in rows)
    assert "img/s" in (tmp_path / "service_load.md").read_text()
