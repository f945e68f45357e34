"""Train pix2pix to render defects from a mask on the synthetic set, and measure its renderings.

Data: :func:`anomalykit.data.synthetic.defect_triples` over all six synthetic categories at
``--image-size`` (64) px: ``--n-train`` (good, mask, defective) triples to train on, and two
disjoint held-out sets of ``--n-test`` triples (``start`` past the training indices): A, whose
(good, mask) pairs are rendered, and B, whose real defective images are the reference every
row is scored against (unpaired: no row shares its good images with the reference).

Model: :class:`anomalykit.generative.pix2pix.Pix2Pix` (``--width``, ``--depth`` = log2 of the
image size, so a 1x1 bottleneck as in the paper; PatchGAN with ``--d-layers``), trained with the
toolkit's loop for a time budget: a throwaway copy times ``--probe-steps`` steps, and the model
trains as many whole epochs as fit ``--train-seconds`` (``--epochs`` fixes them instead).

Rows, each a set of images made from set A's (good, mask) pairs, scored against B's real
defective images (FD-Lite0 = Fréchet distance on pooled EfficientNet-Lite0 features at 128 px;
not an FID):

* ``pix2pix``: ``render_defects(good, mask)`` with dropout noise (the paper's test-time noise);
* ``texture paste (DRAEM)``: DRAEM's anomaly source under the same real masks: an augmented
  texture of :class:`~anomalykit.data.anomaly_synthesis.AnomalySource` blended in with
  ``beta ~ U[0, 0.8)`` (what ``DraemDetector(anomaly_source="perlin")`` pastes, here in the real
  defect's region);
* ``good (no defect drawn)``: A's good images themselves;
* ``real (held-out A)``: A's real defective images: the floor at this sample count.

Columns: FD-Lite0 on the whole images; FD-Lite0 on defect crops (a square of half the image
side centred on the mask's bounding box: A's masks for the rows, B's for the reference, so the
defect fills a large share of what the backbone sees); the L1 to A's real defective image inside
the mask (paired).

Writes into ``--out``: ``results.md`` (command, date, machine, versions, table), ``results.csv``,
``heldout_grid.png`` (rows: good | mask | pix2pix | texture paste | real, two per category),
``train_grid_epoch_XXX.png`` (the model's own grids after the first and the last epoch: good |
mask | rendered | real on kept training triples), and ``runs/`` (ignored by git: the fit's
folder and ``pix2pix.ckpt``, the renderer ``benchmarks/draem_source_study.py`` uses).

Usage::

    python benchmarks/pix2pix_suite.py --out benchmarks/results/pix2pix --threads 1
    python benchmarks/pix2pix_suite.py --out /tmp/p2p_quick --quick
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gan_suite import versions  # benchmarks/ is on sys.path

from anomalykit.data.anomaly_synthesis import AnomalySource, augment_texture, blend_anomaly
from anomalykit.data.io import image_grid, write_png
from anomalykit.data.synthetic import SYNTHETIC_CATEGORIES, defect_triples
from anomalykit.generative.pix2pix import Pix2Pix
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance

HELD_OUT_START = 10_000  # per-category index of held-out set A; B starts at twice this


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pix2pix"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--n-test", type=int, default=480)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--d-width", type=int, default=16)
    parser.add_argument("--d-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-seconds", type=float, default=270.0)
    parser.add_argument("--epochs", type=int, default=None, help="fix the epochs (no time budget)")
    parser.add_argument("--probe-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.train_seconds, args.width, args.d_width = 96, 24, 10.0, 8, 8
    return args


def build(args) -> Pix2Pix:
    torch.manual_seed(args.seed)
    return Pix2Pix(width=args.width, depth=int(math.log2(args.image_size)), d_width=args.d_width,
                   d_layers=args.d_layers, grid_every=1)


def epochs_for_budget(args, data: dict) -> int:
    """Whole epochs that fit ``--train-seconds``, from a throwaway copy's timed probe steps."""
    if args.epochs:
        return args.epochs
    probe = copy.deepcopy(build(args))
    started = time.perf_counter()
    probe.fit(data, epochs=1, max_steps=args.probe_steps, batch_size=args.batch_size, progress=False)
    per_step = (time.perf_counter() - started) / args.probe_steps
    steps_per_epoch = math.ceil(len(data["image"]) / args.batch_size)
    return max(1, int(args.train_seconds / (per_step * steps_per_epoch)))


