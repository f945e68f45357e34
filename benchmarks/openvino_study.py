"""OpenVINO (reading the exported ONNX file) against onnxruntime's CPU provider.

For each ``.onnx`` given (FP32 exports and, where OpenVINO accepts their QDQ nodes, the INT8
files of ``benchmarks/int8_study.py``): run both runtimes on the same test frames and compare
every output (parity), then time both at batch 1 with 1 and 2 threads, the two runtimes
taking turns in blocks of 10 calls in the same run (so the ratio holds on a shared machine).
OpenVINO is the ``openvino`` PyPI package (its own runtime), NOT ``onnxruntime-openvino``,
which would replace the onnxruntime package.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openvino_study.py \\
        /tmp/int8models/padim_fp32.onnx /tmp/int8models/padim_int8.onnx ...

Writes ``results.csv`` and ``results.md`` into ``--out`` after every model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import os
import platform
import shlex
import sys
import traceback
from pathlib import Path

import numpy as np

from anomalykit.atomic import atomic_write_csv, atomic_write_text

FIELDS = ["model", "detector", "status", "parity", "max_dscore_rel", "max_dnorm", "label_flips",
          "max_dmap_rel", "mask_flip_fraction", "ort_ms_1t", "ov_ms_1t", "ov_speedup_1t",
          "ort_ms_2t", "ov_ms_2t", "ov_speedup_2t"]
OUTPUTS = ("score", "normalized_score", "label", "anomaly_map", "pred_mask")
# Parity: decisions identical, scores and maps equal to float32 rounding of different
# kernels (OpenVINO fuses and reorders the arithmetic).
PARITY_TOLERANCE = 1e-3


class OpenVinoModel:
    """An anomalykit ONNX file compiled by OpenVINO for the CPU; ``predict`` like OnnxDetector.

    Outputs are taken by position: OpenVINO may rename a graph output (``pred_mask`` came
    back as ``gt_1``), but keeps their order.
    """

    def __init__(self, path: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(
            core.read_model(str(path)), "CPU",
            {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
             "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
        self.request = self.compiled.create_infer_request()

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.request.infer([np.ascontiguousarray(images)])
        return {name: self.request.get_output_tensor(i).data.copy()
                for i, name in enumerate(OUTPUTS)}


def parity(reference: dict[str, np.ndarray], got: dict[str, np.ndarray],
           threshold: float) -> dict[str, float]:
    score_scale = max(abs(threshold), float(np.abs(reference["score"]).max()), 1e-12)
    map_scale = max(float(np.abs(reference["anomaly_map"]).max()), 1e-12)
    diff = {
        "max_dscore_rel": float(np.abs(reference["score"] - got["score"]).max() / score_scale),
        "max_dnorm": float(np.abs(reference["normalized_score"] - got["normalized_score"]).max()),
        "label_flips": int((reference["label"] != got["label"]).sum()),
        "max_dmap_rel": float(np.abs(reference["anomaly_map"] - got["anomaly_map"]).max()
                              / map_scale),
        "mask_flip_fraction": float((reference["pred_mask"] != got["pred_mask"]).mean()),
    }
    ok = (diff["label_flips"] == 0 and diff["max_dscore_rel"] <= PARITY_TOLERANCE
          and diff["max_dnorm"] <= PARITY_TOLERANCE and diff["max_dmap_rel"] <= PARITY_TOLERANCE)
    diff["parity"] = "ok" if ok else "DIFFERS"
    return diff


def _typed(row: dict[str, str]) -> dict:
    """A row read back from results.csv, numbers as numbers (for the table)."""
    typed: dict = dict(row)
    for key, value in row.items():
        with contextlib.suppress(TypeError, ValueError):
            typed[key] = int(value) if key == "label_flips" else float(value)
    return typed


def study_one(path: Path, frames_for, args: argparse.Namespace) -> dict:
    from anomalykit.benchmark.timing import median_ms
    from anomalykit.export.runtime import OnnxDetector

    ort_model = OnnxDetector(path, device="cpu", threads=1)
    row = {"model": path.name, "detector": ort_model.detector}
    try:
        ov_model = OpenVinoModel(path, threads=1)
    except Exception as exc:  # noqa: BLE001 - a model OpenVINO rejects is a row, not a crash
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        row["status"] = f"OpenVINO cannot read it: {first}"[:200]
        return row
    frames = frames_for(ort_model.image_size)
    reference = {k: [] for k in OUTPUTS}
    got = {k: [] for k in OUTPUTS}
    for frame in frames:
        for store, model in ((reference, ort_model), (got, ov_model)):
            for key, value in model.predict(frame[None]).items():
                store[key].append(value)
    reference = {k: np.concatenate(v) for k, v in reference.items()}
    got = {k: np.concatenate(v) for k, v in got.items()}
    row.update(parity(reference, got, ort_model.threshold))
    for threads in args.threads:
        models = [OnnxDetector(path, device="cpu", threads=threads),
                  OpenVinoModel(path, threads=threads)]

        def cycling(model):
            position = [0]

            def predict(_: np.ndarray):
                frame = frames[position[0] % len(frames)][None]
                position[0] += 1
                return model.predict(frame)

            return predict

        ort_ms, ov_ms = median_ms([cycling(m) for m in models], frames[:1], warmup=3,
                                  repeats=args.repeats)
        row[f"ort_ms_{threads}t"] = round(ort_ms, 2)
        row[f"ov_ms_{threads}t"] = round(ov_ms, 2)
        row[f"ov_speedup_{threads}t"] = round(ort_ms / ov_ms, 3)
    row["status"] = "ok"
    return row


def write_results(rows: list[dict], out: Path, command: str, started: str) -> None:
    import onnxruntime
    import openvino

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "results.csv", rows, FIELDS)
    lines = [
        "# OpenVINO vs onnxruntime (CPU provider) on the same anomalykit ONNX files",
        "",
        f"- command: `{command}`",
        f"- date: {started} (UTC)",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores "
        "SHARED with other jobs (absolute ms are not idle figures; each ratio is measured "
        "interleaved in one run, blocks of 10 calls); onnxruntime "
        f"{onnxruntime.__version__}, openvino {openvino.__version__} (PyPI `openvino`, f32 "
        "inference precision, latency hint, 1 stream)",
        "- parity: both runtimes on the same test frames (model size, batch 1): largest "
        "|score| change / max(threshold, |score|), largest normalized_score change, label "
        "flips, largest map change / map max, share of pred_mask pixels that differ; `ok` = "
        f"no label flip and the three relative changes <= {PARITY_TOLERANCE}",
        "- timing: median ms per image at batch 1 after warm-up; speedup = onnxruntime ms / "
        "OpenVINO ms (> 1: OpenVINO faster)",
        "",
        "| model | parity | d score (rel) | d norm | label flips | d map (rel) | mask flips | "
        "ms 1 thread ort / ov (speedup) | ms 2 threads ort / ov (speedup) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r.get('status', '')} | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['parity']} | {r['max_dscore_rel']:.2e} | {r['max_dnorm']:.2e} | "
            f"{r['label_flips']} | {r['max_dmap_rel']:.2e} | {r['mask_flip_fraction']:.2e} | "
            f"{r.get('ort_ms_1t', '')} / {r.get('ov_ms_1t', '')} ({r.get('ov_speedup_1t', '')}) | "
            f"{r.get('ort_ms_2t', '')} / {r.get('ov_ms_2t', '')} ({r.get('ov_speedup_2t', '')}) |")
    lines.append("")
    atomic_write_text(out / "results.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="anomalykit .onnx files")
    parser.add_argument("--root", type=Path, default=Path("/work/shared/datasets"))
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--frames", type=int, default=32, help="Test images used (evenly spaced).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "openvino")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/openvino_study.py", *(argv or sys.argv[1:])])
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    sys.path.insert(0, str(Path(__file__).parent))
    from int8_study import test_frames

    cache: dict[int, np.ndarray] = {}

    def frames_for(size: int) -> np.ndarray:
        if size not in cache:
            cache[size] = test_frames(args.root, args.category, size, args.frames)
        return cache[size]

    rows: list[dict] = []
    names = {path.name for path in args.models}
    if (args.out / "results.csv").is_file():  # keep rows of models not rerun this time
        with open(args.out / "results.csv", encoding="utf-8") as f:
            rows = [_typed(r) for r in csv.DictReader(f) if r["model"] not in names]
    for path in args.models:
        print(f"== {path}", flush=True)
        try:
            row = study_one(path, frames_for, args)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            row = {"model": path.name, "status": f"error: {type(exc).__name__}: {first}"[:200]}
        print(row, flush=True)
        rows.append(row)
        write_results(rows, args.out, command, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
