"""Ablation of BigGAN's ingredients on a class-conditional DCGAN-sized model (scikit-learn digits, 32 px).

One class, :class:`anomalykit.generative.biggan.BigGAN`, with each ingredient a switch. Rows:

- all ingredients on: class-conditional BatchNorm with skip-z, projection discriminator, hinge
  loss, spectral norm in G and D, TTUR (D's learning rate 4x G's), untruncated sampling;
- each ingredient off in turn: plain BatchNorm with the class embedding concatenated to z; a
  discriminator that sees the class as one-hot channels instead of the projection; the
  non-saturating loss instead of the hinge; no spectral norm (then D has no normalisation);
- the full model sampled with truncation 0.5, 1.0 and 2.0 (no retraining: same weights).

Every trained row starts from the same seed (weights, batches, codes) and trains the same
number of epochs (``--epochs``) with the toolkit's loop (``model.fit``). Data: the digits split
of ``benchmarks/gan_suite.py`` (8x8 digits bilinear to 32x32, one channel; 1297 train / 500
held out by a seeded permutation; 10 classes). Each row draws 500 samples, 50 per class
(the held-out digits are near balanced), from one seeded noise batch, and is scored against the
500 held-out images by FD-Lite0 (Fréchet distance on pooled EfficientNet-Lite0 features at
128 px: NOT an FID, not comparable with published FIDs), k-NN precision / recall (k = 3), and a
class accuracy: a logistic regression trained on the training digits (pooled back to 8x8)
reads each sample's class, and the row reports how often it is the asked class (its accuracy
on the held-out real digits is the ceiling, printed as "real (held out)"). "real (train)"
scores 500 training images in place of samples: the floor of FD-Lite0 at this sample count.

With ``--seeds 0,1`` every row is trained once per seed and the table gives each seed and
the mean; two seeds show the seed noise, they do not remove it.

Writes into ``--out``: ``results.md`` (command, date, machine, versions, tables), ``results.csv``
(one row per seed and row) and ``seed<S>_<row>.png`` grids (10 columns = the 10 classes, 8 rows,
the same noise in every grid), ``real.png`` (held-out digits, laid out the same way).

Usage::

    python benchmarks/biggan_ablation.py --out benchmarks/results/biggan_ablation --seeds 0,1 --threads 1
    python benchmarks/biggan_ablation.py --out /tmp/biggan_quick --quick
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gan_suite import digits_split, scores, versions  # benchmarks/ is on sys.path

from anomalykit.data.io import image_grid, write_png
from anomalykit.generative.biggan import BigGAN
from anomalykit.metrics.sample_quality import backbone_embeddings

NUM_CLASSES = 10
# (row name, the switch turned off); the first row has every ingredient on.
VARIANTS = [
    ("all ingredients", {}),
    ("no conditional BN", {"conditional_bn": False}),
    ("no projection (one-hot concat)", {"projection": False}),
    ("non-saturating loss", {"loss": "non_saturating"}),
    ("no spectral norm", {"spectral_norm": False}),
]
TRUNCATIONS = (0.5, 1.0, 2.0)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def class_reader(data: dict):
    """A logistic regression on the training digits pooled to 8x8: image (N, 1, 32, 32) -> class."""
    from sklearn.linear_model import LogisticRegression

    def flat(images: torch.Tensor) -> np.ndarray:
        return F.adaptive_avg_pool2d(images.float(), 8).flatten(1).numpy()

    reader = LogisticRegression(max_iter=2000).fit(flat(data["train"]), data["train_class"].numpy())
    return lambda images: reader.predict(flat(images))


def real_grid(data: dict, rows: int = 8) -> np.ndarray:
    """Held-out digits laid out like the sample grids: column k holds ``rows`` digits of class k."""
    columns = [data["held_out"][data["held_out_class"] == k][:rows] for k in range(NUM_CLASSES)]
    return image_grid(torch.stack(columns, 1).flatten(0, 1), nrow=NUM_CLASSES)


def train(options: dict, data: dict, seed: int, args) -> tuple[BigGAN, float]:
    torch.manual_seed(seed)  # each row's initial weights depend on the seed only
    model = BigGAN(32, 1, NUM_CLASSES, args.latent_dim, width=args.width, **options)
    args.lr, args.d_lr = model.lr, model.d_lr  # the model's defaults, for the report
    start = time.perf_counter()
    model.fit({"image": data["train"], "class": data["train_class"]}, epochs=args.epochs,
              batch_size=args.batch_size, device="cpu", progress=False, seed=seed)
    return model, time.perf_counter() - start


def evaluate(model: BigGAN, truncation: float | None, seed: int, real_features, read_class, args,
             picture: Path) -> dict:
    classes = torch.arange(args.samples) % NUM_CLASSES
    samples = model.sample(args.samples, torch.Generator().manual_seed(seed + 1000), classes=classes,
                           truncation=truncation)
    row = scores(real_features, backbone_embeddings(samples, image_size=args.embed_size))
    row["class_accuracy"] = float((read_class(samples) == classes.numpy()).mean())
    grid_classes = torch.arange(8 * NUM_CLASSES) % NUM_CLASSES
    grid = model.sample(len(grid_classes), torch.Generator().manual_seed(seed + 2000),
                        classes=grid_classes, truncation=truncation)
    write_png(picture, image_grid(grid, nrow=NUM_CLASSES))
    return row


def run_seed(seed: int, data: dict, real_features, read_class, args) -> list[dict]:
    rows = []
    for name, options in VARIANTS:
        model, seconds = train(options, data, seed, args)
        common = {"seed": seed, "train_s": seconds, "steps": model.global_step,
                  "params": sum(p.numel() for p in model.parameters())}
        truncations = [None, *TRUNCATIONS] if not options else [None]
        for t in truncations:
            label = name if t is None else f"all ingredients, truncation {t:g}"
            picture = args.out / f"seed{seed}_{slug(label)}.png"
            row = {"row": label, "truncation": t, **common,
                   **evaluate(model, t, seed, real_features, read_class, args, picture)}
            rows.append(row)
            print(f"seed {seed}  {label:34s} FD-Lite0 {row['fd_lite0']:8.2f}  precision "
                  f"{row['precision']:.3f}  recall {row['recall']:.3f}  class acc "
                  f"{row['class_accuracy']:.3f}  train {seconds:.0f}s", flush=True)
    return rows


def write_results(out: Path, args, command: str, rows: list[dict], floors: dict, minutes: float,
                  since: float) -> None:
    fields = ["seed", "row", "truncation", "params", "steps", "train_s", "fd_lite0", "precision",
              "recall", "class_accuracy"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})

    seeds = sorted({r["seed"] for r in rows})
    labels = list(dict.fromkeys(r["row"] for r in rows))
    by = {(r["row"], r["seed"]): r for r in rows}
    lines = [
        "# BigGAN's ingredients: ablation on scikit-learn digits (32 px, 10 classes)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs visible (a "
        f"2-core machine shared with other jobs: absolute seconds are not idle figures), "
        f"{torch.get_num_threads()} torch thread(s)  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {minutes:.1f} min. Every trained row: {args.epochs} epochs of batch "
        f"{args.batch_size} ({rows[0]['steps']} steps), width {args.width}, latent {args.latent_dim}, "
        f"Adam betas (0, 0.999), G lr {args.lr:g}, D lr {args.d_lr:g} (TTUR), 1 D step per G step; seeds "
        f"{', '.join(map(str, seeds))} (the seed sets the weights, the batches and the noise).",
        "",
        f"{args.samples} samples ({args.samples // NUM_CLASSES} per class) vs {args.samples} held-out "
        f"digits. FD-Lite0: Fréchet distance on pooled EfficientNet-Lite0 features at {args.embed_size} "
        "px (not an FID; lower is "
        "better). Precision / recall: k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019). Class acc: "
        "share of samples a logistic regression on the training digits (pooled to 8x8) reads as the "
        "asked class. Truncation rows: the \"all ingredients\" weights, z truncated to [-t, t] at "
        "sampling only (the untruncated row is \"all ingredients\").",
        "",
        f"Floors: \"real (train)\" ({args.samples} training images scored as samples): FD-Lite0 "
        f"{floors['fd_lite0']:.2f}, precision {floors['precision']:.3f}, recall {floors['recall']:.3f}; "
        f"the class reader's accuracy on the held-out real digits: {floors['class_accuracy']:.3f}.",
        "",
    ]
    header = "| row | " + " | ".join(
        f"FD-Lite0 s{s} | prec. s{s} | recall s{s} | class acc s{s}" for s in seeds)
    lines += [header + (" | FD-Lite0 mean | class acc mean |" if len(seeds) > 1 else " |"),
              "|---|" + "---:|" * (4 * len(seeds) + (2 if len(seeds) > 1 else 0))]
    for label in labels:
        cells = []
        for s in seeds:
            r = by.get((label, s))
            cells += ([f"{r['fd_lite0']:.1f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                       f"{r['class_accuracy']:.3f}"] if r else ["-"] * 4)
        if len(seeds) > 1:
            got = [by[(label, s)] for s in seeds if (label, s) in by]
            cells += [f"{statistics.mean(r['fd_lite0'] for r in got):.1f}",
                      f"{statistics.mean(r['class_accuracy'] for r in got):.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    trained = [r for r in rows if r["truncation"] is None]
    lines += ["", "Differences smaller than the seed-to-seed spread of a row are seed noise, not findings "
              "(and two seeds estimate that spread only roughly); one short run per seed is not "
              "BigGAN's regime (batch 2048, 10^5 steps)."]
    lines += ["", "Training seconds per row (shared machine): "
              + ", ".join(f"{r['row']} s{r['seed']} {r['train_s']:.0f}" for r in trained) + ".", ""]
    pictures = sorted(p.name for p in out.glob("*.png") if p.stat().st_mtime >= since)
    lines += ["Grids (10 columns = classes 0-9, 8 rows, the same noise in every grid): "
              + ", ".join(f"`{p}`" for p in pictures) + ".", ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/biggan_ablation"))
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the train / held-out split")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per trained row (the same for all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--samples", type=int, default=500, help="samples (and held-out images) scored")
    parser.add_argument("--embed-size", type=int, default=128, help="image side the backbone sees")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.samples, args.width, args.latent_dim = 1, 100, 8, 16
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started, started_wall = time.perf_counter(), time.time()

    data = digits_split(args.data_seed)
    held_out = data["held_out"][:args.samples]
    real_features = backbone_embeddings(held_out, image_size=args.embed_size)
    write_png(args.out / "real.png", real_grid(data))
    read_class = class_reader(data)
    floors = scores(real_features, backbone_embeddings(data["train"][:args.samples],
                                                       image_size=args.embed_size))
    floors["class_accuracy"] = float((read_class(held_out) == data["held_out_class"][:args.samples]
                                      .numpy()).mean())
    print(f"floors: {floors}", flush=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        rows += run_seed(seed, data, real_features, read_class, args)
    command = "python benchmarks/biggan_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    minutes = (time.perf_counter() - started) / 60
    write_results(args.out, args, command, rows, floors, minutes, started_wall)
    print(f"wrote {args.out / 'results.md'} in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
