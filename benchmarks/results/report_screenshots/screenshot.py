"""Full-page screenshot of a benchmark's report.html, 1280 px wide, with Debian's Chromium.

    python benchmarks/results/report_screenshots/screenshot.py REPORT.html OUT.png

Playwright drives the system Chromium (``/usr/bin/chromium``, or ``$ANOMALYKIT_CHROMIUM``);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report, png = Path(argv[0]).resolve(), Path(argv[1])
    if not report.is_file():
        print(f"error: no report at {report}", file=sys.stderr)
        return 2
    chromium = os.environ.get("ANOMALYKIT_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu",
                                                   "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(report.as_uri())
            page.wait_for_function("[...document.images].every(i => i.complete)")
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
