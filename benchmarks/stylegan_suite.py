"""Train the small StyleGAN by progressive growing (4 -> 8 -> 16 -> 32 px) on digits and a texture.

For each data set (the same splits as ``benchmarks/gan_suite.py``: scikit-learn digits at 32 px,
one channel, 1297 train / 500 held out; a synthetic category at 32 px RGB, 1000 train from its
``train`` split / 500 held out from ``test_good``) the ``stylegan`` of the registry trains with
the toolkit's one loop for a fixed step schedule: ``--stable-steps`` at 4x4, then per
resolution ``--fade-steps`` of fade-in and ``--stable-steps`` of stabilisation, so
``stable + 3 (fade + stable)`` steps in all. Then:

* FD-Lite0, k-NN precision and recall (k = 3) of 500 samples at truncation psi 1.0 and 0.7
  against the 500 held-out images (:mod:`anomalykit.metrics.sample_quality`; Fréchet distance
  on pooled EfficientNet-Lite0 features at 128 px, NOT an FID). The row "real (train)" scores
  as many training images: the floor at this sample count.
* A comparison row: ``dcgan`` from the registry (gan_suite's settings: width 32, batch 64)
  trained for as many whole epochs as fit the StyleGAN's measured training time (timed on a
  throwaway copy, gan_suite's ``train``); ``--no-dcgan`` leaves it out.
* Pictures: ``<data>_stylegan_psi1.0.png`` / ``_psi0.7.png`` (8x8 samples),
  ``<data>_stylegan_growth.png`` (the same 8 codes at the end of each resolution's phase, one
  row per resolution, upsampled to 32 px), ``<data>_stylegan_mixing_coarse.png`` and
  ``_mixing_fine.png`` (StyleGAN fig. 3: first row sources B, first column sources A, cells
  take the layers before the crossover from A and the rest from B; coarse: crossover 2, so A
  gives only the 4x4 styles; fine: crossover 6, so B gives only the 32x32 styles),
  ``<data>_dcgan.png``, ``<data>_real.png``.

Writes ``results.md`` (command, date, machine, versions, tables) and ``results.csv`` into
``--out``. The default run took 14.9 min at one thread on the 2-core machine shared with other
jobs (2026-12-01): StyleGAN 187 s (digits) and 167 s (weave) for its 1400 steps, DCGAN about
as long, the rest mostly the backbone (about 2,500 images per data set). Step cost grows with
the resolution: 0.024, 0.047, 0.074, 0.125 s per batch-16 step at 4, 8, 16, 32 px (width 8,
timed by a separate probe on that machine). ``--fade-steps`` / ``--stable-steps`` trade time
for quality.

Usage::

    python benchmarks/stylegan_suite.py --out benchmarks/results/stylegan --threads 1
    python benchmarks/stylegan_suite.py --out /tmp/stylegan_quick --quick
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from gan_suite import IMAGE_SIZE, digits_split, scores, texture_split, train, versions  # benchmarks/ on path

from anomalykit.data.io import image_grid, write_png
from anomalykit.metrics.sample_quality import backbone_embeddings
from anomalykit.registry import create

DATASETS = ("digits", "texture")
PSIS = (1.0, 0.7)
CROSSOVERS = {"coarse": 2, "fine": 6}  # style layers 0-1: 4x4, 2-3: 8x8, 4-5: 16x16, 6-7: 32x32


def build_stylegan(in_channels: int, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    return create("stylegan", kind="generative", image_size=IMAGE_SIZE, in_channels=in_channels,
                  latent_dim=args.latent_dim, w_dim=args.latent_dim, mapping_layers=args.mapping_layers,
                  width=args.width, max_width=args.max_width, fade_steps=args.fade_steps,
                  stable_steps=args.stable_steps, lr=args.lr)


@torch.no_grad()
def draw(model, n: int, seed: int, **options) -> torch.Tensor:
    return model.sample(n, generator=torch.Generator().manual_seed(seed), **options).float().cpu()


def train_stylegan(model, images: torch.Tensor, args) -> tuple[dict, float, torch.Tensor]:
    """Fit the whole schedule; returns the history, the seconds, and the growth picture rows
    (the fixed 8 codes at the last epoch of each resolution, (levels * 8, C, 32, 32))."""
    total = args.stable_steps + (model.levels - 1) * (args.fade_steps + args.stable_steps)
    epochs = math.ceil(total / math.ceil(len(images) / args.batch_size))
    rows: dict[int, torch.Tensor] = {}

    def snapshot(epoch: int, losses: dict, val: float | None) -> None:
        level, _ = model.growth()  # the last epoch at a level overwrites the earlier ones
        rows[level] = draw(model, 8, args.seed + 1)
        print(f"  epoch {epoch + 1}/{epochs} {model.resolution} px alpha {model.growth()[1]:.2f} "
              f"d_loss {losses['d_loss']:.3f} g_loss {losses['g_loss']:.3f}", flush=True)

    start = time.perf_counter()
    history = model.fit(images, epochs=epochs, max_steps=total, batch_size=args.batch_size,
                        device="cpu", progress=False, seed=args.seed, epoch_callback=snapshot)
    seconds = time.perf_counter() - start
    return history, seconds, torch.cat([rows[k] for k in sorted(rows)])


def run_dataset(name: str, data: dict, args, out: Path) -> list[dict]:
    held_out, n = data["held_out"], min(args.samples, len(data["held_out"]))
    in_channels = held_out.shape[1]
    real_features = backbone_embeddings(held_out[:n], image_size=args.embed_size)
    write_png(out / f"{name}_real.png", image_grid(held_out[:64], nrow=8))
    floor = backbone_embeddings(data["train"][:n], image_size=args.embed_size)
    rows = [{"dataset": name, "model": "real (train)", **scores(real_features, floor)}]
    print(f"{name} real (train) FD-Lite0 {rows[0]['fd_lite0']:.2f}", flush=True)

    model = build_stylegan(in_channels, args)
    params = sum(p.numel() for p in model.parameters())
    history, seconds, growth_rows = train_stylegan(model, data["train"], args)
    write_png(out / f"{name}_stylegan_growth.png", image_grid(growth_rows, nrow=8))
    for psi in PSIS:
        samples = draw(model, n, args.seed, truncation_psi=psi)
        rows.append({"dataset": name, "model": f"stylegan (psi {psi:.1f})", "params": params,
                     "steps": history["steps"], "epochs": history["epochs_run"], "train_s": seconds,
                     **scores(real_features, backbone_embeddings(samples, image_size=args.embed_size))})
        write_png(out / f"{name}_stylegan_psi{psi:.1f}.png", image_grid(samples[:64], nrow=8))
        print(f"{name} {rows[-1]['model']} FD-Lite0 {rows[-1]['fd_lite0']:.2f} ({seconds:.0f} s)", flush=True)
    for label, crossover in CROSSOVERS.items():
        write_png(out / f"{name}_stylegan_mixing_{label}.png",
                  model.style_mixing_grid(crossover, rows=5, cols=6, seed=args.seed + 2))

    if args.dcgan:
        torch.manual_seed(args.seed)
        dcgan = create("dcgan", kind="generative", image_size=IMAGE_SIZE, in_channels=in_channels,
                       latent_dim=args.dcgan_latent_dim, width=args.dcgan_width)
        options = SimpleNamespace(batch_size=args.dcgan_batch_size, seed=args.seed, probe_steps=10)
        d_history, epochs, d_seconds = train(dcgan, data["train"], epochs=None, budget_s=seconds,
                                             args=options)
        samples = draw(dcgan, n, args.seed)
        rows.append({"dataset": name, "model": "dcgan (same time)",
                     "params": sum(p.numel() for p in dcgan.parameters()), "steps": d_history["steps"],
                     "epochs": epochs, "train_s": d_seconds,
                     **scores(real_features, backbone_embeddings(samples, image_size=args.embed_size))})
        write_png(out / f"{name}_dcgan.png", image_grid(samples[:64], nrow=8))
        print(f"{name} dcgan FD-Lite0 {rows[-1]['fd_lite0']:.2f} ({d_seconds:.0f} s)", flush=True)
    return rows


def write_results(out: Path, args, command: str, rows: list[dict], seconds: float) -> None:
    fields = ["dataset", "model", "params", "epochs", "steps", "train_s", "fd_lite0", "precision", "recall"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
    total = args.stable_steps + 3 * (args.fade_steps + args.stable_steps)
    lines = [
        "# Small StyleGAN, progressive growing 4 -> 32 px",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch threads; a 2-core machine shared with other jobs, so the "
        "seconds are not idle-machine figures.  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min. StyleGAN: width {args.width} (at 32 px, doubling to "
        f"{args.max_width} towards 4x4), z and w {args.latent_dim}-D, {args.mapping_layers} mapping "
        f"layers, batch {args.batch_size}, lr {args.lr:g}, schedule {args.stable_steps} steps at 4x4, "
        f"then per resolution {args.fade_steps} fade-in + {args.stable_steps} stable steps "
        f"({total} steps); modulated convolutions, non-saturating loss + lazy R1, style mixing 0.9. "
        f"DCGAN: width {args.dcgan_width}, z {args.dcgan_latent_dim}-D, batch {args.dcgan_batch_size}, "
        f"as many whole epochs as fit the StyleGAN's training seconds. Seed {args.seed}.",
        "",
        f"{args.samples} samples vs {args.samples} held-out real images. FD-Lite0 = Fréchet distance on "
        f"pooled EfficientNet-Lite0 features (320-D) at {args.embed_size} px: not an FID, not "
        "comparable with published FIDs; lower is better. Precision / recall: k-NN manifolds (k = 3). "
        "\"real (train)\" = training images in place of samples, the floor at this sample count.",
        "",
    ]
    for dataset in DATASETS:
        part = [r for r in rows if r["dataset"] == dataset]
        if not part:
            continue
        title = ("scikit-learn digits (1 channel)" if dataset == "digits"
                 else f"synthetic {args.texture} (RGB)")
        lines += [f"## {title}, 32 px", "",
                  "| model | params | epochs | steps | train s | FD-Lite0 | precision | recall |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in part:
            cells = [f"{r[k]:,}" if k == "params" and k in r else
                     (f"{r[k]:.1f}" if k == "train_s" and k in r else str(r.get(k, "-")))
                     for k in ("params", "epochs", "steps", "train_s")]
            lines.append(f"| {r['model']} | " + " | ".join(cells)
                         + f" | {r['fd_lite0']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")
        lines.append("")
    pictures = sorted(p.name for p in out.glob("*.png"))
    lines += ["Pictures: " + ", ".join(f"`{p}`" for p in pictures) + ".", ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stylegan"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="digits,texture")
    parser.add_argument("--texture", default="weave", help="synthetic category of the texture data set")
    parser.add_argument("--fade-steps", type=int, default=200)
    parser.add_argument("--stable-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=8, help="StyleGAN channels at 32 px")
    parser.add_argument("--max-width", type=int, default=64, help="StyleGAN channels at 4x4 (cap)")
    parser.add_argument("--latent-dim", type=int, default=64, help="size of z and w")
    parser.add_argument("--mapping-layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-dcgan", dest="dcgan", action="store_false", help="skip the DCGAN row")
    parser.add_argument("--dcgan-width", type=int, default=32)
    parser.add_argument("--dcgan-latent-dim", type=int, default=32)
    parser.add_argument("--dcgan-batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--embed-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a few steps and 100 samples: checks the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.fade_steps = args.stable_steps = 4
        args.samples = 100
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    for dataset in [d for d in args.datasets.split(",") if d]:
        if dataset not in DATASETS:
            parser.error(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")
        data = digits_split(args.seed) if dataset == "digits" else texture_split(args.texture, args.seed)
        rows += run_dataset(dataset, data, args, args.out)
    command = "python benchmarks/stylegan_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, args, command, rows, time.perf_counter() - started)
    print(f"wrote {args.out / 'results.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
