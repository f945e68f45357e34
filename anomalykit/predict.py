"""Score image files with a saved model: ``predictions.csv`` and heat-map overlays.

::

    summary = predict_images("model.onnx", "frames/", "predictions/")
    summary.csv_path, summary.n_anomalous

The model is a checkpoint or an ONNX file (:func:`anomalykit.export.load_predictor`); both
give the same numbers for the same files.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from anomalykit.data.io import write_png
from anomalykit.errors import DataError

__all__ = ["PREDICTIONS_NAME", "PredictSummary", "collect_images", "overlay_names",
           "predict_images", "write_png"]

PREDICTIONS_NAME = "predictions.csv"
OVERLAYS_NAME = "overlays"


@dataclass
class PredictSummary:
    """What :func:`predict_images` wrote.

    Attributes:
        n_images: Images scored.
        n_anomalous: Images whose label is 1 (score above the calibrated threshold).
        csv_path: ``predictions.csv``: path, score, normalized_score (0.5 = threshold), label.
        overlay_dir: Folder of ``<stem>.png`` heat-map overlays.
    """

    n_images: int
    n_anomalous: int
    csv_path: Path
    overlay_dir: Path


def collect_images(source: Path, exclude: Path | None = None) -> list[Path]:
    """An image file, or every image under a folder (recursively, natural order).

    Files under ``exclude`` (the output folder, when it lies inside the input) are skipped,
    so a second run does not score the first run's overlays.
    """
    from anomalykit.data import IMAGE_EXTENSIONS
    from anomalykit.data.records import natural_key

    source = Path(source)
    if not source.exists():
        raise DataError(f"input {source} does not exist")
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"input {source} is not an image file (expected one of "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        return [source]
    skip = Path(exclude).resolve() if exclude is not None else None
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


def predict_images(model: str | os.PathLike[str], source: str | os.PathLike[str],
                   out_dir: str | os.PathLike[str], *, device: str = "auto",
                   progress: bool = True) -> PredictSummary:
    """Score an image file or every image under a folder; write the CSV and the overlays.

    ``out_dir/predictions.csv`` has path, score, normalized_score (0.5 = threshold) and label
    (1 = anomalous); ``out_dir/overlays/<stem>.png`` shows the anomaly map over each image
    on one colour scale for all images (blue 0, red twice the calibrated pixel threshold).
    The images are listed (and an empty input rejected) before the model is loaded.
    """
    from anomalykit.data import read_image
    from anomalykit.export.runtime import heatmap_range, overlay_heatmap
    from anomalykit.export.torch_predictor import load_predictor
    from anomalykit.training.checkpoint import atomic_write_text
    from anomalykit.training.progress import track

    source, out = Path(source), Path(out_dir)
    files = collect_images(source, exclude=out)
    predictor = load_predictor(model, device=device)
    scale = heatmap_range(getattr(predictor, "pixel_threshold", None))
    overlays = out / OVERLAYS_NAME
    overlays.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "normalized_score", "label"])
    n_anomalous = 0
    for file, name in track(list(zip(files, overlay_names(files, source), strict=True)),
                            "predict", enabled=progress):
        image = read_image(file)
        result = predictor.predict(image[None])
        label = int(result["label"][0])
        n_anomalous += label
        writer.writerow([str(file), f"{float(result['score'][0]):.6g}",
                         f"{float(result['normalized_score'][0]):.6g}", label])
        overlay = overlay_heatmap(image, result["anomaly_map"][0, 0], **scale)
        write_png(overlays / name, overlay)
    csv_path = atomic_write_text(out / PREDICTIONS_NAME, buffer.getvalue())
    return PredictSummary(len(files), n_anomalous, csv_path, overlays)
