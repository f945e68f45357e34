"""Inference timing: one predictor on a set of images, and PyTorch vs onnxruntime per detector.

Both runtimes are timed through the module that is exported (uint8 frames in, resize, the
detector, post-processing), so they do the same work:

* PyTorch: :class:`anomalykit.export.torch_predictor.TorchPredictor` (the
  ``InferenceWrapper`` in eval mode, ``torch.no_grad``);
* onnxruntime: :class:`anomalykit.export.runtime.OnnxDetector` on the exported ``.onnx``
  (checked against PyTorch to 1e-4 at export), with the same number of threads as torch.

:func:`time_inference` is what the benchmark reports per detector and category (median ms
per image at batch 1 over real test images). :func:`run_timing` is the whole of
``benchmarks/time_inference.py``: for each model and batch size, ``warmup`` calls, then
``repeats`` timed calls on one batch of random frames, PyTorch and onnxruntime taking turns
in blocks of 10 calls (:func:`median_ms`); it writes ``timing.csv`` and ``timing.md``.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FIELDS", "median_ms", "models_to_time", "run_timing", "time_inference",
           "time_model", "write_timing"]

FIELDS = ["detector", "source", "image_size", "batch", "torch_ms_batch", "onnx_ms_batch",
          "torch_ms_image", "onnx_ms_image", "onnx_over_torch"]


def time_inference(predictor: Any, images: Sequence[np.ndarray | str | os.PathLike[str]], *,
                   warmup: int = 3, progress: bool = False, desc: str = "timing") -> float:
    """Median milliseconds per image of ``predictor.predict`` at batch size 1.

    ``images`` are (H, W, 3) uint8 arrays or image files; files are decoded before the clock
    starts, one at a time, so a large test set is never held in memory. The first ``warmup``
    calls (allocations, kernel selection, lazy initialisation) run but are not counted.
    """
    from anomalykit.data import read_image
    from anomalykit.training.progress import track

    def load(item: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
        return item if isinstance(item, np.ndarray) else read_image(item)

    if len(images) == 0:
        return math.nan
    for item in list(images)[:warmup]:
        predictor.predict(load(item)[None])
    times = []
    for item in track(images, desc, enabled=progress):
        frame = load(item)[None]
        started = time.perf_counter()
        predictor.predict(frame)  # results come back as numpy: GPU work is finished
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000.0)


def median_ms(predictors: Sequence[Callable[[np.ndarray], Any]], frames: np.ndarray, *,
              warmup: int, repeats: int, block: int = 10) -> list[float]:
    """Median wall time in ms of each ``predict(frames)`` over ``repeats`` calls after ``warmup``.

    The predictors take turns in blocks of ``block`` calls (A A A.. B B B.. A A A..), so a
    slow spell of a shared machine hits both alike (timed once each, one after the other, the
    ratio swung by +-40 % between runs). Blocks rather than single alternating calls:
    onnxruntime's worker threads keep spinning briefly after a run and would slow a PyTorch
    call that follows at once.
    """
    for predict in predictors:
        for _ in range(warmup):
            predict(frames)
    times: list[list[float]] = [[] for _ in predictors]
    while len(times[0]) < repeats:
        for predict, record in zip(predictors, times, strict=True):
            predict(frames)  # one untimed call after the switch
            for _ in range(min(block, repeats - len(record))):
                started = time.perf_counter()
                predict(frames)  # returns numpy arrays: the work is finished when it returns
                record.append(time.perf_counter() - started)
    return [statistics.median(record) * 1000.0 for record in times]


def models_to_time(*, checkpoints: Sequence[str | os.PathLike[str]] = (),
                   runs: str | os.PathLike[str] | None = None,
                   detectors: Sequence[str] | None = None, config: str = "quick",
                   seed: int = 0) -> list[tuple[str, str, Any]]:
    """(detector name, where it came from, detector in eval mode) for every model to time.

    Checkpoints (``checkpoints``, plus every ``runs/<detector>/<category>/model.ckpt`` under
    ``runs``, what ``anomalykit benchmark`` writes) when any are given; otherwise each of
    ``detectors`` (default: every registered one) is built from its ``config`` with its
    initial weights: the arithmetic, hence the time, does not depend on the weight values.
    Closed-form models, whose size is set by the fit, are fitted on 64 random images first.
    """
    import torch

    from anomalykit.config import load_config
    from anomalykit.registry import create, list_detectors
    from anomalykit.training import load_model

    paths = [Path(p) for p in checkpoints]
    if runs:
        paths += sorted(Path(runs).glob("runs/*/*/model.ckpt"))
    if paths:
        models = []
        for path in paths:
            detector = load_model(path, map_location="cpu").eval()
            models.append((detector.registry_name, str(path), detector))
        return models
    names = list(detectors) if detectors else [n for n in list_detectors()
                                               if not n.startswith("_")]
    models = []
    for name in names:
        model_cfg = load_config(name, config)["model"]
        torch.manual_seed(seed)
        detector = create(name, **model_cfg)
        source = f"{config} config, initial weights"
        if detector.closed_form:
            # An unfitted closed-form model (PCA) has no components: fit it on random images
            # first, so the timed arithmetic is that of a fitted model.
            images = torch.rand(64, 3, detector.image_size, detector.image_size,
                                generator=torch.Generator().manual_seed(seed))
            detector.fit(images, batch_size=64, device="cpu", progress=False)
            source = f"{config} config, closed-form models fitted on 64 random images"
        models.append((name, source, detector.eval()))
    return models


def time_model(name: str, source: str, detector: Any, workdir: str | os.PathLike[str], *,
               batch_sizes: Sequence[int] = (1, 8), frame_size: int = 256, warmup: int = 3,
               repeats: int = 30, seed: int = 0,
               log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Export ``detector`` into ``workdir`` and time PyTorch vs onnxruntime: one row per batch."""
    import torch

    from anomalykit.export import export_onnx
    from anomalykit.export.runtime import OnnxDetector
    from anomalykit.export.torch_predictor import TorchPredictor

    onnx_path = export_onnx(detector, Path(workdir) / f"{name}.onnx", verbose=False)
    torch_predictor = TorchPredictor(detector, device="cpu")
    onnx_predictor = OnnxDetector(onnx_path, device="cpu", threads=torch.get_num_threads())
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batch_sizes:
        frames = rng.integers(0, 256, (batch, frame_size, frame_size, 3), dtype=np.uint8)
        torch_ms, onnx_ms = median_ms([torch_predictor.predict, onnx_predictor.predict], frames,
                                      warmup=warmup, repeats=repeats)
        rows.append({
            "detector": name, "source": source, "image_size": int(detector.image_size),
            "batch": batch, "torch_ms_batch": round(torch_ms, 2),
            "onnx_ms_batch": round(onnx_ms, 2), "torch_ms_image": round(torch_ms / batch, 2),
            "onnx_ms_image": round(onnx_ms / batch, 2),
            "onnx_over_torch": round(onnx_ms / torch_ms, 3),
        })
        if log is not None:
            log(f"{name:10s} batch {batch}: torch {torch_ms:9.2f} ms  onnxruntime "
                f"{onnx_ms:9.2f} ms  ratio {onnx_ms / torch_ms:.3f}")
    return rows


