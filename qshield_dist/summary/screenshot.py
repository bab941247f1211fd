"""The report in headless Chromium: a screenshot of its first screen, and a page's DOM after it
has loaded (what tests/test_report_browser.py reads its checks from).

    python -m qshield_dist.summary.screenshot reports/quick/report.html docs/quick_report.png

Chromium is Debian's `chromium` package (`apt-get install chromium`); nothing else is needed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH, HEIGHT = 1400, 1000  # the first screen the report is laid out for


class NoChromium(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The first of CHROMIUM on PATH."""
    return next((path for name in CHROMIUM if (path := shutil.which(name))), None)


def _headless(page: Path, args: list[str], width: int, height: int, timeout_s: float) -> str:
    binary = find_chromium()
    if binary is None:
        raise NoChromium(f"none of {', '.join(CHROMIUM)} is on PATH (Debian: apt-get install chromium)")
    if not page.is_file():
        raise FileNotFoundError(page)
    with tempfile.TemporaryDirectory(prefix="qshield-chromium-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            *args,
            page.resolve().as_uri(),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"{binary} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def screenshot(
    page: Path, png: Path, width: int = WIDTH, height: int = HEIGHT, timeout_s: float = 120
) -> Path:
    """The first width x height pixels of `page`, as a PNG."""
    png.parent.mkdir(parents=True, exist_ok=True)
    _headless(page, [f"--screenshot={png.resolve()}"], width, height, timeout_s)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
    return png


def dump_dom(page: Path, width: int = WIDTH, height: int = HEIGHT, timeout_s: float = 120) -> str:
    """The DOM of `page` once it has loaded, scripts run, as HTML."""
    return _headless(page, ["--dump-dom"], width, height, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("report", type=Path, help="the report's HTML page")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--height", type=int, default=HEIGHT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        screenshot(args.report, args.png, args.width, args.height)
    except (NoChromium, FileNotFoundError) as e:
        log.error("screenshot: %s", e)
        return 2
    log.info("screenshot of %s (%dx%d) written to %s", args.report, args.width, args.height, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
