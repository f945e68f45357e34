"""The ``anomalykit`` command line.

::

    anomalykit list [--generative]
    anomalykit data synth --out data/synthetic
    anomalykit train ae --root data/mvtec --category bottle --out runs/bottle
    anomalykit test runs/bottle/model.ckpt --out runs/bottle/test
    anomalykit export runs/bottle/model.ckpt --out bottle.onnx
    anomalykit predict bottle.onnx frames/ --out predictions/
    anomalykit benchmark --detectors ae,ae_ssim --out runs/benchmark

Every expected failure (bad data, unknown name, bad option; :class:`~anomalykit.errors.
AnomalyKitError`) prints one red ``error: <message>`` line on stderr and exits with status 2,
without a traceback. Heavy imports (torch) happen inside the commands, so ``--help`` and
``list`` stay fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from anomalykit.errors import AnomalyKitError, ConfigError, DataError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_DETECTORS = "ae,ae_ssim"

# file=None: rich resolves sys.stdout/sys.stderr at each write, so test runners that swap
# the streams capture the output.
out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# The raw arguments when started through main(), for the benchmark report's header.
_argv: list[str] | None = None

app = typer.Typer(
    name="anomalykit",
    help="Visual anomaly detection trained on good images only: train, test, export, predict, "
         "benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Datasets: generate the synthetic MVTec-layout dataset.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


# -- helpers ---------------------------------------------------------------------------------


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print ``error: <message>`` in red on stderr and return the Exit to raise."""
    lines = message.strip().splitlines() or ["unknown error"]
    err_console.print(f"[bold red]error:[/bold red] [red]{escape(lines[0])}[/red]")
    for line in lines[1:]:  # e.g. the exporter's last words; detail, not the message
        err_console.print(f"  [dim]{escape(line)}[/dim]")
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn the toolkit's expected errors into one-line messages and exit status 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AnomalyKitError, FileNotFoundError) as exc:
            raise fail(str(exc) or type(exc).__name__) from None
        except KeyboardInterrupt:
            raise fail("interrupted", EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def warn(message: str) -> None:
    """A yellow ``warning:`` line on stderr (the run goes on)."""
    err_console.print(f"[yellow]warning:[/yellow] {escape(message)}")


def split_list(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def check_device(device: str | None) -> None:
    """Fail on a bad or unavailable device before any data is read."""
    if device is not None:
        from anomalykit.training import resolve_device

        resolve_device(device)


def fmt(value: Any) -> str:
    """A metric for a table cell: 4 significant digits, ``n/a`` for NaN."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def json_ready(value: Any) -> Any:
    """NaN -> null: JSON has no NaN, and ``json.dumps`` would write invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


# Options shared by several commands.
DeviceOption = Annotated[
    str, typer.Option("--device", help="Where to run: auto (CUDA when available), cpu, cuda, "
                                       "cuda:N.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a config value, e.g. --set epochs=5 --set model.lr=1e-3 "
                      "(repeatable; values are YAML).")]
ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Profile name (quick, paper) or a YAML file.")]


# -- list / data -----------------------------------------------------------------------------


@app.command("list")
@handle_errors
def list_command(
    generative: Annotated[bool, typer.Option("--generative",
                                             help="List generative models instead of "
                                                  "detectors.")] = False,
) -> None:
    """List the registered detectors (or generative models), one per line."""
    from anomalykit.registry import get_class, list_detectors, list_generative

    kind = "generative" if generative else "detector"
    names = list_generative() if generative else list_detectors()
    width = max((len(n) for n in names), default=0)
    for name in names:
        doc = (get_class(name, kind).__doc__ or "").strip()
        summary = doc.splitlines()[0].strip() if doc else ""
        typer.echo(f"{name.ljust(width)}  {summary}".rstrip())


@data_app.command("synth")
@handle_errors
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the dataset to "
                                                          "(MVTec AD layout).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same "
                                           "images.")] = 0,
    categories: Annotated[str | None, typer.Option(
        help="Comma-separated categories to generate (default: all synthetic "
             "categories).")] = None,
    image_size: Annotated[int, typer.Option("--image-size", help="Side of the generated "
                                                                 "images in pixels.")] = 128,
) -> None:
    """Generate the synthetic MVTec-layout dataset (textures and objects with defects + masks)."""
    from anomalykit.data import SYNTHETIC_CATEGORIES, generate_synthetic

    chosen = split_list(categories) or None  # generate_synthetic rejects unknown names
    with err_console.status("generating synthetic images..."):
        root = generate_synthetic(out, categories=chosen, seed=seed, image_size=image_size)
    root = Path(root) if root is not None else out
    out_console.print(f"wrote synthetic dataset to {escape(str(root))} "
                      f"({', '.join(chosen or SYNTHETIC_CATEGORIES)})")


