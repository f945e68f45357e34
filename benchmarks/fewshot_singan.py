"""Few-shot FastFlow on magnetic_tile, with and without SinGAN variations of the few images.

Per seed, ``--shots`` (10) good images are drawn from ``magnetic_tile/train/good`` with
``numpy.random.default_rng(seed)``; FastFlow (quick profile, the same settings in every arm)
is trained through the toolkit's pipeline (:func:`anomalykit.pipeline.train_detector` on a
dataset root in MVTec layout whose ``train/good`` holds the arm's images and whose ``test`` and
``ground_truth`` link to the real ones) and evaluated on the FULL magnetic_tile test set
(:func:`anomalykit.pipeline.evaluate_detector`: 508 images, image AUROC, pixel AUROC, AUPRO).
Arms:

- ``real``: the 10 images only;
- ``singan``: the 10 images + ``--per-image`` SinGAN variations of each (one SinGAN per image,
  trained on that image as one grey channel resized to ``--singan-size`` px square, as the
  detector sees it, then sampled at that size and written as PNG; the detector's loader
  upsamples them to its 256-px input like any image);
- ``blurred`` (control): the 10 images + ``--per-image`` copies of each image resized to
  ``--singan-size`` px (what the variations' resolution alone would add, with the same image
  count and hence the same number of FastFlow steps as ``singan``: with 20 epochs of batches
  of 32, 10 images give 20 steps and 90 images 60).

FastFlow options: ``anomalykit/configs/fastflow/quick.yaml`` with ``train.val_fraction=0``
(10 images are too few to hold one out; the threshold is then calibrated on the training
images, which none of the reported metrics uses). Seeds change the 10 images, the SinGANs and
FastFlow's initialisation and data order.

Writes into ``--out``: ``results.md`` (command, date, machine, per-seed and mean table),
``results.csv`` (one row per seed and arm) and ``variations_seed<S>.png`` (per row: a chosen
image at the SinGAN's size, then its variations).

Cost, measured on the shared 2-core machine (one thread): a SinGAN (64 px, 5 scales, width
16, 60 iterations per scale) 64-133 s; a FastFlow arm 1-2 min of training plus about 2-3 min
of evaluation; so about 25 minutes per seed with the three arms.

Usage::

    python benchmarks/fewshot_singan.py --out benchmarks/results/fewshot_magnetic_tile --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gan_suite import versions  # benchmarks/ is on sys.path

from anomalykit.data.io import image_grid, is_image_file, read_image, write_png
from anomalykit.generative.singan import SinGAN
from anomalykit.pipeline import evaluate_detector, train_detector

CATEGORY = "magnetic_tile"
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def grey(path: Path, size: int) -> torch.Tensor:
    """An image file -> (1, 1, size, size) grey in [0, 1] (antialiased resize to a square)."""
    x = torch.from_numpy(read_image(path)).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x.mean(1, keepdim=True), size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)


def as_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, H, W) in [0, 1] -> (H, W) uint8."""
    return (image[0].numpy() * 255.0 + 0.5).astype(np.uint8)


def make_root(base: Path, name: str, mt_root: Path, files: list[Path],
              extra: list[tuple[str, np.ndarray]]) -> Path:
    """An MVTec-layout root ``base/name/magnetic_tile`` with the chosen files (copied as they
    are) and ``extra`` (name, grey uint8 image) PNGs in train/good; test and ground_truth are
    links to the real ones."""
    category = base / name / CATEGORY
    good = category / "train" / "good"
    good.mkdir(parents=True)
    for path in files:
        shutil.copy(path, good / path.name)
    for filename, image in extra:
        write_png(good / filename, image)
    for part in ("test", "ground_truth"):
        (category / part).symlink_to((mt_root / part).resolve(), target_is_directory=True)
    return base / name


def singan_variations(image: torch.Tensor, n: int, seed: int, args) -> tuple[torch.Tensor, float]:
    """(n, 1, S, S) variations of one (1, 1, S, S) image and the SinGAN's training seconds."""
    torch.manual_seed(seed)
    model = SinGAN(image.shape[-1], 1, min_size=args.min_size, width=args.width,
                   max_width=args.max_width, steps_per_scale=args.steps_per_scale)
    history = model.fit(image, epochs=model.num_scales, batch_size=1, seed=seed, device="cpu",
                        progress=False)
    return model.eval().sample(n, torch.Generator().manual_seed(seed)), history["seconds"]


def run_arm(root: Path, seed: int, out_dir: Path) -> dict:
    started = time.perf_counter()
    result = train_detector("fastflow", root=root, category=CATEGORY, config="quick",
                            overrides=["train.val_fraction=0"], out_dir=out_dir, seed=seed,
                            device="cpu", progress=False)
    train_s = time.perf_counter() - started
    evaluation = evaluate_detector(result.detector, result.test_records, progress=False)
    return {**{k: evaluation.metrics[k] for k in METRICS}, "n_train": len(result.train_records),
            "fastflow_steps": result.history["steps"], "fastflow_train_s": train_s,
            "n_test": evaluation.metrics["n_test"]}


