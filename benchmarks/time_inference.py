"""Inference timing of every detector: PyTorch vs onnxruntime, batch 1 and batch 8.

Each detector is timed through the module that is exported (uint8 frames in, resize, the
detector, post-processing), so both runtimes do the same work:

* PyTorch: :class:`anomalykit.export.torch_predictor.TorchPredictor` (the ``InferenceWrapper``
  in eval mode, ``torch.no_grad``);
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

Writes ``timing.csv`` and ``timing.md`` (atomically) into ``--out``. The logic lives in
:mod:`anomalykit.benchmark.timing`; this script only parses the options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anomalykit.benchmark.timing import run_timing


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
    rows = run_timing(
        args.out, detectors=args.detectors.split(",") if args.detectors else None,
        config=args.config, runs=args.runs, checkpoints=args.checkpoints or [],
        batch_sizes=args.batch_sizes, frame_size=args.frame_size, warmup=args.warmup,
        repeats=args.repeats, threads=args.threads, seed=args.seed,
        command="python " + " ".join(sys.argv), log=lambda line: print(line, flush=True))
    slower = [r for r in rows if r["onnx_over_torch"] > 1.0]
    if slower:
        print("onnxruntime slower than PyTorch for: "
              + ", ".join(f"{r['detector']} (batch {r['batch']}, x{r['onnx_over_torch']})"
                          for r in slower))
    print(f"wrote {Path(args.out) / 'timing.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
