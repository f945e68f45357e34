"""Load test of the inspection service on loopback: micro-batching on and off, side by side.

For each ``--max-batch`` value (default 8, then 1 = batching off) the script starts the
service (``python -m anomalykit.serve.app MODEL --port 0``) in its own process and waits for
``/ready``. Then the load goes to the services in turn, ``--slice`` seconds each (interleaved,
so background load on a shared machine hits every mode alike), until each had ``--duration``
seconds: ``--clients`` threads each POST PNG frames (``--frame-size`` px, random, seeded, 8
distinct frames) over one keep-alive connection. Reported per mode: requests, throughput
(img/s), p50 / p99 latency, errors (any non-200 answer or connection failure), the mean batch
size (from the service's /metrics), and the service process's resident memory (RSS, from
/proc) at start (after the warm-up frame), at the end, and its peak.

    python benchmarks/service_load.py fastflow_256.onnx --out benchmarks/results/service_load
    python benchmarks/service_load.py model.onnx --clients 2 --duration 2 --out /tmp/load

Writes ``service_load.md`` and ``service_load.json`` (atomically) into ``--out``. The clients
run on the same machine as the service, so they take CPU from it: the numbers are for one
machine serving itself, not the service's ceiling. Linux only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from anomalykit.atomic import atomic_write_text
from anomalykit.export.runtime import OnnxDetector

STARTUP_S = 120.0


def start_service(model: str | Path, options: list[str]) -> tuple[subprocess.Popen, str]:
    """Start the service on a free port; return the process and its base URL once ready."""
    command = [sys.executable, "-m", "anomalykit.serve.app", str(model), "--port", "0", "--quiet",
               *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_S)
    except queue.Empty:
        line = ""
    if "serving" not in line:
        stop_service(process)
        raise RuntimeError(f"the service did not start: {line} {process.stderr.read()}")
    url = line.rsplit(" ", 1)[-1].strip()
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.1)
    stop_service(process)
    raise RuntimeError(f"the service at {url} never became ready")


def stop_service(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` in MiB (``VmHWM`` = its peak) from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def make_frames(size: int, count: int, seed: int) -> list[bytes]:
    """``count`` random (size, size, 3) frames as PNG bytes: smooth noise, like a surface."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        small = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
        frame = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        ok, png = cv2.imencode(".png", frame)
        assert ok
        frames.append(png.tobytes())
    return frames


