"""Inference timing of every detector: PyTorch vs onnxruntime, batch 1 and batch 8.

Each detector is timed through the module that is exported (uint8 frames in, resize, the
detector, post-processing), so both runtimes do the same work:

* PyTorch: :class:`anomalykit.pipeline.TorchPredictor` (the ``InferenceWrapper`` in eval mode,
  ``torch.no_grad``);
* onnxruntime: :class:`anomalykit.export.runtime.OnnxDetector` on the exported ``.onnx``
  (checked against PyTorch to 1e-4 at export), with the same number of threads as torch.

Models come either from checkpoints (``--checkpoints a.ckpt b.ckpt``, or every
``runs/<detector>/<category>/model.ckpt`` under ``--runs DIR``, what ``anomalykit benchmark``
writes) or, by default, are built from each detector's config (``--config quick``) with
their initial weights: the arithmetic, hence the time, does not depend on the weight values
(closed-form models, whose size is set by the fit, are fitted on 64 random images first).

For each model and batch size: ``--warmup`` calls, then ``--repeats`` timed calls on the same
batch of random frames of ``--frame-size``, PyTorch and onnxruntime taking turns in blocks
of 10 calls; the median is reported in ms per batch and ms per
image, and the ratio onnxruntime / PyTorch (< 1: onnxruntime is faster).

    python benchmarks/time_inference.py --out benchmarks/results/inference_cpu
    python benchmarks/time_inference.py --runs benchmarks/results/synthetic --out /tmp/timing

Writes ``timing.csv`` and ``timing.md`` (atomically) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalykit.config import load_config
from anomalykit.export import export_onnx
from anomalykit.export.runtime import OnnxDetector
from anomalykit.pipeline import TorchPredictor
from anomalykit.registry import create, list_detectors
from anomalykit.training import load_model
from anomalykit.training.checkpoint import atomic_write_text

FIELDS = ["detector", "source", "image_size", "batch", "torch_ms_batch", "onnx_ms_batch",
          "torch_ms_image", "onnx_ms_image", "onnx_over_torch"]


def median_ms(predictors, frames: np.ndarray, *, warmup: int, repeats: int,
              block: int = 10) -> list[float]:
    """Median wall time in ms of each ``predict(frames)`` over ``repeats`` calls after ``warmup``.

    The predictors take turns in blocks of ``block`` calls (A A A.. B B B.. A A A..), so a
    slow spell of a shared machine hits both alike (timed once each, one after the other, the
    ratio swung by +-40 % between runs). Blocks rather than single alternating calls:
    onnxruntime's worker threads keep spinning briefly after a run and would slow a PyTorch
    call that follows at once.
    """
    for predict in predictors:
        for _ in range(warmup):
            predict(frames)
    times: list[list[float]] = [[] for _ in predictors]
    while len(times[0]) < repeats:
        for predict, record in zip(predictors, times, strict=True):
            predict(frames)  # one untimed call after the switch
            for _ in range(min(block, repeats - len(record))):
                started = time.perf_counter()
                predict(frames)  # returns numpy arrays: the work is finished when it returns
                record.append(time.perf_counter() - started)
    return [statistics.median(record) * 1000.0 for record in times]


def models_to_time(args: argparse.Namespace) -> list[tuple[str, str, torch.nn.Module]]:
    """(detector name, where it came from, detector in eval mode) for every model to time."""
    checkpoints = [Path(p) for p in args.checkpoints or []]
    if args.runs:
        checkpoints += sorted(Path(args.runs).glob("runs/*/*/model.ckpt"))
    if checkpoints:
        models = []
        for path in checkpoints:
            detector = load_model(path, map_location="cpu").eval()
            models.append((detector.registry_name, str(path), detector))
        return models
    names = args.detectors.split(",") if args.detectors else [
        n for n in list_detectors() if not n.startswith("_")]
    models = []
    for name in names:
        model_cfg = load_config(name, args.config)["model"]
        torch.manual_seed(args.seed)
        detector = create(name, **model_cfg)
        source = f"{args.config} config, initial weights"
        if detector.closed_form:
            # An unfitted closed-form model (PCA) has no components: fit it on random images
            # first, so the timed arithmetic is that of a fitted model.
            images = torch.rand(64, 3, detector.image_size, detector.image_size,
                                generator=torch.Generator().manual_seed(args.seed))
            detector.fit(images, batch_size=64, device="cpu", progress=False)
            source = f"{args.config} config, closed-form models fitted on 64 random images"
        models.append((name, source, detector.eval()))
    return models


def time_model(name: str, source: str, detector: torch.nn.Module, args: argparse.Namespace,
               workdir: Path) -> list[dict[str, Any]]:
    onnx_path = export_onnx(detector, workdir / f"{name}.onnx", verbose=False)
    torch_predictor = TorchPredictor(detector, device="cpu")
    onnx_predictor = OnnxDetector(onnx_path, device="cpu", threads=torch.get_num_threads())
    rng = np.random.default_rng(args.seed)
    rows = []
    for batch in args.batch_sizes:
        frames = rng.integers(0, 256, (batch, args.frame_size, args.frame_size, 3), dtype=np.uint8)
        torch_ms, onnx_ms = median_ms([torch_predictor.predict, onnx_predictor.predict], frames,
                                      warmup=args.warmup, repeats=args.repeats)
        rows.append({
            "detector": name, "source": source, "image_size": int(detector.image_size),
            "batch": batch, "torch_ms_batch": round(torch_ms, 2), "onnx_ms_batch": round(onnx_ms, 2),
            "torch_ms_image": round(torch_ms / batch, 2), "onnx_ms_image": round(onnx_ms / batch, 2),
            "onnx_over_torch": round(onnx_ms / torch_ms, 3),
        })
        print(f"{name:10s} batch {batch}: torch {torch_ms:9.2f} ms  onnxruntime {onnx_ms:9.2f} ms  "
              f"ratio {onnx_ms / torch_ms:.3f}", flush=True)
    return rows


def write_outputs(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "timing.csv", buffer.getvalue())
    lines = [
        "# Inference timing: PyTorch vs onnxruntime",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads for torch and onnxruntime; torch {torch.__version__}",
        "- median of the timed calls after warm-up (the two runtimes take turns in blocks of 10 "
        "calls), uint8 frames resized inside the model; "
        "ratio = onnxruntime / PyTorch (< 1: onnxruntime faster)",
        "",
        "| detector | size | batch | torch ms/batch | onnx ms/batch | torch ms/img | onnx ms/img | "
        "onnx / torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['detector']} | {r['image_size']} | {r['batch']} | {r['torch_ms_batch']} | "
                     f"{r['onnx_ms_batch']} | {r['torch_ms_image']} | {r['onnx_ms_image']} | "
                     f"{r['onnx_over_torch']} |")
    sources = sorted({r["source"] for r in rows})
    lines += ["", "Models: " + "; ".join(sources), ""]
    atomic_write_text(out / "timing.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder for timing.csv and timing.md")
    parser.add_argument("--detectors", help="comma-separated names (default: every detector)")
    parser.add_argument("--config", default="quick", help="config profile for built models")
    parser.add_argument("--runs", help="a benchmark output folder: time its runs/*/*/model.ckpt")
    parser.add_argument("--checkpoints", nargs="*", help="checkpoint files to time")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--frame-size", type=int, default=256, help="side of the input frames")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, detector in models_to_time(args):
            rows += time_model(name, source, detector, args, Path(tmp))
            # partial results survive an interrupted run
            write_outputs(rows, Path(args.out), "python " + " ".join(sys.argv))
    slower = [r for r in rows if r["onnx_over_torch"] > 1.0]
    if slower:
        print("onnxruntime slower than PyTorch for: "
              + ", ".join(f"{r['detector']} (batch {r['batch']}, x{r['onnx_over_torch']})" for r in slower))
    print(f"wrote {Path(args.out) / 'timing.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
