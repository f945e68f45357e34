"""What micro-batching can win: onnxruntime's cost per image at batch 1 and at batch N.

For each exported model, ``N`` frames at the model's input size are scored as N calls of one
frame and as one call of N frames, the two interleaved ``--repeats`` times (so both see the
same background load); the medians per image and their ratio are reported. This is the upper
bound of what the service's micro-batching (``--max-batch``) gains on this CPU.

    python benchmarks/batch_cost.py model_a.onnx model_b.onnx --threads 2 --batch 8 \\
        --out benchmarks/results/service_load
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from anomalykit.export.runtime import OnnxDetector
from anomalykit.training.checkpoint import atomic_write_text


def time_model(path: Path, *, threads: int, batch: int, repeats: int, seed: int) -> dict:
    """Median ms per image at batch 1 and at ``batch`` (interleaved), for one model."""
    detector = OnnxDetector(path, device="cpu", threads=threads)
    size = detector.image_size
    frames = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    detector.predict(frames)  # warm-up: first-call allocations
    detector.predict(frames[:1])
    single, batched = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for frame in frames:
            detector.predict(frame[None])
        single.append((time.perf_counter() - started) * 1e3 / batch)
        started = time.perf_counter()
        detector.predict(frames)
        batched.append((time.perf_counter() - started) * 1e3 / batch)
    one, many = statistics.median(single), statistics.median(batched)
    return {"model": path.name, "detector": detector.detector, "image_size": size,
            "threads": threads, "batch": batch, "ms_per_image_batch1": round(one, 2),
            f"ms_per_image_batch{batch}": round(many, 2), "speedup": round(one / many, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files from anomalykit export")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=8, help="frames per batched call")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random frames")
    parser.add_argument("--out", type=Path, default=None, help="folder for batch_cost.{md,json}")
    args = parser.parse_args(argv)
    rows = [time_model(p, threads=args.threads, batch=args.batch, repeats=args.repeats,
                       seed=args.seed) for p in args.models]
    b = args.batch
    lines = [f"| detector | input px | ms/image, batch 1 | ms/image, batch {b} | batch {b} speed-up |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['detector']} | {r['image_size']} | {r['ms_per_image_batch1']} | "
              f"{r[f'ms_per_image_batch{b}']} | {r['speedup']:.2f}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        header = (f"# onnxruntime cost per image, batch 1 vs batch {b}\n\n"
                  f"Machine: {platform.processor() or platform.machine()}, {args.threads} "
                  f"onnxruntime thread(s), {time.strftime('%Y-%m-%d')}; median of "
                  f"{args.repeats} interleaved repetitions on random frames at each model's "
                  f"input size.\n\nCommand: `python benchmarks/batch_cost.py "
                  f"{' '.join(str(p) for p in args.models)} --threads {args.threads} --batch {b} "
                  f"--repeats {args.repeats} --out {args.out}`\n\n")
        atomic_write_text(args.out / "batch_cost.md", header + table + "\n")
        atomic_write_text(args.out / "batch_cost.json", json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
