"""Train the GAN family and two autoencoder baselines; mode coverage in 2-D, sample quality on images.

Two parts, each model trained with the toolkit's one loop (``model.fit``) from the same seed:

1. 2-D. The MLP ``gan`` (``dim=2``) with the non-saturating loss and with the WGAN-GP loss on
   a ring of 8 Gaussians (radius 2, std 0.02, drawn with numpy from the seed) and on
   scikit-learn's two moons (noise 0.05); with the WGAN-GP loss, 5 critic steps and Adam
   betas (0, 0.9) as in Gulrajani et al., both with the MLP GAN's learning rate 1e-3. 2000
   samples per model are scored:

   * ring: a sample is *high quality* when it lies within 3 std (0.06) of its nearest mode
     centre; a mode is *covered* when at least 1% of the samples (20) are high-quality
     samples of that mode (the rule of Srivastava et al. 2017 / Metz et al. 2017, with the
     per-mode count stated as a share);
   * moons: the noiseless curves are cut into 8 arcs of equal angle (4 per moon); a sample is
     high quality within 3 x noise (0.15) of the nearest curve point, and an arc is covered
     with at least 1% of the samples high-quality and nearest to it.

   One scatter PNG per data set: the data (grey) and each model's samples (colour).

2. Images, 32 px. scikit-learn's digits (8x8, 17 grey levels, bilinear to 32x32, one channel;
   1297 train / 500 held out by a seeded permutation) and one category of the toolkit's
   synthetic dataset (:func:`anomalykit.data.synthetic.render_sample`, defect-free RGB images:
   1000 from its ``train`` split, 500 held out from ``test_good``). Models: dcgan, lsgan,
   wgan, wgan_gp, cgan (digits only, trained on ``{"image", "class"}``), infogan, bigan, and
   the baselines vae and ae (ae samples decode codes drawn from a Gaussian fitted to the
   training latents). Each model's samples are compared with the held-out images by FD-Lite0
   (Fréchet distance on pooled EfficientNet-Lite0 features at 128 px; NOT an FID, values are
   not comparable with published FIDs), k-NN precision and recall (k = 3), see
   :mod:`anomalykit.metrics.sample_quality`. The row "real (train)" scores as many training
   images as samples: the floor a perfect generator would reach with these sample counts.

Training time. By default every model gets a time budget (``--train-seconds``, 2-D:
``--train-seconds-2d``): a throwaway copy trains ``--probe-steps`` steps to time one step, and
the model then trains for as many whole epochs as fit the budget (at least one). The epochs
therefore depend on the machine; results.md reports those used, and ``--epochs`` /
``--epochs-2d`` fix them for a reproducible rerun. Expected run time with the defaults on two
idle CPU cores, about 12 minutes: 8 min of training budgets (4 x 15 s in 2-D, 17 x 25 s on
images) plus about 10,500 images through the backbone at ~20 ms each on one thread (measured:
64 images at 128 px in 1.4 s) plus the probes; an estimate from those parts, not a timed full
run. Models missing from the registry are skipped and listed.

Reading the 2-D numbers: the moons rule credits a sample anywhere near a curve, so a
degenerate generator whose samples cross both moons (a line) still scores some high-quality
samples and arcs; look at the scatter plot too.

Writes into ``--out``: ``results.md`` (command, date, machine, versions, the tables, the
pictures), ``results.csv`` (one row per data set and model) and PNGs: ``2d_<data>.png``,
``<data>_<model>.png`` sample grids (cgan: one row per class; infogan: one row per value of
the categorical code), ``<data>_real.png``.

Usage::

    python benchmarks/gan_suite.py --out benchmarks/results/gan_suite --seed 0
    python benchmarks/gan_suite.py --out /tmp/gan_quick --quick --models gan,dcgan,vae,ae
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anomalykit.data.io import image_grid, write_png
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance, knn_precision_recall
from anomalykit.registry import create, list_generative

IMAGE_SIZE = 32
RING_MODES, RING_RADIUS, RING_STD = 8, 2.0, 0.02
MOONS_NOISE = 0.05
ARCS_PER_MOON = 4
POINTS_2D = 2000  # samples scored per 2-D model; 1% of them covers a mode
LOSSES_2D = ("non_saturating", "wgan_gp")
# WGAN-GP's critic schedule and Adam betas (Gulrajani et al. 2017) for the 2-D MLP GAN; the
# MLP GAN's own learning rate (1e-3) is kept for both losses.
LOSS_OPTIONS_2D = {"wgan_gp": {"n_critic": 5, "betas": (0.0, 0.9)}}
GAN_MODELS = ("dcgan", "lsgan", "wgan", "wgan_gp", "cgan", "infogan", "bigan")
BASELINES = ("vae", "ae")
ALL_MODELS = ("gan", *GAN_MODELS, *BASELINES)
IMAGE_DATASETS = ("digits", "texture")


# -- data ----------------------------------------------------------------------------------


def ring_data(n: int, seed: int) -> np.ndarray:
    """(n, 2) float32: 8 Gaussians (std 0.02) evenly on a circle of radius 2, equal weights."""
    rng = np.random.default_rng(seed)
    centres = ring_centres()
    points = centres[rng.integers(0, RING_MODES, n)] + RING_STD * rng.standard_normal((n, 2))
    return points.astype(np.float32)


def ring_centres() -> np.ndarray:
    angles = 2.0 * np.pi * np.arange(RING_MODES) / RING_MODES
    return RING_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def moons_data(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    return make_moons(n_samples=n, noise=MOONS_NOISE, random_state=seed)[0].astype(np.float32)


def moons_curve(points_per_moon: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless moons (make_moons' parametrisation) as (2P, 2) points and their arc index (2P,)."""
    t = np.linspace(0.0, np.pi, points_per_moon)
    outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    inner = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    arc = np.minimum((t / np.pi * ARCS_PER_MOON).astype(int), ARCS_PER_MOON - 1)
    return np.concatenate([outer, inner]), np.concatenate([arc, arc + ARCS_PER_MOON])


