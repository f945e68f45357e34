"""Bad uploads against the inspection service: each answered with a 4xx JSON error (or, for
16-bit and RGBA images, served correctly) while the service keeps serving.

The script starts the service on ``MODEL`` (its own process, free port, default limits
except ``--body-timeout``), sends each case on a plain socket, records the status and the
error message, and checks that a good PNG is scored (200) right after each one.

    python benchmarks/service_bad_uploads.py fastflow_256.onnx --out benchmarks/results/service_load

Cases: empty body; a truncated PNG; a text file; a 1-gigapixel PNG bomb (a valid 40000 x 25000
header, a few dozen bytes); a 16-bit PNG; an RGBA PNG; a client that sends half its body and
stalls (answered when ``--body-timeout`` runs out); a client that never finishes its headers
(``--header-timeout``); a body whose Content-Length is over the
size cap (refused before it is read); a chunked body that grows over the cap (refused while
streaming). Writes ``service_bad_uploads.md`` and ``.json`` (atomically) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

from anomalykit.atomic import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import start_service, stop_service  # noqa: E402

MAX_BODY_BYTES = 32 * 2**20  # the service's default cap, passed explicitly below


def png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, a tiny IDAT and IEND: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def request(url: str, head: bytes, parts: list[bytes], timeout_s: float) -> tuple[int, dict]:
    """Send the head, then each part, on one socket; read the answer until the server closes
    or the JSON body is complete."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
        conn.sendall(head)
        for part in parts:
            conn.sendall(part)
        answer = b""
        while True:
            chunk = conn.recv(65536)
            answer += chunk
            head_end = answer.find(b"\r\n\r\n")
            if not chunk:
                break
            if head_end >= 0:
                headers = answer[:head_end].decode("latin-1").lower()
                length = next((int(line.split(":", 1)[1]) for line in headers.split("\r\n")
                               if line.startswith("content-length:")), None)
                if length is not None and len(answer) - head_end - 4 >= length:
                    break
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1])


