"""Combine `anomalykit benchmark` runs that differ only in --seed: mean and spread per detector.

    python benchmarks/aggregate_seeds.py --out benchmarks/results/adversarial_synthetic \\
        /tmp/b9/syn_s0 /tmp/b9/syn_s1 /tmp/b9/syn_s2

Reads each folder's results.csv (and the first one's results.md header: command, date,
machine, versions), and writes ``seeds.md`` and ``seeds.csv`` into ``--out``: for every
detector the mean over the categories of each seed, then the mean over seeds, the standard
deviation over seeds and the min / max; and per category the mean and min-max over seeds.
Train seconds and PyTorch / onnxruntime ms per image are averaged over the runs that have
them (a run without --onnx has no onnxruntime figure). The first run's files (results.md,
report.html, figures/) are copied beside it as the full report of one seed.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "aupro")
TIMES = ("train_s", "torch_ms", "onnx_ms")


def read_rows(folder: Path) -> list[dict[str, str]]:
    path = folder / "results.csv"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: is {folder} an `anomalykit benchmark` folder?")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(value: str) -> float | None:
    """A table cell as a float; None when empty, unparsable or NaN (an export that failed)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(result) else result


def header_lines(folder: Path) -> list[str]:
    """The '- key: value' lines at the top of a benchmark's results.md."""
    path = folder / "results.md"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("- "):
            lines.append(line)
        elif line.startswith("#"):
            break
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmark folders, one per seed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    # (detector, seed) -> category -> row
    table: dict[tuple[str, str], dict[str, dict[str, str]]] = defaultdict(dict)
    detectors: list[str] = []
    categories: list[str] = []
    seeds: list[str] = []
    for folder in args.runs:
        for row in read_rows(folder):
            if row.get("error"):
                raise SystemExit(f"{folder}: {row['detector']} on {row['category']} failed: "
                                 f"{row['error']}")
            d, c, s = row["detector"], row["category"], row["seed"]
            table[d, s][c] = row
            for item, seen in ((d, detectors), (c, categories), (s, seeds)):
                if item not in seen:
                    seen.append(item)

    lines = ["# Detectors over seeds", ""]
    lines += [f"- runs: {', '.join(f'`{p}`' for p in args.runs)} (seeds {', '.join(seeds)})"]
    lines += [f"- first run's header: {h[2:]}" for h in header_lines(args.runs[0])]
    lines += [f"- aggregated by: `python benchmarks/aggregate_seeds.py --out {args.out} "
              f"{' '.join(map(str, args.runs))}`", ""]
    csv_rows = []
    for metric in METRICS:
        lines += [f"### {metric}: mean over categories per seed, then over seeds", "",
                  "| detector | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | std | min | max |",
                  "|---|" + "---:|" * (len(seeds) + 4)]
        for d in detectors:
            per_seed = []
            for s in seeds:
                values = [number(table[d, s][c][metric]) for c in categories if c in table[d, s]]
                values = [v for v in values if v is not None]
                per_seed.append(statistics.mean(values) if values else float("nan"))
            mean = statistics.mean(per_seed)
            std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            lines.append(f"| {d} | " + " | ".join(f"{v:.3f}" for v in per_seed)
                         + f" | **{mean:.3f}** | {std:.3f} | {min(per_seed):.3f} | {max(per_seed):.3f} |")
            csv_rows.append({"detector": d, "metric": metric, "category": "mean",
                             **{f"seed_{s}": f"{v:.6g}" for s, v in zip(seeds, per_seed, strict=True)},
                             "mean": f"{mean:.6g}", "std": f"{std:.6g}"})
        lines.append("")
    if len(categories) > 1:
        lines += ["### image_auroc per category: mean over seeds (min-max)", "",
                  "| detector | " + " | ".join(categories) + " |",
                  "|---|" + "---:|" * len(categories)]
        for d in detectors:
            cells = []
            for c in categories:
                values = [number(table[d, s][c]["image_auroc"]) for s in seeds if c in table[d, s]]
                values = [v for v in values if v is not None]
                cells.append(f"{statistics.mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"
                             if values else "-")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### time: mean over categories and the runs that measured it", "",
              "| detector | train s | torch ms/img | onnx ms/img |", "|---|---:|---:|---:|"]
    for d in detectors:
        cells = []
        for key in TIMES:
            values = [number(table[d, s][c].get(key, "")) for s in seeds for c in categories
                      if c in table[d, s]]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.mean(values):.1f}" if values else "-")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.md").write_text("\n".join(lines))
    with (args.out / "seeds.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    first = args.runs[0]
    for name in ("results.md", "results.csv", "report.html"):
        if (first / name).is_file():
            shutil.copy2(first / name, args.out / name)
    if (first / "figures").is_dir():
        shutil.copytree(first / "figures", args.out / "figures", dirs_exist_ok=True)
    print(f"wrote {args.out / 'seeds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