def run_seed(seed: int, args, base: Path, report) -> list[dict]:
    files = sorted(p for p in (args.mt_root / "train" / "good").iterdir() if is_image_file(p))
    chosen = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), args.shots,
                                                                          replace=False))]
    print(f"seed {seed}: {', '.join(p.name for p in chosen)}", flush=True)
    rows: list[dict] = []
    common = {"seed": seed, "images": " ".join(p.name for p in chosen)}
    small = [grey(p, args.singan_size) for p in chosen]
    for arm in args.arms:
        extra, seconds = [], []
        if arm == "blurred":
            extra = [(f"{p.stem}_small_{k}.png", as_uint8(x[0]))
                     for p, x in zip(chosen, small, strict=True) for k in range(args.per_image)]
        if arm == "singan":
            grid = []
            for i, (p, x) in enumerate(zip(chosen, small, strict=True)):
                samples, s = singan_variations(x, args.per_image, seed * 1000 + i, args)
                seconds.append(s)
                extra += [(f"{p.stem}_singan_{k}.png", as_uint8(v)) for k, v in enumerate(samples)]
                grid.append(torch.cat([x, samples]))
                print(f"  SinGAN {i + 1}/{len(chosen)} on {p.name}: {s:.0f} s", flush=True)
            write_png(args.out / f"variations_seed{seed}.png",
                      image_grid(torch.cat(grid), nrow=args.per_image + 1))
        root = make_root(base, f"{arm}_{seed}", args.mt_root, chosen, extra)
        row = {**common, "arm": arm, **run_arm(root, seed, base / f"run_{arm}_{seed}")}
        if seconds:
            row.update(singan_s_mean=float(np.mean(seconds)), singan_s_total=float(np.sum(seconds)))
        rows.append(row)
        print(f"  {arm:8s} {row}", flush=True)
        report(rows)
    return rows


def write_results(out: Path, args, command: str, rows: list[dict], seconds: float) -> None:
    fields = ["seed", "arm", *METRICS, "n_train", "fastflow_steps", "fastflow_train_s",
              "singan_s_mean", "singan_s_total", "n_test", "images"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Few-shot FastFlow on magnetic_tile, with and without SinGAN variations",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch threads; a 2-core machine shared with other jobs, so "
        "absolute seconds are not idle figures  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Run so far: {seconds / 60:.1f} min, seeds done: {', '.join(map(str, seeds))}.",
        "",
        f"{args.shots} good training images per seed (drawn with numpy default_rng(seed) from the "
        f"400 of train/good); FastFlow quick profile with train.val_fraction=0, identical in every "
        f"arm; evaluated on the full test set (508 images). `singan`: + {args.per_image} SinGAN "
        f"variations per image (grey, {args.singan_size} px, min_size {args.min_size}, width "
        f"{args.width}, max width {args.max_width}, {args.steps_per_scale} iterations per scale: "
        "far below the paper's 2000); `blurred`: + as many copies of each image resized to "
        f"{args.singan_size} px (control: same image count and FastFlow steps, same resolution "
        "loss, no new content).",
        "",
        "| seed | arm | train images | FastFlow steps | image AUROC | pixel AUROC | AUPRO | "
        "FastFlow train s | SinGAN s (mean per image) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        singan_s = f"{r['singan_s_mean']:.0f}" if "singan_s_mean" in r else "-"
        lines.append(f"| {r['seed']} | {r['arm']} | {r['n_train']} | {r['fastflow_steps']} | "
                     f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                     f"{r['fastflow_train_s']:.0f} | {singan_s} |")
    lines += ["", f"Mean over seeds {', '.join(map(str, seeds))} (std across seeds where > 1):", "",
              "| arm | seeds | image AUROC | pixel AUROC | AUPRO |", "|---|---:|---:|---:|---:|"]
    for arm in ("real", "blurred", "singan"):
        part = [r for r in rows if r["arm"] == arm]
        if not part:
            continue
        cells = []
        for metric in METRICS:
            values = np.array([r[metric] for r in part])
            cells.append(f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1
                                                   else ""))
        lines.append(f"| {arm} | {len(part)} | " + " | ".join(cells) + " |")
    lines += ["", "Chosen images per seed: see `results.csv`; variations: "
              + ", ".join(f"`variations_seed{s}.png`" for s in seeds) + " (each row: the image "
              f"at {args.singan_size} px, then its variations).", ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fewshot_magnetic_tile"))
    parser.add_argument("--mt-root", type=Path, default=Path("/work/shared/datasets/magnetic_tile"))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--arms", default="real,singan,blurred", help="in this order")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--per-image", type=int, default=8, help="variations per training image")
    parser.add_argument("--singan-size", type=int, default=64)
    parser.add_argument("--steps-per-scale", type=int, default=60,
                        help="SinGAN iterations per scale (150 took 408 s per image on the loaded "
                             "shared machine, 60 took 64-133 s)")
    parser.add_argument("--min-size", type=int, default=25)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--max-width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    if not args.mt_root.is_dir():
        print(f"{args.mt_root} not found: nothing to do", flush=True)
        return 1
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/fewshot_singan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fewshot_singan_") as tmp:
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            rows += run_seed(seed, args, Path(tmp), lambda done, kept=list(rows): write_results(
                args.out, args, command, kept + done, time.perf_counter() - started))
    print(f"wrote {args.out / 'results.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
