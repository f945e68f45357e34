"""DifferNet's anomaly maps compared on the same trained flows (issue 15).

DifferNet scores a whole image (a flow on globally pooled features), so its map is a
by-product and several are possible. For each dataset this script trains DifferNet ONCE per
category with a profile (``quick``), then evaluates every map variant on that same model,
switching :meth:`~anomalykit.detectors.differnet.DifferNetDetector.set_map_method` (no
retraining: the score and image AUROC are the same for all of them):

* ``density``: each cell's score under the flow, pasted into the flow's centre (the default);
* ``attribution``: first-order attribution <d score / d v, F(p)>, positive part (the old map);
* ``attribution_abs``: its magnitude;
* ``attribution_centered``: <d score / d v, F(p) - mean_p F>, positive part;
* ``gradient``: the paper's |d score / d image|, smoothed (PyTorch only, not exportable).

(:mod:`anomalykit.detectors.differnet` explains each.)

Pixel AUROC and AUPRO come from :func:`anomalykit.pipeline.evaluate_detector` (hence
:mod:`anomalykit.metrics`), averaged over a dataset's categories. Each exportable variant is
then recalibrated on the held-out good images, exported with
:func:`anomalykit.export.export_onnx` (parity with PyTorch checked on the trained weights) and
timed in onnxruntime (:class:`~anomalykit.export.runtime.OnnxDetector`, batch 1, median over
``--frames`` random frames of ``--frame-size`` px after a warm-up) on the dataset's first
category.

    python benchmarks/differnet_maps.py --out benchmarks/results/differnet_maps \\
        --dataset synthetic=/tmp/syn --dataset magnetic_tile=/work/shared/datasets:magnetic_tile

``--dataset LABEL=ROOT[:CAT,CAT]`` (every category under ROOT by default). Trained models
go to ``--workdir`` (``--reuse`` loads them instead of training again). Writes
``results.csv`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalykit.base import AnomalyOutput

VARIANTS = ["attribution", "attribution_abs", "attribution_centered", "density", "gradient"]
FIELDS = ["dataset", "variant", "pixel_auroc", "aupro", "pixel_ap", "image_auroc",
          "onnx_ms", "categories"]


class GradientMapDetector(torch.nn.Module):
    """The paper's input-gradient map behind the detector interface, for evaluate_detector."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.image_size = model.image_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        with torch.no_grad():
            score = self.model(images).score
        return AnomalyOutput(score, self.model.gradient_map(images))


def parse_dataset(spec: str) -> tuple[str, str, list[str]]:
    from anomalykit.data import list_mvtec_categories

    label, _, rest = spec.partition("=")
    root, _, cats = rest.partition(":")
    if not label or not root:
        raise SystemExit(f"--dataset wants LABEL=ROOT[:CAT,CAT], got {spec!r}")
    return label, root, cats.split(",") if cats else list_mvtec_categories(root)


def trained_model(root: str, category: str, workdir: Path, *, config: str, overrides: list[str],
                  seed: int, reuse: bool) -> tuple[Any, list[Any], list[Any]]:
    """(model, held-out good records, test records): trained now, or loaded with ``--reuse``."""
    from anomalykit.base import Estimator
    from anomalykit.data import split_train_val
    from anomalykit.pipeline import load_split, train_detector

    run = workdir / category
    if reuse and (run / "model.ckpt").is_file():
        model = Estimator.load(run / "model.ckpt").eval()
        # the same held-out split as training made (train_detector: seeded split_train_val)
        good = [r for r in load_split(root, category, "train") if r.label == 0]
        val_fraction = float(model.checkpoint_meta["config"]["train"]["val_fraction"]) \
            if getattr(model, "checkpoint_meta", None) else 0.1
        _, val = split_train_val(good, val_fraction, seed)
        return model, val, load_split(root, category, "test")
    result = train_detector("differnet", root=root, category=category, config=config,
                            overrides=overrides, out_dir=run, seed=seed, progress=False)
    return result.detector.eval(), result.val_records, result.test_records


