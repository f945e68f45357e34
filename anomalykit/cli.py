"""The ``anomalykit`` command line.

::

    anomalykit list [--generative]
    anomalykit data synth --out data/synthetic
    anomalykit data train-renderer pix2pix --out defects.ckpt
    anomalykit data augment defects.ckpt --good my/good --out data/augmented/mine
    anomalykit train ae --root data/mvtec --category bottle --out runs/bottle
    anomalykit train ae --good-dir my/good --defect-dir my/bad --out runs/mine
    anomalykit test runs/bottle/model.ckpt --out runs/bottle/test
    anomalykit export runs/bottle/model.ckpt --out bottle.onnx
    anomalykit predict bottle.onnx frames/ --out predictions/
    anomalykit benchmark --detectors ae,ae_ssim --out runs/benchmark
    anomalykit serve bottle.onnx --port 8080
    anomalykit watch bottle.onnx /data/line3/inbox

Every expected failure (bad data, unknown name, bad option; :class:`~anomalykit.errors.
AnomalyKitError`) prints one red ``error: <message>`` line on stderr and exits with status 2,
without a traceback. Heavy imports (torch) happen inside the commands, so ``--help`` and
``list`` stay fast. Each command parses its options, calls one function of
:mod:`anomalykit.pipeline`, :mod:`anomalykit.predict` or :mod:`anomalykit.benchmark`, and
prints what it returned.
"""

from __future__ import annotations

import functools
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

