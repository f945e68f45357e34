"""Benchmark reports: ``results.csv``, ``results.md`` and ``report.html`` with figures.

Layout of a benchmark folder::

    results.csv                      one row per job (detector, category, seed), rewritten
                                     after each
    results.md                       header (command, date, machine, versions) + one table per
                                     metric: detectors as rows, categories as columns, mean;
                                     with several seeds one line per seed + mean ± std
    report.html                      the same tables, ROC curves and example heat maps
    figures/<category>/roc.png       ROC curves of every detector on that category
    runs/<detector>/<category>/      a job's run folder (one seed), or .../seed<k>/ (several):
        model.ckpt, model.onnx, predictions.npz, row.json (the job's row), error.txt (failed)
        examples.png                 image | ground truth | heat-map overlay
        training/*.png               what the detector trained on, for detectors that make
                                     their own training data (DRAEM's synthetic anomalies)

Figures use matplotlib's object API (``Figure`` + Agg canvas) rather than pyplot, so no
global backend is switched and nothing needs a display.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalykit.training.checkpoint import atomic_write, atomic_write_text

#: Columns of results.csv, in order.
COLUMNS = (
    "detector", "category", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "f1_max",
    "f1_at_threshold", "fpr_good", "train_s", "torch_ms", "onnx_ms", "n_train", "n_test",
    "config", "seed", "error", "notes",
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
    "train_s": "Training time, seconds",
    "torch_ms": "PyTorch inference, ms/image (batch 1, median)",
    "onnx_ms": "onnxruntime inference, ms/image (batch 1, median)",
}
FIGURES = "figures"
PREDICTIONS = "predictions.npz"
EXAMPLES = "examples.png"
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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in COLUMNS})
    return atomic_write_text(path, buffer.getvalue())


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


def markdown_tables(rows: Sequence[dict[str, Any]]) -> str:
    """The per-metric tables (and the list of failures) as Markdown, without the header."""
    parts = []
    for metric, title in TABLE_METRICS.items():
        header, body = metric_table(rows, metric)
        parts.append(f"### {metric}: {title}\n\n{_markdown_grid(header, body)}\n")
    several = len(seeds_of(rows)) > 1
    errors = [r for r in rows if r.get("error")]
    if errors:
        parts.append("### Failures\n\n" + "\n".join(
            f"- {row_label(r, several)}: {r['error']}" for r in errors) + "\n")
    noted = [r for r in rows if r.get("notes")]
    if noted:
        parts.append("### Notes\n\n" + "\n".join(
            f"- {row_label(r, several)}: {r['notes']}" for r in noted) + "\n")
    return "\n".join(parts)


def markdown_report(rows: Sequence[dict[str, Any]], info: dict[str, str]) -> str:
    """The whole results.md: environment header, then the tables."""
    configs = sorted({str(r.get("config", "")) for r in rows if r.get("config")})
    seeds = [str(s) for s in seeds_of(rows) if s is not None]
    header = [
        "# anomalykit benchmark",
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
        "- threshold metrics use the threshold calibrated on held-out good training images; "
        "f1_max picks its threshold on the test set (an upper bound)",
        "",
    ]
    return "\n".join(header) + "\n" + markdown_tables(rows)


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


def _html_table(header: list[str], body: list[list[str]]) -> str:
    """A :func:`metric_table` grid as HTML, detector names as row headers."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for row in body:
        cells = [f"<th>{html.escape(row[0])}</th>"]
        cells += [f"<td>{html.escape(c)}</td>" for c in row[1:]]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
