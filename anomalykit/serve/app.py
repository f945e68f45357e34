"""The inspection service: an exported anomalykit model behind HTTP (FastAPI on uvicorn).

    python -m anomalykit.serve.app model.onnx --host 127.0.0.1 --port 8080
    python deploy/service.py model.onnx ...          # the same, from a checkout or the image

Routes (every error answer is JSON ``{"error": ...}``):

``POST /predict``   the image as the raw body (``curl --data-binary @frame.png``) or as the
                    ``file`` field of a multipart form (``curl -F file=@frame.png``) ->
                    ``{score, normalized_score, label, threshold, detector, width, height}``;
                    ``?heatmap=1`` adds ``heatmap_png_base64`` (the JET overlay as a PNG).
                    400 not an image / empty / corrupt, 408 body too slow, 413 body or image
                    too large, 503 + Retry-After queue full, 504 request too slow, 500 model failed.
``GET /health``     liveness: the process is up and the model loaded; model metadata.
``GET /ready``      readiness: 200 once one warm-up frame went through the model, 503 before.
``GET /metrics``    Prometheus text format.
``GET /docs``       OpenAPI page (``/openapi.json``).
``GET /``           a page for a person: drop an image, see score, verdict and heat-map.

Torch-free: from anomalykit it imports only :mod:`anomalykit.export.runtime`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from anomalykit.export.runtime import OnnxDetector, decode_image, heatmap_range, overlay_heatmap
from anomalykit.serve.batching import MicroBatcher, QueueFull, Scored
from anomalykit.serve.limits import ServiceSettings, UploadError, image_size_from_header

logger = logging.getLogger("anomalykit.serve")

ROUTES = ("/", "/predict", "/health", "/ready", "/metrics", "/docs", "/openapi.json")
WARM_UP_SIZE = 64  # the readiness frame: (64, 64, 3) gray; the model resizes it itself
RETRY_AFTER_S = 1
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Prometheus metrics of one app, on its own registry (two apps in a process never mix)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("anomalykit_requests", "HTTP requests answered",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("anomalykit_request_latency_seconds", "time to answer a request",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.queue_depth = Gauge("anomalykit_queue_depth", "images accepted and not yet scored",
                                 registry=self.registry)
        batch_buckets = sorted({1, 2, 4, 8, 16, 32, max_batch})
        self.batch_size = Histogram("anomalykit_batch_size", "frames per onnxruntime call",
                                    buckets=[b for b in batch_buckets if b <= max_batch],
                                    registry=self.registry)
        self.inference = Histogram("anomalykit_inference_seconds", "time of one onnxruntime call",
                                   buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.images = Counter("anomalykit_images_scored", "images scored", registry=self.registry)
        self.anomalies = Counter("anomalykit_anomalies_flagged", "images scored as anomalous",
                                 registry=self.registry)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)


class Service:
    """Everything one app holds: model, settings, batcher, metrics, readiness."""

    def __init__(self, detector: OnnxDetector, settings: ServiceSettings) -> None:
        self.detector = detector
        self.settings = settings
        self.metrics = Metrics(settings.max_batch)
        self.batcher = MicroBatcher(detector.predict, max_batch=settings.max_batch,
                                    wait_s=settings.batch_wait_ms / 1000.0,
                                    max_queue=settings.max_queue, on_batch=self.metrics.observe_batch)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        # Decoding and PNG encoding run here, off the event loop (OpenCV releases the GIL).
        self.pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
        self.ready = False
        self.not_ready_reason = "warming up: the model has not run yet"

    async def warm_up(self) -> None:
        """Run one gray frame through the batcher; /ready answers 200 only after it worked."""
        try:
            await self.batcher.submit(np.full((WARM_UP_SIZE, WARM_UP_SIZE, 3), 128, np.uint8))
        except Exception as exc:  # noqa: BLE001 - reported by /ready and the log
            self.not_ready_reason = f"the warm-up frame failed: {exc}"
            logger.error("warm-up failed: %s", exc)
            return
        self.ready = True
        self.not_ready_reason = ""

    async def predict(self, request: Request, heatmap: bool) -> dict[str, Any]:
        """Read, check, decode and score one upload; raises UploadError for a bad one."""
        settings = self.settings
        info = request.scope.setdefault("anomalykit", {})
        if self.batcher.depth >= settings.max_queue:  # shed load before reading the body
            raise _queue_full(self.batcher.depth, settings.max_queue)
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        data, source = await image_bytes(request, body)
        image_size_from_header(data, max_pixels=settings.max_pixels, source=source)  # 413 before decoding
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(self.pool, lambda: decode_image(data, source=source))
        except ValueError as exc:
            raise UploadError(400, f"{exc}; send a PNG, JPEG, BMP, TIFF or WebP file") from None
        try:
            scored: Scored = await self.batcher.submit(image)
        except QueueFull as exc:
            raise _queue_full(self.batcher.depth, settings.max_queue) from exc
        except Exception as exc:  # noqa: BLE001 - the model failed on this batch: 500, keep serving
            logger.exception("inference failed")
            raise UploadError(500, f"inference failed: {exc}") from None
        outputs = scored.outputs
        label = int(outputs["label"])
        payload: dict[str, Any] = {
            "score": float(outputs["score"]),
            "normalized_score": float(outputs["normalized_score"]),
            "label": label,
            "threshold": float(self.detector.threshold),
            "detector": self.detector.detector,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
        }
        info.update(score=payload["score"], label=label, batch_size=scored.batch_size)
        self.metrics.images.inc()
        if label == 1:
            self.metrics.anomalies.inc()
        if heatmap:
            payload["heatmap_png_base64"] = await loop.run_in_executor(
                self.pool, _overlay_png_base64, image, outputs["anomaly_map"],
                heatmap_range(self.detector.pixel_threshold))
        return payload


def _queue_full(depth: int, limit: int) -> UploadError:
    return UploadError(503, f"the service is busy: {depth} images are waiting (limit {limit}); "
                            f"retry after {RETRY_AFTER_S} s",
                       headers={"Retry-After": str(RETRY_AFTER_S)})


def _overlay_png_base64(image: np.ndarray, anomaly_map: np.ndarray,
                        scale: dict[str, float]) -> str:
    # One colour scale for every request (the predict command's): red = twice the threshold.
    overlay = overlay_heatmap(image, anomaly_map, **scale)
    ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UploadError(500, "cannot encode the heat-map as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, at most ``max_bytes``, arrived within ``timeout_s`` seconds.

    The declared Content-Length is checked before reading a byte; a chunked body is counted
    while it streams. Raises UploadError 413 (too large), 408 (too slow: the client stalled),
    400 (bad Content-Length, or the client went away).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise UploadError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise _too_large(int(declared), max_bytes)
    received = bytearray()

    async def collect() -> None:
        async for chunk in request.stream():
            received.extend(chunk)
            if len(received) > max_bytes:
                raise _too_large(len(received), max_bytes, streaming=True)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise UploadError(408, f"the body did not arrive within {timeout_s:g} s ({len(received)} "
                               f"of {declared or 'unknown'} bytes received)",
                          headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise UploadError(400, f"the client disconnected after {len(received)} bytes") from None
    return bytes(received)


def _too_large(size: int, limit: int, *, streaming: bool = False) -> UploadError:
    what = f"more than {limit:,}" if streaming else f"{size:,}"
    # Connection: close, so the server does not have to drain the rest of a huge upload.
    return UploadError(413, f"body of {what} bytes exceeds the limit of {limit:,} bytes "
                            "(--max-body-bytes)", headers={"Connection": "close"})


async def image_bytes(request: Request, body: bytes) -> tuple[bytes, str]:
    """The image file inside the body: the body itself, or a multipart form's ``file`` field."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return body, "request body"

    async def one_chunk() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, one_chunk(), max_files=4, max_fields=16).parse()
    except Exception as exc:  # noqa: BLE001 - a malformed form is the client's error
        raise UploadError(400, f"malformed multipart form: {exc}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise UploadError(400, f"the multipart form has no file field 'file' (fields: "
                                   f"{', '.join(form.keys()) or 'none'}); use -F file=@frame.png")
        return await upload.read(), f"uploaded file {upload.filename or 'file'!r}"
    finally:
        await form.close()


class ObserveRequests:
    """ASGI middleware: a request id, the Prometheus request metrics and one log line per request."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        info = scope.setdefault("anomalykit", {})
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = scope["path"] if scope["path"] in ROUTES else "other"
            metrics = self.service.metrics
            metrics.requests.labels(route=route, status=str(status)).inc()
            metrics.latency.labels(route=route).observe(seconds)
            if self.service.settings.log_requests:
                client = scope.get("client")
                logger.info("request", extra={"fields": {
                    "request_id": request_id, "method": scope["method"], "route": scope["path"],
                    "status": status, "latency_ms": round(seconds * 1000.0, 2),
                    "score": info.get("score"), "label": info.get("label"),
                    "batch_size": info.get("batch_size"), "error": info.get("error"),
                    "client": f"{client[0]}:{client[1]}" if client else None}})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(model: str | Path | OnnxDetector, settings: ServiceSettings | None = None) -> FastAPI:
    """The service for ``model`` (an ONNX file written by anomalykit export, or a loaded
    :class:`OnnxDetector`). The model is loaded here, so a bad file fails before binding."""
    settings = settings or ServiceSettings()
    detector = model if isinstance(model, OnnxDetector) else OnnxDetector(
        model, device=settings.device, threads=settings.threads)
    service = Service(detector, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        # Not awaited here: the server listens (liveness) while the model warms up (readiness).
        warm_up = asyncio.create_task(service.warm_up())
        try:
            yield
        finally:
            warm_up.cancel()
            await service.batcher.stop()
            service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="anomalykit inspection service", version=detector.metadata.get(
        "anomalykit_version", "unknown"), lifespan=lifespan,
        description=f"Scores images with the exported {detector.detector} model "
                    f"{detector.path.name}. Higher score = more anomalous; label 1 = NG.")
    app.state.service = service
    app.add_middleware(ObserveRequests, service=service)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"unknown path {request.url.path}; see GET /docs" if exc.status_code == 404
                   else str(exc.detail))
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(422, problems)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("anomalykit.serve").joinpath("page.html").read_text("utf-8"))

    @app.get("/health", summary="Liveness: the process is up and the model is loaded")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "ready": service.ready, "model": detector.path.name,
                "detector": detector.detector, "threshold": float(detector.threshold),
                "providers": detector.providers, "metadata": detector.metadata,
                "limits": {"max_body_bytes": settings.max_body_bytes, "max_pixels": settings.max_pixels,
                           "max_batch": settings.max_batch, "max_queue": settings.max_queue}}

    @app.get("/ready", summary="Readiness: the model has scored a warm-up frame",
             responses={503: {"description": "still warming up, or the warm-up failed"}})
    async def ready() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready"})
        return _error(503, service.not_ready_reason, {"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict", summary="Score one image", openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request, heatmap: bool = False) -> JSONResponse:
        info = request.scope.setdefault("anomalykit", {})
        try:
            payload = await asyncio.wait_for(service.predict(request, heatmap), settings.request_timeout_s)
        except UploadError as exc:
            info["error"] = exc.message
            return _error(exc.status, exc.message, exc.headers)
        except asyncio.TimeoutError:
            info["error"] = "request timeout"
            return _error(504, f"the request took longer than {settings.request_timeout_s:g} s "
                               "(--request-timeout)")
        return JSONResponse(payload)

    return app


PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "The image file: raw bytes as the body, or the 'file' field of a form.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    },
    "responses": {
        "400": {"description": "empty, corrupt or not an image"},
        "408": {"description": "the body did not arrive within the body timeout"},
        "413": {"description": "body over the size cap, or image over the pixel cap"},
        "503": {"description": "queue full; retry after Retry-After seconds"},
        "504": {"description": "the request took longer than the request timeout"},
    },
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, message and the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        line = {"time": when, "level": record.levelname.lower(), "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        when = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        text = f"{when} {record.levelname.lower()} {record.getMessage()} {extra}".rstrip()
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def configure_logging(log_format: str, *, quiet: bool = False) -> None:
    """Log lines on stderr in ``json`` or ``text``; ``quiet`` keeps warnings and errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, plus a deadline for each request's head (request line + headers).

    uvicorn times out idle keep-alive connections but not a client that opens a connection and
    then trickles or withholds its headers ("slowloris"); such a client would hold a slot
    until ``--limit-concurrency`` turns everyone away. This closes it after ``timeout_s`` with a
    408. The deadline starts when the connection opens and again after each answer, and stops
    when a request's head is complete (from there the body and request timeouts apply).
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithHeaderTimeout(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            body = json.dumps({"error": f"the request line and headers did not arrive within "
                                        f"{timeout_s:g} s (--header-timeout)"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()
            client = f"{self.client[0]}:{self.client[1]}" if self.client else None
            logger.info("header timeout", extra={"fields": {"status": 408, "client": client}})

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a new request's head was parsed
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # waiting for the next request's head on this keep-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return H11WithHeaderTimeout


def uvicorn_config(app: FastAPI, settings: ServiceSettings) -> Any:
    """uvicorn settings for ``app``: our timeouts and limits, our request log instead of uvicorn's."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False,
                          http=header_timeout_protocol(settings.header_timeout_s),
                          timeout_keep_alive=max(1, round(settings.keep_alive_s)),
                          limit_concurrency=settings.limit_concurrency,
                          timeout_graceful_shutdown=max(1, round(settings.request_timeout_s)))


def run(model: str | Path, *, host: str = "127.0.0.1", port: int = 8080,
        settings: ServiceSettings | None = None, quiet: bool = False) -> None:
    """Load ``model``, bind ``host:port`` (0 = a free port), print ``serving ... on URL`` and
    serve until SIGINT / SIGTERM. Raises FileNotFoundError / ValueError for a bad model."""
    import uvicorn

    settings = settings or ServiceSettings()
    configure_logging(settings.log_format, quiet=quiet)
    app = create_app(model, settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say
    # TCP, and without it every keep-alive answer after the first waits ~40 ms (Nagle's
    # algorithm against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    # Printed once the socket listens, so a supervisor (or a test) can wait for this line.
    print(f"serving {app.state.service.detector.detector} from {model} on http://{url_host}:{bound_port}",
          flush=True)
    uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = ServiceSettings()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="ONNX file written by anomalykit export")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; "
                        "0.0.0.0 = all, only on a trusted network: there is no authentication)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 = any free port)")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="frames per model call (1 = no micro-batching)")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                        help="how long a frame waits for others to batch with")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="images waiting before new ones get 503 + Retry-After")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body (413 above)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="largest image, width x height from its header (413 above)")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                        help="seconds for a request's line and headers to arrive (408 after)")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        help="seconds for the whole body to arrive (408 after)")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds for a whole /predict (504 after)")
    parser.add_argument("--keep-alive", type=float, default=defaults.keep_alive_s,
                        help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--limit-concurrency", type=int, default=defaults.limit_concurrency,
                        help="open connections + tasks before uvicorn answers 503")
    parser.add_argument("--decode-threads", type=int, default=defaults.decode_threads,
                        help="threads decoding uploads and encoding heat-maps")
    parser.add_argument("--log-format", choices=("json", "text"), default=defaults.log_format)
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    return replace(ServiceSettings(), device=args.device, threads=args.threads,
                   max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                   max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                   max_pixels=args.max_pixels, header_timeout_s=args.header_timeout,
                   body_timeout_s=args.body_timeout,
                   request_timeout_s=args.request_timeout, keep_alive_s=args.keep_alive,
                   limit_concurrency=args.limit_concurrency, decode_threads=args.decode_threads,
                   log_format=args.log_format, log_requests=not args.quiet)


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Command line entry (``prog``: the name shown in --help, e.g. ``anomalykit serve``).
    Returns 2 with ``error: ...`` on stderr for a bad model, option or port."""
    args = build_parser(prog).parse_args(argv)
    try:
        settings = settings_from_args(args)
        run(args.model, host=args.host, port=args.port, settings=settings, quiet=args.quiet)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