from anomalykit.errors import AnomalyKitError, ConfigError

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
data_app = typer.Typer(help="Datasets: generate the synthetic MVTec-layout dataset; make defective "
                            "images and texture variations with the suite's GANs.",
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
TrackOption = Annotated[
    str | None, typer.Option(
        "--track", metavar="BACKEND[:WHERE]",
        help="Log the run (config, losses per epoch, thresholds, test metrics, figures): "
             "mlflow[:DIR_OR_URI] (a local file store, default runs/mlruns) or tensorboard[:DIR] "
             "(event files, default runs/tensorboard); needs pip install 'anomalykit[tracking]'. "
             "Default: the config's tracking section, else off.")]
ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Profile name (quick, paper) or a YAML file.")]

# Options of the INT8 quantisation, shared by `export --quantize int8` and `quantize`.
CalibrationOption = Annotated[Path | None, typer.Option(
    help="Folder of GOOD images (never the test set) that calibrate the INT8 ranges; up to 64, "
         "evenly spaced.")]
CheckOption = Annotated[Path | None, typer.Option(
    help="MVTec-layout category folder (test/, ground_truth/): measure image and pixel AUROC of "
         "FP32 and INT8 and refuse INT8 when either drops by more than --max-auroc-drop.")]
MaxDropOption = Annotated[float, typer.Option(
    help="Largest AUROC drop INT8 may cost (measured with --check).")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Write the INT8 model even when it loses more AUROC than allowed (recorded in its "
         "metadata).")]


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


def _key_values(items: list[str] | None, option: str) -> dict[str, Any]:
    """``["steps_per_scale=200", "width=16"]`` -> {"steps_per_scale": 200, "width": 16} (YAML
    values)."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} takes KEY=VALUE; got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


@data_app.command("train-renderer")
@handle_errors
def data_train_renderer(
    renderer: Annotated[str, typer.Argument(help="pix2pix (defects where a mask says) or stargan "
                                                 "(one domain per defect type).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.")],
    categories: Annotated[str | None, typer.Option(
        help="Synthetic categories to learn from (pix2pix: default all six; stargan: exactly "
             "one, default brick).")] = None,
    image_size: Annotated[int, typer.Option("--image-size")] = 64,
    n_train: Annotated[int, typer.Option("--n-train", help="Training images (pix2pix: "
                                                           "triples).")] = 1024,
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    seed: Annotated[int, typer.Option()] = 0,
    model_set: Annotated[list[str] | None, typer.Option(
        "--model-set", metavar="KEY=VALUE", help="A model option, e.g. --model-set width=32 "
                                                 "(repeatable).")] = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Train a defect renderer (pix2pix or StarGAN) on the synthetic dataset, for `data augment`."""
    from anomalykit.data.augment import train_renderer

    check_device(device)
    path = train_renderer(renderer, out, categories=split_list(categories) or None,
                          image_size=image_size, n_train=n_train, epochs=epochs,
                          batch_size=batch_size, seed=seed,
                          model_options=_key_values(model_set, "--model-set"), device=device,
                          progress=not quiet)
    out_console.print(f"saved {renderer} to {escape(str(path))}")


@data_app.command("augment")
@handle_errors
def data_augment(
    model: Annotated[str, typer.Argument(help="A pix2pix or StarGAN checkpoint (see `data "
                                              "train-renderer`), or 'singan' (trains one SinGAN "
                                              "per good image).")],
    good: Annotated[Path, typer.Option("--good", help="A good image or a folder of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Category folder to write (MVTec AD "
                                                          "layout); must be new or empty.")],
    per_image: Annotated[int, typer.Option("--per-image", help="Renderings per good image "
                                                               "(StarGAN: one per defect "
                                                               "type).")] = 4,
    masks: Annotated[str, typer.Option(
        help="pix2pix's masks: perlin (DRAEM's shapes), synthetic (the synthetic set's defect "
             "shapes), or a painted mask file (used for every image) / folder (matched by "
             "stem).")] = "perlin",
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Side the good images are resized to (default: the renderer's "
                             "training size; SinGAN 64).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    mask_threshold: Annotated[float, typer.Option(
        "--mask-threshold", help="StarGAN: a pixel is in the mask when its mean |RGB change| "
                                 "exceeds this (0-1).")] = 0.1,
    singan_set: Annotated[list[str] | None, typer.Option(
        "--singan-set", metavar="KEY=VALUE", help="A SinGAN option, e.g. --singan-set "
                                                  "steps_per_scale=300 (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty "
                                                                "--out.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Make defective images with masks (pix2pix, StarGAN) or texture variations (SinGAN) from
    good images, into a folder in the MVTec AD layout."""
    from anomalykit.data.augment import augment

    def report(done: int, total: int) -> None:
        if not quiet:
            err_console.print(f"  {done}/{total} good image(s) done")

    result = augment(model, good, out, per_image=per_image, masks=masks, image_size=image_size,
                     seed=seed, mask_threshold=mask_threshold,
                     singan_options=_key_values(singan_set, "--singan-set"), overwrite=overwrite,
                     progress=report)
    for folder, count in sorted(result.counts.items()):
        out_console.print(f"  {folder}: {count} image(s)")
    out_console.print(f"wrote {result.total} image(s) with {result.model} to "
                      f"{escape(str(result.out))} (manifest {escape(str(result.manifest))})")


# -- train / test ----------------------------------------------------------------------------


# The folder dataset, for train / test / benchmark (anomalykit.pipeline.FolderData).
GoodDirOption = Annotated[
    Path | None, typer.Option("--good-dir", help="Folder of good images (instead of --root/"
                                                 "--category).")]
DefectDirOption = Annotated[
    Path | None, typer.Option("--defect-dir", help="Folder of defective images (loose "
                                                   "images, or one subfolder per defect "
                                                   "type); test set only.")]
MaskDirOption = Annotated[
    Path | None, typer.Option("--mask-dir", help="Folder of the defects' binary masks, "
                                                 "matched by stem (<stem>_mask.png or "
                                                 "<stem>.png); optional.")]
TestFractionOption = Annotated[
    float | None, typer.Option("--test-fraction", help="Share of --good-dir held out as good "
                                                       "test images (default 0.2; 0 trains "
                                                       "on all of them).")]
# The dataset root's layout (anomalykit.data.formats); the names are checked there.
FormatOption = Annotated[
    str, typer.Option("--format", help="Layout of --root: mvtec, mpdd, visa, loco, mvtec2, "
                                       "btad, folder (--good-dir), or auto: detected from the "
                                       "folders, failing when ambiguous.")]
FOLDER_HELP = (
    "\n\nYour own images instead of the MVTec AD layout: --good-dir FOLDER (and, to test, "
    "--defect-dir FOLDER, optionally --mask-dir FOLDER). The good folder is split once, "
    "deterministically with the seed: --test-fraction of it (default 0.2) is held out as the "
    "good part of the test set, the rest is split into train and validation (the config's "
    "val_fraction; validation images calibrate the threshold). The checkpoint records the "
    "folders, so `anomalykit test` finds the same held-out images again.")


@app.command(help=(
    "Train a detector on the good images of one category, calibrate it, save OUT/model.ckpt."
    + FOLDER_HELP))
@handle_errors
def train(
    detector: Annotated[str, typer.Argument(help="Detector name (see `anomalykit list`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: receives model.ckpt "
                                                          "(and last.ckpt for --resume).")],
    root: Annotated[Path | None, typer.Option(help="Dataset root in MVTec AD layout.")] = None,
    category: Annotated[str | None, typer.Option(help="Category folder under the "
                                                      "root.")] = None,
    good_dir: GoodDirOption = None,
    defect_dir: DefectDirOption = None,
    mask_dir: MaskDirOption = None,
    test_fraction: TestFractionOption = None,
    format: FormatOption = "auto",
    config: ConfigOption = "quick",
    overrides: SetOption = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda or cuda:N (default: the config's train.device, else "
             "auto).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of the train/val split (and of --good-dir's held-out test images), the "
             "weights and the data order (default: the config's train.seed, else 0).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run "
                                              "from OUT/last.ckpt.")] = False,
    track: TrackOption = None,
    quiet: QuietOption = False,
) -> None:
    from anomalykit.pipeline import folder_data, train_detector
    from anomalykit.tracking import track_run, tracking_for

    check_device(device)
    folder = folder_data(good_dir, defect_dir, mask_dir, test_fraction)
    tracking = tracking_for(track, detector, config, overrides or [])
    with track_run(tracking, f"{detector}/{folder.name if folder else category}",
                   tags={"command": "train", "out": str(out)}) as run:
        result = train_detector(detector, root=root, category=category, folder=folder,
                                format=format, config=config, overrides=overrides or [],
                                out_dir=out, device=device, seed=seed, progress=not quiet,
                                resume=resume, run=run)
    from anomalykit.training import is_main_process

    if not is_main_process():
        return  # under torchrun: rank 0 reports (it alone wrote model.ckpt)
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


@app.command(help=(
    "Evaluate a checkpoint on a test split: print the metrics, write metrics.json.\n\n"
    "The test set defaults to the data the model was trained on. Folders: --good-dir (good "
    "test images) and --defect-dir (defective ones, --mask-dir for their masks); when "
    "--good-dir is the folder the model was trained on, only its held-out images are used."))
@handle_errors
def test(
    checkpoint: Annotated[Path, typer.Argument(help="model.ckpt written by `anomalykit "
                                                    "train`.")],
    root: Annotated[Path | None, typer.Option(
        help="Dataset root in MVTec AD layout (default: the one the model was trained "
             "on).")] = None,
    category: Annotated[str | None, typer.Option(
        help="Category to test on (default: the one the model was trained on).")] = None,
    good_dir: Annotated[Path | None, typer.Option(
        "--good-dir", help="Folder of good test images (default: the held-out part of the "
                           "training folder).")] = None,
    defect_dir: Annotated[Path | None, typer.Option(
        "--defect-dir", help="Folder of defective test images (default: the one given at "
                             "training).")] = None,
    mask_dir: MaskDirOption = None,
    format: Annotated[str, typer.Option(
        "--format", help="Layout of --root (default auto: the one recorded in the checkpoint "
                         "for its own root, else detected): mvtec, mpdd, visa, loco, mvtec2, "
                         "btad, folder.")] = "auto",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for metrics.json, ROC curve and example heat maps "
                            "(default: metrics.json next to the checkpoint, no "
                            "pictures).")] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Inference batch size.")] = 16,
    track: TrackOption = None,
    quiet: QuietOption = False,
) -> None:
    from anomalykit.pipeline import evaluate_checkpoint
    from anomalykit.tracking import resolve_tracking, track_run

    check_device(device)
    with track_run(resolve_tracking(track), f"test/{checkpoint.parent.name}",
                   tags={"command": "test", "checkpoint": str(checkpoint)}) as run:
        result = evaluate_checkpoint(checkpoint, root=root, category=category, good_dir=good_dir,
                                     defect_dir=defect_dir, mask_dir=mask_dir, format=format,
                                     out_dir=out, device=device, batch_size=batch_size,
                                     progress=not quiet, run=run)
    for note in result.notes:
        err_console.print(f"[dim]{escape(note)}[/dim]")
    out_console.print(metrics_table(result.metrics, f"{result.detector} on {result.dataset}"))
    for path in [result.metrics_path, *result.figures]:
        out_console.print(f"wrote {escape(str(path))}")


# -- export / predict ------------------------------------------------------------------------


@app.command()
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="model.ckpt written by `anomalykit "
                                                    "train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write, e.g. "
                                                          "model.onnx.")],
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
    quantize: Annotated[str | None, typer.Option(
        help="Also write an INT8 model beside --out (<stem>_int8.onnx): onnxruntime static "
             "quantisation calibrated on --calibration.")] = None,
    calibration: CalibrationOption = None,
    check: CheckOption = None,
    max_auroc_drop: MaxDropOption = 0.01,
    force: ForceOption = False,
) -> None:
    """Export a checkpoint to ONE self-contained ONNX file (uint8 frames in, map + label out).

    Prints the largest difference between onnxruntime and PyTorch on random frames. With
    --quantize int8 the FP32 file is written as always and the INT8 one beside it, unless
    --check shows it loses more AUROC than --max-auroc-drop (then it is refused, exit 2).
    """
    from anomalykit.errors import check_choice

    if quantize is not None:  # fail on a bad option before the export, not after it
        check_choice("--quantize", quantize, ("int8",))
        if calibration is None:
            raise ConfigError("--quantize int8 needs --calibration DIR (a folder of good images)")
    from anomalykit.pipeline import PARITY_OUTPUTS, export_with_parity

    with err_console.status(f"exporting {escape(str(checkpoint))} to ONNX..."):
        result = export_with_parity(checkpoint, out, opset=opset)
    table = Table(title="parity: max |onnxruntime - PyTorch| on random frames",
                  title_justify="left")
    table.add_column("frames")
    for name in PARITY_OUTPUTS:
        table.add_column(name, justify="right")
    for frames, diffs in result.parity:
        table.add_row(frames, *(f"{diffs[k]:.2e}" for k in PARITY_OUTPUTS))
    out_console.print(f"wrote {escape(str(result.path))} "
                      f"({result.path.stat().st_size / 1e6:.2f} MB)")
    out_console.print(table)
    if quantize is not None:
        int8_path = result.path.with_name(f"{result.path.stem}_int8{result.path.suffix}")
        _quantize(result.path, int8_path, calibration, check=check,
                  max_auroc_drop=max_auroc_drop, force=force, threads=1)


def _quantize(model: Path, out: Path, calibration: Path | None, **options: Any) -> None:
    """quantize_onnx, its notes printed as warnings (the same notes come back in the result)."""
    import warnings

    from anomalykit.export.quantize import quantize_onnx, summary_lines

    if calibration is None:
        raise ConfigError("--calibration DIR (a folder of good images) is required")
    with err_console.status(f"quantising {escape(str(model))} to INT8..."), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize_onnx(model, out, calibration, **options)
    for line in summary_lines(result):
        if line.startswith("warning: "):
            warn(line[len("warning: "):])
        else:
            out_console.print(escape(line))


@app.command()
@handle_errors
def quantize(
    model: Annotated[Path, typer.Argument(help="FP32 .onnx written by `anomalykit export`.")],
    out: Annotated[Path, typer.Argument(help="INT8 .onnx to write.")],
    calibration: CalibrationOption = None,
    check: CheckOption = None,
    max_auroc_drop: MaxDropOption = 0.01,
    force: ForceOption = False,
    threads: Annotated[int, typer.Option(help="onnxruntime threads for the FP32 / INT8 "
                                              "comparison and timing.")] = 1,
) -> None:
    """Quantise an exported model to INT8 (onnxruntime static QDQ), calibrated on good images.

    Only the networks' Conv / MatMul / Gemm are quantised; pre- and post-processing, scoring
    and thresholds stay float. With --check the AUROC of both models is measured and INT8 is
    refused (nothing written, exit 2) when it drops by more than --max-auroc-drop.
    """
    _quantize(model, out, calibration, check=check, max_auroc_drop=max_auroc_drop, force=force,
              threads=threads)


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
    from anomalykit.predict import predict_images

    check_device(device)
    summary = predict_images(model, input, out, device=device, progress=not quiet)
    out_console.print(f"{summary.n_images} image(s), {summary.n_anomalous} anomalous; wrote "
                      f"{escape(str(summary.csv_path))} and {escape(str(summary.overlay_dir))}/")


# -- on the line: service and folder watcher (torch-free) -------------------------------------

# These commands hand their arguments to the deploy modules' own parsers (one definition of
# each option, shared with `python -m anomalykit.serve.watcher` on a PC without the CLI).
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                "help_option_names": []}


@app.command(context_settings=PASS_THROUGH, add_help_option=False, help=(
    "Serve MODEL over HTTP for the line: POST /predict, a page for people at /, /health, "
    "/ready, /metrics (anomalykit serve MODEL [--host H] [--port P] [--max-batch 8] ...; "
    "--help for every option)."))
def serve(ctx: typer.Context) -> None:
    from anomalykit.serve.app import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args), prog="anomalykit serve"))


@app.command(context_settings=PASS_THROUGH, add_help_option=False, help=(
    "Score each image dropped into INBOX: a row in results.csv, the file moved to ok/, ng/ or "
    "error/ (anomalykit watch MODEL INBOX [--out DIR] [--once] ...; --help for every option)."))
def watch(ctx: typer.Context) -> None:
    from anomalykit.serve.watcher import main as watch_main

    raise typer.Exit(watch_main(list(ctx.args)))


# -- benchmark -------------------------------------------------------------------------------


def _command_line(params: dict[str, Any]) -> str:
    """The command as typed when run as a program, else rebuilt from the parsed options."""
    if _argv is not None:
        return shlex.join(["anomalykit", *_argv])
    words = ["anomalykit", "benchmark"]
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value or key in ("onnx", "resume"):  # the two-sided flags
                words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            for item in value:
                words += [flag if key != "overrides" else "--set", str(item)]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


@app.command(help=(
    "Train, test, export and time every detector on every category; write the reports.\n\n"
    "A failing pair is recorded as an error row and the benchmark goes on; the exit status is "
    "1 when any pair failed.\n\n"
    "Your own images instead of an MVTec AD root: --good-dir and --defect-dir (optionally "
    "--mask-dir); the good folder is split with the seed as for `anomalykit train` and the "
    "results' category is the name of the folder that holds --good-dir."))
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
    good_dir: GoodDirOption = None,
    defect_dir: DefectDirOption = None,
    mask_dir: MaskDirOption = None,
    test_fraction: TestFractionOption = None,
    format: FormatOption = "auto",
    config: ConfigOption = "quick",
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Benchmark folder: results.csv, "
                                                          "results.md, report.html, "
                                                          "runs/.")] = Path("runs/benchmark"),
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 0,
    seeds: Annotated[str | None, typer.Option(
        help="Comma-separated seeds, e.g. 0,1,2: every (detector, category) runs once per "
             "seed and the tables add mean ± std. Replaces --seed.")] = None,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Export each model to ONNX "
                                                                "and time onnxruntime.")] = True,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch and onnxruntime alike (default: torch's default; with "
             "--executor ray, --cpus-per-job).")] = None,
    executor: Annotated[str, typer.Option(
        help="local (this process, one job after another) or ray (one Ray task per "
             "(detector, category, seed) job; pip install 'anomalykit[cluster]').")] = "local",
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join: auto or ray://HOST:10001 (default: start a local Ray). Data "
             "and --out paths must exist on every node (a shared filesystem).")] = None,
    cpus_per_job: Annotated[float, typer.Option(
        help="Ray: CPUs reserved per job.")] = 1.0,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Reuse the rows of jobs that already finished in --out "
                                     "(failed jobs run again), or run everything.")] = True,
    job_timeout: Annotated[float | None, typer.Option(
        help="Seconds a job may run before it is stopped and becomes an error row.")] = None,
    track: TrackOption = None,
    quiet: QuietOption = False,
) -> None:
    from rich.markdown import Markdown

    from anomalykit.benchmark import markdown_tables, run_benchmark
    from anomalykit.data import ensure_synthetic, list_categories
    from anomalykit.pipeline import check_format, folder_data
    from anomalykit.registry import list_detectors
    from anomalykit.tracking import resolve_tracking, tracking_for

    check_device(device)
    names = list_detectors() if detectors.strip() == "all" else split_list(detectors)
    folder = folder_data(good_dir, defect_dir, mask_dir, test_fraction)
    check_format(format, folder)
    if folder is not None and (root is not None or categories is not None):
        raise ConfigError("give either --root/--categories (MVTec AD layout) or --good-dir/"
                          "--defect-dir (folders of images), not both")
    if folder is None and root is None:
        with err_console.status("preparing the synthetic dataset..."):
            root = Path(ensure_synthetic())
        err_console.print(f"using the synthetic dataset in {escape(str(root))}")
    chosen = [] if folder is not None else split_list(categories) or list_categories(root, format)
    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(item) for item in split_list(seeds)]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        if not seed_list:
            raise ConfigError("--seeds is empty; give e.g. --seeds 0,1,2")
    command = _command_line(dict(ctx.params))
    tracking = (tracking_for(track, names[0], config, overrides or []) if names
                else resolve_tracking(track))
    rows = run_benchmark(names, root, chosen, folder=folder, format=format, config=config,
                         overrides=overrides or [], out_dir=out, device=device, seed=seed,
                         seeds=seed_list, onnx=onnx, progress=not quiet, threads=threads,
                         command=command, executor=executor, address=address,
                         cpus_per_job=cpus_per_job, resume=resume, job_timeout=job_timeout,
                         tracking=tracking)
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
