"""Train the autoregressive models and the VQ-VAE's two code priors on scikit-learn's digits.

The 1797 8x8 digits (17 grey levels) are split 1500 train / 297 held out with the seeded
permutation of ``benchmarks/generative_suite.py``. PixelCNN, Gated PixelCNN (unconditional
and class-conditional) and PixelRNN (Row LSTM) model the digits at their native 8x8 with a
17-way softmax per pixel, so held-out bits per dimension are exact discrete likelihoods
(uniform: log2 17 = 4.09; the flows of generative_suite dequantise with 17 bins and give an
upper bound on the same quantity). The VQ-VAE (generative_suite's settings, 16x16 input, a
4x4 map of 64 codes) is trained, then a PixelCNN prior (one VQ-VAE per prior size in
``--prior-sizes``, identical for a seed) on the training code maps; the histogram and the
PixelCNN priors are compared on held-out code maps (NLL, nats per map) and on samples
(FD-Lite0 of :mod:`anomalykit.metrics.sample_quality` against the held-out digits).

Writes into ``--out``: ``autoregressive_suite.md`` (model, parameters, held-out bits/dim
before training, after the first and the last epoch, seconds, sampling seconds, FD-Lite0;
the prior comparison) and PNG grids: ``<model>.png`` (held-out digits, then samples; one row
per class for the conditional model) and ``vqvae_priors.png``.

Usage::

    python benchmarks/autoregressive_suite.py --out benchmarks/results/autoregressive_suite --threads 1
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from generative_suite import load_digits_split, save_grid, upsample  # benchmarks/ is on sys.path

from anomalykit.generative.autoregressive import GatedPixelCNN, PixelCNN, PixelRNN
from anomalykit.generative.vqvae import VQVAE
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance

NUM_LEVELS = 17
MODELS = ("pixelcnn", "gated_pixelcnn", "gated_pixelcnn_cond", "pixelrnn")


def build(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # each model's initial weights depend on the seed only
    common = {"in_channels": 1, "num_levels": NUM_LEVELS, "lr": 1e-3}
    if name == "pixelcnn":
        return PixelCNN(8, hidden=64, layers=5, head_hidden=128, **common)
    if name == "gated_pixelcnn":
        return GatedPixelCNN(8, hidden=64, layers=6, head_hidden=128, **common)
    if name == "gated_pixelcnn_cond":
        return GatedPixelCNN(8, hidden=64, layers=6, head_hidden=128, num_classes=10, **common)
    if name == "pixelrnn":
        return PixelRNN(8, hidden=64, layers=2, head_hidden=128, **common)
    raise ValueError(name)


def digit_labels(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes of the same split as :func:`load_digits_split`."""
    from sklearn.datasets import load_digits

    target = torch.tensor(load_digits().target, dtype=torch.long)
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    return target[order[:1500]], target[order[1500:]]


def grid_rows(images: torch.Tensor, title: str, per_row: int = 10) -> dict[str, torch.Tensor]:
    """(N, 1, h, w) -> {row title: (10, 16, 16)} for :func:`save_grid` (one row: ``title``)."""
    images = F.interpolate(images, size=16, mode="nearest")[:, 0].clamp(0, 1)
    n_rows = math.ceil(len(images) / per_row)
    return {(title if n_rows == 1 else f"{title} {r}"): images[r * per_row:(r + 1) * per_row]
            for r in range(n_rows)}


