"""Benchmark reports: ``results.csv``, ``results.md`` and ``report.html`` with figures.

A person should see at a glance which detector to take: the page opens with ONE summary
table (detectors as rows, metrics as columns, the best of each column in bold; means over
the categories; ``mean ± std`` over seeds), then a quality-against-cost picture, then per
category its table, the examples side by side (the same test images as rows, the
detectors as columns, every map on its detector's threshold-anchored colour scale) and
its ROC curves. ``results.md`` has the same tables in the same order.

Layout of a benchmark folder::

    results.csv                      one row per job (detector, category, seed), rewritten
                                     after each
    results.md                       summary table, per-category tables, failures, notes,
                                     then how it was run (command, date, machine, versions)
    report.html                      the same tables, the figures and the examples
    figures/quality_cost.png         pixel AUROC against fit time and inference time
    figures/colour_scale.png         the heat-map colour bar (0 .. 2 x pixel threshold)
    figures/<category>/roc.png       ROC curves of every detector on that category
    figures/<category>/examples/     the example grid's tiles (r<row>_c<column>.png)
    runs/<detector>/<category>/      a job's run folder (one seed), or .../seed<k>/ (several):
        model.ckpt, model.onnx, predictions.npz, row.json (the job's row), error.txt (failed)
        examples.npz                 a few test images, masks and maps at low resolution,
                                     with the calibrated thresholds (see save_examples)
        training/*.png               what the detector trained on, for detectors that make
                                     their own training data (DRAEM's synthetic anomalies)

Workers write only their run folder; the driver draws every figure under ``figures/`` and
the pages from the run folders, so a report can be rebuilt from a benchmark folder alone.
Figures use matplotlib's object API (``Figure`` + Agg canvas) rather than pyplot, so no
global backend is switched and nothing needs a display.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalykit.atomic import atomic_write_csv
from anomalykit.training.checkpoint import atomic_write, atomic_write_text

#: Columns of results.csv, in order.
COLUMNS = (
    "detector", "category", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "f1_max",
    "f1_at_threshold", "fpr_good", "miss_rate", "threshold_rule", "train_s", "torch_ms",
    "onnx_ms", "n_train", "n_test", "config", "seed", "error", "notes",
)
#: Metrics that get a table in results.md / report.html, with how to print them.
TABLE_METRICS: dict[str, str] = {
    "image_auroc": "Image AUROC (higher is better)",
    "pixel_auroc": "Pixel AUROC (higher is better)",
    "aupro": "AUPRO up to 30 % FPR (higher is better)",
    "pixel_ap": "Pixel AP (higher is better)",
    "f1_max": "Image F1-max, best threshold on the test set (higher is better)",
    "f1_at_threshold": "Image F1 at the calibrated threshold (higher is better)",
    "fpr_good": "Good images flagged at the calibrated threshold (lower is better)",
    "miss_rate": "Defective images missed at the calibrated threshold (lower is better)",
    "train_s": "Training time, seconds",
    "torch_ms": "PyTorch inference, ms/image (batch 1, median)",
    "onnx_ms": "onnxruntime inference, ms/image (batch 1, median)",
}
#: The summary's columns: results.csv name -> (short header, higher is better).
SUMMARY_METRICS: dict[str, tuple[str, bool]] = {
    "image_auroc": ("image AUROC", True),
    "pixel_auroc": ("pixel AUROC", True),
    "aupro": ("AUPRO", True),
    "f1_at_threshold": ("F1 at threshold", True),
    "f1_max": ("F1-max", True),
    "fpr_good": ("false alarms (good)", False),
    "miss_rate": ("misses (defective)", False),
    "train_s": ("fit s", False),
    "torch_ms": ("ms/image torch", False),
    "onnx_ms": ("ms/image onnxruntime", False),
}
FIGURES = "figures"
PREDICTIONS = "predictions.npz"
EXAMPLES = "examples.png"
EXAMPLE_ARRAYS = "examples.npz"
QUALITY_COST = "quality_cost.png"
COLOUR_SCALE = "colour_scale.png"
TRAINING = "training"


# -- environment -----------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment_info(device: str, command: str) -> dict[str, str]:
    """What a reader needs to reproduce or compare timings: command, date, machine, versions."""
    import torch

    from anomalykit import __version__

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # the benchmark can run with --no-onnx
        ort_version = "not installed"
    device_text = device
    if device.startswith("cuda") and torch.cuda.is_available():
        device_text = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
                   f"{platform.release()} {platform.machine()}",
        "versions": f"anomalykit {__version__}, torch {torch.__version__}, onnxruntime "
                    f"{ort_version}, Python {platform.python_version()}",
        "torch_threads": str(torch.get_num_threads()),
        "device": device_text,
    }


# -- values ----------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite-or-nan float, or None for missing/non-numeric cells."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_value(metric: str, value: Any) -> str:
    """How a cell prints: 3 decimals for scores, 1 for times, ``n/a`` for undefined."""
    number = _number(value)
    if number is None:
        return "-"
    if math.isnan(number):
        return "n/a"
    if metric.endswith("_s") or metric.endswith("_ms"):
        return f"{number:.1f}" if number < 100 else f"{number:.0f}"
    return f"{number:.3f}"


def _csv_cell(value: Any) -> str:
    """Empty for missing, ``nan`` for undefined, 6 significant digits for floats."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows atomically: an interrupted benchmark never leaves half a file."""
    return atomic_write_csv(path, ({c: _csv_cell(row.get(c)) for c in COLUMNS} for row in rows),
                            COLUMNS)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a results.csv as strings (for tools and tests)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def seeds_of(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """The distinct seeds of ``rows``, in order of appearance."""
    return list(dict.fromkeys(r.get("seed") for r in rows))


def _finite(row: dict[str, Any] | None, metric: str) -> float | None:
    """The metric of a successful row when it is a finite number."""
    if row is None or row.get("error"):
        return None
    number = _number(row.get(metric))
    return None if number is None or math.isnan(number) else number


def _mean_std(metric: str, values: Sequence[float]) -> str:
    """``mean ± std`` (sample std) over seeds; the value alone for one seed."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return format_value(metric, values[0])
    return (f"{format_value(metric, float(np.mean(values)))} ± "
            f"{format_value(metric, float(np.std(values, ddof=1)))}")


def metric_table(rows: Sequence[dict[str, Any]], metric: str) -> tuple[list[str], list[list[str]]]:
    """One metric as a grid: header ``[detector, cat..., mean]`` and one row per detector.

    The mean is over the categories where the metric is defined; a failed job shows
    ``error`` and is left out of the mean. With several seeds each detector gets one line
    per seed (``det / seed k``) and a ``det mean ± std`` line: per category over the seeds
    that succeeded, and in the mean column over the seeds' category means.
    """
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    seeds = seeds_of(rows)
    cells = {(r["detector"], r["category"], r.get("seed")): r for r in rows}
    header = ["detector", *categories, "mean"]
    body = []
    for det in detectors:
        seed_means = []
        for seed in seeds:
            if len(seeds) > 1 and not any((det, c, seed) in cells for c in categories):
                continue
            line, values = [det if len(seeds) == 1 else f"{det} / seed {seed}"], []
            for cat in categories:
                row = cells.get((det, cat, seed))
                if row is None:
                    line.append("-")
                elif row.get("error"):
                    line.append("error")
                else:
                    line.append(format_value(metric, row.get(metric)))
                    if (number := _finite(row, metric)) is not None:
                        values.append(number)
            line.append(format_value(metric, float(np.mean(values)) if values else math.nan))
            body.append(line)
            if values:
                seed_means.append(float(np.mean(values)))
        if len(seeds) > 1:
            line = [f"{det} mean ± std"]
            for cat in categories:
                runs = [cells.get((det, cat, seed)) for seed in seeds]
                values = [v for r in runs if (v := _finite(r, metric)) is not None]
                failed = all(r is None or r.get("error") for r in runs)
                line.append("error" if failed and any(runs) else _mean_std(metric, values))
            line.append(_mean_std(metric, seed_means))
            body.append(line)
    return header, body


def row_label(row: dict[str, Any], several_seeds: bool) -> str:
    """``detector / category`` (``/ seed k`` when the benchmark has several seeds)."""
    label = f"{row['detector']} / {row['category']}"
    return f"{label} / seed {row.get('seed')}" if several_seeds else label


def _markdown_grid(header: list[str], body: list[list[str]]) -> str:
    """A :func:`metric_table` grid as a Markdown table, numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def _cell(metric: str, per_seed: Sequence[float], runs: Sequence[dict[str, Any] | None]
          ) -> tuple[str, float | None]:
    """One summary cell: text (``mean ± std`` over seeds) and the number that ranks it."""
    if per_seed:
        return _mean_std(metric, per_seed), float(np.mean(per_seed))
    if any(r is not None and r.get("error") for r in runs) and \
            all(r is None or r.get("error") for r in runs):
        return "error", None
    return ("n/a" if any(r is not None for r in runs) else "-"), None


def summary_table(rows: Sequence[dict[str, Any]], category: str | None = None
                  ) -> tuple[list[str], list[str], list[list[str]], list[list[bool]]]:
    """Detectors as rows, :data:`SUMMARY_METRICS` as columns, on one category or all.

    Args:
        rows: Result rows (several seeds and categories allowed; error rows too).
        category: Only this category; ``None``: each detector's mean over the categories
            where the metric is defined (one not finished on every category is marked ``†``).

    Returns:
        ``(metrics, header, body, best)``: the metric keys of the columns shown (those some
        row has a value for), the header ``["detector", short names...]``, one text line
        per detector and, per line, which metric cells are the best of their column (the
        highest score, the lowest error rate or cost; ties all marked; only when at least
        two detectors have a value). With several seeds a cell is ``mean ± std`` over the
        seeds (each seed first averaged over the categories) and ranks by the mean.
    """
    chosen = [r for r in rows if category is None or r["category"] == category]
    detectors = list(dict.fromkeys(r["detector"] for r in chosen))
    categories = list(dict.fromkeys(r["category"] for r in chosen))
    seeds = seeds_of(chosen)
    cells = {(r["detector"], r["category"], r.get("seed")): r for r in chosen}
    metrics = [m for m in SUMMARY_METRICS if any(_number(r.get(m)) is not None for r in chosen)]
    body, numbers = [], []
    for det in detectors:
        runs = [cells.get((det, c, s)) for c in categories for s in seeds]
        finished = {c for c in categories for s in seeds
                    if (r := cells.get((det, c, s))) is not None and not r.get("error")}
        partial = 0 < len(finished) < len(categories)  # its mean is over fewer categories
        line, ranks = [f"{det} †" if partial else det], []
        for metric in metrics:
            per_seed = []
            for seed in seeds:
                values = [v for c in categories
                          if (v := _finite(cells.get((det, c, seed)), metric)) is not None]
                if values:
                    per_seed.append(float(np.mean(values)))
            text, number = _cell(metric, per_seed, runs)
            line.append(text)
            ranks.append(number)
        body.append(line)
        numbers.append(ranks)
    best = [[False] * len(metrics) for _ in body]
    for j, metric in enumerate(metrics):
        column = [(i, n[j]) for i, n in enumerate(numbers) if n[j] is not None]
        if len(column) < 2:
            continue
        higher = SUMMARY_METRICS[metric][1]
        top = max(v for _, v in column) if higher else min(v for _, v in column)
        for i, value in column:  # as printed: 0.9996 and 1.000 tie
            best[i][j] = format_value(metric, value) == format_value(metric, top)
    header = ["detector", *(SUMMARY_METRICS[m][0] for m in metrics)]
    return metrics, header, body, best


#: Cost columns: the terminal's copy of the tables puts them in a table of their own.
COST_METRICS = ("train_s", "torch_ms", "onnx_ms")


def _markdown_summary(rows: Sequence[dict[str, Any]], category: str | None,
                      split_costs: bool = False) -> str:
    """:func:`summary_table` as Markdown, best cells in bold; ``split_costs``: the quality
    columns and the cost columns as two tables (each fits an 80-column terminal)."""
    metrics, header, body, best = summary_table(rows, category)
    groups = [list(range(len(metrics)))]
    if split_costs:
        groups = [[j for j, m in enumerate(metrics) if m not in COST_METRICS],
                  [j for j, m in enumerate(metrics) if m in COST_METRICS]]
    tables = []
    for columns in (g for g in groups if g):
        lines = [[line[0], *(f"**{line[j + 1]}**" if flags[j] else line[j + 1] for j in columns)]
                 for line, flags in zip(body, best, strict=True)]
        tables.append(_markdown_grid([header[0], *(header[j + 1] for j in columns)], lines))
    return "\n\n".join(tables)


def _legend(rows: Sequence[dict[str, Any]]) -> str:
    """What the summary's columns are (with their results.csv names) and how to read them."""
    metrics = summary_table(rows)[0]
    text = ("Best of each column in bold: the highest score, the lowest false-alarm rate, miss "
            "rate and cost. F1 at threshold, false alarms (good test images flagged) and misses "
            "(defective test images passed) use the threshold calibrated on held-out good "
            "images, as the line will; F1-max picks its threshold on the test set (an upper "
            "bound). results.csv columns: "
            + ", ".join(f"{SUMMARY_METRICS[m][0]} = `{m}`" for m in metrics) + ".")
    text += " Each cell is the mean over the categories the detector finished"
    if len({r["category"] for r in rows}) > 1:
        text += " († = not all of them)"
    if len(seeds_of(rows)) > 1:
        text += "; with several seeds, mean ± std over the seeds (sample std)"
    text += "."
    return text


def _threshold_rules(rows: Sequence[dict[str, Any]]) -> str:
    rules = sorted({str(r["threshold_rule"]) for r in rows if r.get("threshold_rule")})
    return f"Threshold rule: {', '.join(rules)}." if rules else ""


def markdown_tables(rows: Sequence[dict[str, Any]], *, split_costs: bool = True) -> str:
    """The summary, per-category tables, failures and notes as Markdown (no run header).

    ``split_costs``: the costs (fit s, ms/image) in a second table under each summary, so
    the copy the CLI prints fits an 80-column terminal; results.md has one table
    (``False``).
    """
    categories = list(dict.fromkeys(r["category"] for r in rows))
    parts = ["## Summary\n", _markdown_summary(rows, None, split_costs) + "\n",
             _legend(rows) + "\n"]
    if rule := _threshold_rules(rows):
        parts.append(rule + "\n")
    several = len(seeds_of(rows)) > 1
    errors = [r for r in rows if r.get("error")]
    if errors:
        parts.append("### Failures\n\n" + "\n".join(
            f"- {row_label(r, several)}: {r['error']}" for r in errors) + "\n")
    if len(categories) > 1:
        for category in categories:
            parts.append(f"## {category}\n\n{_markdown_summary(rows, category, split_costs)}\n")
    if several:  # the summary shows mean ± std; the spread is read from the seeds themselves
        parts.append("## Per seed\n")
        for metric in ("image_auroc", "pixel_auroc"):
            header, body = metric_table(rows, metric)
            parts.append(f"{SUMMARY_METRICS[metric][0]}:\n\n{_markdown_grid(header, body)}\n")
    noted = [r for r in rows if r.get("notes")]
    if noted:
        parts.append("### Notes\n\n" + "\n".join(
            f"- {row_label(r, several)}: {r['notes']}" for r in noted) + "\n")
    return "\n".join(parts)


def markdown_report(rows: Sequence[dict[str, Any]], info: dict[str, str],
                    out_dir: str | os.PathLike[str] | None = None) -> str:
    """The whole results.md: the tables, the quality/cost figure (when drawn), how it ran."""
    configs = sorted({str(r.get("config", "")) for r in rows if r.get("config")})
    seeds = [str(s) for s in seeds_of(rows) if s is not None]
    figure = ""
    if out_dir is not None and (Path(out_dir) / FIGURES / QUALITY_COST).is_file():
        figure = f"![quality against cost]({FIGURES}/{QUALITY_COST})\n\n"
    footer = [
        "## How this was run",
        "",
        f"- command: `{info.get('command', '')}`",
        f"- date: {info.get('date', '')}",
        f"- machine: {info.get('machine', '')}",
        f"- versions: {info.get('versions', '')}",
        f"- device: {info.get('device', '')}; CPU threads (torch and onnxruntime): "
        f"{info.get('torch_threads', '?')}",
        f"- config: {', '.join(configs) or '-'}; seed: {', '.join(seeds) or '-'}",
        *([f"- executor: {info['executor']}"] if info.get("executor") else []),
        *([f"- resumed: {info['resumed']}"] if info.get("resumed") else []),
        "- threshold metrics (F1 at threshold, false alarms, misses) use the threshold "
        "calibrated on held-out good training images; F1-max picks its threshold on the "
        "test set (an upper bound)",
        "",
    ]
    return ("# anomalykit benchmark\n\n" + markdown_tables(rows, split_costs=False) + "\n" + figure
            + "\n".join(footer))


# -- figures ---------------------------------------------------------------------------------


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score (ties moved together)."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    # The last index of each run of equal scores: a threshold cannot split ties.
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1] if len(scores) else []
    tp = np.cumsum(labels)[last] if len(scores) else np.zeros(0)
    fp = np.cumsum(~labels)[last] if len(scores) else np.zeros(0)
    n_pos, n_neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _save_figure(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str],
             title: str) -> Path:
    """ROC curves of several detectors on one test set: ``{name: (labels, scores)}``."""
    from matplotlib.figure import Figure

    from anomalykit.metrics import image_auroc

    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    lines, names = [], []
    for name, (labels, scores) in curves.items():
        fpr, tpr = roc_curve(labels, scores)
        auroc = image_auroc(labels, scores)
        lines += ax.plot(fpr, tpr, lw=1.8)
        names.append(f"{name} (AUROC {format_value('auroc', auroc)})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (good flagged)",
           ylabel="true positive rate (defects found)", title=title)
    # Explicit handles: matplotlib hides labels starting with "_", a valid detector name.
    ax.legend(lines, names, loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def pick_examples(labels: np.ndarray, defect_types: Sequence[str], *, n_good: int = 2,
                  n_defect: int = 3) -> list[int]:
    """Indices to show: the first good images and one defect per defect type, round-robin."""
    labels = np.asarray(labels)
    good = [i for i in range(len(labels)) if labels[i] == 0][:n_good]
    by_type: dict[str, list[int]] = {}
    for i in range(len(labels)):
        if labels[i] == 1:
            by_type.setdefault(str(defect_types[i]) if i < len(defect_types) else "defect",
                               []).append(i)
    defects: list[int] = []
    depth = 0
    while len(defects) < n_defect and any(depth < len(v) for v in by_type.values()):
        for indices in by_type.values():
            if depth < len(indices) and len(defects) < n_defect:
                defects.append(indices[depth])
        depth += 1
    return good + defects


def plot_examples(predictions: dict[str, Any], path: str | os.PathLike[str], title: str, *,
                  threshold: float | None = None, n_good: int = 2, n_defect: int = 3) -> Path:
    """Rows of image | ground-truth mask | heat-map overlay for a few good and defect images.

    ``predictions`` is :func:`anomalykit.training.predict`'s output (with paths). All rows
    share one colour scale, so a calm good image looks calm next to a defect.
    """
    import cv2
    from matplotlib.figure import Figure

    from anomalykit.data import read_image
    from anomalykit.export.runtime import overlay_heatmap

    maps = np.asarray(predictions["maps"])
    labels = np.asarray(predictions.get("labels", np.zeros(len(maps), dtype=np.int64)))
    indices = pick_examples(labels, predictions.get("defect_types", []), n_good=n_good,
                            n_defect=n_defect)
    if not indices:
        indices = list(range(min(len(maps), n_good + n_defect)))
    masks = predictions.get("masks")
    low = float(min(maps[i].min() for i in indices)) if indices else 0.0
    high = float(max(maps[i].max() for i in indices)) if indices else 1.0
    fig = Figure(figsize=(7.5, 2.4 * max(len(indices), 1)))
    for row, i in enumerate(indices):
        height, width = maps[i].shape
        image = cv2.resize(read_image(predictions["paths"][i]), (width, height),
                           interpolation=cv2.INTER_LINEAR)
        mask = masks[i] if masks is not None else np.zeros((height, width), np.uint8)
        overlay = overlay_heatmap(image, maps[i], vmin=low, vmax=high)
        score = float(predictions["scores"][i])
        kind = predictions["defect_types"][i] if predictions.get("defect_types") else "?"
        verdict = ""
        if threshold is not None and math.isfinite(threshold):
            verdict = " -> anomalous" if score > threshold else " -> good"
        panels = ((image, f"{kind}: {Path(predictions['paths'][i]).name}"),
                  (mask * 255, "ground truth"), (overlay, f"score {score:.4g}{verdict}"))
        for col, (picture, caption) in enumerate(panels):
            ax = fig.add_subplot(len(indices), 3, row * 3 + col + 1)
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(caption, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def save_predictions(predictions: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Keep what the ROC curves need (labels, scores, paths), not the maps: files stay small."""
    labels = np.asarray(predictions.get("labels", np.zeros(0, np.int64)))
    arrays = {"labels": labels, "scores": np.asarray(predictions["scores"]),
              "paths": np.asarray([str(p) for p in predictions.get("paths", [])]),
              "defect_types": np.asarray([str(d) for d in predictions.get("defect_types", [])])}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


def load_predictions(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read what :func:`save_predictions` wrote."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def plot_quality_cost(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Pixel AUROC against fit time and against inference time, one labelled point per detector.

    Values are the summary's (means over categories and seeds). Inference time is
    onnxruntime's when every plotted detector has it, else PyTorch's. Falls back to image
    AUROC when no detector has a pixel AUROC (no masks). Returns ``None`` (nothing drawn)
    when no detector has a quality and a cost.
    """
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["detector"] for r in rows))
    values = {m: [_summary_number(rows, name, m) for name in names]
              for m in ("pixel_auroc", "image_auroc", "train_s", "torch_ms", "onnx_ms")}
    quality = "pixel_auroc" if any(v is not None for v in values["pixel_auroc"]) else "image_auroc"
    onnx_complete = all(o is not None for o, q in zip(values["onnx_ms"], values[quality],
                                                      strict=True) if q is not None)
    speed = "onnx_ms" if onnx_complete and any(v is not None for v in values["onnx_ms"]) \
        else "torch_ms"
    panels = (("train_s", "fit time, s (log)"),
              (speed, f"inference, ms/image, {'onnxruntime' if speed == 'onnx_ms' else 'PyTorch'}"
                      " (log)"))
    if not any(q is not None and c is not None for key, _ in panels
               for q, c in zip(values[quality], values[key], strict=True)):
        return None
    fig = Figure(figsize=(10, 3.8))
    for k, (cost, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        points = [(c, q, n) for c, q, n in zip(values[cost], values[quality], names, strict=True)
                  if c is not None and q is not None and c > 0]
        for i, (c, q, name) in enumerate(points):
            ax.scatter([c], [q], s=40, color=f"C{i % 10}", zorder=3)
            ax.annotate(name, (c, q), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        if points:  # room for the labels right of the last point
            low, high = min(p[0] for p in points), max(p[0] for p in points)
            ax.set_xlim(low / 1.6, high * 2.5)
        ax.grid(True, which="both", color="0.9", lw=0.6)
        ax.set(xlabel=label, ylabel=quality.replace("_", " ").replace("auroc", "AUROC"),
               title=f"quality against {'training' if cost == 'train_s' else 'inference'} cost")
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def _summary_number(rows: Sequence[dict[str, Any]], detector: str, metric: str) -> float | None:
    """A detector's summary value: mean over seeds of its mean over categories."""
    per_seed = []
    for seed in seeds_of(rows):
        values = [v for r in rows if r["detector"] == detector and r.get("seed") == seed
                  if (v := _finite(r, metric)) is not None]
        if values:
            per_seed.append(float(np.mean(values)))
    return float(np.mean(per_seed)) if per_seed else None


def save_examples(predictions: dict[str, Any], path: str | os.PathLike[str], *,
                  threshold: float | None, pixel_threshold: float | None, n_good: int = 2,
                  n_defect: int = 4, size: int = 96) -> Path:
    """Keep a few test images, masks and maps at low resolution for the side-by-side examples.

    Written by a job into its run folder while the maps are in memory; the driver draws
    the grid from it (:func:`plot_example_grid`). The images are those of
    :func:`pick_examples` (a deterministic choice from the labels and defect types, so every
    detector on the same test set keeps the same ones), defects first.

    Args:
        predictions: :func:`anomalykit.training.predict`'s output (``maps`` (N, H, W),
            ``scores``, ``labels``, ``paths``, ``defect_types``, ``masks`` (N, H, W) if any).
        path: The ``.npz`` to write.
        threshold, pixel_threshold: The detector's calibrated image and pixel thresholds
            (``None``/0: not calibrated).
        size: Longer side of the stored arrays, pixels (maps are downscaled by area).

    The file holds ``paths`` (K,), ``defect_types`` (K,), ``labels`` (K,), ``scores`` (K,),
    ``images`` (K, h, w, 3) uint8 RGB, ``masks`` (K, h, w) uint8 {0, 1}, ``maps`` (K, h, w)
    float32, ``threshold`` and ``pixel_threshold`` (scalars, nan when not calibrated).
    """
    import cv2

    from anomalykit.data import read_image

    maps = np.asarray(predictions["maps"], dtype=np.float32)
    labels = np.asarray(predictions.get("labels", np.zeros(len(maps), dtype=np.int64)))
    defect_types = [str(d) for d in predictions.get("defect_types", [])]
    picked = pick_examples(labels, defect_types, n_good=n_good, n_defect=n_defect)
    picked = [i for i in picked if labels[i] == 1] + [i for i in picked if labels[i] != 1]
    height, width = maps.shape[1:] if len(maps) else (size, size)
    scale = min(1.0, size / max(height, width))
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2: (w, h)
    masks = predictions.get("masks")
    images, small_masks, small_maps = [], [], []
    for i in picked:
        images.append(cv2.resize(read_image(predictions["paths"][i]), shape,
                                 interpolation=cv2.INTER_AREA))
        mask = (np.asarray(masks[i]) > 0).astype(np.uint8) if masks is not None \
            else np.zeros((height, width), np.uint8)
        small_masks.append(cv2.resize(mask, shape, interpolation=cv2.INTER_NEAREST))
        small_maps.append(cv2.resize(maps[i], shape, interpolation=cv2.INTER_AREA))
    h, w = shape[1], shape[0]
    arrays = {
        "paths": np.asarray([str(predictions["paths"][i]) for i in picked], dtype=str),
        "defect_types": np.asarray([defect_types[i] if i < len(defect_types) else ""
                                    for i in picked], dtype=str),
        "labels": labels[picked].astype(np.int64),
        "scores": np.asarray(predictions["scores"], dtype=np.float64)[picked],
        "images": np.asarray(images, np.uint8).reshape(len(picked), h, w, 3),
        "masks": np.asarray(small_masks, np.uint8).reshape(len(picked), h, w),
        "maps": np.asarray(small_maps, np.float32).reshape(len(picked), h, w),
        "threshold": np.float64(math.nan if threshold is None else threshold),
        "pixel_threshold": np.float64(math.nan if pixel_threshold is None else pixel_threshold),
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


def _write_png(path: Path, image_rgb: np.ndarray) -> Path:
    import cv2

    array = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(encoded.tobytes()))


def colour_scale_png(path: str | os.PathLike[str], width: int = 240, height: int = 12) -> Path:
    """The heat maps' colour bar (JET, left = 0, middle = pixel threshold, right = twice it)."""
    import cv2

    ramp = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    return _write_png(Path(path), cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET),
                                               cv2.COLOR_BGR2RGB))


def example_tiles(examples: dict[str, dict[str, np.ndarray]], out_dir: str | os.PathLike[str],
                  *, draw: bool = True) -> list[dict[str, Any]]:
    """Draw one category's example grid as PNG tiles; return its rows for the page.

    Args:
        examples: ``{detector: what save_examples wrote}`` for the detectors that have it,
            in column order. The rows are the first detector's images; another detector's
            cell is empty where it lacks that image.
        out_dir: Folder for the tiles (``r<row>_c<column>.png``; columns 0 and 1 are the
            image and the ground truth).
        draw: Write the tiles; ``False`` only names them (they are there from a previous call).

    Every map is coloured by :func:`~anomalykit.export.runtime.overlay_heatmap` on the
    scale :func:`~anomalykit.export.runtime.heatmap_range` gives for that detector's pixel
    threshold (blue 0, red at twice the threshold), as ``predict`` and the service do.

    Returns:
        One dict per row: ``path``, ``defect_type``, ``label``, ``tiles`` (file per column,
        ``None`` for an empty cell) and ``captions`` (text per column).
    """
    from anomalykit.export.runtime import heatmap_range, overlay_heatmap

    if not examples:
        return []
    out = Path(out_dir)
    reference = next(iter(examples.values()))

    def tile(name: str, picture: np.ndarray) -> Path:
        return _write_png(out / name, picture) if draw else out / name

    grid = []
    for r, path in enumerate(reference["paths"]):
        image, mask = reference["images"][r], reference["masks"][r]
        label = int(reference["labels"][r])
        tiles = [tile(f"r{r}_c0.png", image),
                 tile(f"r{r}_c1.png", (mask > 0).astype(np.uint8) * 255)]
        captions = [f"{reference['defect_types'][r] or ('good' if label == 0 else 'defect')}: "
                    f"{Path(str(path)).name}", "ground truth"]
        for c, data in enumerate(examples.values(), start=2):
            where = np.nonzero(data["paths"] == path)[0]
            if not len(where):
                tiles.append(None)
                captions.append("not in this detector's examples")
                continue
            k = int(where[0])
            pixel_threshold = float(data["pixel_threshold"])
            scale = heatmap_range(pixel_threshold if math.isfinite(pixel_threshold) else None)
            tiles.append(tile(f"r{r}_c{c}.png", overlay_heatmap(image, data["maps"][k], **scale)))
            score, threshold = float(data["scores"][k]), float(data["threshold"])
            verdict = ""
            if math.isfinite(threshold):
                verdict = " NG" if score > threshold else " OK"
            captions.append(f"score {score:.3g}{verdict}")
        grid.append({"path": str(path), "defect_type": str(reference["defect_types"][r]),
                     "label": label, "tiles": tiles, "captions": captions})
    return grid


def load_examples(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read what :func:`save_examples` wrote."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


# -- the whole report ------------------------------------------------------------------------


def run_dir_of(out_dir: str | os.PathLike[str], row: dict[str, Any]) -> Path:
    """A row's run folder: its ``run_dir`` (relative to the benchmark folder) when it has one;
    for rows read back from a results.csv, ``runs/<detector>/<category>[/seed<k>]``."""
    if row.get("run_dir"):
        return Path(out_dir) / row["run_dir"]
    path = Path(out_dir) / "runs" / row["detector"] / row["category"]
    per_seed = path / f"seed{row.get('seed')}"
    return per_seed if per_seed.is_dir() else path


def save_training_figures(model: Any, images: Any, run_dir: str | os.PathLike[str], *,
                          n: int = 8, seed: int = 0) -> list[Path]:
    """Let a detector that synthesises its own training data show it, as PNGs in
    ``run_dir/training/``.

    A detector opts in with ``example_figures(images (N, 3, S, S) in [0, 1], out_dir, *, n,
    seed) -> list[Path]`` (DRAEM draws its Perlin-noise anomalies on these images). Others: [].
    """
    if not hasattr(model, "example_figures"):
        return []
    return list(model.example_figures(images, Path(run_dir) / TRAINING, n=n, seed=seed))


def _first_successful(rows: Sequence[dict[str, Any]], detector: str,
                      category: str) -> dict[str, Any] | None:
    """The row whose figures represent (detector, category): its first seed that succeeded."""
    return next((r for r in rows if r["detector"] == detector and r["category"] == category
                 and not r.get("error")), None)


def roc_figure_path(out_dir: str | os.PathLike[str], category: str) -> Path:
    """Where a category's ROC curves (all detectors) go."""
    return Path(out_dir) / FIGURES / category / "roc.png"


def _html_summary(rows: Sequence[dict[str, Any]], category: str | None, css_class: str) -> str:
    """A :func:`summary_table` as HTML: best cells bold with class ``best``, full metric
    names as header tooltips."""
    esc = html.escape
    metrics, header, body, best = summary_table(rows, category)
    head = "<th>detector</th>" + "".join(
        f"<th title='{esc(TABLE_METRICS[m])}'>{esc(h)}</th>"
        for m, h in zip(metrics, header[1:], strict=True))
    lines = []
    for line, flags in zip(body, best, strict=True):
        cells = [f"<th>{esc(line[0])}</th>"]
        for text, is_best in zip(line[1:], flags, strict=True):
            if is_best:
                cells.append(f"<td class='best'><strong>{esc(text)}</strong></td>")
            else:
                css = " class='error'" if text == "error" else ""
                cells.append(f"<td{css}>{esc(text)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table class='{css_class}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(lines)}</tbody></table>")


def _src(path: Path, out: Path) -> str:
    """An image's address relative to the report (the folder moves or zips as a whole)."""
    return html.escape(path.relative_to(out).as_posix(), quote=True)


def _html_examples(grid: list[dict[str, Any]], detectors: list[str],
                   examples: dict[str, dict[str, np.ndarray]], out: Path, category: str) -> str:
    """The side-by-side grid: image, ground truth, then one column per detector."""
    esc = html.escape
    head = ["<th>image</th>", "<th>ground truth</th>"]
    for det in detectors:
        pixel_threshold = float(examples[det]["pixel_threshold"])
        scale = (f"red = {2 * pixel_threshold:.3g} (2 × pixel threshold)"
                 if math.isfinite(pixel_threshold) and pixel_threshold > 0 else "own min/max")
        head.append(f"<th>{esc(det)}<br><small>{esc(scale)}</small></th>")
    lines = []
    for row in grid:
        cells = []
        for tile, caption in zip(row["tiles"], row["captions"], strict=True):
            if tile is None:
                cells.append(f"<td class='empty'><small>{esc(caption)}</small></td>")
                continue
            cells.append(f"<td><figure><img src='{_src(tile, out)}' alt='{esc(caption)}, "
                         f"{esc(category)}'><figcaption>{esc(caption)}</figcaption></figure></td>")
        kind = "good" if row["label"] == 0 else "defect"
        lines.append(f"<tr class='{kind}'>" + "".join(cells) + "</tr>")
    return (f"<div class='wide'><table class='examples'><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>{''.join(lines)}</tbody></table></div>")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1240px;
       padding: 0 1em; color: #222; font-size: 15px; }
h1 { margin-bottom: 0.2em; } .subtitle { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: right; }
thead th { background: #f2f2f2; vertical-align: bottom; } tbody th { text-align: left; }
table.summary, table.category { font-size: 14px; }
td.best { background: #e3f4e3; } td.error, .error { color: #b00; }
.legend { color: #444; font-size: 13px; max-width: 1100px; }
div.examples { width: min-content; max-width: 100%; } /* as wide as its grid: ROC beside */
img { max-width: 100%; }
img.figure { border: 1px solid #eee; }
.wide { overflow-x: auto; }
table.examples td { padding: 2px; text-align: center; vertical-align: top; }
table.examples th { text-align: center; font-size: 13px; }
table.examples figure { margin: 0; }
table.examples img { width: 120px; max-width: none; height: auto; display: block; margin: 0 auto; }
table.examples figcaption { font-size: 11px; color: #444; max-width: 120px; margin: 0 auto;
                            overflow-wrap: anywhere; }
tr.good td:first-child { box-shadow: inset 4px 0 #4a4; }
tr.defect td:first-child { box-shadow: inset 4px 0 #c44; }
img.scale { width: 240px; height: 12px; vertical-align: middle; border: 1px solid #ccc; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
code { background: #f5f5f5; padding: 0.1em 0.3em; }
"""


def _category_examples(rows: Sequence[dict[str, Any]], out: Path, category: str
                       ) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """The detectors of ``category`` that saved examples (first successful seed), in order."""
    examples = {}
    for detector in dict.fromkeys(r["detector"] for r in rows if r["category"] == category):
        shown = _first_successful(rows, detector, category)
        file = run_dir_of(out, shown) / EXAMPLE_ARRAYS if shown is not None else None
        if file is not None and file.is_file():
            examples[detector] = load_examples(file)
    return list(examples), examples


def examples_dir(out_dir: str | os.PathLike[str], category: str) -> Path:
    """Where a category's example tiles go."""
    return Path(out_dir) / FIGURES / category / "examples"


def html_report(rows: Sequence[dict[str, Any]], info: dict[str, str],
                out_dir: str | os.PathLike[str],
                grids: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """report.html's text: summary, quality/cost, then per category its table, examples, ROC.

    ``grids``: each category's example rows (:func:`example_tiles`), drawn by
    :func:`write_report`; a category without one shows no examples. Images are referenced
    relative to ``out_dir`` (only those that exist), so the folder can be moved or zipped.
    """
    out = Path(out_dir)
    esc = html.escape
    grids = grids or {}
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    seeds = seeds_of(rows)
    several = len(seeds) > 1
    scope = (f"{len(detectors)} detector{'s' * (len(detectors) > 1)} on {len(categories)} "
             f"categor{'ies' if len(categories) > 1 else 'y'}"
             + (f", {len(seeds)} seeds" if several else ""))
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>anomalykit benchmark</title>", f"<style>{_STYLE}</style></head><body>",
        "<h1>anomalykit benchmark</h1>",
        f"<p class='subtitle'>{esc(scope)} &middot; {esc(info.get('date', ''))} &middot; "
        "<a href='#how'>how this was run</a></p>",
        "<section id='summary'><h2>Summary</h2>", _html_summary(rows, None, "summary"),
        f"<p class='legend'>{esc(_legend(rows)).replace('`', '')}</p>",
    ]
    if rule := _threshold_rules(rows):
        parts.append(f"<p class='legend'>{esc(rule)}</p>")
    errors = [r for r in rows if r.get("error")]
    if errors:
        parts.append("<h3>Failures</h3><ul>" + "".join(
            f"<li class='error'>{esc(row_label(r, several))}: "
            f"{esc(str(r['error']))}</li>" for r in errors) + "</ul>")
    parts.append("</section>")
    quality_cost = out / FIGURES / QUALITY_COST
    if quality_cost.is_file():
        parts.append("<section id='quality-cost'><h2>Quality against cost</h2>"
                     f"<img class='figure' src='{_src(quality_cost, out)}' "
                     "alt='pixel AUROC against fit time and inference time'>"
                     "<p class='legend'>Up and to the left is better: summary values (means over "
                     "categories and seeds); log time axes.</p></section>")
    scale_png = out / FIGURES / COLOUR_SCALE
    for category in categories:
        anchor = "-".join(category.split())  # an id has no spaces
        parts.append(f"<section class='category' id='category-{esc(anchor)}'>"
                     f"<h2>{esc(category)}</h2>")
        if len(categories) > 1:
            parts.append(_html_summary(rows, category, "category"))
        names, examples = _category_examples(rows, out, category)
        grid = grids.get(category)
        parts.append("<div class='figures'>")
        if grid:
            scale = (f"<img class='scale' src='{_src(scale_png, out)}' alt='colour scale'> "
                     if scale_png.is_file() else "")
            parts.append(
                "<div class='examples'><h3>Examples</h3><p class='legend'>The same test images "
                "for every detector (defects, then good). Each map on one colour scale anchored at that "
                f"detector's calibrated pixel threshold: {scale}blue = 0, green-yellow = the "
                "threshold, red = twice it; a calm good image stays blue. The score's verdict "
                "uses the calibrated image threshold.</p>"
                + _html_examples(grid, names, examples, out, category) + "</div>")
        roc = roc_figure_path(out, category)
        if roc.is_file():
            parts.append(f"<div><h3>ROC curves</h3><img class='figure' src='{_src(roc, out)}' "
                         f"alt='ROC curves, {esc(category)}' style='width:420px'></div>")
        parts.append("</div>")
        for detector in dict.fromkeys(r["detector"] for r in rows if r["category"] == category):
            shown = _first_successful(rows, detector, category)
            training = (sorted((run_dir_of(out, shown) / TRAINING).glob("*.png"))
                        if shown is not None else [])
            if training:
                parts.append(f"<h4>{esc(detector)}: training data it synthesised</h4>"
                             "<div class='figures'>" + "".join(
                                 f"<img class='figure' src='{_src(f, out)}' "
                                 f"alt='{esc(detector)} training example' style='width:420px'>"
                                 for f in training) + "</div>")
        parts.append("</section>")
    noted = [r for r in rows if r.get("notes")]
    if noted:
        parts.append("<section id='notes'><h2>Notes</h2><ul>" + "".join(
            f"<li>{esc(row_label(r, several))}: {esc(str(r['notes']))}</li>"
            for r in noted) + "</ul></section>")
    configs = sorted({str(r.get("config", "")) for r in rows if r.get("config")})
    parts += [
        "<section id='how'><h2>How this was run</h2><ul>",
        f"<li>command: <code>{esc(info.get('command', ''))}</code></li>",
        f"<li>date: {esc(info.get('date', ''))}</li>",
        f"<li>machine: {esc(info.get('machine', ''))}</li>",
        f"<li>versions: {esc(info.get('versions', ''))}</li>",
        f"<li>device: {esc(info.get('device', ''))}; CPU threads: "
        f"{esc(info.get('torch_threads', '?'))}</li>",
        f"<li>config: {esc(', '.join(configs) or '-')}; seed: "
        f"{esc(', '.join(str(s) for s in seeds if s is not None) or '-')}</li>",
        *([f"<li>executor: {esc(info['executor'])}</li>"] if info.get("executor") else []),
        *([f"<li>resumed: {esc(info['resumed'])}</li>"] if info.get("resumed") else []),
        "<li>F1 at threshold, false alarms and misses use the threshold calibrated on held-out "
        "good training images; F1-max picks its threshold on the test set (an upper bound)</li>",
        "</ul></section>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str],
                 info: dict[str, str], *, categories: Sequence[str] | None = None
                 ) -> dict[str, Path]:
    """Write results.csv, results.md, the figures and report.html into ``out_dir``.

    ROC curves are drawn from each row's ``<run dir>/predictions.npz`` and the example
    grids from its ``examples.npz`` (saved by the job; with several seeds, the first seed
    that succeeded), so the report can be rebuilt from a benchmark folder alone.
    ``categories``: redraw only these categories' ROC curves and example tiles (default:
    all); the others' tiles are reused from an earlier call.
    """
    out = Path(out_dir)
    paths = {"csv": write_csv(rows, out / "results.csv")}
    several = len(seeds_of(rows)) > 1
    grids: dict[str, list[dict[str, Any]]] = {}
    for category in dict.fromkeys(r["category"] for r in rows):
        redraw = categories is None or category in categories
        names, examples = _category_examples(rows, out, category)
        if examples:
            # Another category's tiles are already drawn: their names are enough.
            grids[category] = example_tiles(examples, examples_dir(out, category),
                                            draw=redraw or not examples_dir(out, category).is_dir())
        if not redraw:
            continue
        curves = {}
        for detector in dict.fromkeys(r["detector"] for r in rows if r["category"] == category):
            shown = _first_successful(rows, detector, category)
            file = run_dir_of(out, shown) / PREDICTIONS if shown is not None else None
            if file is not None and file.is_file():
                data = load_predictions(file)
                if len(np.unique(data["labels"])) == 2:
                    name = f"{detector} (seed {shown.get('seed')})" if several else detector
                    curves[name] = (data["labels"], data["scores"])
        if curves:
            plot_roc(curves, roc_figure_path(out, category), f"ROC: {category}")
    if grids and not (out / FIGURES / COLOUR_SCALE).is_file():
        colour_scale_png(out / FIGURES / COLOUR_SCALE)
    quality_cost = out / FIGURES / QUALITY_COST
    if plot_quality_cost(rows, quality_cost) is None:
        quality_cost.unlink(missing_ok=True)  # a stale picture must not outlive its rows
    paths["markdown"] = atomic_write_text(out / "results.md", markdown_report(rows, info, out))
    paths["html"] = atomic_write_text(out / "report.html", html_report(rows, info, out, grids))
    return paths
