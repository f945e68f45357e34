"""Train the autoencoder family and the flows on scikit-learn's digits; write a table and grids.

The 1797 8x8 digits (17 grey levels) are split 1500 train / 297 held out with a seeded
permutation. The autoencoders (ae, denoising_ae, masked_ae, vae, vqvae) see them upsampled
to 16x16, one channel; the flows see them at their native 8x8 (glow) or as 64-vectors
(realnvp), dequantised with 17 bins so bits per dimension are comparable between the two
(a uniform model scores log2(17) = 4.09).

Writes into ``--out``: ``generative_suite.md`` (model, parameters, first/last training
loss, held-out reconstruction MSE, a model-specific extra, seconds) and one PNG per model
(held-out images, their reconstructions, samples; for the VAE also an interpolation row).
Training losses are each model's own objective (MSE, masked MSE, nats per image for the VAE
and flows) and are not comparable across rows; the MSE column is.

Usage::

    python benchmarks/generative_suite.py --out /tmp/gen_suite --epochs 20 --seed 0
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

from anomalykit.generative.ae import AutoEncoder, DenoisingAutoEncoder, MaskedAutoEncoder
from anomalykit.generative.flows import Glow, RealNVP
from anomalykit.generative.vae import VAE
from anomalykit.generative.vqvae import VQVAE

SIZE = 16
NUM_BINS = 17
LAYOUT = {"in_channels": 1, "widths": [32, 64], "strides": [2, 2]}


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1500, 1, 8, 8), (297, 1, 8, 8) in [0, 1] on 17 levels."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:1500]], images[order[1500:]]


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def build_models(seed: int) -> dict[str, torch.nn.Module]:
    models = {}
    specs = {
        "ae": lambda: AutoEncoder(SIZE, latent_dim=16, lr=2e-3, **LAYOUT),
        "denoising_ae": lambda: DenoisingAutoEncoder(SIZE, latent_dim=16, noise_std=0.2,
                                                     salt_pepper=0.05, lr=2e-3, **LAYOUT),
        "masked_ae": lambda: MaskedAutoEncoder(SIZE, latent_dim=16, mask_ratio=0.5, patch_size=4,
                                               lr=2e-3, **LAYOUT),
        "vae": lambda: VAE(SIZE, latent_dim=16, beta=1.0, sigma=0.1, lr=2e-3, **LAYOUT),
        "vqvae": lambda: VQVAE(SIZE, num_codes=64, code_dim=16, ema=True, dead_code_threshold=1.0,
                               lr=2e-3, **LAYOUT),
        "realnvp": lambda: RealNVP(64, num_layers=6, hidden=128, permutation="random",
                                   dequantize=True, num_bins=NUM_BINS),
        "glow": lambda: Glow(8, in_channels=1, levels=2, steps=4, hidden_channels=32,
                             num_bins=NUM_BINS),
    }
    for name, make in specs.items():
        torch.manual_seed(seed)  # each model's initial weights depend on the seed only
        models[name] = make()
    return models


def model_input(name: str, x8: torch.Tensor) -> torch.Tensor:
    if name == "realnvp":
        return x8.flatten(1)
    if name == "glow":
        return x8
    return upsample(x8)


def to_display(name: str, x: torch.Tensor) -> torch.Tensor:
    """Anything a model produces -> (N, 16, 16) for the grids."""
    if name == "realnvp":
        x = x.view(-1, 1, 8, 8)
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=SIZE, mode="nearest")
    return x[:, 0].clamp(0.0, 1.0)


@torch.no_grad()
def evaluate(name: str, model, held_out: torch.Tensor, seed: int) -> dict[str, object]:
    """Held-out reconstruction MSE, the model's extra figure, and rows of pictures."""
    model.eval()
    x = model_input(name, held_out)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, torch.Tensor] = {"held-out": to_display(name, x[:10])}
    out: dict[str, object] = {"mse": float("nan"), "extra": ""}
    if name in ("realnvp", "glow"):
        bpd = float(model.bits_per_dim(x).mean())
        out["extra"] = f"{bpd:.3f} bits/dim (uniform {math.log2(NUM_BINS):.2f})"
        out["mse"] = None  # a bijection reconstructs exactly
    else:
        recon = model.reconstruct(x)
        out["mse"] = float(F.mse_loss(recon, x))
        rows["reconstruction"] = to_display(name, recon[:10])
        if name == "vae":
            mu, logvar = model.encode(x)
            kl = float(0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean())
            elbo = float(model.elbo(x, generator=generator).mean())
            out["extra"] = f"KL {kl:.1f} nats, -ELBO {-elbo:.0f} nats"
            rows["interpolation"] = to_display(name, model.interpolate(x[0], x[1], steps=10))
        elif name == "masked_ae":
            model.test_draws = 4
            drawn = float(F.mse_loss(model.reconstruct(x), x))
            model.test_draws = 0
            out["extra"] = f"MSE {drawn:.4f} with 4 mask draws (pixels predicted from context)"
        elif name == "vqvae":
            codes = model.encode(x)
            usage = torch.bincount(codes.flatten(), minlength=model.quantizer.num_codes).double()
            p = usage / usage.sum()
            perplexity = math.exp(float(-(p[p > 0] * p[p > 0].log()).sum()))
            out["extra"] = (f"perplexity {perplexity:.1f} of {model.quantizer.num_codes} codes "
                            f"({int((usage > 0).sum())} used)")
    samples = model.sample(10, generator=generator)
    rows["samples"] = to_display(name, samples)
    out["rows"] = rows
    return out