def fd(real_features: np.ndarray, images: torch.Tensor) -> float:
    return frechet_distance(real_features, backbone_embeddings(images))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the image models")
    parser.add_argument("--vqvae-epochs", type=int, default=20)
    parser.add_argument("--prior-epochs", type=int, default=30)
    parser.add_argument("--prior-sizes", default="64x5,32x2",
                        help="PixelCNN priors to compare, hidden x residual blocks")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=200, help="samples per model for FD-Lite0")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--models", default=",".join(MODELS) + ",vqvae", help="comma-separated subset")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.models.split(",")

    train, held_out = load_digits_split(args.seed)
    train_y, held_y = digit_labels(args.seed)
    real_features = backbone_embeddings(held_out)
    floor = fd(real_features, train[:args.samples])  # real training digits vs held-out ones
    print(f"FD-Lite0 of {args.samples} training digits against the held-out ones: {floor:.2f}")
    rows = []
    for name in [m for m in MODELS if m in wanted]:
        model = build(name, args.seed)
        cond = name.endswith("_cond")
        train_data = {"image": train, "label": train_y} if cond else train
        val_data = {"image": held_out, "label": held_y} if cond else held_out
        with torch.no_grad():
            start_bpd = float(model.bits_per_dim(held_out, held_y if cond else None).mean())
        start = time.perf_counter()
        history = model.fit(train_data, val_data, epochs=args.epochs, batch_size=args.batch_size,
                            device="cpu", seed=args.seed, progress=False)
        seconds = time.perf_counter() - start
        model.eval()
        val_bpd = [v / math.log(2.0) for v in history["val_loss"]]  # mean nats per pixel -> bits
        start = time.perf_counter()
        labels = torch.arange(args.samples) % 10 if cond else None
        samples = model.sample(args.samples, generator=torch.Generator().manual_seed(args.seed),
                               labels=labels)
        sample_seconds = time.perf_counter() - start
        if cond:  # one row per class
            by_class = samples[:100][torch.argsort(labels[:100], stable=True)]
            pictures = grid_rows(held_out[:10], "held-out")
            for c in range(10):
                pictures.update(grid_rows(by_class[c * 10:(c + 1) * 10], f"class {c}"))
        else:
            pictures = {**grid_rows(held_out[:10], "held-out"), **grid_rows(samples[:40], "samples")}
        save_grid(args.out / f"{name}.png", f"{name}: {args.epochs} epochs on digits", pictures)
        row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
               "bpd_start": start_bpd, "bpd_first": val_bpd[0], "bpd_last": val_bpd[-1],
               "bpd_best": min(val_bpd), "seconds": seconds, "sample_seconds": sample_seconds,
               "fd": fd(real_features, samples)}
        rows.append(row)
        print(f"{name:20s} held-out bits/dim {start_bpd:.3f} -> {val_bpd[0]:.3f} -> {val_bpd[-1]:.3f} "
              f"(best {min(val_bpd):.3f})  FD-Lite0 {row['fd']:.2f}  {seconds:.1f}s train, "
              f"{sample_seconds:.1f}s for {args.samples} samples", flush=True)

    prior_lines: list[str] = []
    if "vqvae" in wanted:
        prior_lines = vqvae_priors(args, train, held_out, real_features)

    command = "python benchmarks/autoregressive_suite.py " + " ".join(sys.argv[1:] if argv is None
                                                                       else argv)
    lines = [
        "# Autoregressive models on scikit-learn digits",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} CPU thread(s), numpy {np.__version__}, {platform.machine()} "
        f"({platform.processor() or 'cpu'}); seconds were taken on a machine shared with other jobs.  ",
        "1500 train / 297 held-out digits at 8x8, 17 levels, one channel (so no colour ordering "
        "here; the tests check it). Bits/dim are exact discrete held-out likelihoods "
        f"(uniform {math.log2(NUM_LEVELS):.2f}), before training and after the first and the "
        f"last of {args.epochs} epochs. The conditional Gated PixelCNN scores log p(x | class). "
        f"FD-Lite0: {args.samples} samples against the 297 held-out digits (EfficientNet-Lite0 "
        f"features at 128 px; {args.samples} real training digits score {floor:.2f}, the floor). "
        "Diagonal BiLSTM: not implemented.",
        "",
        "| model | params | held-out bits/dim before | after epoch 1 | last epoch | best | "
        "train s | sampling s | FD-Lite0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['bpd_start']:.3f} | {r['bpd_first']:.3f} | "
                     f"{r['bpd_last']:.3f} | {r['bpd_best']:.3f} | {r['seconds']:.1f} | "
                     f"{r['sample_seconds']:.1f} | {r['fd']:.2f} |")
    lines += ["", "Pictures: " + ", ".join(f"`{r['model']}.png`" for r in rows) + ".", ""]
    lines += prior_lines
    (args.out / "autoregressive_suite.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'autoregressive_suite.md'}")
    return 0


