"""The service's page in a real headless browser: Debian's Chromium driven by Playwright.

The service runs as a real subprocess (torch blocked) on a free port with test_deploy's tiny
model (map = mean intensity, threshold 0.5). The browser picks files through the page's file
input, as a person would, and the test reads what the page shows. Skipped, with the reason,
where Playwright's Python package or /usr/bin/chromium is missing (`.ci/run` installs both).
Playwright's own browser download is never used: the system Chromium is launched directly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web stack (pip install anomalykit[serve]) is not installed")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright's Python package is not installed (pip install playwright)")

from test_deploy import ROOT, SERVICE, build_model, start_service, stop  # noqa: E402

CHROMIUM = Path(os.environ.get("ANOMALYKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
WAIT_MS = 15_000

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file() and not shutil.which(str(CHROMIUM)),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def service_url(tmp_path_factory) -> Iterator[str]:
    model = build_model(tmp_path_factory.mktemp("browser") / "model.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process, url = start_service([str(SERVICE), str(model)], cwd=ROOT, env=env)
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def page(service_url) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{service_url}/")
            yield page
        finally:
            browser.close()


def test_pick_an_image_and_see_score_verdict_and_overlay(page, tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = 255  # right half white: the tiny model scores 1.0 -> NG
    path = tmp_path / "frame.png"
    assert cv2.imwrite(str(path), image)
    sync_api.expect(page.locator("#model")).to_contain_text("mean_intensity")
    page.set_input_files("#file", str(path))
    sync_api.expect(page.locator("#verdict")).to_have_text("NG")
    sync_api.expect(page.locator("#score")).to_have_text("1.0000")
    sync_api.expect(page.locator("#threshold")).to_have_text("0.5000")
    sync_api.expect(page.locator("#size")).to_have_text("64 x 48 px")
    page.wait_for_function("document.getElementById('overlay').complete && "
                           "document.getElementById('overlay').naturalWidth > 0")
    assert page.eval_on_selector("#overlay", "img => [img.naturalWidth, img.naturalHeight]") == [64, 48]
    assert page.is_hidden("#error")

    dark = tmp_path / "dark.png"
    assert cv2.imwrite(str(dark), np.full((20, 20, 3), 10, np.uint8))
    page.set_input_files("#file", str(dark))
    sync_api.expect(page.locator("#verdict")).to_have_text("OK")


def test_a_text_file_shows_a_readable_error(page, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    page.set_input_files("#file", str(path))
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_contain_text("notes.txt was refused (HTTP 400)")
    sync_api.expect(error).to_contain_text("is not an image")
    assert page.is_hidden("#result")
