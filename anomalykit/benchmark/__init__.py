"""Benchmark: every detector x every category, with results tables and an HTML report.

:func:`run_benchmark` trains, evaluates, exports and times each pair;
:mod:`anomalykit.benchmark.report` writes ``results.csv``, ``results.md`` and ``report.html``.
"""

from __future__ import annotations

from anomalykit.benchmark.report import COLUMNS, markdown_tables, read_csv, write_report
from anomalykit.benchmark.runner import benchmark_pair, run_benchmark

__all__ = ["COLUMNS", "benchmark_pair", "markdown_tables", "read_csv", "run_benchmark",
           "write_report"]
