"""DRAEM on magnetic_tile with each anomaly source: Perlin textures, pix2pix renderings, both.

DRAEM (:class:`anomalykit.detectors.draem.DraemDetector`) learns from synthetic anomalies on
good images. Its ``anomaly_source`` option picks their appearance; the region is DRAEM's Perlin
mask in every case:

* ``perlin``: the paper's, an augmented texture (offline default source) beta-blended in;
* ``pix2pix``: a pix2pix model renders a defect on the good image under the mask (the model of
  ``benchmarks/pix2pix_suite.py``, trained on the toolkit's SYNTHETIC set only: it never saw a
  magnetic tile, and the test set is never used for training);
* ``both``: each anomaly from one of the two, with probability 1/2.

Each run is the ``quick`` profile of DRAEM (64 px, reconstructive base 16, discriminative base
16 with 5 levels, Adam 1e-3, batch 8, 10 % of the good training images held out to calibrate)
with ``--epochs`` epochs instead of its 40, so that a run fits about 5 minutes on one thread;
same seed for every source (same split, initial weights and data order; the synthetic anomalies
differ by construction). Trained and evaluated with the toolkit's pipeline
(:func:`anomalykit.pipeline.train_detector`, :func:`~anomalykit.pipeline.evaluate_detector`)
on the dataset's test split: image AUROC, pixel AUROC, AUPRO (up to 30 % FPR), pixel AP.

Writes into ``--out``: ``results.md`` (command, date, machine, versions, table), ``results.csv``,
``anomalies_<source>.png`` (rows of 8 training tiles: clean | with a synthetic anomaly | mask,
anomalies forced on), and ``runs/`` (ignored by git: each run's folder and checkpoint).

Usage::

    python benchmarks/draem_source_study.py --threads 1 \\
        --pix2pix-checkpoint benchmarks/results/pix2pix/runs/pix2pix.ckpt
    python benchmarks/draem_source_study.py --quick --out /tmp/draem_source_quick ...
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gan_suite import versions  # benchmarks/ is on sys.path

from anomalykit.data.io import image_grid, write_png
from anomalykit.pipeline import evaluate_detector, train_detector

SOURCES = ("perlin", "pix2pix", "both")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/work/shared/datasets"))
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--pix2pix-checkpoint", type=Path,
                        default=Path("benchmarks/results/pix2pix/runs/pix2pix.ckpt"))
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/draem_source_magnetic_tile"))
    parser.add_argument("--quick", action="store_true", help="2 steps per run, to check the script")
    return parser.parse_args(argv)


def anomaly_picture(model, images: torch.Tensor, seed: int) -> np.ndarray:
    """Rows clean | augmented | mask for ``images`` (N, 3, S, S), an anomaly forced on each."""
    synthesizer = model.synthesizer
    keep, synthesizer.anomaly_prob = synthesizer.anomaly_prob, 1.0
    try:
        augmented, masks = model.synthesize(images, np.random.default_rng(seed))
    finally:
        synthesizer.anomaly_prob = keep
    panels = torch.stack([images, augmented, masks.expand_as(images)], dim=1).flatten(0, 1)
    return image_grid(panels, nrow=3)


def main(argv: list[str] | None = None) -> int:
    from anomalykit.data import AnomalyDataset

    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for source in args.sources.split(","):
        overrides: dict = {"train.epochs": args.epochs, "model.anomaly_source": source}
        if source != "perlin":
            overrides["model.pix2pix_checkpoint"] = str(args.pix2pix_checkpoint)
        if args.quick:
            overrides.update({"train.epochs": 1, "train.max_steps": 2})
        print(f"{source}: training", flush=True)
        result = train_detector("draem", root=args.root, category=args.category, config="quick",
                                overrides=overrides, out_dir=out / "runs" / source, seed=args.seed,
                                progress=False)
        evaluation = evaluate_detector(result.detector, result.test_records, progress=False)
        row = {"source": source, **{m: evaluation.metrics.get(m) for m in METRICS},
               "train_s": result.meta["train_seconds"], "epochs": result.history["epochs_run"],
               "steps": result.history["steps"], "n_train": result.meta["n_train"],
               "n_test": evaluation.metrics["n_test"]}
        rows.append(row)
        print(row, flush=True)
        tiles = AnomalyDataset(result.train_records[:8], int(result.detector.image_size))
        images = torch.stack([tiles[i]["image"] for i in range(len(tiles))])
        write_png(out / f"anomalies_{source}.png", anomaly_picture(result.detector, images, args.seed))

    seconds = time.perf_counter() - started
    fields = ["source", *METRICS, "train_s", "epochs", "steps", "n_train", "n_test"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"# DRAEM's anomaly source on {args.category}: Perlin textures vs pix2pix renderings",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, 2-core machine shared with other jobs, "
        f"{torch.get_num_threads()} torch thread(s): absolute seconds are not idle figures  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min.",
        "",
        f"DRAEM quick profile (64 px) with {rows[0]['epochs']} epochs ({rows[0]['steps']} steps of "
        f"batch 8) instead of 40, seed {args.seed}, on {rows[0]['n_train']} good training tiles; "
        f"evaluated on the {rows[0]['n_test']} test tiles. pix2pix renderer: "
        f"`{args.pix2pix_checkpoint}` (trained on the synthetic set only, never on magnetic tiles).",
        "",
        "| anomaly source | image AUROC | pixel AUROC | AUPRO | pixel AP | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['source']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
                     f"{r['aupro']:.3f} | {r['pixel_ap']:.3f} | {r['train_s']:.0f} |")
    lines += [
        "",
        "Pictures: `anomalies_<source>.png`, 8 training tiles with an anomaly forced on: clean | "
        "with the synthetic anomaly | mask.",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    print(f"done in {seconds / 60:.1f} min -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