# -- train / test ----------------------------------------------------------------------------


@app.command()
@handle_errors
def train(
    detector: Annotated[str, typer.Argument(help="Detector name (see `anomalykit list`).")],
    root: Annotated[Path, typer.Option(help="Dataset root in MVTec AD layout.")],
    category: Annotated[str, typer.Option(help="Category folder under the root.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: receives model.ckpt "
                                                          "(and last.ckpt for --resume).")],
    config: ConfigOption = "quick",
    overrides: SetOption = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda or cuda:N (default: the config's train.device, else "
             "auto).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of the train/val split, the weights and the data order (default: the "
             "config's train.seed, else 0).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run "
                                              "from OUT/last.ckpt.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Train a detector on the good images of one category, calibrate it, save OUT/model.ckpt."""
    from anomalykit.pipeline import train_detector

    check_device(device)
    result = train_detector(detector, root=root, category=category, config=config,
                            overrides=overrides or [], out_dir=out, device=device, seed=seed,
                            progress=not quiet, resume=resume)
    for note in result.warnings:
        warn(note)
    meta = result.meta
    out_console.print(f"saved model to {escape(str(result.checkpoint))}")
    out_console.print(
        f"  {meta['history']['epochs_run']} epoch(s) in {meta['train_seconds']:.1f} s on "
        f"{meta['device']}; {meta['n_train']} train / {meta['n_val']} val images; threshold "
        f"{meta['threshold']:.4g} calibrated on {meta['calibrated_on']} images")


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    """Two-column rich table, one metric per row."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, fmt(value))
    return table


@app.command()
@handle_errors
def test(
    checkpoint: Annotated[Path, typer.Argument(help="model.ckpt written by `anomalykit "
                                                    "train`.")],
    root: Annotated[Path | None, typer.Option(
        help="Dataset root in MVTec AD layout (default: the one the model was trained "
             "on).")] = None,
    category: Annotated[str | None, typer.Option(
        help="Category to test on (default: the one the model was trained on).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for metrics.json, ROC curve and example heat maps "
                            "(default: metrics.json next to the checkpoint, no "
                            "pictures).")] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Inference batch size.")] = 16,
    quiet: QuietOption = False,
) -> None:
    """Evaluate a checkpoint on a test split: print the metrics, write metrics.json."""
    from anomalykit.pipeline import evaluate_detector
    from anomalykit.training import load_model

    check_device(device)
    model = load_model(checkpoint, map_location="cpu")
    meta = getattr(model, "checkpoint_meta", {}) or {}
    root = root if root is not None else (Path(meta["root"]) if meta.get("root") else None)
    category = category or meta.get("category")
    if root is None or not category:
        raise ConfigError(f"{checkpoint} does not record its dataset; pass --root and "
                          "--category")
    result = evaluate_detector(model, (str(root), category), device=device,
                               batch_size=batch_size, progress=not quiet)
    metrics = result.metrics
    out_dir = out if out is not None else checkpoint.parent
    payload = {"checkpoint": str(checkpoint), "detector": model.registry_name,
               "root": str(root), "category": category, "metrics": metrics}
    from anomalykit.training.checkpoint import atomic_write_text

    metrics_path = atomic_write_text(out_dir / "metrics.json",
                                     json.dumps(json_ready(payload), indent=2) + "\n")
    out_console.print(metrics_table(metrics, f"{model.registry_name} on {category}"))
    out_console.print(f"wrote {escape(str(metrics_path))}")
    if out is not None:
        from anomalykit.benchmark import report

        predictions = result.predictions
        if len(set(predictions["labels"].tolist())) == 2:
            roc = report.plot_roc({model.registry_name: (predictions["labels"],
                                                         predictions["scores"])},
                                  out / "roc.png", f"ROC: {category}")
            out_console.print(f"wrote {escape(str(roc))}")
        examples = report.plot_examples(predictions, out / "examples.png",
                                        f"{model.registry_name} on {category}",
                                        threshold=metrics.get("threshold"))
        out_console.print(f"wrote {escape(str(examples))}")


# -- export / predict ------------------------------------------------------------------------


@app.command()
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="model.ckpt written by `anomalykit "
                                                    "train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write, e.g. "
                                                          "model.onnx.")],
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
) -> None:
    """Export a checkpoint to ONE self-contained ONNX file (uint8 frames in, map + label out).

    Prints the largest difference between onnxruntime and PyTorch on random frames.
    """
    import numpy as np

    from anomalykit.export import compare_with_torch, export_onnx
    from anomalykit.training import load_model

    model = load_model(checkpoint, map_location="cpu")
    with err_console.status(f"exporting {model.registry_name} to ONNX..."):
        path = export_onnx(model, out, opset=opset)
    size = int(model.image_size)
    rng = np.random.default_rng(0)
    table = Table(title="parity: max |onnxruntime - PyTorch| on random frames",
                  title_justify="left")
    table.add_column("frames")
    for name in ("score", "normalized_score", "label", "anomaly_map", "pred_mask"):
        table.add_column(name, justify="right")
    # The native size and a larger non-square one: the graph resizes inside.
    for shape in [(2, size, size, 3), (1, size + size // 2, size * 2, 3)]:
        frames = rng.integers(0, 256, size=shape, dtype=np.uint8)
        diffs = compare_with_torch(model, path, frames)
        table.add_row(f"{shape[0]}x{shape[1]}x{shape[2]}",
                      *(f"{diffs[k]:.2e}" for k in ("score", "normalized_score", "label",
                                                    "anomaly_map", "pred_mask")))
    out_console.print(f"wrote {escape(str(path))} ({path.stat().st_size / 1e6:.2f} MB)")
    out_console.print(table)


def collect_images(source: Path, exclude: Path | None = None) -> list[Path]:
    """An image file, or every image under a folder (recursively, natural order).

    Files under ``exclude`` (the output folder, when it lies inside the input) are skipped,
    so a second run does not score the first run's overlays.
    """
    from anomalykit.data import IMAGE_EXTENSIONS
    from anomalykit.data.records import natural_key

    if not source.exists():
        raise DataError(f"input {source} does not exist")
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"input {source} is not an image file (expected one of "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        return [source]
    skip = exclude.resolve() if exclude is not None else None
    files = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(source).parts)
             and not (skip is not None and p.resolve().is_relative_to(skip))]
    if not files:
        raise DataError(f"no images in {source} (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return sorted(files, key=lambda p: tuple(natural_key(part)
                                             for part in p.relative_to(source).parts))


def overlay_names(files: list[Path], source: Path) -> list[str]:
    """``<stem>.png`` per file; files whose stems collide get their folders as a prefix."""
    stems = [f.stem for f in files]
    names = []
    for file, stem in zip(files, stems, strict=True):
        if stems.count(stem) > 1 and source.is_dir():
            parts = file.relative_to(source).with_suffix("").parts
            stem = "_".join(parts)
        names.append(f"{stem}.png")
    return names


def write_png(path: Path, image_rgb: Any) -> Path:
    """Encode an RGB image as PNG and write it atomically (non-ASCII paths work too)."""
    import cv2

    from anomalykit.training.checkpoint import atomic_write

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"cannot encode {path.name} as PNG")
    return atomic_write(path, encoded.tofile)


@app.command()
@handle_errors
def predict(
    model: Annotated[Path, typer.Argument(help="model.ckpt or model.onnx.")],
    input: Annotated[Path, typer.Argument(help="An image file or a folder of images "
                                               "(searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for predictions.csv and "
                                                          "overlays/.")],
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Score images with a checkpoint or an ONNX model; write predictions.csv and heat maps.

    predictions.csv has path, score, normalized_score (0.5 = threshold) and label
    (1 = anomalous); overlays/<stem>.png shows the anomaly map over each image, on one
    colour scale for all images (blue 0, red twice the calibrated pixel threshold).
    """
    import csv
    import io

    from anomalykit.data import read_image
    from anomalykit.export.runtime import overlay_heatmap
    from anomalykit.pipeline import load_predictor
    from anomalykit.training.checkpoint import atomic_write_text
    from anomalykit.training.progress import track

    check_device(device)
    files = collect_images(input, exclude=out)
    predictor = load_predictor(model, device=device)
    pixel_threshold = float(getattr(predictor, "pixel_threshold", 0.0) or 0.0)
    scale = {"vmin": 0.0, "vmax": 2.0 * pixel_threshold} if pixel_threshold > 0 else {}
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "normalized_score", "label"])
    n_anomalous = 0
    for file, name in track(list(zip(files, overlay_names(files, input), strict=True)),
                            "predict", enabled=not quiet):
        image = read_image(file)
        result = predictor.predict(image[None])
        label = int(result["label"][0])
        n_anomalous += label
        writer.writerow([str(file), f"{float(result['score'][0]):.6g}",
                         f"{float(result['normalized_score'][0]):.6g}", label])
        overlay = overlay_heatmap(image, result["anomaly_map"][0, 0], **scale)
        write_png(overlays / name, overlay)
    csv_path = atomic_write_text(out / "predictions.csv", buffer.getvalue())
    out_console.print(f"{len(files)} image(s), {n_anomalous} anomalous; wrote "
                      f"{escape(str(csv_path))} and {escape(str(overlays))}/")


