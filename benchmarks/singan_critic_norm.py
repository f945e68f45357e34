"""SinGAN's critic normalisation, one exploratory run: d_norm "none" vs "batch" on one image.

Trains one SinGAN per ``d_norm`` on a 64-px good image of a synthetic texture (train index
0; width 16 -> 32, 150 iterations per scale, seed 0), draws 100 variations and compares them
with 100 held-out good images (``test_good`` 0-99) by FD-Lite0 and k-NN precision / recall;
also the reconstruction MSE from z*. Prints one line per setting and writes a grid per setting
(the training image, then 15 variations) to ``--out``.

Usage::

    python benchmarks/singan_critic_norm.py weave none batch --out /tmp/sx
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from anomalykit.data.io import image_grid, write_png
from anomalykit.data.synthetic import render_sample
from anomalykit.generative.singan import SinGAN
from anomalykit.metrics.sample_quality import backbone_embeddings, frechet_distance, knn_precision_recall


def texture(category: str, index: int, split: str) -> torch.Tensor:
    """(3, 64, 64) in [0, 1]."""
    _, image, _ = render_sample(category, split=split, index=index, image_size=64)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category")
    parser.add_argument("d_norms", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("/tmp/singan_critic_norm"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = texture(args.category, 0, "train")
    real = backbone_embeddings(torch.stack([texture(args.category, i, "test_good") for i in range(100)]))
    for d_norm in args.d_norms:
        torch.manual_seed(0)
        model = SinGAN(64, 3, width=16, max_width=32, steps_per_scale=150, d_norm=d_norm)
        started = time.time()
        model.fit(train[None], epochs=model.num_scales, batch_size=1, seed=0, device="cpu",
                  progress=False)
        seconds = time.time() - started
        samples = model.sample(100, torch.Generator().manual_seed(0))
        fake = backbone_embeddings(samples)
        precision, recall = knn_precision_recall(real, fake, k=3)
        mse = float(((model.reconstruct() - model.image_) ** 2).mean())
        print(f"{args.category} d_norm={d_norm}: fit {seconds:.0f} s, FD-Lite0 "
              f"{frechet_distance(real, fake):.1f}, precision {precision:.2f}, recall {recall:.2f}, "
              f"reconstruction MSE {mse:.5f}", flush=True)
        write_png(args.out / f"{args.category}_{d_norm}.png",
                  image_grid(torch.cat([train[None], samples[:15]]), nrow=8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
