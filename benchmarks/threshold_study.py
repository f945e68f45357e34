"""Old threshold rule (max of the good validation scores) against a target false-alarm rate.

Each detector (quick profile) is trained ONCE on a category's train split at one seed with
:func:`anomalykit.pipeline.train_detector`; its held-out good validation scores and its test
scores / labels are cached in ``--workdir/<detector>.npz`` (a rerun skips finished detectors;
delete the file to redo one). Every threshold rule is then applied to the same cached scores,
so the rules differ only in the threshold, never in the training.

    OMP_NUM_THREADS=1 python benchmarks/threshold_study.py --root /path/to/datasets \\
        --category magnetic_tile --workdir /tmp/threshold_study \\
        --out benchmarks/results/threshold_magnetic_tile

For each detector and rule: the threshold, F1, the false-alarm rate on good test images and
the miss rate on defective ones, against F1-max (the best F1 over every threshold, which only
an oracle that sees the test labels could pick). For the target-rate rules, also the rate the
tail model predicted against the rate observed on the good test images. Writes
``results.csv`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DETECTORS = ["pca", "padim", "patchcore", "fastflow", "ae", "ae_ssim", "riad", "draem",
             "differnet"]
# (name, calibrate keyword arguments): the rules compared on the same scores.
RULES = [("max (old)", {"rule": "quantile", "quantile": 1.0}),
         *[(f"{tail} {rate:.0%}", {"rule": "fpr", "fpr": rate, "tail": tail})
           for rate in (0.01, 0.05) for tail in ("gpd", "gaussian", "lognormal")]]
# Resampling: the good scores of validation and test pooled, split at random into a
# calibration set of the validation's size and a held-out rest, this many times.
RESAMPLES = 500


def score_detector(detector: str, args: argparse.Namespace) -> Path:
    """Train once, score the validation and test images, cache them; returns the cache file."""
    import torch

    from anomalykit.atomic import atomic_write
    from anomalykit.data import AnomalyDataset
    from anomalykit.pipeline import train_detector
    from anomalykit.training.inference import predict

    cache = Path(args.workdir) / f"{detector}.npz"
    if cache.is_file():
        return cache
    torch.set_num_threads(args.threads)
    print(f"[{time.strftime('%H:%M:%S')}] training {detector}", flush=True)
    start = time.perf_counter()
    trained = train_detector(detector, root=args.root, category=args.category,
                             config=args.config, out_dir=Path(args.workdir) / detector,
                             seed=args.seed, progress=False)
    seconds = time.perf_counter() - start
    model = trained.detector
    size = int(model.image_size)
    val = predict(model, AnomalyDataset(trained.val_records, size), batch_size=16)
    test = predict(model, AnomalyDataset(trained.test_records, size), batch_size=16)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, val_scores=val["scores"], test_scores=test["scores"],
                     test_labels=test["labels"], seconds=np.float64(seconds))

    atomic_write(cache, write)
    print(f"[{time.strftime('%H:%M:%S')}] {detector}: {len(val['scores'])} val, "
          f"{len(test['scores'])} test images, {seconds:.0f} s", flush=True)
    return cache


def apply_rule(val_scores: np.ndarray, test_scores: np.ndarray, test_labels: np.ndarray,
               options: dict) -> dict:
    """Threshold from the validation scores by one rule; its numbers on the test set."""
    from anomalykit.metrics.classification import f1_at_threshold
    from anomalykit.metrics.threshold import calibrate_threshold

    threshold, record = calibrate_threshold(val_scores, **options)
    good, bad = test_scores[test_labels == 0], test_scores[test_labels == 1]
    return {
        "threshold": threshold,
        "f1": f1_at_threshold(test_labels, test_scores, threshold),
        "fpr_good": float(np.mean(good >= threshold)),
        "miss_rate": float(np.mean(bad < threshold)),
        "predicted_fpr": record.get("predicted_fpr"),
        "fallback": record.get("fallback") or "",
    }


def resample_rule(val_scores: np.ndarray, test_scores: np.ndarray, test_labels: np.ndarray,
                  options: dict, *, resamples: int, seed: int) -> dict:
    """The rule over random calibration / held-out splits of all good scores (val + test).

    One test set of 120 good images shows a 1 % rate as 0, 1 or 2 false alarms; pooling the
    good scores and splitting them ``resamples`` times (calibration set of the validation's
    size, the rest held out; the defects always the test's) measures the rule's false-alarm
    rate, miss rate and F1 with far less noise, without retraining. Validation and test good
    images are equally unseen by the detector, so any split is a fair one.
    """
    from anomalykit.metrics.threshold import calibrate_threshold

    good = np.concatenate([val_scores, test_scores[test_labels == 0]])
    bad = test_scores[test_labels == 1]
    rng = np.random.default_rng(seed)
    fprs, misses, f1s = [], [], []
    for _ in range(resamples):
        order = rng.permutation(len(good))
        calibration, held_out = good[order[:len(val_scores)]], good[order[len(val_scores):]]
        threshold, _ = calibrate_threshold(calibration, **options)
        false_alarms = int((held_out >= threshold).sum())
        hits = int((bad >= threshold).sum())
        fprs.append(false_alarms / len(held_out))
        misses.append(1.0 - hits / len(bad))
        f1s.append(2.0 * hits / (2.0 * hits + false_alarms + len(bad) - hits))
    return {"resampled_fpr": float(np.mean(fprs)), "resampled_fpr_p90": float(np.quantile(fprs, 0.9)),
            "resampled_miss": float(np.mean(misses)), "resampled_f1": float(np.mean(f1s))}


def analyse(args: argparse.Namespace, command: str) -> None:
    from anomalykit.atomic import atomic_write_csv, atomic_write_text
    from anomalykit.metrics.classification import f1_max

    rows = []
    for detector in args.detectors:
        cache = Path(args.workdir) / f"{detector}.npz"
        if not cache.is_file():
            continue
        data = np.load(cache)
        val, scores, labels = data["val_scores"], data["test_scores"], data["test_labels"]
        best, best_threshold = f1_max(labels, scores)
        # Where F1-max sits: on a test set that is mostly defects (magnetic_tile: 388 of 508)
        # flagging everything already scores F1 = 2d/(2d+g), so F1-max may mean many alarms.
        at_best = {"fpr_at_f1_max": float(np.mean(scores[labels == 0] >= best_threshold)),
                   "miss_at_f1_max": float(np.mean(scores[labels == 1] < best_threshold))}
        for name, options in RULES:
            result = apply_rule(val, scores, labels, options)
            result.update(resample_rule(val, scores, labels, options, resamples=RESAMPLES,
                                        seed=args.seed))
            rows.append({"detector": detector, "rule": name, "n_val": len(val),
                         "n_good_test": int((labels == 0).sum()),
                         "n_defect_test": int((labels == 1).sum()),
                         "f1_max": best, **at_best, **result})
    if not rows:
        print("no cached scores yet", file=sys.stderr)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "results.csv", rows, list(rows[0]))
    atomic_write_text(out / "results.md", render_markdown(rows, args, command))
    print(render_markdown(rows, args, command))


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None or value == "" else f"{float(value):.{digits}f}"


def render_markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    lines = [
        f"# Threshold rules on {args.category} (seed {args.seed}, {args.config} profiles)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or platform.system()}, "
        f"Python {platform.python_version()}, {args.threads} thread(s), a 2-core machine shared "
        "with other jobs (no timings are reported here)  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Detectors done: {', '.join(detectors)}",
        "",
        "Each detector was trained once; every rule sets its threshold from the same held-out good "
        "validation scores (never the test set). F1-max is the best F1 over all thresholds (an "
        "oracle that sees the test labels). FPR good = share of good test images flagged; miss = "
        "share of defective test images passed; predicted = the false-alarm rate the rule "
        "expects on new good images (the target for the `fpr` rules; for max-of-validation, "
        "1/(n_val+1), the chance a new good image beats all n_val).",
        "",
        f"Resampled: the good scores of validation and test pooled and split {RESAMPLES} times "
        "at random into a calibration set of the validation's size and a held-out rest (the "
        "defects always the test's), the rule applied to each calibration set: mean (and 90th "
        "percentile) false-alarm rate on the held-out good images, mean miss rate and F1. "
        "This measures how a rule holds up on held-out good images with far less noise than "
        "one test set (120 good images show a 1 % rate as 0, 1 or 2 false alarms).",
        "",
        "## Summary over detectors (means)",
        "",
        "| rule | predicted FPR | test FPR good | resampled FPR (min-max over detectors) | "
        "resampled FPR p90 | "
        "mean abs(resampled - predicted) | test F1 | resampled F1 | test miss | F1-max | "
        "FPR good at F1-max | miss at F1-max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _ in RULES:
        sel = [r for r in rows if r["rule"] == name]

        def mean(key: str, sel=sel) -> float:
            return float(np.mean([float(r[key]) for r in sel]))

        error = np.mean([abs(r["resampled_fpr"] - r["predicted_fpr"]) for r in sel])
        lines.append(f"| {name} | {mean('predicted_fpr'):.3f} | {mean('fpr_good'):.3f} | "
                     f"{mean('resampled_fpr'):.3f} ({min(r['resampled_fpr'] for r in sel):.3f}-"
                     f"{max(r['resampled_fpr'] for r in sel):.3f}) | {mean('resampled_fpr_p90'):.3f} | "
                     f"{error:.3f} | {mean('f1'):.3f} | {mean('resampled_f1'):.3f} | "
                     f"{mean('miss_rate'):.3f} | {mean('f1_max'):.3f} | "
                     f"{mean('fpr_at_f1_max'):.3f} | {mean('miss_at_f1_max'):.3f} |")
    lines += ["", "## Per detector", "",
              "| detector | rule | threshold | F1 | F1-max (FPR good, miss there) | FPR good | miss | "
              "predicted FPR | resampled FPR (p90) | resampled F1 | resampled miss | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['detector']} | {r['rule']} | {r['threshold']:.5g} | {_fmt(r['f1'])} | "
                     f"{_fmt(r['f1_max'])} ({_fmt(r['fpr_at_f1_max'], 2)}, "
                     f"{_fmt(r['miss_at_f1_max'], 2)}) | {_fmt(r['fpr_good'])} | "
                     f"{_fmt(r['miss_rate'])} | {_fmt(r['predicted_fpr'])} | {_fmt(r['resampled_fpr'])} "
                     f"({_fmt(r['resampled_fpr_p90'])}) | {_fmt(r['resampled_f1'])} | "
                     f"{_fmt(r['resampled_miss'])} | {r['fallback']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--detectors", nargs="+", default=DETECTORS)
    parser.add_argument("--config", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", required=True, help="cache of scores, one .npz per detector")
    parser.add_argument("--out", default="benchmarks/results/threshold_magnetic_tile")
    parser.add_argument("--score-only", action="store_true", help="train and cache, no tables")
    parser.add_argument("--analyse-only", action="store_true", help="tables from the cache only")
    args = parser.parse_args(argv)
    command = "python benchmarks/threshold_study.py " + " ".join(argv or sys.argv[1:])
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if not args.analyse_only:
        for detector in args.detectors:
            try:
                score_detector(detector, args)
            except Exception as exc:  # one detector failing must not lose the others
                print(f"{detector} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
                      flush=True)
    if not args.score_only:
        analyse(args, command)
    json.dumps(vars(args))  # the arguments are plain values (logged in the command line)


if __name__ == "__main__":
    main()
