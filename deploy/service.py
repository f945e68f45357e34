"""A small HTTP inspection service for an exported anomalykit model (standard library only).

    python deploy/service.py model.onnx --host 127.0.0.1 --port 8080

``GET /health``            -> 200 JSON: status, model file, providers, model metadata.
``POST /predict``          -> body = the raw image file (PNG/JPEG/BMP bytes, e.g.
                              ``curl --data-binary @frame.png http://127.0.0.1:8080/predict``);
                              200 JSON {score, normalized_score, label, threshold, detector,
                              width, height}.
``POST /predict?heatmap=1`` adds ``heatmap_png_base64``: the JET anomaly overlay as a PNG.
A body that is not a decodable image -> 400 JSON {"error": ...}.

No torch: it needs numpy, onnxruntime and opencv, and either the anomalykit package or a
copy of ``anomalykit/export/runtime.py`` saved as ``runtime.py`` next to this file.
It binds to 127.0.0.1 by default; pass ``--host 0.0.0.0`` only on a trusted network (there
is no authentication).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2

try:
    from anomalykit.export.runtime import OnnxDetector, decode_image, overlay_heatmap
except ImportError:  # deployed without the package: runtime.py copied beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runtime import OnnxDetector, decode_image, overlay_heatmap  # type: ignore[no-redef]

MAX_BYTES = 32 * 2**20
TRUE = {"1", "true", "yes", "on"}


class Handler(BaseHTTPRequestHandler):
    """Routes /health and /predict; every answer, errors included, is JSON."""

    server_version = "anomalykit-service/1"
    detector: OnnxDetector  # set on the subclass made in make_server
    max_bytes: int = MAX_BYTES
    quiet: bool = False

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def do_GET(self) -> None:
        route = urlsplit(self.path).path
        if route == "/health":
            self._send_json(HTTPStatus.OK, {
                "status": "ok",
                "model": self.detector.path.name,
                "detector": self.detector.detector,
                "providers": self.detector.providers,
                "metadata": self.detector.metadata,
            })
        else:
            self._error(HTTPStatus.NOT_FOUND, f"unknown path {route}; use GET /health or "
                        "POST /predict")

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/predict":
            self._error(HTTPStatus.NOT_FOUND, f"unknown path {url.path}; use POST /predict")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the image as the body with a "
                        "Content-Length (curl --data-binary @frame.png ...)")
            return
        if int(length) > self.max_bytes:
            # Do not read it: closing is cheaper than draining a huge upload.
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body of {length} bytes exceeds the limit of {self.max_bytes}")
            return
        body = self.rfile.read(int(length))
        try:
            image = decode_image(body, source="request body")
        except ValueError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"{exc}; send the raw PNG/JPEG bytes as the "
                        "body (curl --data-binary @frame.png), not a multipart form")
            return
        try:
            result = self.detector.predict_image(image)
        except Exception as exc:  # noqa: BLE001 - report it to the client, keep serving
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {exc}")
            return
        payload = {
            "score": result["score"],
            "normalized_score": result["normalized_score"],
            "label": result["label"],
            "threshold": self.detector.threshold,
            "detector": self.detector.detector,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
        }
        if parse_qs(url.query).get("heatmap", ["0"])[-1].lower() in TRUE:
            overlay = overlay_heatmap(image, result["anomaly_map"])
            ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
            if not ok:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "cannot encode the heatmap")
                return
            payload["heatmap_png_base64"] = base64.b64encode(png.tobytes()).decode("ascii")
        self._send_json(HTTPStatus.OK, payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        if not self.quiet:
            super().log_message(format, *args)


def make_server(model: str | Path, host: str = "127.0.0.1", port: int = 8080, *,
                device: str = "auto", threads: int | None = None, max_bytes: int = MAX_BYTES,
                quiet: bool = False) -> ThreadingHTTPServer:
    """Load the model once and bind; ``port=0`` picks a free port (see ``server_address``)."""
    detector = OnnxDetector(model, device=device, threads=threads)
    # One session shared by all request threads: InferenceSession.run is thread-safe.
    handler = type("BoundHandler", (Handler,), {"detector": detector, "max_bytes": max_bytes,
                                                "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="ONNX file written by anomalykit export")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 = all)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 = any free port)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                        help="largest accepted request body")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.model, args.host, args.port, device=args.device,
                             threads=args.threads, max_bytes=args.max_bytes, quiet=args.quiet)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    detector = server.RequestHandlerClass.detector
    # Printed after the bind, so a supervisor (or a test) can wait for this line.
    print(f"serving {detector.detector} from {args.model} on http://{host}:{port}", flush=True)
    # As PID 1 in a container SIGTERM has no default action: make `docker stop` stop us.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
