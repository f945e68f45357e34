"""Benchmark: every detector x every category x every seed, with tables, an HTML report, timing.

:func:`run_benchmark` trains, evaluates, exports and times each (detector, category, seed)
job, here or as Ray tasks (:mod:`anomalykit.benchmark.executors`; Ray is imported only when
used), and resumes a benchmark folder; :mod:`anomalykit.benchmark.report` writes
``results.csv``, ``results.md`` and ``report.html``; :mod:`anomalykit.benchmark.timing` times
predictors (:func:`time_inference`) and compares PyTorch with onnxruntime per detector
(:func:`run_timing`, ``benchmarks/time_inference.py``).
"""

from __future__ import annotations

from anomalykit.benchmark.executors import EXECUTORS, Job
from anomalykit.benchmark.report import COLUMNS, markdown_tables, read_csv, write_report
from anomalykit.benchmark.runner import benchmark_pair, run_benchmark
from anomalykit.benchmark.timing import run_timing, time_inference

__all__ = ["COLUMNS", "EXECUTORS", "Job", "benchmark_pair", "markdown_tables", "read_csv",
           "run_benchmark", "run_timing", "time_inference", "write_report"]