def mode_coverage(dataset: str, samples: np.ndarray) -> dict[str, float]:
    """Modes covered and the share of high-quality samples (rules in the module docstring)."""
    if dataset == "ring":
        reference, mode_of, radius, modes = ring_centres(), np.arange(RING_MODES), 3 * RING_STD, RING_MODES
    else:
        reference, mode_of = moons_curve()
        radius, modes = 3 * MOONS_NOISE, 2 * ARCS_PER_MOON
    d = np.sqrt(((samples[:, None, :] - reference[None, :, :]) ** 2).sum(-1))
    nearest = d.argmin(1)
    good = d[np.arange(len(samples)), nearest] <= radius
    counts = np.bincount(mode_of[nearest[good]], minlength=modes)
    min_count = math.ceil(0.01 * len(samples))
    return {"modes_covered": int((counts >= min_count).sum()), "modes": modes,
            "high_quality": float(good.mean())}


def digits_split(seed: int, held_out: int = 500) -> dict[str, torch.Tensor]:
    """Digits at 32x32 in [0, 1]: train/held-out images (N, 1, 32, 32) and classes (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    classes = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, test = order[:-held_out], order[-held_out:]
    return {"train": images[train], "train_class": classes[train],
            "held_out": images[test], "held_out_class": classes[test]}


def texture_split(category: str, seed: int, n_train: int = 1000, held_out: int = 500) -> dict:
    """Defect-free synthetic images (N, 3, 32, 32) in [0, 1], rendered exactly as the dataset writes them."""
    from anomalykit.data.synthetic import render_sample

    def render(split: str, n: int) -> torch.Tensor:
        images = [render_sample(category, seed=seed, split=split, index=i, image_size=IMAGE_SIZE)[0]
                  for i in range(n)]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0

    return {"train": render("train", n_train), "held_out": render("test_good", held_out)}


# -- models --------------------------------------------------------------------------------


def build_image_model(name: str, in_channels: int, args, extra: dict) -> torch.nn.Module:
    """A GAN through the registry's common options, or a baseline with a 3-stage conv layout."""
    torch.manual_seed(args.seed)  # each model's initial weights depend on the seed only
    if name in BASELINES:
        w = args.width
        options = {"image_size": IMAGE_SIZE, "in_channels": in_channels, "latent_dim": args.latent_dim,
                   "widths": [w, 2 * w, 4 * w], "strides": [2, 2, 2], "lr": 2e-3}
    elif name == "infogan":  # z is the noise part; 10 categorical values, 2 continuous codes
        options = {"image_size": IMAGE_SIZE, "in_channels": in_channels, "noise_dim": args.latent_dim,
                   "num_categories": 10, "width": args.width}
    else:
        options = {"image_size": IMAGE_SIZE, "in_channels": in_channels, "latent_dim": args.latent_dim,
                   "width": args.width}
        if name == "cgan":
            options["num_classes"] = 10
    options.update(extra.get(name, {}))
    return create(name, kind="generative", **options)


