"""SinGAN on one image: variations of a synthetic texture and of a magnetic_tile tile.

For each data set a :class:`~anomalykit.generative.singan.SinGAN` is trained with the toolkit's
loop on ONE good image (``epochs = num_scales``, ``--steps-per-scale`` iterations per scale),
then draws ``--samples`` variations. They are compared with ``--samples`` held-out real good
images of the same category by FD-Lite0 (Fréchet distance on pooled EfficientNet-Lite0
features at 128 px; NOT an FID, only comparable within this table) and k-NN precision /
recall (k = 3), next to two reference rows scored against the same held-out images:

- "training image x N": the one training image repeated N times (what a generator that only
  copies its image would score);
- "other real images": N other real good images (the floor at this sample count).

Also reported: the mean absolute pixel difference of the samples to the training image and
between samples (variations, not copies), the reconstruction path's MSE to the image, and the
training time.

Data sets:

- ``synthetic``: ``--texture`` (default weave) of :mod:`anomalykit.data.synthetic`, rendered
  at ``--size`` px: the training image is ``train`` index 0, the held-out images ``test_good``
  0..N-1, the other real images ``train`` 1..N.
- ``magnetic_tile`` (skipped when ``--mt-root`` is absent): grey tiles resized to a square of
  ``--mt-size`` px (as the detectors see them, aspect ratio not kept) and trained as ONE
  channel (``in_channels=1``); the training image is ``train/good`` file ``--mt-index``, the
  held-out images ``test/good`` (first N), the other real images the next N of ``train/good``.

Writes into ``--out``: ``results.md`` (command, date, machine, versions, the table),
``results.csv`` and per data set ``<data>_grid.png`` (row 1: the training image, its
reconstruction, 6 variations; rows 2-3: 16 more variations), ``<data>_wide.png`` (4 samples
at twice the width: SinGAN's arbitrary aspect ratio) and ``<data>_scales/epoch_XXX.png`` (the
per-scale grids the fit writes).

Cost: the committed run (defaults: 64 px, 300 iterations per scale) took 33 minutes on the
shared 2-core machine under a load of about 8 (each SinGAN 15-16 minutes); over the 15-minute
target; ``--steps-per-scale 150`` about halves it.

Usage::

    python benchmarks/singan_suite.py --out benchmarks/results/singan --threads 1
    python benchmarks/singan_suite.py --out /tmp/singan_quick --quick
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gan_suite import versions  # benchmarks/ is on sys.path

from anomalykit.data.io import image_grid, is_image_file, read_image, write_png
from anomalykit.generative.singan import SinGAN
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance, knn_precision_recall


def to_tensor(images: list[np.ndarray], size: int, channels: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB arrays -> (N, channels, size, size) in [0, 1] (antialiased resize)."""
    out = []
    for image in images:
        x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.mean(1, keepdim=True) if channels == 1 else x)
    return torch.cat(out).clamp(0.0, 1.0)


def synthetic_data(texture: str, size: int, n: int) -> dict[str, torch.Tensor]:
    from anomalykit.data.synthetic import render_sample

    def render(split: str, indices) -> torch.Tensor:
        return to_tensor([render_sample(texture, split=split, index=i, image_size=size)[0]
                          for i in indices], size, 3)

    return {"train": render("train", [0]), "held_out": render("test_good", range(n)),
            "other": render("train", range(1, n + 1))}


def magnetic_tile_data(root: Path, size: int, n: int, index: int) -> dict[str, torch.Tensor]:
    def files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if is_image_file(p))

    train, test = files(root / "train" / "good"), files(root / "test" / "good")
    others = [p for i, p in enumerate(train) if i != index][:n]

    def load(paths) -> torch.Tensor:
        return to_tensor([read_image(p) for p in paths], size, 1)

    return {"train": load([train[index]]), "held_out": load(test[:n]), "other": load(others),
            "train_file": str(train[index].relative_to(root))}


def quality(real: np.ndarray, fake_images: torch.Tensor) -> dict[str, float]:
    fake = backbone_embeddings(fake_images)
    precision, recall = knn_precision_recall(real, fake, k=3)
    return {"fd_lite0": frechet_distance(real, fake), "precision": precision, "recall": recall}


def mean_pair_difference(images: torch.Tensor) -> float:
    """Mean |a - b| over the pixels of all ordered pairs of distinct images."""
    n = len(images)
    total = sum(float((images[i] - images).abs().mean((1, 2, 3)).sum()) for i in range(n))
    return total / (n * (n - 1))


