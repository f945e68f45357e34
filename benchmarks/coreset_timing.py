"""Time PatchCore's greedy k-center coreset selection on a real training set.

Extracts PatchCore's locally aware patch features (the quick profile's backbone and stages,
256 px) of the first ``--images`` good training images of a category (all of them by
default), projects them to 128 dims with the detector's seeded random projection, and times
:func:`anomalykit.nn.coreset.greedy_coreset` for each ``--ratios`` coreset, plus the plain
one-matrix-vector-product-per-pick algorithm on its first ``--plain-picks`` picks (its per
pick cost is constant, so picks per second extrapolate). The feature extraction is not
timed. Run it alone on the machine: the figures are wall-clock seconds.

    python benchmarks/coreset_timing.py --root /path/to/datasets --category magnetic_tile \\
        --out benchmarks/results/coreset_timing --ratios 0.01,0.1,0.25
    python benchmarks/coreset_timing.py ... --images 200 --ratios 0.1 --append

Writes (or with ``--append`` adds rows to) ``coreset_timing.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from anomalykit.config import load_config
from anomalykit.data.dataset import AnomalyDataset
from anomalykit.data.mvtec import scan_mvtec
from anomalykit.detectors.patchcore import PatchCoreDetector
from anomalykit.nn.coreset import _squared_distances, greedy_coreset, random_projection


def plain_picks_per_second(x: torch.Tensor, picks: int) -> float:
    """The textbook vectorised greedy (one full matrix-vector product per pick), timed."""
    sq = x.pow(2).sum(1)
    min_sq = _squared_distances(x, sq, x[0])
    started = time.perf_counter()
    for _ in range(picks):
        torch.minimum(min_sq, _squared_distances(x, sq, x[int(min_sq.argmax())]), out=min_sq)
    return picks / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--ratios", default="0.01,0.1,0.25")
    parser.add_argument("--plain-picks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = load_config("patchcore", "quick")["model"]
    detector = PatchCoreDetector(**model_cfg).eval()
    data = AnomalyDataset(scan_mvtec(args.root, args.category, "train"), detector.image_size)
    count = min(len(data), args.images or len(data))
    images = torch.stack([data[i]["image"] for i in range(count)])
    with torch.no_grad():
        patches = detector.training_patches(images)
        projected = random_projection(patches, detector.projection_dim, seed=args.seed).contiguous()
    m = len(projected)
    plain = plain_picks_per_second(projected, args.plain_picks)
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        k = detector.bank_size(m) if ratio == detector.coreset_ratio else max(1, round(ratio * m))
        started = time.perf_counter()
        picks = greedy_coreset(projected, k, seed=args.seed)
        seconds = time.perf_counter() - started
        assert len(set(picks.tolist())) == k
        rows.append((count, m, ratio, k, seconds, k / seconds, k / plain))
        print(f"{count} images, {m} patches, {ratio:.0%}: {k} picks in {seconds:.1f} s "
              f"({k / seconds:.0f} picks/s; plain algorithm {plain:.1f} picks/s -> {k / plain:.0f} s)",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "coreset_timing.md"
    header = [
        f"# Greedy k-center coreset selection time: {args.category} training set",
        "",
        "PatchCore quick profile features (EfficientNet-Lite0 stages 2+3, 3x3 locally aware, 152 "
        "channels, 256 px: 1,024 patches per image), seeded 128-d random projection; "
        "`anomalykit.nn.coreset.greedy_coreset`, wall-clock seconds, feature extraction not "
        "included. 'plain' = the textbook vectorised greedy (one matrix-vector product over all "
        "patches per pick), timed on its first picks and extrapolated (its cost per pick is "
        "constant).",
        "",
        "| images | patches | coreset | picks | seconds | picks/s | plain algorithm (extrapolated s) "
        "| command |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    command = (f"`python benchmarks/coreset_timing.py --root <datasets> --category {args.category} "
               f"--out {args.out} --ratios {args.ratios}"
               + (f" --images {args.images}" if args.images else "")
               + (f" --threads {args.threads}" if args.threads else "") + "`")
    lines = [f"| {c} | {mm} | {r:.0%} | {k} | {s:.1f} | {ps:.0f} | {p:.0f} | {command} |"
             for c, mm, r, k, s, ps, p in rows]
    machine = (f"\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"torch threads, torch {torch.__version__}, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.note}\n")
    if args.append and path.is_file():
        text = path.read_text().rstrip("\n").split("\n")
        table_end = max(i for i, line in enumerate(text) if line.startswith("|"))
        text[table_end + 1:table_end + 1] = lines
        if machine.strip() in text:  # the same machine line: once is enough
            machine = ""
        path.write_text("\n".join(text) + "\n" + machine)
    else:
        path.write_text("\n".join(header + lines) + "\n" + machine)


if __name__ == "__main__":
    main()