def train(model, data, *, epochs: int | None, budget_s: float, args) -> tuple[dict, int, float]:
    """Fit for ``epochs``, or for as many whole epochs as fit ``budget_s`` (timed on a copy).

    Returns the history, the epochs used and the training seconds (the probe excluded).
    """
    options = {"batch_size": args.batch_size, "device": "cpu", "progress": False, "seed": args.seed}
    n = len(data["image"]) if isinstance(data, dict) else len(data)
    steps_per_epoch = math.ceil(n / args.batch_size)
    if epochs is None:
        probe = copy.deepcopy(model)
        history = probe.fit(data, epochs=1, max_steps=args.probe_steps, **options)
        step_s = (history["seconds"] - history["setup_seconds"]) / max(1, history["steps"])
        epochs = max(1, int(budget_s / (step_s * steps_per_epoch)))
        del probe
    start = time.perf_counter()
    history = model.fit(data, epochs=epochs, **options)
    return history, epochs, time.perf_counter() - start


@torch.no_grad()
def draw(model, n: int, seed: int, **condition: torch.Tensor) -> torch.Tensor:
    """n samples from ``generator`` seeded with ``seed``; ``condition``: cgan's ``classes`` or
    infogan's categorical ``codes``."""
    model.eval()
    return model.sample(n, generator=torch.Generator().manual_seed(seed), **condition).float().cpu()


def condition_name(model) -> str | None:
    """The sample() argument that picks a class / categorical code ("classes", "codes"), if any."""
    parameters = inspect.signature(model.sample).parameters
    return next((name for name in ("classes", "codes") if name in parameters), None)


# -- the two parts -------------------------------------------------------------------------


def run_2d(args, extra: dict, out: Path) -> list[dict]:
    rows = []
    for dataset in ("ring", "moons"):
        points = ring_data(4000, args.seed) if dataset == "ring" else moons_data(4000, args.seed)
        panels = {}
        for loss in args.losses_2d:
            label = f"gan ({loss})"
            row = {"part": "2d", "dataset": dataset, "model": label}
            try:
                torch.manual_seed(args.seed)
                options = {"dim": 2, "loss": loss, **LOSS_OPTIONS_2D.get(loss, {}), **extra.get("gan", {})}
                model = create("gan", kind="generative", **options)
                history, epochs, seconds = train(model, torch.from_numpy(points), epochs=args.epochs_2d,
                                                 budget_s=args.train_seconds_2d, args=args)
                samples = draw(model, POINTS_2D, args.seed).numpy().reshape(POINTS_2D, 2)
                panels[label] = samples
                row.update(mode_coverage(dataset, samples), epochs=epochs, steps=history["steps"],
                           train_s=seconds, params=sum(p.numel() for p in model.parameters()))
            except Exception as exc:  # report and go on: one broken model must not hide the others
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append(row)
            print(f"2d {dataset:6s} {label:22s} " + fmt_row(row), flush=True)
        if panels:
            scatter(out / f"2d_{dataset}.png", dataset, points, panels)
    return rows