def save_grid(path: Path, title: str, rows: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.15 * len(rows) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(10):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20, help="epochs for every model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", default="ae,denoising_ae,masked_ae,vae,vqvae,realnvp,glow",
                        help="comma-separated subset")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    train, held_out = load_digits_split(args.seed)
    wanted = args.models.split(",")
    models = {k: v for k, v in build_models(args.seed).items() if k in wanted}
    rows = []
    for name, model in models.items():
        start = time.perf_counter()
        history = model.fit(model_input(name, train), epochs=args.epochs, batch_size=args.batch_size,
                            device="cpu", seed=args.seed, progress=False)
        seconds = time.perf_counter() - start
        result = evaluate(name, model, held_out, args.seed)
        save_grid(args.out / f"{name}.png", f"{name}: {args.epochs} epochs on digits",
                  result["rows"])
        losses = history["train_loss"]
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "first": losses[0]["loss"], "last": losses[-1]["loss"],
                     "mse": result["mse"], "extra": result["extra"], "seconds": seconds})
        mse = "-" if result["mse"] is None else f"{result['mse']:.4f}"
        print(f"{name:13s} loss {losses[0]['loss']:.4g} -> {losses[-1]['loss']:.4g}  "
              f"held-out mse {mse}  {result['extra']}  {seconds:.1f}s", flush=True)

    command = "python benchmarks/generative_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Generative suite on scikit-learn digits",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} CPU threads, numpy {np.__version__}.  ",
        "1500 train / 297 held-out digits; autoencoders at 16x16 (bilinear upsampling, 1 channel), "
        "flows at 8x8 dequantised with 17 bins. Losses are each model's own objective; "
        "held-out MSE (the posterior-mean / unmasked / quantised reconstruction) compares the "
        "autoencoders. The VAE's -ELBO is under a Gaussian density (sigma 0.1) on the 256 "
        "continuous pixels, so it can be negative and is not comparable with the flows' "
        "discrete bits/dim. VQ-VAE samples draw codes i.i.d. from the training histogram "
        "(no PixelCNN prior). Seconds were taken on a shared machine.",
        "",
        "| model | params | first loss | last loss | held-out recon MSE | extra | train s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        mse = "- (bijective)" if r["mse"] is None else f"{r['mse']:.4f}"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['first']:.4g} | {r['last']:.4g} | "
                     f"{mse} | {r['extra'] or '-'} | {r['seconds']:.1f} |")
    lines += ["", "Pictures: " + ", ".join(f"`{r['model']}.png`" for r in rows) + "."]
    (args.out / "generative_suite.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'generative_suite.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