def run(dataset: str, data: dict, args, out: Path) -> list[dict]:
    image, held_out = data["train"], data["held_out"]
    n, channels, size = len(held_out), image.shape[1], image.shape[-1]
    real = backbone_embeddings(held_out)
    torch.manual_seed(args.seed)
    model = SinGAN(size, channels, min_size=args.min_size, width=args.width,
                   max_width=args.max_width, steps_per_scale=args.steps_per_scale)
    scales_dir = out / f"{dataset}_scales"
    shutil.rmtree(scales_dir, ignore_errors=True)
    started = time.perf_counter()
    history = model.fit(image, epochs=model.num_scales, batch_size=1, seed=args.seed, device="cpu",
                        out_dir=scales_dir, progress=False)
    train_s = time.perf_counter() - started
    (scales_dir / "last.ckpt").unlink(missing_ok=True)  # keep the per-scale grids only
    model.eval()
    samples = model.sample(n, torch.Generator().manual_seed(args.seed))
    rec = model.reconstruct()
    grid = torch.cat([image, rec, samples[:22]])
    write_png(out / f"{dataset}_grid.png", image_grid(grid, nrow=8))
    wide = model.sample(4, torch.Generator().manual_seed(args.seed + 1), size=(size, 2 * size))
    write_png(out / f"{dataset}_wide.png", image_grid(wide, nrow=2))
    common = {"dataset": dataset, "size": size, "channels": channels, "scales": model.num_scales,
              "steps_per_scale": args.steps_per_scale}
    rows = [
        {**common, "row": f"SinGAN variations x{n}", **quality(real, samples), "train_s": train_s,
         "steps": history["steps"], "params": sum(p.numel() for p in model.parameters()),
         "diff_to_image": float((samples - image).abs().mean()),
         "diff_between": mean_pair_difference(samples),
         "rec_mse": float((rec - image).pow(2).mean())},
        {**common, "row": f"training image x{n}", **quality(real, image.repeat(n, 1, 1, 1)),
         "diff_to_image": 0.0, "diff_between": 0.0},
        {**common, "row": f"other real images x{len(data['other'])}", **quality(real, data["other"]),
         "diff_to_image": float((data["other"] - image).abs().mean()),
         "diff_between": mean_pair_difference(data["other"])},
    ]
    for row in rows:
        print(f"{dataset:14s} {row['row']:26s} FD-Lite0 {row['fd_lite0']:8.2f}  precision "
              f"{row['precision']:.3f}  recall {row['recall']:.3f}", flush=True)
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None or value == "" else format(value, spec)


def write_results(out: Path, args, command: str, rows: list[dict], notes: list[str],
                  seconds: float) -> None:
    fields = ["dataset", "row", "size", "channels", "scales", "steps_per_scale", "steps", "params",
              "train_s", "fd_lite0", "precision", "recall", "diff_to_image", "diff_between",
              "rec_mse"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# SinGAN on one image",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch threads; a 2-core machine shared with other jobs, so "
        "absolute seconds are not idle figures  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min. SinGAN: min_size {args.min_size}, scale factor 0.75 "
        f"(adjusted), width {args.width} (doubling every 4 scales, max {args.max_width}), "
        f"{args.steps_per_scale} iterations per scale (the paper: 2000), 3 critic + 3 generator "
        "updates per iteration, WGAN-GP 0.1, reconstruction weight 10, seed "
        f"{args.seed}.",
        "",
        *notes,
        "",
        "FD-Lite0: Fréchet distance on pooled EfficientNet-Lite0 features at 128 px, against the "
        "held-out real good images (same count as each row's images); not an FID. With ~100 "
        "images and 320 feature dimensions the estimate is biased upwards: compare rows, not "
        "with other tables. |x - image|: mean absolute pixel difference to the training image; "
        "between: mean over pairs of the row's images.",
        "",
        "| data | row | scales | train s | FD-Lite0 | precision | recall | abs diff to image "
        "| abs diff between | rec MSE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['dataset']} {r['size']} px | {r['row']} | {r['scales']} | "
                     f"{fmt(r.get('train_s'), '.0f')} | {r['fd_lite0']:.1f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['diff_to_image']:.3f} | {r['diff_between']:.3f} | "
                     f"{fmt(r.get('rec_mse'), '.5f')} |")
    pictures = sorted(p.name for p in out.glob("*.png"))
    lines += ["", "Pictures: " + ", ".join(f"`{p}`" for p in pictures) + "; per-scale grids in "
              "`<data>_scales/samples/` (the image at that scale, its reconstruction, 14 "
              "samples).", ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/singan"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texture", default="weave")
    parser.add_argument("--size", type=int, default=64, help="synthetic image side")
    parser.add_argument("--mt-root", type=Path, default=Path("/work/shared/datasets/magnetic_tile"))
    parser.add_argument("--mt-size", type=int, default=64, help="magnetic_tile image side")
    parser.add_argument("--mt-index", type=int, default=0, help="train/good file (sorted) to learn")
    parser.add_argument("--samples", type=int, default=100, help="variations and real images scored")
    parser.add_argument("--steps-per-scale", type=int, default=300)
    parser.add_argument("--min-size", type=int, default=25)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--max-width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny settings: 32 px, 5 steps, 20 samples")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = args.mt_size = 32
        args.min_size, args.steps_per_scale, args.samples, args.width = 16, 5, 20, 8
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    notes = []
    rows = run("synthetic_" + args.texture, synthetic_data(args.texture, args.size, args.samples),
               args, args.out)
    if args.mt_root.is_dir():
        data = magnetic_tile_data(args.mt_root, args.mt_size, args.samples, args.mt_index)
        notes.append(f"magnetic_tile: trained on `{data['train_file']}` (grey, one channel), "
                     f"resized to {args.mt_size} x {args.mt_size}.")
        rows += run("magnetic_tile", data, args, args.out)
    else:
        notes.append(f"magnetic_tile: {args.mt_root} not found, skipped.")
    command = "python benchmarks/singan_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, args, command, rows, notes, time.perf_counter() - started)
    print(f"wrote {args.out / 'results.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