def post(url: str, body: bytes, timeout_s: float = 60.0) -> tuple[int, dict]:
    head = (f"POST /predict HTTP/1.1\r\nHost: service\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return request(url, head, [body], timeout_s)


def cases(body_timeout_s: float, header_timeout_s: float) -> tuple[list[dict], bytes]:
    """The cases (name, expected class, a function url -> (status, JSON)) and a good PNG."""
    rng = np.random.default_rng(0)
    good = png(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    deep = rng.integers(0, 65536, (96, 128, 3), dtype=np.uint16)
    rgba = rng.integers(0, 256, (96, 128, 4), dtype=np.uint8)
    stalled = png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    over = MAX_BODY_BYTES + 2**20  # the declared Content-Length
    chunk = 2**20
    # The cap is crossed only by the last, small chunk: everything sent has arrived when the
    # server answers and closes, so the answer is not lost to a TCP reset.
    chunks = [b"%x\r\n" % chunk + b"\0" * chunk + b"\r\n"] * (MAX_BODY_BYTES // chunk)
    chunks.append(b"400\r\n" + b"\0" * 1024 + b"\r\n")  # 0x400 = 1 KiB
    return [
        {"case": "empty body", "expect": "4xx", "send": lambda url: post(url, b"")},
        {"case": "truncated PNG", "expect": "4xx", "send": lambda url: post(url, good[: len(good) // 2])},
        {"case": "text file", "expect": "4xx",
         "send": lambda url: post(url, b"lot,station,result\nA3,2,ok\nA3,3,ng\n" * 20)},
        {"case": "1-gigapixel PNG bomb", "expect": "4xx",
         "send": lambda url: post(url, png_bomb(40_000, 25_000))},
        {"case": "16-bit PNG", "expect": "200", "send": lambda url: post(url, png(deep))},
        {"case": "RGBA PNG", "expect": "200", "send": lambda url: post(url, png(rgba))},
        {"case": "slow client (stalls mid-body)", "expect": "4xx", "send": lambda url: request(
            url, (f"POST /predict HTTP/1.1\r\nHost: service\r\nContent-Type: image/png\r\n"
                  f"Content-Length: {len(stalled)}\r\n\r\n").encode(), [stalled[: len(stalled) // 2]],
            timeout_s=body_timeout_s + 30)},
        {"case": "slow headers (never finished)", "expect": "4xx", "send": lambda url: request(
            url, b"POST /predict HTTP/1.1\r\nHost: service\r\nContent-Type: image/png\r\n", [],
            timeout_s=header_timeout_s + 30)},
        {"case": "body over the size cap", "expect": "4xx", "send": lambda url: request(
            url, (f"POST /predict HTTP/1.1\r\nHost: service\r\nContent-Type: image/png\r\n"
                  f"Content-Length: {over}\r\n\r\n").encode(), [], timeout_s=60)},
        {"case": "chunked body over the size cap", "expect": "4xx", "send": lambda url: request(
            url, b"POST /predict HTTP/1.1\r\nHost: service\r\nContent-Type: image/png\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n",
            chunks, timeout_s=60)},
    ], good


def run(model: str, body_timeout_s: float, header_timeout_s: float) -> list[dict]:
    all_cases, good = cases(body_timeout_s, header_timeout_s)
    process, url = start_service(model, ["--body-timeout", str(body_timeout_s),
                                         "--header-timeout", str(header_timeout_s),
                                         "--max-body-bytes", str(MAX_BODY_BYTES)])
    rows = []
    try:
        for case in all_cases:
            start = time.perf_counter()
            try:
                status, answer = case["send"](url)
            except (OSError, ValueError) as exc:
                status, answer = 0, {"error": f"no answer: {type(exc).__name__}: {exc}"}
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            after, _ = post(url, good)
            message = answer.get("error") or (f"scored: score {answer['score']:.4g}, label "
                                              f"{answer['label']}, {answer['width']} x {answer['height']}")
            rows.append({"case": case["case"], "expect": case["expect"], "status": status,
                         "answer": message, "ms": round(elapsed_ms, 1), "good_request_after": after})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_service(process)
    return rows


def ok(row: dict) -> bool:
    expected = 400 <= row["status"] < 500 if row["expect"] == "4xx" else row["status"] == 200
    return expected and row["good_request_after"] == 200


def markdown(rows: list[dict], command: str, model: str, body_timeout_s: float,
             header_timeout_s: float) -> str:
    lines = ["# Inspection service: bad uploads", "",
             f"Model `{model}`; service defaults except `--body-timeout {body_timeout_s:g}` "
             f"`--header-timeout {header_timeout_s:g}` "
             f"(size cap {MAX_BODY_BYTES:,} bytes, pixel cap 40,000,000).", "",
             f"Command: `{command}`", "",
             "| case | status | answer | ms | good request after | as expected |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        answer = row["answer"].replace("|", "\\|")
        lines.append(f"| {row['case']} | {row['status']} | {answer} | {row['ms']} | "
                     f"{row['good_request_after']} | {'yes' if ok(row) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an ONNX file written by anomalykit export")
    parser.add_argument("--out", required=True, help="folder for service_bad_uploads.md / .json")
    parser.add_argument("--body-timeout", type=float, default=10.0,
                        help="the service's --body-timeout: how long the stalled client is waited for")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="the service's --header-timeout: how long unfinished headers are waited for")
    args = parser.parse_args(argv)
    rows = run(args.model, args.body_timeout, args.header_timeout)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "service_bad_uploads.json", json.dumps(rows, indent=2) + "\n")
    table = markdown(rows, command, Path(args.model).name, args.body_timeout, args.header_timeout)
    atomic_write_text(out / "service_bad_uploads.md", table)
    print(table)
    return 0 if all(ok(row) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