thead th { background: #f2f2f2; } tbody th { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
code { background: #f5f5f5; padding: 0.1em 0.3em; }
.error { color: #b00; }
"""


def html_report(rows: Sequence[dict[str, Any]], info: dict[str, str],
                out_dir: str | os.PathLike[str]) -> str:
    """report.html's text: header, metric tables, then per category its ROC and heat maps.

    Images are referenced relative to ``out_dir`` (only those that exist), so the folder
    can be moved or zipped as a whole.
    """
    out = Path(out_dir)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<title>anomalykit benchmark</title>", f"<style>{_STYLE}</style></head><body>",
        "<h1>anomalykit benchmark</h1><ul>",
        f"<li>command: <code>{esc(info.get('command', ''))}</code></li>",
        f"<li>date: {esc(info.get('date', ''))}</li>",
        f"<li>machine: {esc(info.get('machine', ''))}</li>",
        f"<li>versions: {esc(info.get('versions', ''))}</li>",
        f"<li>device: {esc(info.get('device', ''))}; CPU threads: "
        f"{esc(info.get('torch_threads', '?'))}</li>",
        *([f"<li>executor: {esc(info['executor'])}</li>"] if info.get("executor") else []),
        *([f"<li>resumed: {esc(info['resumed'])}</li>"] if info.get("resumed") else []),
        "</ul>",
        "<h2>Results</h2>",
    ]
    for metric, title in TABLE_METRICS.items():
        header, body = metric_table(rows, metric)
        parts.append(f"<h3>{esc(title)}</h3>{_html_table(header, body)}")
    several = len(seeds_of(rows)) > 1
    errors = [r for r in rows if r.get("error")]
    if errors:
        parts.append("<h3>Failures</h3><ul>" + "".join(
            f"<li class='error'>{esc(row_label(r, several))}: "
            f"{esc(str(r['error']))}</li>" for r in errors) + "</ul>")
    noted = [r for r in rows if r.get("notes")]
    if noted:
        parts.append("<h3>Notes</h3><ul>" + "".join(
            f"<li>{esc(row_label(r, several))}: {esc(str(r['notes']))}</li>"
            for r in noted) + "</ul>")
    for category in dict.fromkeys(r["category"] for r in rows):
        parts.append(f"<h2>{esc(category)}</h2><div class='figures'>")
        roc = roc_figure_path(out, category)
        if roc.is_file():
            parts.append(f"<img src='{esc(roc.relative_to(out).as_posix())}' "
                         f"alt='ROC curves, {esc(category)}' style='width:420px'>")
        parts.append("</div>")
        for detector in dict.fromkeys(r["detector"] for r in rows if r["category"] == category):
            shown = _first_successful(rows, detector, category)
            if shown is None:
                continue
            run_dir = run_dir_of(out, shown)
            example = run_dir / EXAMPLES
            if example.is_file():
                seed_note = f" (seed {shown.get('seed')})" if several else ""
                parts.append(f"<h3>{esc(detector)}{esc(seed_note)}</h3><img src='"
                             f"{esc(example.relative_to(out).as_posix())}' "
                             f"alt='{esc(detector)} heat maps, {esc(category)}'>")
            training = sorted((run_dir / TRAINING).glob("*.png"))
            if training:
                parts.append(f"<h4>{esc(detector)}: training data it synthesised</h4>"
                             "<div class='figures'>" + "".join(
                                 f"<img src='{esc(f.relative_to(out).as_posix())}' "
                                 f"alt='{esc(detector)} training example' style='width:420px'>"
                                 for f in training) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str],
                 info: dict[str, str], *, categories: Sequence[str] | None = None
                 ) -> dict[str, Path]:
    """Write results.csv, results.md, the ROC figures and report.html into ``out_dir``.

    ROC curves are drawn from each row's ``<run dir>/predictions.npz`` (saved by the job;
    with several seeds, the first seed that succeeded), so the report can be rebuilt from a
    benchmark folder alone. Example heat maps are drawn by the job while the maps are in
    memory. ``categories``: redraw only these categories' ROC figures (default: all).
    """
    out = Path(out_dir)
    paths = {"csv": write_csv(rows, out / "results.csv")}
    paths["markdown"] = atomic_write_text(out / "results.md", markdown_report(rows, info))
    several = len(seeds_of(rows)) > 1
    for category in dict.fromkeys(r["category"] for r in rows):
        if categories is not None and category not in categories:
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
    paths["html"] = atomic_write_text(out / "report.html", html_report(rows, info, out))
    return paths