def run_images(dataset: str, data: dict, args, extra: dict, out: Path) -> list[dict]:
    held_out = data["held_out"]
    in_channels = held_out.shape[1]
    n = min(args.samples, len(held_out))
    real_features = backbone_embeddings(held_out[:n], image_size=args.embed_size)
    write_png(out / f"{dataset}_real.png", image_grid(held_out[:64], nrow=8))
    # The floor: as many training images as samples, scored like a generator's samples.
    reference = backbone_embeddings(data["train"][:n], image_size=args.embed_size)
    rows = [{"part": "images", "dataset": dataset, "model": "real (train)",
             **scores(real_features, reference)}]
    print(f"{dataset:8s} {'real (train)':14s} " + fmt_row(rows[0]), flush=True)
    for name in args.models:
        if name == "gan" or (name == "cgan" and "train_class" not in data):
            continue
        row = {"part": "images", "dataset": dataset, "model": name}
        try:
            model = build_image_model(name, in_channels, args, extra)
            train_data = ({"image": data["train"], "class": data["train_class"]} if name == "cgan"
                          else data["train"])
            history, epochs, seconds = train(model, train_data, epochs=args.epochs,
                                             budget_s=args.train_seconds, args=args)
            condition = condition_name(model)
            # cgan: every class equally often (the digits are balanced); infogan draws its codes.
            samples = draw(model, n, args.seed, **({"classes": torch.arange(n) % model.num_classes}
                                                    if condition == "classes" else {}))
            fake_features = backbone_embeddings(samples, image_size=args.embed_size)
            row.update(scores(real_features, fake_features), epochs=epochs, steps=history["steps"],
                       train_s=seconds, params=sum(p.numel() for p in model.parameters()),
                       recon_mse=recon_mse(model, held_out[:n]))
            if condition:  # one row per class (cgan) or categorical code value (infogan)
                values = getattr(model, "num_classes", None) or getattr(model, "num_categories", 10)
                codes = torch.arange(min(10, values)).repeat_interleave(10)
                grid = draw(model, len(codes), args.seed + 1, **{condition: codes})
            else:
                grid = samples[:64]
            write_png(out / f"{dataset}_{name}.png", image_grid(grid, nrow=10 if condition else 8))
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        print(f"{dataset:8s} {name:14s} " + fmt_row(row), flush=True)
    return rows


def scores(real_features: np.ndarray, fake_features: np.ndarray) -> dict[str, float]:
    precision, recall = knn_precision_recall(real_features, fake_features, k=3)
    return {"fd_lite0": frechet_distance(real_features, fake_features), "precision": precision,
            "recall": recall}


@torch.no_grad()
def recon_mse(model, images: torch.Tensor) -> float | None:
    """Held-out reconstruction MSE for the models that reconstruct (bigan, ae, vae), else None."""
    try:
        recon = model.reconstruct(images)
    except NotImplementedError:
        return None
    return float(F.mse_loss(recon.float().cpu(), images))


# -- output --------------------------------------------------------------------------------


