"""The report's HTML page in a real browser: headless Chromium, 1,400 pixels wide.

A small report (tests/report_fixture.py) is rendered, and a copy of its page with a probe
script appended is loaded; the probe writes what the browser laid out into the DOM, which
Chromium dumps once the page has loaded. The report itself carries no script.

Without Chromium the tests skip, naming it; under CI=true they fail instead (.ci/run
installs Debian's chromium).
"""

from __future__ import annotations

import html
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from report_fixture import build

from qshield_dist.summary.render import anchor
from qshield_dist.summary.report import Options, Summary, summarize
from qshield_dist.summary.screenshot import CHROMIUM, HEIGHT, WIDTH, dump_dom, find_chromium, main
from qshield_dist.summary.sections_verdicts import VERDICT_TABLE

PROBE = """
<script>
window.addEventListener("load", () => {
  const box = (el) => el && {top: el.getBoundingClientRect().top + scrollY,
                              bottom: el.getBoundingClientRect().bottom + scrollY};
  const table = document.getElementById(%(table)s);
  const ids = [...document.querySelectorAll("[id]")].map((e) => e.id);
  const numeric = [...table.querySelectorAll("td")].filter((td) => /^[0-9]/.test(td.textContent.trim()));
  const result = {
    width: innerWidth,
    verdict_table: box(table),
    forest_plot: box(document.getElementById("forest_vs_cnn")),
    images: [...document.images].map((i) => ({alt: i.alt.slice(0, 60), loaded: i.complete && i.naturalWidth > 0})),
    contents: [...document.querySelectorAll("nav.toc a")].map((a) => ({
      href: a.getAttribute("href"), resolves: !!document.getElementById(a.getAttribute("href").slice(1))})),
    duplicate_ids: ids.filter((id, i) => ids.indexOf(id) !== i),
    header_position: getComputedStyle(table.querySelector("th")).position,
    numbers_aligned: [...new Set(numeric.map((td) => getComputedStyle(td).textAlign))],
  };
  const out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        message = (
            f"Chromium not found (none of {', '.join(CHROMIUM)} on PATH; Debian: apt-get install chromium)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must have it (.ci/run installs it)")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Summary:
    root = tmp_path_factory.mktemp("browser")
    build(root / "results")
    return summarize(root / "results", root / "report", Options(formats=("html",), svg=False))


@pytest.fixture(scope="module")
def laid_out(chromium: str, report: Summary) -> dict[str, Any]:
    page = report.results.root.parent / "report" / "report.html"
    text = page.read_text()
    assert "<script" not in text  # readable with scripts off
    probe = page.with_name("probe.html")
    table = json.dumps(anchor(VERDICT_TABLE) + "-table")
    probe.write_text(text.replace("</body>", PROBE % {"table": table} + "</body>"))
    dom = dump_dom(probe)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_verdict_table_and_forest_plot_on_the_first_screen(laid_out: dict[str, Any]) -> None:
    assert laid_out["width"] == WIDTH
    table, forest = laid_out["verdict_table"], laid_out["forest_plot"]
    assert table is not None and forest is not None
    assert 0 < table["top"] < table["bottom"] <= HEIGHT, table
    assert table["bottom"] < forest["top"] < HEIGHT, forest


def test_every_image_loads(laid_out: dict[str, Any], report: Summary) -> None:
    images = laid_out["images"]
    assert len(images) == len(report.figures) > 0
    assert [i for i in images if not i["loaded"]] == []


def test_contents_links_resolve_and_ids_are_unique(laid_out: dict[str, Any], report: Summary) -> None:
    links = laid_out["contents"]
    assert [link["href"][1:] for link in links] == [sec.anchor for sec in report.sections]
    assert [link for link in links if not link["resolves"]] == []
    assert laid_out["duplicate_ids"] == []


def test_headers_stick_and_numbers_align_right(laid_out: dict[str, Any]) -> None:
    assert laid_out["header_position"] == "sticky"
    assert laid_out["numbers_aligned"] == ["right"]


def test_screenshot_command(chromium: str, report: Summary, tmp_path: Path) -> None:
    page = report.results.root.parent / "report" / "report.html"
    png = tmp_path / "docs" / "first_screen.png"
    assert main([str(page), str(png)]) == 0
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (WIDTH, HEIGHT)
    assert main([str(tmp_path / "absent.html"), str(png)]) == 2