def vqvae_priors(args, train: torch.Tensor, held_out: torch.Tensor,
                 real_features: np.ndarray) -> list[str]:
    """The VQ-VAE (generative_suite's settings) once per PixelCNN prior size; compare priors.

    The same seed gives the same VQ-VAE every time (its modules are built and trained before
    the prior's), so the histogram rows come from the first one. Held-out code NLL is
    recorded after every prior epoch but never used to pick an epoch.
    """
    x_train, x_held = upsample(train), upsample(held_out)
    rows, pictures = [], {"held-out": x_held[:10, 0]}
    notes: list[str] = []
    first_codes = None
    for size in args.prior_sizes.split(","):
        hidden, layers = (int(v) for v in size.split("x"))
        torch.manual_seed(args.seed)
        model = VQVAE(16, in_channels=1, widths=[32, 64], strides=[2, 2], num_codes=64,
                      code_dim=16, ema=True, dead_code_threshold=1.0, lr=2e-3,
                      code_prior="pixelcnn", prior_hidden=hidden, prior_layers=layers,
                      prior_epochs=0)  # fit only counts the histogram; fit_prior below
        start = time.perf_counter()
        model.fit(x_train, epochs=args.vqvae_epochs, batch_size=args.batch_size, device="cpu",
                  seed=args.seed, progress=False)
        vq_seconds = time.perf_counter() - start
        start = time.perf_counter()
        history = model.fit_prior(x_train, x_held, epochs=args.prior_epochs, seed=args.seed)
        prior_seconds = time.perf_counter() - start
        model.eval()
        per_map = [v * model.grid ** 2 for v in history["val_loss"]]  # nats per code -> per map
        k = model.quantizer.num_codes
        codes = model.code_maps(x_held)
        if rows and not torch.equal(codes, first_codes):
            notes.append(f"(The VQ-VAE of prior {size} differs from the first one: its codes of "
                         "the held-out digits differ.)")
        first_codes = codes if not rows else first_codes
        priors = ["uniform", "empirical", "pixelcnn"] if not rows else ["pixelcnn"]
        if not rows:
            with torch.no_grad():
                recon_mse = float(F.mse_loss(model.reconstruct(x_held), x_held))
            notes.append(f"VQ-VAE: {args.vqvae_epochs} epochs, {vq_seconds:.1f} s, held-out "
                         f"reconstruction MSE {recon_mse:.4f}, code map {model.grid}x{model.grid} "
                         f"of {k} codes (uniform NLL = {model.grid ** 2} log {k}).")
        for prior in priors:
            name = prior if prior != "pixelcnn" else f"pixelcnn {hidden}x{layers}"
            with torch.no_grad():
                nll = float(-model.code_log_prob(x_held, prior).mean())
            start = time.perf_counter()
            samples = model.sample(args.samples, generator=torch.Generator().manual_seed(args.seed),
                                   prior=prior)
            sample_seconds = time.perf_counter() - start
            row = {"prior": name, "nll": nll, "bits": nll / math.log(2.0) / model.grid ** 2,
                   # FD against the 8x8 held-out digits: samples area-pooled back to 8x8 like them.
                   "fd": fd(real_features, F.avg_pool2d(samples, 2)),
                   "sample_seconds": sample_seconds, "params": "-", "curve": "-", "train_s": "-"}
            if prior == "pixelcnn":
                best = min(range(len(per_map)), key=per_map.__getitem__)
                row.update(params=f"{sum(p.numel() for p in model.prior.parameters()):,}",
                           curve=f"{per_map[0]:.1f} / {per_map[best]:.1f} (epoch {best + 1}) / "
                                 f"{per_map[-1]:.1f}",
                           train_s=f"{prior_seconds:.1f}")
            rows.append(row)
            pictures[f"{name} prior"] = samples[:10, 0]
            print(f"vqvae prior {name:16s} held-out code NLL {nll:.1f} nats/map "
                  f"({row['bits']:.3f} bits/code)  FD-Lite0 {row['fd']:.2f}  curve {row['curve']}",
                  flush=True)
    save_grid(args.out / "vqvae_priors.png", "VQ-VAE samples by code prior", pictures)
    lines = [
        "## VQ-VAE: histogram prior vs PixelCNN prior",
        "",
        "VQ-VAE at 16x16 with generative_suite's settings (widths [32, 64], 64 codes of 16 dims, "
        "EMA, dead-code restarts). " + " ".join(notes) + f" PixelCNN priors 'hidden x residual "
        f"blocks' (7x7 mask A, head 2 x hidden) trained {args.prior_epochs} epochs on the 1500 "
        "training code maps; the held-out NLL after each epoch is shown as first / best "
        "(epoch) / last, for information only (the table's NLL is the last epoch's). "
        f"FD-Lite0: {args.samples} decoded samples, 2x2 area-pooled to 8x8, against the held-out "
        "digits.",
        "",
        "| prior | params | held-out code NLL, nats/map | bits/code | NLL by epoch: first / best / "
        "last | prior train s | FD-Lite0 | sampling s |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['prior']} | {r['params']} | {r['nll']:.1f} | {r['bits']:.3f} | "
                     f"{r['curve']} | {r['train_s']} | {r['fd']:.2f} | {r['sample_seconds']:.2f} |")
    lines += ["", "Pictures: `vqvae_priors.png` (held-out digits, then samples under each prior)."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
