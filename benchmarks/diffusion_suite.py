"""Train DDPMs on digits and a synthetic texture; sample quality against sampling steps, DDPM vs DDIM.

Data. scikit-learn's digits with the 1500 / 297 split of ``generative_suite.py`` (bilinear to
16x16, one channel), and one category of the toolkit's synthetic dataset (defect-free RGB at
32 px, rendered as ``gan_suite.py`` does: ``--texture-train`` images of its ``train`` split,
``--samples`` held out from ``test_good``).

Models, each trained with the toolkit's one loop for a time budget (``--train-seconds``:
``gan_suite.train`` times a few probe steps on a copy and trains whole epochs that fit):

* ``ddpm``: :class:`anomalykit.generative.diffusion.DDPM`, epsilon prediction, linear schedule,
  T = 1000, EMA of the weights (``--ema-decay``) used for sampling;
* ``latent_diffusion`` (digits): a VAE (16-D latent, the layout of ``generative_suite.py``)
  trained first for ``--vae-seconds``, then the same DDPM on its posterior means (a one-level
  U-Net on (16, 1, 1) latents: a residual MLP), decoded; the VAE's own prior samples are a row
  for comparison.

Sampling steps against quality: the same trained DDPM sampled with DDPM (ancestral, all 1000
steps) and DDIM (eta = 0) with 10 / 25 / 50 / 100 steps (``--ddim-steps``), all from the same
seed; each row gives the Fréchet distance to the held-out images on the offline backbone
(FD-Lite0, :mod:`anomalykit.metrics.sample_quality`: pooled EfficientNet-Lite0 features at
``--embed-size`` px; not an FID and not comparable with published FIDs; lower is better) and
the seconds the sampling took. "real (train)" scores as many training images as samples: the
floor at this sample count.

Writes into ``--out``: ``diffusion_suite.md`` (command, date, machine, the tables) and PNGs:
``<data>_<model>_<sampler>.png`` sample grids and ``<data>_real.png``.

Usage::

    python benchmarks/diffusion_suite.py --out benchmarks/results/diffusion_suite --threads 1
    python benchmarks/diffusion_suite.py --out /tmp/diffusion_quick --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gan_suite import texture_split, train, versions  # benchmarks/ is on sys.path
from generative_suite import LAYOUT, load_digits_split, upsample

from anomalykit.data.io import image_grid, write_png
from anomalykit.generative.diffusion import DDPM, LatentDiffusion
from anomalykit.generative.vae import VAE
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance

DATASETS = ("digits", "texture")


def digits_data(seed: int) -> dict[str, torch.Tensor]:
    train_images, held_out = load_digits_split(seed)
    return {"train": upsample(train_images), "held_out": upsample(held_out)}


def build_ddpm(dataset: str, args) -> DDPM:
    channels, size = (1, 16) if dataset == "digits" else (3, 32)
    widths = [args.width, 2 * args.width] if dataset == "digits" else [args.width, 2 * args.width,
                                                                       2 * args.width]
    torch.manual_seed(args.seed)
    return DDPM(size, in_channels=channels, widths=widths, blocks_per_level=args.blocks,
                attention_levels=[len(widths) - 1], groups=8, schedule="linear", timesteps=1000,
                ema_decay=args.ema_decay, lr=args.lr)


def embed(images: torch.Tensor, args) -> np.ndarray:
    return backbone_embeddings(images.float().clamp(0, 1), image_size=args.embed_size)


def save_samples(path: Path, images: torch.Tensor) -> None:
    write_png(path, image_grid(images[:64].clamp(0, 1), nrow=8))


@torch.no_grad()
def timed_samples(model, n: int, args, **options) -> tuple[torch.Tensor, float]:
    """n samples from a fixed seed, drawn in chunks of ``--sample-batch``, and the seconds."""
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    chunks = [model.sample(min(args.sample_batch, n - i), generator=generator, **options)
              for i in range(0, n, args.sample_batch)]
    return torch.cat(chunks).float().cpu(), time.perf_counter() - start


def run_dataset(dataset: str, data: dict[str, torch.Tensor], args, out: Path) -> list[dict]:
    rows: list[dict] = []
    n = min(args.samples if dataset == "digits" else args.texture_samples, len(data["held_out"]))
    real_features = embed(data["held_out"][:n], args)
    floor = frechet_distance(real_features, embed(data["train"][:n], args))
    rows.append({"dataset": dataset, "model": "real (train)", "sampler": "-", "steps": None,
                 "fd": floor, "sample_s": None})
    save_samples(out / f"{dataset}_real.png", data["held_out"])

    model = build_ddpm(dataset, args)
    budget = args.train_seconds if dataset == "digits" else args.texture_seconds
    history, epochs, train_s = train(model, data["train"], epochs=args.epochs, budget_s=budget, args=args)
    base = {"dataset": dataset, "model": "ddpm", "params": sum(p.numel() for p in model.unet.parameters()),
            "epochs": epochs, "steps_trained": history["steps"], "train_s": train_s,
            "loss_first": history["train_loss"][0]["loss"], "loss_last": history["train_loss"][-1]["loss"]}
    print(f"{dataset} ddpm: {epochs} epochs, {train_s:.0f} s, loss {base['loss_first']:.3f} -> "
          f"{base['loss_last']:.3f}", flush=True)
    runs = [("ddpm", 1000)] if not args.skip_ddpm else []
    runs += [("ddim", s) for s in args.ddim_steps]
    for sampler, steps in runs:
        samples, seconds = timed_samples(model, n, args, sampler=sampler, steps=steps)
        fd = frechet_distance(real_features, embed(samples, args))
        rows.append({**base, "sampler": sampler, "steps": steps, "fd": fd, "sample_s": seconds})
        save_samples(out / f"{dataset}_ddpm_{sampler}{steps}.png", samples)
        print(f"  {sampler} {steps} steps: FD-Lite0 {fd:.2f}, {seconds:.1f} s", flush=True)

    if dataset == "digits" and not args.skip_latent:
        torch.manual_seed(args.seed)
        vae = VAE(16, latent_dim=16, beta=1.0, sigma=0.1, lr=2e-3, **LAYOUT)
        _, vae_epochs, vae_s = train(vae, data["train"], epochs=None, budget_s=args.vae_seconds,
                                     args=args)
        samples, seconds = timed_samples(vae, n, args)
        rows.append({"dataset": dataset, "model": "vae (prior samples)", "sampler": "-",
                     "steps": None, "epochs": vae_epochs, "train_s": vae_s,
                     "fd": frechet_distance(real_features, embed(samples, args)), "sample_s": seconds})
        save_samples(out / f"{dataset}_vae_prior.png", samples)
        torch.manual_seed(args.seed)
        latent = LatentDiffusion.from_autoencoder(vae, widths=[4 * args.width], blocks_per_level=2,
                                                  attention_levels=[], groups=8, timesteps=1000,
                                                  ema_decay=args.ema_decay, lr=args.lr)
        history, epochs, train_s = train(latent, data["train"], epochs=None,
                                         budget_s=args.latent_seconds, args=args)
        for sampler, steps in [("ddpm", 1000), ("ddim", 50)]:
            samples, seconds = timed_samples(latent, n, args, sampler=sampler, steps=steps)
            fd = frechet_distance(real_features, embed(samples, args))
            rows.append({"dataset": dataset, "model": "latent_diffusion (vae)", "sampler": sampler,
                         "steps": steps, "epochs": epochs, "train_s": train_s,
                         "steps_trained": history["steps"],
                         "params": sum(p.numel() for p in latent.diffusion.unet.parameters()),
                         "loss_first": history["train_loss"][0]["loss"],
                         "loss_last": history["train_loss"][-1]["loss"], "fd": fd,
                         "sample_s": seconds})
            save_samples(out / f"{dataset}_latent_{sampler}{steps}.png", samples)
            print(f"  latent {sampler} {steps}: FD-Lite0 {fd:.2f}, {seconds:.1f} s", flush=True)
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_results(out: Path, args, command: str, rows: list[dict], seconds: float) -> None:
    lines = [
        "# Diffusion suite",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch thread(s), shared with other jobs (seconds are indicative)  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min. Seed {args.seed}; training budget "
        + (f"{args.epochs} epochs" if args.epochs
           else f"{args.train_seconds:g} s (digits) / {args.texture_seconds:g} s (texture)")
        + f" per DDPM, VAE {args.vae_seconds:g} s, latent DDPM {args.latent_seconds:g} s, "
        f"batch {args.batch_size}, AdamW lr {args.lr:g}, EMA decay {args.ema_decay:g}, base width "
        f"{args.width}, {args.blocks} residual block(s) per level, linear schedule T = 1000, "
        "epsilon prediction. Samples drawn with the EMA weights.",
        "",
        f"FD-Lite0: Fréchet distance between N samples and N held-out images (N = {args.samples} for "
        f"digits, {args.texture_samples} for the texture: FD values are biased upwards at small N, so "
        "compare rows of one table only) on pooled EfficientNet-Lite0 features at "
        f"{args.embed_size} px; not an FID, lower is better. \"real (train)\" = training images in "
        "place of samples (the floor at this sample count). Sample seconds: wall time to draw all "
        f"samples in batches of {args.sample_batch}.",
        "",
    ]
    for dataset in DATASETS:
        part = [r for r in rows if r["dataset"] == dataset]
        if not part:
            continue
        title = ("scikit-learn digits, 16 px, 1500 train / 297 held out" if dataset == "digits"
                 else f"synthetic {args.texture}, 32 px RGB, {args.texture_train} train")
        lines += [f"## {title}", "",
                  "| model | sampler | steps | FD-Lite0 | sample s | params | epochs (steps) | train s "
                  "| loss first -> last epoch |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in part:
            trained = (f"{r['epochs']} ({r['steps_trained']})" if r.get("steps_trained")
                       else fmt(r.get("epochs"), "d"))
            loss = (f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}" if "loss_first" in r else "-")
            lines.append(f"| {r['model']} | {r['sampler']} | {fmt(r['steps'], 'd')} | {r['fd']:.2f} | "
                         f"{fmt(r['sample_s'], '.1f')} | {fmt(r.get('params'), ',')} | {trained} | "
                         f"{fmt(r.get('train_s'), '.0f')} | {loss} |")
        lines.append("")
    pictures = sorted(p.name for p in out.glob("*.png"))
    lines += ["Pictures (8x8 grids, first 64 samples): " + ", ".join(f"`{p}`" for p in pictures) + ".", ""]
    (out / "diffusion_suite.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diffusion_suite"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="digits,texture")
    parser.add_argument("--texture", default="weave", help="synthetic category")
    parser.add_argument("--texture-train", type=int, default=500, help="texture training images")
    parser.add_argument("--train-seconds", type=float, default=150.0, help="budget of the digits DDPM")
    parser.add_argument("--texture-seconds", type=float, default=120.0, help="budget of the texture DDPM")
    parser.add_argument("--vae-seconds", type=float, default=30.0, help="budget of the VAE")
    parser.add_argument("--latent-seconds", type=float, default=60.0, help="budget of the latent DDPM")
    parser.add_argument("--epochs", type=int, default=None, help="fixed DDPM epochs (no budget)")
    parser.add_argument("--probe-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=1, help="residual blocks per level")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--samples", type=int, default=256,
                        help="digits: samples (and held-out images) scored")
    parser.add_argument("--texture-samples", type=int, default=100,
                        help="texture: samples (and held-out images) scored")
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--ddim-steps", default="10,25,50,100")
    parser.add_argument("--skip-ddpm", action="store_true", help="no 1000-step ancestral sampling")
    parser.add_argument("--skip-latent", action="store_true")
    parser.add_argument("--embed-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    args = parser.parse_args(argv)
    args.ddim_steps = [int(s) for s in args.ddim_steps.split(",") if s]
    if args.quick:
        args.train_seconds = args.texture_seconds = args.vae_seconds = args.latent_seconds = 3.0
        args.samples = args.texture_samples = 32
        args.texture_train, args.width, args.probe_steps = 64, 8, 2
        args.ddim_steps, args.skip_ddpm = [5], True
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    for dataset in [d for d in args.datasets.split(",") if d]:
        if dataset not in DATASETS:
            parser.error(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")
        data = (digits_data(args.seed) if dataset == "digits"
                else texture_split(args.texture, args.seed, n_train=args.texture_train,
                                   held_out=args.texture_samples))
        rows += run_dataset(dataset, data, args, args.out)
    command = "python benchmarks/diffusion_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, args, command, rows, time.perf_counter() - started)
    print(f"wrote {args.out / 'diffusion_suite.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
