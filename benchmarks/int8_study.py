"""INT8 (onnxruntime static quantisation) against FP32, per detector, on magnetic_tile.

For each detector: train it with the quick profile (or reuse ``RUNS/<detector>/model.ckpt``),
export FP32, quantise INT8 with :func:`anomalykit.export.quantize.quantize_onnx` calibrated
on ``train/good`` (never the test set), evaluate both ONNX models on the test split with
onnxruntime (image and pixel AUROC, :mod:`anomalykit.metrics`), then time both at batch 1,
1 and 2 threads, FP32 and INT8 taking turns in blocks of 10 calls in the same run (so the
ratio holds on a shared machine). The guard's verdict is in the ``status`` column: ``ok``
when neither AUROC drops by more than ``--max-auroc-drop``, else what ``anomalykit export
--quantize int8 --check`` would refuse with (the INT8 file is still written, with
``force=True``, so it can be timed).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_study.py \\
        --detectors padim patchcore fastflow --runs /tmp/int8runs

Writes ``results.csv`` and ``results.md`` into ``--out`` after every detector.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from anomalykit.atomic import atomic_write_csv, atomic_write_text

FIELDS = ["detector", "status", "n_calibration", "quantized_nodes", "fp32_image_auroc",
          "int8_image_auroc", "delta_image_auroc", "fp32_pixel_auroc", "int8_pixel_auroc",
          "delta_pixel_auroc", "calib_max_dnorm", "calib_label_flips", "fp32_ms_1t",
          "int8_ms_1t", "speedup_1t", "fp32_ms_2t", "int8_ms_2t", "speedup_2t", "fp32_mb",
          "int8_mb", "train_s", "quantize_s"]
DEFAULT_DETECTORS = ["padim", "patchcore", "fastflow", "riad", "ae", "draem", "differnet"]


def _round(value: float, digits: int = 4) -> float | str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else round(float(value), digits)


def _signed(value: float | str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(number) else f"{number:+.4f}"


def checkpoint_for(detector: str, runs: Path, root: Path, category: str) -> tuple[Path, float]:
    """``runs/<detector>/model.ckpt``, trained with the quick profile when it is missing."""
    from anomalykit.pipeline import train_detector

    path = runs / detector / "model.ckpt"
    if path.is_file():
        return path, math.nan
    started = time.perf_counter()
    train_detector(detector, root=root, category=category, config="quick",
                   out_dir=runs / detector, progress=False, seed=0)
    return path, time.perf_counter() - started


def time_models(fp32_path: Path, int8_path: Path, frames: np.ndarray, threads: int,
                repeats: int) -> tuple[float, float]:
    """Median ms per frame at batch 1, FP32 and INT8 interleaved in blocks of 10 calls."""
    from anomalykit.benchmark.timing import median_ms
    from anomalykit.export.runtime import OnnxDetector

    def cycling(detector: OnnxDetector):
        position = [0]

        def predict(_: np.ndarray):
            frame = frames[position[0] % len(frames)][None]
            position[0] += 1
            return detector.predict(frame)

        return predict

    models = [OnnxDetector(p, device="cpu", threads=threads) for p in (fp32_path, int8_path)]
    fp32_ms, int8_ms = median_ms([cycling(m) for m in models], frames[:1], warmup=3,
                                 repeats=repeats)
    return fp32_ms, int8_ms


def test_frames(root: Path, category: str, size: int, count: int = 32) -> np.ndarray:
    """``count`` test images (evenly spaced), resized to the model size: timing input."""
    from anomalykit.data import scan_mvtec
    from anomalykit.data.io import read_image
    from anomalykit.data.transforms import resize_image

    records = scan_mvtec(root, category, "test")
    keep = np.unique(np.linspace(0, len(records) - 1, min(count, len(records))).round())
    return np.stack([resize_image(read_image(records[int(i)].path), size) for i in keep])


def study_one(detector: str, args: argparse.Namespace, work: Path) -> dict:
    from anomalykit.export import export_checkpoint
    from anomalykit.export.quantize import quantize_onnx

    row: dict = {"detector": detector}
    checkpoint, train_s = checkpoint_for(detector, args.runs, args.root, args.category)
    row["train_s"] = _round(train_s, 1)
    fp32 = work / f"{detector}_fp32.onnx"
    int8 = work / f"{detector}_int8.onnx"
    export_checkpoint(checkpoint, fp32)
    category_dir = args.root / args.category
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forced-write warning: the status column says it
        result = quantize_onnx(fp32, int8, category_dir / "train" / "good", check=category_dir,
                               max_auroc_drop=args.max_auroc_drop, force=True, time_repeats=0)
    row["quantize_s"] = _round(time.perf_counter() - started, 1)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(int8), load_external_data=False).metadata_props}
    import json

    record = json.loads(meta["quantization"])
    fp32_m, int8_m, drop = result.auroc["fp32"], result.auroc["int8"], result.auroc["drop"]
    over = {k: v for k, v in drop.items() if math.isfinite(v) and v > args.max_auroc_drop}
    row.update({
        "status": "ok" if not over else "refused: " + ", ".join(
            f"{k.replace('_', ' ')} -{v:.3f}" for k, v in over.items()),
        "n_calibration": result.n_calibration,
        "quantized_nodes": record.get("quantized_nodes", ""),
        "fp32_image_auroc": _round(fp32_m["image_auroc"]),
        "int8_image_auroc": _round(int8_m["image_auroc"]),
        "delta_image_auroc": _round(-drop["image_auroc"]),
        "fp32_pixel_auroc": _round(fp32_m["pixel_auroc"]),
        "int8_pixel_auroc": _round(int8_m["pixel_auroc"]),
        "delta_pixel_auroc": _round(-drop["pixel_auroc"]),
        "calib_max_dnorm": _round(result.calibration_diff["max_abs_normalized_score"]),
        "calib_label_flips": result.calibration_diff["label_flips"],
        "fp32_mb": _round(fp32.stat().st_size / 1e6, 2),
        "int8_mb": _round(int8.stat().st_size / 1e6, 2),
    })
    from anomalykit.export.runtime import OnnxDetector

    frames = test_frames(args.root, args.category, OnnxDetector(fp32, device="cpu").image_size)
    for threads in args.threads:
        fp32_ms, int8_ms = time_models(fp32, int8, frames, threads, args.repeats)
        row[f"fp32_ms_{threads}t"] = _round(fp32_ms, 2)
        row[f"int8_ms_{threads}t"] = _round(int8_ms, 2)
        row[f"speedup_{threads}t"] = _round(fp32_ms / int8_ms, 3)
    return row


def write_results(rows: list[dict], out: Path, command: str, started: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "results.csv", rows, FIELDS)
    import onnxruntime

    lines = [
        "# INT8 (onnxruntime static QDQ quantisation) vs FP32 on magnetic_tile",
        "",
        f"- command: `{command}`",
        f"- date: {started} (UTC)",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores "
        "SHARED with other jobs (absolute ms are not idle figures; each FP32/INT8 ratio is "
        "measured interleaved in one run, blocks of 10 calls); onnxruntime "
        f"{onnxruntime.__version__}, Python {platform.python_version()}",
        "- models: quick profile, seed 0, trained on train/good; INT8 calibrated on 64 evenly "
        "spaced train/good images (not the test set); activations uint8, weights int8 per "
        "channel, only Conv/ConvTranspose/MatMul/Gemm inside the detector's networks "
        "(scoring arithmetic, pre/post-processing and thresholds stay float)",
        "- AUROC: both ONNX models on the full test split (images resized to the model size), "
        "`anomalykit.metrics`; delta = INT8 - FP32; status `refused` = a drop > "
        "0.01 that `quantize_onnx` / `--quantize int8 --check` refuses without `--force`",
        "- timing: median ms per image at batch 1 over 32 test images, after warm-up; "
        "speedup = FP32 ms / INT8 ms (> 1: INT8 faster). With 2 threads on 2 cores that other "
        "jobs use too, onnxruntime's spinning worker threads compete with them: several "
        "2-thread figures are slower than the 1-thread ones",
        "- other calibrations and scopes tried (percentile, entropy, backbone only, ...): "
        "`notes.md`",
        "",
        "| detector | status | image AUROC fp32 -> int8 (delta) | pixel AUROC fp32 -> int8 "
        "(delta) | ms 1 thread fp32 / int8 (speedup) | ms 2 threads fp32 / int8 (speedup) | "
        "MB fp32 / int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if str(r.get("status", "")).startswith("error"):
            lines.append(f"| {r['detector']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['detector']} | {r['status']} | {r['fp32_image_auroc']} -> "
            f"{r['int8_image_auroc']} ({_signed(r['delta_image_auroc'])}) | {r['fp32_pixel_auroc']} "
            f"-> {r['int8_pixel_auroc']} ({_signed(r['delta_pixel_auroc'])}) | "
            f"{r.get('fp32_ms_1t', '')} / {r.get('int8_ms_1t', '')} ({r.get('speedup_1t', '')}) | "
            f"{r.get('fp32_ms_2t', '')} / {r.get('int8_ms_2t', '')} ({r.get('speedup_2t', '')}) | "
            f"{r['fp32_mb']} / {r['int8_mb']} |")
    lines.append("")
    atomic_write_text(out / "results.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=DEFAULT_DETECTORS)
    parser.add_argument("--root", type=Path, default=Path("/work/shared/datasets"))
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/int8runs"),
                        help="Run folders: RUNS/<detector>/model.ckpt, trained when missing.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8models"),
                        help="Where the FP32 and INT8 .onnx files go.")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "int8_magnetic_tile")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-auroc-drop", type=float, default=0.01)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/int8_study.py", *(argv or sys.argv[1:])])
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out
    rows: list[dict] = []
    if (out / "results.csv").is_file():  # keep rows of detectors not rerun this time
        with open(out / "results.csv", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["detector"] not in args.detectors]
    for detector in args.detectors:
        print(f"== {detector}", flush=True)
        try:
            row = study_one(detector, args, args.work)
        except Exception as exc:  # noqa: BLE001 - one failing detector is a row, not a lost study
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            row = {"detector": detector, "status": f"error: {type(exc).__name__}: {first}"[:200],
                   "error": True}
        print(row, flush=True)
        rows.append(row)
        write_results(rows, out, command, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