def connect(host: str, port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with Nagle's algorithm off, as curl and browsers do: http.client
    sends headers and body in two writes, and Nagle + delayed ACK would add ~40 ms to each."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def client(url: str, frames: list[bytes], deadline: float, offset: int,
           latencies: list[float], errors: list[str]) -> None:
    """POST frames in turn over one keep-alive connection until ``deadline``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = connect(host, int(port))
    index = offset
    while time.monotonic() < deadline:
        body = frames[index % len(frames)]
        index += 1
        start = time.perf_counter()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
            answer = connection.getresponse()
            payload = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = connect(host, int(port))
            continue
        if answer.status == 200:
            latencies.append(time.perf_counter() - start)
        else:
            errors.append(f"HTTP {answer.status}: {payload[:200]!r}")
    connection.close()


def service_options(max_batch: int, args: argparse.Namespace) -> list[str]:
    options = ["--max-batch", str(max_batch), "--max-queue", str(max(64, 2 * args.clients)),
               "--limit-concurrency", str(max(64, 4 * args.clients))]
    if args.threads:
        options += ["--threads", str(args.threads)]
    if args.batch_wait_ms is not None:
        options += ["--batch-wait-ms", str(args.batch_wait_ms)]
    return options


def load(url: str, frames: list[bytes], clients: int, seconds: float,
         latencies: list[float], errors: list[str]) -> float:
    """``clients`` threads POSTing for ``seconds``; returns the wall time it took."""
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(url, frames, deadline, i, latencies, errors))
               for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def run_modes(model: str, args: argparse.Namespace, frames: list[bytes]) -> list[dict]:
    """One service per ``--max-batches`` value, all started first; the load then goes to each
    in turn in slices of ``--slice`` seconds (A B A B ...), so a change in the machine's
    background load hits every mode alike; ratios between modes are the robust figure."""
    services = []
    try:
        for max_batch in args.max_batches:
            process, url = start_service(model, service_options(max_batch, args))
            services.append({"max_batch": max_batch, "process": process, "url": url,
                             "rss_start": rss_mb(process.pid), "latencies": [], "errors": [],
                             "elapsed": 0.0})
        slices = max(1, round(args.duration / args.slice))
        for index in range(slices):
            for service in services:
                print(f"slice {index + 1}/{slices}: max batch {service['max_batch']}", flush=True)
                service["elapsed"] += load(service["url"], frames, args.clients, args.duration / slices,
                                           service["latencies"], service["errors"])
        rows = []
        for service in services:
            pid, url = service["process"].pid, service["url"]
            calls = metric(url, "anomalykit_batch_size_count") - 1  # minus the warm-up frame
            frames_scored = metric(url, "anomalykit_batch_size_sum") - 1
            ms = np.asarray(service["latencies"]) * 1000.0
            elapsed, errors = service["elapsed"], service["errors"]
            rows.append({
                "max_batch": service["max_batch"], "clients": args.clients, "duration_s": round(elapsed, 2),
                "slices": slices, "requests": len(ms), "errors": len(errors), "first_errors": errors[:5],
                "throughput_img_s": round(len(ms) / elapsed, 2),
                "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
                "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
                "mean_batch": round(frames_scored / calls, 2) if calls > 0 else None,
                "rss_start_mb": round(service["rss_start"], 1), "rss_end_mb": round(rss_mb(pid), 1),
                "rss_peak_mb": round(rss_mb(pid, "VmHWM"), 1),
            })
        return rows
    finally:
        for service in services:
            stop_service(service["process"])


def markdown(report: dict) -> str:
    lines = [
        "# Inspection service load test (loopback)", "",
        f"Model `{report['model']}` ({report['detector']}), {report['frame_size']} px PNG frames, "
        f"{report['clients']} concurrent clients, {report['duration_s']} s per mode in "
        f"{report['runs'][0]['slices']} interleaved slices; "
        f"{report['cpus']} CPUs ({report['machine']}). Clients and service share the machine.", "",
        f"Command: `{report['command']}`", "",
        "| micro-batching | max batch | requests | img/s | p50 ms | p99 ms | errors | mean batch "
        "| RSS start MiB | RSS end MiB | RSS peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        mode = "off" if run["max_batch"] == 1 else "on"
        lines.append(f"| {mode} | {run['max_batch']} | {run['requests']} | {run['throughput_img_s']} | "
                     f"{run['p50_ms']} | {run['p99_ms']} | {run['errors']} | {run['mean_batch']} | "
                     f"{run['rss_start_mb']} | {run['rss_end_mb']} | {run['rss_peak_mb']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an ONNX file written by anomalykit export")
    parser.add_argument("--out", required=True, help="folder for service_load.md / .json")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode")
    parser.add_argument("--slice", type=float, default=10.0,
                        help="the modes take turns every this many seconds (interleaved)")
    parser.add_argument("--max-batches", type=int, nargs="+", default=[8, 1],
                        help="service --max-batch values to compare (1 = batching off)")
    parser.add_argument("--frame-size", type=int, default=None,
                        help="side of the frames sent (default: the model's image_size)")
    parser.add_argument("--threads", type=int, default=None, help="service onnxruntime threads")
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="service --batch-wait-ms (default: the service's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.slice <= 0:
        parser.error(f"--clients must be >= 1, --duration and --slice > 0; got {args.clients}, "
                     f"{args.duration}, {args.slice}")
    detector = OnnxDetector(args.model, device="cpu", threads=1)  # reads the metadata only
    frame_size = args.frame_size or detector.image_size
    frames = make_frames(frame_size, 8, args.seed)
    runs = run_modes(args.model, args, frames)
    report = {"model": Path(args.model).name, "detector": detector.detector, "frame_size": frame_size,
              "clients": args.clients, "duration_s": args.duration, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(),
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "service_load.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "service_load.md", markdown(report))
    print(markdown(report))
    return 1 if any(run["errors"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
