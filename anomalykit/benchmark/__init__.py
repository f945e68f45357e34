"""Benchmark: every detector x every category, with results tables, an HTML report, timing.

:func:`run_benchmark` trains, evaluates, exports and times each pair;
:mod:`anomalykit.benchmark.report` writes ``results.csv``, ``results.md`` and ``report.html``;
:mod:`anomalykit.benchmark.timing` times predictors (:func:`time_inference`) and compares
PyTorch with onnxruntime per detector (:func:`run_timing`, ``benchmarks/time_inference.py``).
"""

from __future__ import annotations

from anomalykit.benchmark.report import COLUMNS, markdown_tables, read_csv, write_report
from anomalykit.benchmark.runner import benchmark_pair, run_benchmark
from anomalykit.benchmark.timing import run_timing, time_inference

__all__ = ["COLUMNS", "benchmark_pair", "markdown_tables", "read_csv", "run_benchmark",
           "run_timing", "time_inference", "write_report"]