def scatter(path: Path, dataset: str, points: np.ndarray, panels: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.4), squeeze=False)
    lim = np.abs(points).max() * 1.4
    for ax, (title, xy, colour) in zip(
            axes[0], [("data", points[:POINTS_2D], "0.4")] + [(k, v, "tab:red") for k, v in panels.items()],
            strict=True):
        if title != "data":
            ax.scatter(points[:POINTS_2D, 0], points[:POINTS_2D, 1], s=2, c="0.8", linewidths=0)
        ax.scatter(xy[:, 0], xy[:, 1], s=2, c=colour, linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{dataset}: data (grey) and {POINTS_2D} samples per model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def fmt_row(row: dict) -> str:
    if "error" in row:
        return f"FAILED {row['error']}"
    if row["part"] == "2d":
        return (f"modes {row['modes_covered']}/{row['modes']}  high quality {row['high_quality']:.3f}  "
                f"{row['epochs']} epochs  {row['train_s']:.1f}s")
    text = f"FD-Lite0 {row['fd_lite0']:.2f}  precision {row['precision']:.3f}  recall {row['recall']:.3f}"
    if "epochs" in row:
        text += f"  {row['epochs']} epochs  {row['train_s']:.1f}s"
    return text


def versions() -> str:
    names = ["anomalykit", "torch", "numpy", "scipy", "timm", "scikit-learn", "matplotlib"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def write_results(out: Path, args, command: str, rows: list[dict], skipped: list[str],
                  seconds: float, since: float) -> None:
    fields = ["part", "dataset", "model", "params", "epochs", "steps", "train_s", "modes_covered", "modes",
              "high_quality", "fd_lite0", "precision", "recall", "recon_mse", "error"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") if row.get(k) is not None else "" for k in fields})

    lines = [
        "# GAN suite",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch threads  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min. Training budget per model: "
        + (f"{args.epochs} epochs (fixed)" if args.epochs else f"{args.train_seconds:g} s")
        + " for images, "
        + (f"{args.epochs_2d} epochs (fixed)" if args.epochs_2d else f"{args.train_seconds_2d:g} s")
        + f" in 2-D; batch {args.batch_size}, seed {args.seed}, width {args.width}, "
          f"latent {args.latent_dim}. Seconds were taken on a shared machine.",
        "",
    ]
    if skipped:
        lines += [f"Not in the registry, skipped: {', '.join(skipped)}.", ""]
    two_d = [r for r in rows if r["part"] == "2d"]
    if two_d:
        lines += [
            "## 2-D mode coverage",
            "",
            f"{POINTS_2D} samples per model. Ring: 8 Gaussians, radius {RING_RADIUS:g}, std {RING_STD:g}; "
            f"high quality = within 3 std of the nearest mode; a mode is covered with >= 1% of the samples "
            f"({math.ceil(0.01 * POINTS_2D)}) high-quality and nearest to it. Moons (noise {MOONS_NOISE:g}): "
            f"the same with the 8 arcs of equal angle (4 per moon) of the noiseless curves and 3 x noise "
            f"(credits samples merely crossing a curve: see the scatter plots). The wgan_gp loss runs with "
            f"{LOSS_OPTIONS_2D['wgan_gp']}.",
            "",
            "| data | model | modes covered | high-quality share | epochs | steps | train s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in two_d:
            if "error" in r:
                lines.append(f"| {r['dataset']} | {r['model']} | failed: {r['error']} | | | | |")
                continue
            lines.append(f"| {r['dataset']} | {r['model']} | {r['modes_covered']}/{r['modes']} | "
                         f"{r['high_quality']:.3f} | {r['epochs']} | {r['steps']} | {r['train_s']:.1f} |")
        lines.append("")
    for dataset in IMAGE_DATASETS:
        part = [r for r in rows if r["part"] == "images" and r["dataset"] == dataset]
        if not part:
            continue
        title = "scikit-learn digits" if dataset == "digits" else f"synthetic {args.texture}"
        lines += [
            f"## Images: {title}, 32 px",
            "",
            f"{args.samples} samples vs {args.samples} held-out real images. FD-Lite0 = Fréchet distance on "
            f"pooled EfficientNet-Lite0 features (deepest stage, 320-D) at {args.embed_size} px: not an FID "
            "and not comparable with published FIDs; lower is better. Precision / recall: k-NN manifolds "
            "(k = 3, Kynkäänniemi et al. 2019). \"real (train)\" = training images in place of samples, "
            "the floor at this sample count. Recon MSE: held-out reconstruction for models that "
            "reconstruct.",
            "",
            "| model | params | epochs | steps | train s | FD-Lite0 | precision | recall | recon MSE |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in part:
            if "error" in r:
                lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {r['model']} | {fmt(r.get('params'), ',')} | {fmt(r.get('epochs'), 'd')} | "
                         f"{fmt(r.get('steps'), 'd')} | {fmt(r.get('train_s'), '.1f')} | "
                         f"{r['fd_lite0']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                         f"{fmt(r.get('recon_mse'), '.4f')} |")
        lines.append("")
    pictures = sorted(p.name for p in out.glob("*.png") if p.stat().st_mtime >= since)  # this run's
    lines += ["Pictures: " + ", ".join(f"`{p}`" for p in pictures) + ". Sample grids are 8x8 "
              "(cgan: one row per class; infogan: one row per categorical code value, first 10); "
              "`<data>_real.png` shows held-out images.", ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gan_suite"),
                        help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(ALL_MODELS),
                        help="comma-separated subset of " + ",".join(ALL_MODELS) + " ('gan' = the 2-D part)")
    parser.add_argument("--datasets", default="digits,texture", help="image data sets: digits,texture")
    parser.add_argument("--texture", default="weave", help="synthetic category for the texture data set")
    parser.add_argument("--losses-2d", default=",".join(LOSSES_2D), help="losses of the 2-D gan")
    parser.add_argument("--train-seconds", type=float, default=25.0, help="training budget per image model")
    parser.add_argument("--train-seconds-2d", type=float, default=15.0, help="training budget per 2-D model")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epochs per image model (no budget)")
    parser.add_argument("--epochs-2d", type=int, default=None, help="fixed epochs per 2-D model (no budget)")
    parser.add_argument("--probe-steps", type=int, default=10,
                        help="steps timed to turn the budget into epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="base channel width of every image model")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--samples", type=int, default=500, help="samples (and held-out images) scored")
    parser.add_argument("--embed-size", type=int, default=128, help="image side the backbone sees")
    parser.add_argument("--model-kwargs", default="{}",
                        help='JSON of extra constructor options per model, '
                             'e.g. \'{"infogan": {"num_categories": 5}, "dcgan": {"lr": 1e-4}}\'')
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings to check the script runs: 2 s budgets, 100 samples, width 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_seconds, args.train_seconds_2d, args.samples = 2.0, 2.0, 100
        args.width, args.latent_dim, args.probe_steps = 16, 16, 3
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = json.loads(args.model_kwargs)
    args.losses_2d = [s for s in args.losses_2d.split(",") if s]
    unknown = [m for m in args.models.split(",") if m not in ALL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    registered = set(list_generative())
    wanted = [m for m in args.models.split(",") if m]
    skipped = [m for m in wanted if m not in registered]
    args.models = [m for m in wanted if m in registered]
    if skipped:
        print(f"not in the registry, skipped: {', '.join(skipped)}", flush=True)

    started, started_wall = time.perf_counter(), time.time()
    rows: list[dict] = []
    if "gan" in args.models:
        rows += run_2d(args, extra, args.out)
    for dataset in [d for d in args.datasets.split(",") if d]:
        if dataset not in IMAGE_DATASETS:
            parser.error(f"unknown data set {dataset!r}; choose from {', '.join(IMAGE_DATASETS)}")
        data = digits_split(args.seed) if dataset == "digits" else texture_split(args.texture, args.seed)
        if any(m != "gan" for m in args.models):
            rows += run_images(dataset, data, args, extra, args.out)

    command = "python benchmarks/gan_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, args, command, rows, skipped, time.perf_counter() - started, started_wall)
    print(f"wrote {args.out / 'results.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
