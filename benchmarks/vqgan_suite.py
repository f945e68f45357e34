"""VQ-VAE against VQGAN on one synthetic texture category: reconstructions and prior samples.

Data. Defect-free images of one category of the toolkit's synthetic dataset at 32 px, rendered
as ``gan_suite.py`` does (:func:`gan_suite.texture_split`): ``--train`` images of its ``train``
split (the last ``--prior-val`` of them held back to stop the code prior early) and
``--samples`` held out from ``test_good``.

Models. The same autoencoder (the suite's VQ-VAE: widths ``--widths``, strides 2, 2, 1, so an
8x8 map of ``--codes`` codes of dimension 32; L1 pixel loss), the same optimiser (Adam
``--lr``, betas (0.5, 0.9)), batch, seed and number of steps (``--epochs``):

* ``vqvae``: :class:`anomalykit.generative.vqvae.VQVAE`, pixel + codebook + commitment losses;
* ``vqgan``: :class:`anomalykit.generative.vqgan.VQGAN`, the same plus the perceptual loss on
  the frozen EfficientNet-Lite0 (stages 0-3, weight ``--perceptual-weight``) and a
  PatchDiscriminator (width ``--disc-width``, hinge loss, adaptive weight x
  ``--disc-weight``) switched on after ``--disc-start-epochs`` epochs.

Each is trained with the toolkit's loop, then its PixelCNN code prior
(:class:`~anomalykit.generative.autoregressive.CodePixelCNN`, same size for both) on the
training code maps for up to ``--prior-epochs`` epochs, keeping the epoch with the best NLL on
the held-back code maps (patience 3).

Measured: held-out reconstruction MSE; FD-Lite0 (Fréchet distance on pooled EfficientNet-Lite0
features at ``--embed-size`` px, :mod:`anomalykit.metrics.sample_quality`; not an FID) of the
held-out images' reconstructions and of ``--samples`` prior samples, both against the held-out
images; "real (train)" scores training images in place of either, the floor at this count.
CAVEAT: FD-Lite0 uses the same backbone weights as VQGAN's perceptual loss (its deepest stage,
which the loss does not use, pooled), so VQGAN is partly trained on the metric's own features.

Writes into ``--out``: ``results.md`` (command, date, machine, versions, the table),
``results.csv`` and PNGs: ``reconstructions.png`` (rows: real, VQ-VAE, VQGAN, twice),
``samples_<model>.png`` (64 prior samples), ``real.png`` (held-out images).

Usage::

    python benchmarks/vqgan_suite.py --out benchmarks/results/vqgan --threads 1
    python benchmarks/vqgan_suite.py --out /tmp/vqgan_quick --quick
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gan_suite import texture_split, versions  # benchmarks/ is on sys.path

from anomalykit.data.io import image_grid, write_png
from anomalykit.generative.vqgan import VQGAN
from anomalykit.generative.vqvae import VQVAE
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance

IMAGE_SIZE = 32
MODELS = ("vqvae", "vqgan")
FIELDS = ["model", "params", "epochs", "steps", "train_s", "prior_epochs", "prior_s",
          "prior_val_nll", "code_perplexity", "recon_mse", "fd_recon", "fd_samples",
          "gan_weight_last_epoch", "d_loss_last_epoch", "warnings"]


def build(name: str, args) -> VQVAE | VQGAN:
    """The two models with the same autoencoder, optimiser and code prior."""
    torch.manual_seed(args.seed)  # the same initial autoencoder weights for both
    common = {"image_size": IMAGE_SIZE, "widths": args.widths, "strides": [2, 2, 1],
              "num_codes": args.codes, "code_dim": 32, "lr": args.lr, "prior_hidden": args.prior_hidden,
              "prior_layers": args.prior_layers, "prior_epochs": 0}  # the prior is fitted below
    if name == "vqvae":
        model = VQVAE(**common, loss="l1", code_prior="pixelcnn")
        return model
    steps_per_epoch = -(-(args.train - args.prior_val) // args.batch_size)
    return VQGAN(**common, recon_loss="l1", betas=(0.5, 0.9), perceptual_weight=args.perceptual_weight,
                 disc_width=args.disc_width, disc_start=args.disc_start_epochs * steps_per_epoch,
                 disc_weight=args.disc_weight)


def vqvae_adam_betas(model: VQVAE, betas=(0.5, 0.9)):
    """VQVAE's optimiser with VQGAN's betas, so that only the losses differ."""
    params = [p for name, p in model.named_parameters() if not name.startswith("prior.")]
    return torch.optim.Adam(params, lr=model.lr, betas=betas)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model.reconstruct(images[i:i + batch]) for i in range(0, len(images), batch)])


def run_model(name: str, data: dict, real_features, args) -> tuple[dict, torch.Tensor, torch.Tensor]:
    train, prior_val = data["train"][:-args.prior_val], data["train"][-args.prior_val:]
    held_out = data["held_out"][:args.samples]
    model = build(name, args)
    if name == "vqvae":  # same optimiser as VQGAN's autoencoder (Adam betas 0.5, 0.9)
        model.configure_optimizers = lambda: vqvae_adam_betas(model)
    options = {"epochs": args.epochs, "batch_size": args.batch_size, "device": "cpu",
               "progress": False, "seed": args.seed}
    started = time.perf_counter()
    history = model.fit(train, **options)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    prior = model.fit_prior(train, prior_val, epochs=args.prior_epochs, seed=args.seed,
                            early_stopping_patience=3)
    prior_s = time.perf_counter() - started
    recon = reconstruct(model, held_out)
    model.eval()
    samples = model.sample(args.samples, generator=torch.Generator().manual_seed(args.seed),
                           prior="pixelcnn").float().cpu()
    vq = model.vqvae if name == "vqgan" else model
    last = history["train_loss"][-1]
    row = {"model": name, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "epochs": history["epochs_run"], "steps": history["steps"], "train_s": train_s,
           "prior_epochs": prior["epochs_run"], "prior_s": prior_s,
           "prior_val_nll": prior["best_val_loss"] * vq.grid ** 2,  # nats per code -> per map
           "code_perplexity": vq.code_perplexity(),
           "recon_mse": float(F.mse_loss(recon, held_out)),
           "fd_recon": frechet_distance(real_features,
                                        backbone_embeddings(recon, image_size=args.embed_size)),
           "fd_samples": frechet_distance(real_features,
                                          backbone_embeddings(samples, image_size=args.embed_size)),
           "gan_weight_last_epoch": last.get("gan_weight"), "d_loss_last_epoch": last.get("d_loss"),
           "warnings": " ".join(getattr(model, "adversarial_warnings", []))}
    print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in row.items() if k != "model"), flush=True)
    return row, recon, samples


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_results(out: Path, args, command: str, rows: list[dict], seconds: float) -> None:
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in FIELDS})
    lines = [
        "# VQ-VAE vs VQGAN",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  ",
        f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{torch.get_num_threads()} torch threads; a 2-core machine shared with other jobs, so "
        "the seconds are not idle figures.  ",
        f"Versions: Python {platform.python_version()}, {versions()}  ",
        f"Whole run: {seconds / 60:.1f} min.",
        "",
        f"Data: synthetic `{args.texture}` at {IMAGE_SIZE} px, {args.train - args.prior_val} training "
        f"images ({args.prior_val} more held back for the prior's early stopping), {args.samples} "
        "held-out `test_good` images.",
        "",
        f"Both: autoencoder widths {args.widths}, strides [2, 2, 1] (8x8 code map), {args.codes} "
        f"codes of dim 32, L1 pixel loss, Adam lr {args.lr:g} betas (0.5, 0.9), batch "
        f"{args.batch_size}, {args.epochs} epochs, seed {args.seed}; PixelCNN code prior (hidden "
        f"{args.prior_hidden}, {args.prior_layers} residual blocks), up to {args.prior_epochs} "
        "epochs, best held-back NLL kept. VQGAN adds the perceptual loss (EfficientNet-Lite0 "
        f"stages 0-3, no learned heads) x {args.perceptual_weight:g} and a PatchDiscriminator "
        f"(width {args.disc_width}, hinge) from epoch {args.disc_start_epochs + 1} on, weighted "
        f"by {args.disc_weight:g} x the adaptive weight of Esser et al. eq. 7.",
        "",
        "Recon MSE: held-out images against their reconstructions. FD-Lite0 (Fréchet distance on "
        f"pooled EfficientNet-Lite0 deepest-stage features at {args.embed_size} px; not an FID, "
        f"lower is better) of the {args.samples} held-out reconstructions and of {args.samples} "
        "prior samples, each against the held-out images. Prior NLL: nats per 8x8 code map on the "
        "held-back images (each model on its own codes; not comparable across models, "
        "uniform = 64 ln K). Code perplexity: exp(entropy) of the training code histogram. "
        "Params: trainable (the frozen perceptual backbone excluded, the prior included). "
        "CAVEAT: VQGAN's perceptual loss uses the same backbone weights as FD-Lite0 (other "
        "stages), so FD-Lite0 favours it partly by construction; look at the pictures too.",
        "",
        "| model | params | epochs | steps | train s | prior epochs | prior s | prior NLL | code perplexity "
        "| recon MSE | FD-Lite0 recon | FD-Lite0 samples | GAN weight (last epoch) | D loss (last epoch) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {fmt(r.get('params'), ',')} | {fmt(r.get('epochs'), 'd')} | "
            f"{fmt(r.get('steps'), 'd')} | {fmt(r.get('train_s'), '.0f')} | "
            f"{fmt(r.get('prior_epochs'), 'd')} | {fmt(r.get('prior_s'), '.0f')} | "
            f"{fmt(r.get('prior_val_nll'), '.1f')} | {fmt(r.get('code_perplexity'), '.1f')} | "
            f"{fmt(r.get('recon_mse'), '.4f')} | {fmt(r.get('fd_recon'), '.1f')} | "
            f"{fmt(r.get('fd_samples'), '.1f')} | {fmt(r.get('gan_weight_last_epoch'), '.3g')} | "
            f"{fmt(r.get('d_loss_last_epoch'), '.3f')} |")
    warned = [f"{r['model']}: {r['warnings']}" for r in rows if r.get("warnings")]
    lines += ["", "Training-health warnings (AdversarialMonitor): " + ("; ".join(warned) or "none") + "."]
    lines += ["", "Pictures: `reconstructions.png` (rows: held-out real, VQ-VAE, VQGAN; twice), "
              "`samples_vqvae.png`, `samples_vqgan.png` (64 prior samples each), `real.png` (64 "
              "held-out images).", ""]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vqgan"))
    parser.add_argument("--texture", default="weave", help="synthetic category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=1200, help="images of the train split")
    parser.add_argument("--prior-val", type=int, default=200,
                        help="of which held back for the prior's early stopping")
    parser.add_argument("--samples", type=int, default=500, help="held-out images and samples scored")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[64, 64, 64])
    parser.add_argument("--codes", type=int, default=128)
    parser.add_argument("--perceptual-weight", type=float, default=1.0)
    parser.add_argument("--disc-width", type=int, default=16)
    parser.add_argument("--disc-weight", type=float, default=0.8)
    parser.add_argument("--disc-start-epochs", type=int, default=10)
    parser.add_argument("--prior-hidden", type=int, default=64)
    parser.add_argument("--prior-layers", type=int, default=5)
    parser.add_argument("--prior-epochs", type=int, default=20)
    parser.add_argument("--embed-size", type=int, default=128, help="image side the FD backbone sees")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true",
                        help="check the script runs: 2 epochs, 300 images, 100 samples")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.prior_val, args.samples = 2, 300, 50, 100
        args.disc_start_epochs, args.prior_epochs = 1, 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data = texture_split(args.texture, args.seed, n_train=args.train, held_out=args.samples)
    held_out = data["held_out"]
    real_features = backbone_embeddings(held_out, image_size=args.embed_size)
    floor = backbone_embeddings(data["train"][:args.samples], image_size=args.embed_size)
    rows = [{"model": "real (train)", "fd_recon": frechet_distance(real_features, floor),
             "fd_samples": frechet_distance(real_features, floor)}]
    recons, samples = {}, {}
    for name in MODELS:
        row, recons[name], samples[name] = run_model(name, data, real_features, args)
        rows.append(row)
        write_png(args.out / f"samples_{name}.png", image_grid(samples[name][:64], nrow=8))
    write_png(args.out / "real.png", image_grid(held_out[:64], nrow=8))
    blocks = [torch.cat([held_out[i:i + 8], recons["vqvae"][i:i + 8], recons["vqgan"][i:i + 8]])
              for i in (0, 8)]
    write_png(args.out / "reconstructions.png", image_grid(torch.cat(blocks), nrow=8))

    command = "python benchmarks/vqgan_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, args, command, rows, time.perf_counter() - started)
    print(f"wrote {args.out / 'results.md'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