def texture_paste(good: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """DRAEM's appearance (augmented texture, beta-blended) under the given masks, in [0, 1]."""
    rng = np.random.default_rng(seed)
    source = AnomalySource(None)
    out = []
    size = good.shape[-2:]
    for image, m in zip(good.numpy(), mask.numpy(), strict=True):
        texture = augment_texture(source.sample(size, rng), rng, 3).transpose(2, 0, 1) / 255.0
        out.append(blend_anomaly(image, texture.astype(np.float32), m, float(rng.uniform(0.0, 0.8))))
    return torch.from_numpy(np.stack(out).astype(np.float32))


def defect_crops(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, C, S/2, S/2): a square of half the side centred on each mask's bounding box."""
    size = images.shape[-1]
    half = size // 2
    crops = []
    for image, m in zip(images, mask, strict=True):
        ys, xs = torch.nonzero(m[0], as_tuple=True)
        cy, cx = (int(ys.min() + ys.max()) // 2, int(xs.min() + xs.max()) // 2)
        y0 = min(max(cy - half // 2, 0), size - half)
        x0 = min(max(cx - half // 2, 0), size - half)
        crops.append(image[:, y0:y0 + half, x0:x0 + half])
    return torch.stack(crops)


def in_mask_l1(images: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((images - real).abs() * mask).sum() / (images.shape[1] * mask.sum()))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = args.out
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    size, n_categories = args.image_size, len(SYNTHETIC_CATEGORIES)
    print(f"rendering {args.n_train} + 2 x {args.n_test} triples at {size} px", flush=True)
    train = defect_triples(n=args.n_train, image_size=size, seed=args.seed)
    held_a = defect_triples(n=args.n_test, image_size=size, seed=args.seed, start=HELD_OUT_START)
    held_b = defect_triples(n=args.n_test, image_size=size, seed=args.seed, start=2 * HELD_OUT_START)

    epochs = epochs_for_budget(args, train)
    model = build(args)
    model.grid_every = max(1, epochs // 4)
    print(f"training {epochs} epochs", flush=True)
    history = model.fit(train, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
                        out_dir=runs / "fit", progress=False)
    model.save(runs / "pix2pix.ckpt")
    grids = sorted((runs / "fit" / "samples").glob("epoch_*.png"))
    for grid in {grids[0], grids[-1]}:  # the first and the last epoch's (the rest stay in runs/)
        shutil.copy(grid, out / f"train_grid_{grid.name}")

    good, mask, real = held_a["good"], held_a["mask"], held_a["image"]
    rendered = torch.cat([model.render_defects(good[i:i + 64], mask[i:i + 64],
                                               generator=torch.Generator().manual_seed(args.seed + i))
                          for i in range(0, len(good), 64)])
    pasted = texture_paste(good, mask, args.seed)
    rows_images = {"pix2pix": rendered, "texture paste (DRAEM)": pasted,
                   "good (no defect drawn)": good, "real (held-out A)": real}
    print("scoring with the backbone", flush=True)
    reference = backbone_embeddings(held_b["image"])
    reference_crops = backbone_embeddings(defect_crops(held_b["image"], held_b["mask"]))
    rows = []
    for name, images in rows_images.items():
        rows.append({
            "row": name,
            "fd_lite0": frechet_distance(reference, backbone_embeddings(images)),
            "fd_lite0_crops": frechet_distance(reference_crops,
                                               backbone_embeddings(defect_crops(images, mask))),
            "l1_in_mask": in_mask_l1(images, real, mask) if images is not real else math.nan,
        })
        print(rows[-1], flush=True)

    # Two held-out examples per category: good | mask | pix2pix | texture paste | real.
    pick = [k for c in range(n_categories) for k in (c, c + n_categories)]
    panels = torch.stack([good[pick], mask[pick].expand(-1, 3, -1, -1), rendered[pick], pasted[pick],
                          real[pick]], dim=1).flatten(0, 1)
    write_png(out / "heldout_grid.png", image_grid(panels, nrow=5))

    seconds = time.perf_counter() - started
    fields = ["row", "fd_lite0", "fd_lite0_crops", "l1_in_mask"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields + ["epochs", "steps", "train_s"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "epochs": history["epochs_run"], "steps": history["steps"],
                             "train_s": round(history["seconds"], 1)})
    params = sum(p.numel() for p in model.generator.parameters())
    d_params = sum(p.numel() for p in model.discriminator.parameters())
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# pix2pix: defect synthesis from a mask (synthetic set)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, 2-core machine shared with other jobs, "
        f"{torch.get_num_threads()} torch thread(s): absolute seconds are not idle figures  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min.",
        "",
        f"Model: pix2pix, U-Net G width {args.width}, depth {int(math.log2(size))} ({params:,} "
        f"parameters), PatchGAN D width {args.d_width}, {args.d_layers} strided layers "
        f"({d_params:,} parameters), lambda_L1 100, Adam 2e-4 (0.5, 0.999), composite in the "
        f"exact mask. Trained on {args.n_train} triples of all six synthetic categories at {size} px, "
        f"batch {args.batch_size}, seed {args.seed}: {history['epochs_run']} epochs, "
        f"{history['steps']} steps, {history['seconds']:.0f} s "
        + ("(fixed epochs)." if args.epochs else f"(time budget {args.train_seconds:g} s)."),
        "",
        f"Each row is made from held-out set A's (good, mask) pairs ({args.n_test} triples, never "
        f"trained on) and scored against held-out set B's {args.n_test} real defective images. "
        "FD-Lite0: Fréchet distance of pooled EfficientNet-Lite0 features at 128 px (not an FID; "
        "lower is better; only comparable within this table). Crops: a square of half the side "
        "centred on the defect's bounding box (A's masks for the rows, B's for the reference). L1 "
        "in mask: mean absolute difference to A's real defective image inside its mask ([0, 1]).",
        "",
        "| images | FD-Lite0 (whole) | FD-Lite0 (defect crops) | L1 in mask |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['row']} | {r['fd_lite0']:.2f} | {r['fd_lite0_crops']:.2f} | "
                     + ("-" if math.isnan(r["l1_in_mask"]) else f"{r['l1_in_mask']:.4f}") + " |")
    lines += [
        "",
        "Rows: `pix2pix` = `render_defects(good, mask)` with dropout noise; `texture paste (DRAEM)` "
        "= DRAEM's default anomaly appearance (augmented offline texture, beta ~ U[0, 0.8)) under the "
        "same real masks; `good (no defect drawn)` = A's good images; `real (held-out A)` = A's real "
        "defective images (the floor at this sample count).",
        "",
        "Pictures: `heldout_grid.png` (held-out A, two per category, columns good | mask | pix2pix "
        "| texture paste | real), `train_grid_epoch_XXX.png` (the fit's own grids on kept training "
        "triples: good | mask | rendered | real).",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    print(f"done in {seconds / 60:.1f} min -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
