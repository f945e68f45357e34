"""The benchmark's report.html in a real headless browser: Debian's Chromium driven by Playwright.

A real benchmark (two tiny detectors, one synthetic category at 32 px, no ONNX) writes the
report; Chromium opens it from disk (file://, as a person opens it from the benchmark folder)
at 1280 px wide. The tests read what the page shows: the summary table first with one row per
detector and the best cells marked, every image loaded, nothing wider than the window, and
the layout (summary above the quality/cost picture above the examples; the examples grid has
the image, the ground truth and one column per detector). The layout is checked on element
boxes and on the screenshot's size, not pixel by pixel: fonts differ between machines.
Skipped, with the reason, where Playwright's Python package or /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright's Python package is not installed (pip install playwright)")

from tiny_detector import TinyConvDetector  # noqa: E402

from anomalykit.benchmark import run_benchmark  # noqa: E402
from anomalykit.benchmark.report import SUMMARY_METRICS  # noqa: E402
from anomalykit.data import SYNTHETIC_CATEGORIES, generate_synthetic  # noqa: E402
from anomalykit.registry import register_detector  # noqa: E402

CHROMIUM = Path(os.environ.get("ANOMALYKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
WIDTH = 1280
WAIT_MS = 15_000
MAX_DET = "_report_test_max"
MEAN_DET = "_report_test_mean"
DETECTORS = [MAX_DET, MEAN_DET]
CATEGORY = SYNTHETIC_CATEGORIES[0]

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file() and not shutil.which(str(CHROMIUM)),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@register_detector(MAX_DET)
class MaxDetector(TinyConvDetector):
    """Image score = the map's maximum."""


@register_detector(MEAN_DET)
class MeanDetector(TinyConvDetector):
    """Image score = the map's mean: other numbers than MaxDetector's, so a column has a best."""

    reduction = "mean"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root, categories=[CATEGORY], seed=0, image_size=32, n_train=10,
                       n_test_good=3, n_test_defect=4)
    config = tmp_path_factory.mktemp("config") / "tiny.yaml"
    config.write_text("model:\n  image_size: 32\ntrain:\n  epochs: 1\n  batch_size: 8\n"
                      "  val_fraction: 0.2\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("bench")
    rows = run_benchmark(DETECTORS, root, [CATEGORY], config=config, out_dir=out, device="cpu",
                         onnx=False, progress=False, threads=1,
                         command="anomalykit benchmark --no-onnx (browser test)")
    assert not any(r["error"] for r in rows)
    return out / "report.html"


@pytest.fixture(scope="module")
def page(report: Path) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            yield page
        finally:
            browser.close()


def box(page, selector: str) -> dict[str, float]:
    found = page.query_selector(selector)
    assert found is not None, f"{selector} is not on the page"
    result = found.bounding_box()
    assert result is not None and result["width"] > 0 and result["height"] > 0, selector
    return result


def test_summary_table_comes_first_with_one_row_per_detector(page) -> None:
    assert page.eval_on_selector("table", "t => t.className") == "summary"  # the first table
    names = page.eval_on_selector_all("table.summary tbody th", "cells => cells.map(c => c.textContent)")
    assert names == DETECTORS
    header = page.eval_on_selector_all("table.summary thead th", "cells => cells.map(c => c.textContent)")
    assert header[0] == "detector"
    assert {"image AUROC", "pixel AUROC", "F1 at threshold", "false alarms (good)",
            "misses (defective)", "fit s", "ms/image torch"} <= set(header)
    assert "ms/image onnxruntime" not in header  # --no-onnx: no column of dashes


def test_best_cell_of_each_column_is_marked(page) -> None:
    header = page.eval_on_selector_all("table.summary thead th", "cells => cells.map(c => c.textContent)")
    rows = page.eval_on_selector_all(
        "table.summary tbody tr",
        "rows => rows.map(r => [...r.querySelectorAll('td')].map(c => [c.textContent, "
        "c.classList.contains('best'), c.querySelector('strong') !== null]))")
    by_name = {name: (metric, higher) for metric, (name, higher) in SUMMARY_METRICS.items()}
    for j, name in enumerate(header[1:]):
        column = [row[j] for row in rows]
        values = [float(text) for text, _, _ in column]  # both detectors ran: numbers
        marked = [best for _, best, _ in column]
        assert [best for _, best, _ in column] == [bold for _, _, bold in column], name
        higher = by_name[name][1]
        target = max(values) if higher else min(values)
        assert any(marked), f"no best cell marked in {name}"
        for value, is_best in zip(values, marked, strict=True):
            assert is_best == (value == target), (name, values, marked)


def test_every_image_loads_from_the_folder(page) -> None:
    page.wait_for_function("[...document.images].every(i => i.complete)")
    images = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.naturalWidth])")
    sources = [src for src, _ in images]
    assert "figures/quality_cost.png" in sources and f"figures/{CATEGORY}/roc.png" in sources
    assert all("://" not in src and not src.startswith("/") for src in sources)  # offline, movable
    assert [src for src, width in images if width == 0] == []


def test_summary_table_fits_the_window(page) -> None:
    summary = box(page, "table.summary")
    assert summary["x"] >= 0 and summary["x"] + summary["width"] <= WIDTH
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH


def test_layout_screenshot(page, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[1] == WIDTH
    height = page.evaluate("document.documentElement.scrollHeight")
    assert abs(image.shape[0] - height) <= 2

    summary, picture = box(page, "table.summary"), box(page, "#quality-cost img")
    examples = box(page, "table.examples")
    assert summary["y"] + summary["height"] <= picture["y"]
    assert picture["y"] + picture["height"] <= examples["y"]
    assert examples["y"] + examples["height"] <= image.shape[0]

    columns = len(DETECTORS) + 2  # image, ground truth, one per detector
    assert page.eval_on_selector_all("table.examples thead th", "c => c.length") == columns
    cells = page.eval_on_selector_all("table.examples tbody tr", "rows => rows.map(r => r.cells.length)")
    assert len(cells) >= 2 and set(cells) == {columns}
    kinds = page.eval_on_selector_all("table.examples tbody tr", "rows => rows.map(r => r.className)")
    assert "good" in kinds and "defect" in kinds and kinds.index("defect") < kinds.index("good")
    tiles = page.eval_on_selector_all(
        "table.examples tbody tr:first-child img",
        "imgs => imgs.map(i => { const b = i.getBoundingClientRect(); return [b.x, b.width]; })")
    assert len(tiles) == columns
    xs = [x for x, _ in tiles]
    assert xs == sorted(xs) and len({round(w) for _, w in tiles}) == 1  # one row, equal tiles

    # The table was drawn where its box says: that strip of the screenshot is not blank.
    top, bottom = int(summary["y"]), int(summary["y"] + summary["height"])
    strip = image[top:bottom, int(summary["x"]):int(summary["x"] + summary["width"])]
    assert strip.size and float(np.std(strip)) > 10.0