def write_timing(rows: list[dict[str, Any]], out: str | os.PathLike[str], command: str) -> Path:
    """Write ``timing.csv`` and ``timing.md`` into ``out`` (atomically); return the .md path."""
    import torch

    from anomalykit.atomic import atomic_write_csv, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "timing.csv", rows, FIELDS)
    lines = [
        "# Inference timing: PyTorch vs onnxruntime",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads for torch and onnxruntime; torch {torch.__version__}",
        "- median of the timed calls after warm-up (the two runtimes take turns in blocks of 10 "
        "calls), uint8 frames resized inside the model; "
        "ratio = onnxruntime / PyTorch (< 1: onnxruntime faster)",
        "",
        "| detector | size | batch | torch ms/batch | onnx ms/batch | torch ms/img | onnx ms/img | "
        "onnx / torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['detector']} | {r['image_size']} | {r['batch']} | "
                     f"{r['torch_ms_batch']} | {r['onnx_ms_batch']} | {r['torch_ms_image']} | "
                     f"{r['onnx_ms_image']} | {r['onnx_over_torch']} |")
    sources = sorted({r["source"] for r in rows})
    lines += ["", "Models: " + "; ".join(sources), ""]
    return atomic_write_text(out / "timing.md", "\n".join(lines))


def run_timing(out: str | os.PathLike[str], *, detectors: Sequence[str] | None = None,
               config: str = "quick", runs: str | os.PathLike[str] | None = None,
               checkpoints: Sequence[str | os.PathLike[str]] = (),
               batch_sizes: Sequence[int] = (1, 8), frame_size: int = 256, warmup: int = 3,
               repeats: int = 30, threads: int | None = None, seed: int = 0,
               command: str = "(python API) run_timing",
               log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Time every model of :func:`models_to_time`; rewrite ``timing.csv``/``.md`` after each.

    Partial results survive an interrupted run. Returns the rows (see :data:`FIELDS`).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, detector in models_to_time(checkpoints=checkpoints, runs=runs,
                                                     detectors=detectors, config=config,
                                                     seed=seed):
            rows += time_model(name, source, detector, tmp, batch_sizes=batch_sizes,
                               frame_size=frame_size, warmup=warmup, repeats=repeats,
                               seed=seed, log=log)
            write_timing(rows, out, command)
    return rows
