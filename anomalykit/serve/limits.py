"""What the inspection service accepts: its settings and the image-size check made from the header.

Torch-free and web-stack-free (Pillow only reads image headers). A request that
breaks a limit raises :class:`UploadError`, which the app turns into a JSON error answer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError

LOG_FORMATS = ("json", "text")

# Formats whose size Pillow reads from the header and OpenCV (decode_image) can decode.
HEADER_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM")


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and tuning of one service process (the CLI flags mirror these names).

    Memory is bounded by roughly ``limit_concurrency`` bodies of ``max_body_bytes``, plus
    ``max_queue`` decoded frames of at most ``max_pixels`` pixels (3 bytes each), plus one
    batch's float32 maps (4 bytes a pixel).
    """

    max_body_bytes: int = 32 * 2**20   # largest request body, bytes
    max_pixels: int = 40_000_000       # largest image, width x height, read from the header
    max_batch: int = 8                 # frames per onnxruntime call; 1 turns batching off
    batch_wait_ms: float = 5.0         # how long the first frame of a batch waits for others
    max_queue: int = 32                # images accepted and not yet answered; more -> 503
    header_timeout_s: float = 10.0     # a request's head (line + headers) within this -> else 408
    body_timeout_s: float = 10.0       # the whole body must arrive within this -> else 408
    request_timeout_s: float = 30.0    # a whole /predict within this -> else 504
    keep_alive_s: float = 5.0          # an idle keep-alive connection is closed after this
    limit_concurrency: int = 64        # open connections + tasks; uvicorn answers 503 above
    decode_threads: int = 2            # threads decoding images and encoding heat-maps
    device: str = "auto"               # onnxruntime device: auto, cpu, cuda[:N]
    threads: int | None = None         # onnxruntime intra-op threads (None: all cores)
    log_format: Literal["json", "text"] = "json"
    log_requests: bool = True          # one log line per request

    def __post_init__(self) -> None:
        positive = ("max_body_bytes", "max_pixels", "max_batch", "max_queue", "header_timeout_s",
                    "body_timeout_s", "request_timeout_s", "keep_alive_s", "limit_concurrency",
                    "decode_threads")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, "
                             f"got {self.log_format!r}")


class UploadError(Exception):
    """A request the service refuses: ``status`` (HTTP code) and a message for the client."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def image_size_from_header(data: bytes, *, max_pixels: int, source: str = "request body") -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header without decoding the pixels.

    Raises UploadError: 400 for an empty body or bytes that are not a PNG/JPEG/BMP/TIFF/WebP/PPM
    header, 413 when width x height exceeds ``max_pixels`` (a small file can claim a
    gigapixel: a "decompression bomb"). Truncated pixel data is not seen here; the decoder
    reports it afterwards.
    """
    if not data:
        raise UploadError(400, f"{source} is empty: send the image file's bytes")
    try:
        # Image.open is lazy: it parses the header and stops. Pillow's own bomb check is
        # skipped (see _open_header) so that this check, with its numbers, decides.
        with _open_header(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise UploadError(400, f"{source} ({len(data)} bytes) is not an image: expected "
                               f"{', '.join(HEADER_FORMATS)}") from None
    except Exception as exc:  # noqa: BLE001 - any header parse failure is a corrupt file
        raise UploadError(400, f"{source} has a corrupt image header: {exc}") from None
    if width <= 0 or height <= 0:
        raise UploadError(400, f"{source} claims an empty image ({width} x {height})")
    if width * height > max_pixels:
        raise UploadError(413, f"{source} is a {width} x {height} image ({width * height:,} pixels); "
                               f"the limit is {max_pixels:,} pixels (--max-pixels)")
    return width, height


def _open_header(stream: io.BytesIO) -> Image.Image:
    """``Image.open`` limited to the decodable formats, without Pillow's bomb check.

    Pillow's check reads the module global ``MAX_IMAGE_PIXELS`` and raises before the size
    is known to the caller; the service never decodes pixels with Pillow (OpenCV does), so
    the global is cleared once for this process and :func:`image_size_from_header` enforces
    ``max_pixels`` itself.
    """
    Image.MAX_IMAGE_PIXELS = None
    return Image.open(stream, formats=list(HEADER_FORMATS))