# -- benchmark -------------------------------------------------------------------------------


def _command_line(params: dict[str, Any]) -> str:
    """The command as typed when run as a program, else rebuilt from the parsed options."""
    if _argv is not None:
        return shlex.join(["anomalykit", *_argv])
    words = ["anomalykit", "benchmark"]
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value or key == "onnx":  # --onnx/--no-onnx is the only two-sided flag
                words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            for item in value:
                words += [flag if key != "overrides" else "--set", str(item)]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


@app.command()
@handle_errors
def benchmark(
    ctx: typer.Context,
    detectors: Annotated[str, typer.Option(
        help="Comma-separated detector names, or 'all' for every registered "
             "one.")] = DEFAULT_DETECTORS,
    root: Annotated[Path | None, typer.Option(
        help="Dataset root in MVTec AD layout (default: the synthetic dataset in "
             "./data/synthetic, generated on first use).")] = None,
    categories: Annotated[str | None, typer.Option(
        help="Comma-separated categories (default: all in the root).")] = None,
    config: ConfigOption = "quick",
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Benchmark folder: results.csv, "
                                                          "results.md, report.html, "
                                                          "runs/.")] = Path("runs/benchmark"),
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 0,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Export each model to ONNX "
                                                                "and time onnxruntime.")] = True,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch and onnxruntime alike (default: torch's "
             "default).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Train, test, export and time every detector on every category; write the reports.

    A failing pair is recorded as an error row and the benchmark goes on; the exit status is
    1 when any pair failed.
    """
    from rich.markdown import Markdown

    from anomalykit.benchmark import markdown_tables, run_benchmark
    from anomalykit.data import ensure_synthetic, list_mvtec_categories
    from anomalykit.registry import list_detectors

    check_device(device)
    names = list_detectors() if detectors.strip() == "all" else split_list(detectors)
    if root is None:
        with err_console.status("preparing the synthetic dataset..."):
            root = Path(ensure_synthetic())
        err_console.print(f"using the synthetic dataset in {escape(str(root))}")
    chosen = split_list(categories) or list_mvtec_categories(root)
    command = _command_line(dict(ctx.params))
    rows = run_benchmark(names, root, chosen, config=config, overrides=overrides or [],
                         out_dir=out, device=device, seed=seed, onnx=onnx, progress=not quiet,
                         threads=threads, command=command)
    out_console.print(Markdown(markdown_tables(rows)))
    out_console.print(f"wrote {escape(str(out / 'results.csv'))}, results.md and report.html "
                      f"in {escape(str(out))}")
    failed = [r for r in rows if r.get("error")]
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(rows)} run(s) failed[/red] (see the "
                          "error column of results.csv)")
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``anomalykit = "anomalykit.cli:main"``)."""
    global _argv
    _argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never go online at run time
    app(args=_argv, prog_name="anomalykit")


if __name__ == "__main__":  # python -m anomalykit.cli (python -m anomalykit also works)
    main()