def onnx_ms(model: Any, val_records: list[Any], path: Path, *, frames: int, frame_size: int,
            threads: int) -> float:
    """Recalibrate (the pixel threshold belongs to the map), export with parity, time batch 1."""
    from anomalykit.benchmark.timing import time_inference
    from anomalykit.data import AnomalyDataset
    from anomalykit.export import OnnxDetector, export_onnx

    model.calibrate(AnomalyDataset(val_records, model.image_size))
    export_onnx(model, path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (frame_size, frame_size, 3), dtype=np.uint8)
              for _ in range(frames)]
    return time_inference(OnnxDetector(path, device="cpu", threads=threads), images, warmup=3)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from anomalykit.pipeline import evaluate_detector

    rows: list[dict[str, Any]] = []
    workdir = Path(args.workdir)
    for spec in args.dataset:
        label, root, categories = parse_dataset(spec)
        metrics: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
        timing: dict[str, float] = {}
        for index, category in enumerate(categories):
            started = time.perf_counter()
            model, val, test = trained_model(root, category, workdir / label, config=args.config,
                                             overrides=args.overrides, seed=args.seed,
                                             reuse=args.reuse)
            print(f"{label}/{category}: model ready in {time.perf_counter() - started:.0f} s",
                  flush=True)
            for variant in args.variants:
                if variant == "gradient":
                    detector = GradientMapDetector(model)
                else:
                    model.set_map_method(variant)
                    detector = model
                m = evaluate_detector(detector, test, batch_size=8, progress=False).metrics
                metrics[variant].append(m)
                print(f"  {variant:22s} pixel_auroc {m['pixel_auroc']:.3f} aupro "
                      f"{m['aupro']:.3f} image_auroc {m['image_auroc']:.3f}", flush=True)
                if index == 0 and variant != "gradient" and args.frames > 0:
                    path = workdir / label / f"{variant}.onnx"
                    timing[variant] = onnx_ms(model, val, path, frames=args.frames,
                                              frame_size=args.frame_size, threads=args.threads)
                    print(f"  {variant:22s} onnxruntime {timing[variant]:.1f} ms/img", flush=True)
        for variant in args.variants:
            ms = metrics[variant]
            rows.append({"dataset": label, "variant": variant,
                         **{k: statistics.fmean(m[k] for m in ms)
                            for k in ("pixel_auroc", "aupro", "pixel_ap", "image_auroc")},
                         "onnx_ms": timing.get(variant, math.nan),
                         "categories": " ".join(categories)})
    return rows


def markdown(rows: list[dict[str, Any]], command: str, threads: int, note: str) -> str:
    from anomalykit.benchmark.report import environment_info

    info = environment_info("cpu", command)
    lines = ["# DifferNet anomaly maps, same trained flows", "",
             f"- command: `{command}`", f"- date: {info['date']}",
             f"- machine: {info['machine']}, no GPU; onnxruntime threads: {threads}, "
             f"torch threads: {info['torch_threads']}",
             f"- versions: {info['versions']}",
             "- pixel AUROC, AUPRO, pixel AP and image AUROC: means over the categories; "
             "onnx ms/img: onnxruntime, batch 1, median, the first category's model",
             *([f"- {note}"] if note else []), ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == dataset]
        lines += [f"### {dataset} ({part[0]['categories']})", "",
                  "| variant | pixel AUROC | AUPRO | pixel AP | image AUROC | onnx ms/img |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in part:
            ms = "PyTorch only" if r["variant"] == "gradient" else f"{r['onnx_ms']:.1f}"
            lines.append(f"| {r['variant']} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                         f"{r['pixel_ap']:.3f} | {r['image_auroc']:.3f} | {ms} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.csv and results.md")
    parser.add_argument("--dataset", action="append", required=True,
                        help="LABEL=ROOT[:CAT,CAT] (repeatable)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated (default {','.join(VARIANTS)})")
    parser.add_argument("--workdir", default="/tmp/differnet_maps", help="trained models")
    parser.add_argument("--reuse", action="store_true", help="load models the workdir holds")
    parser.add_argument("--config", default="quick")
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides key=value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (timing)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads for training and evaluation (default: torch's)")
    parser.add_argument("--frames", type=int, default=10, help="timed frames (0: no timing)")
    parser.add_argument("--frame-size", type=int, default=256)
    parser.add_argument("--note", default="", help="a line for results.md (e.g. machine load)")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                     for r in rows)
    (out / "results.csv").write_text(buffer.getvalue())
    command = "python " + " ".join(sys.argv)
    (out / "results.md").write_text(markdown(rows, command, args.threads, args.note))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
