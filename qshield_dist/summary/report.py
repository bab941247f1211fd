"""The whole summary pipeline: load -> tables -> paper comparison -> plots -> sections -> files.

`summarize()` assembles; the tables are built in tables.py (judged in verdicts.py), the
sections in sections.py and sections_verdicts.py, the Markdown, CSV and LaTeX in render.py
and the HTML page in html_page.py. The report opens with the verdicts (a table, then their
forest plot) and where the gains come from; the measurements behind them follow.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from qshield_dist.summary.html_page import render_html
from qshield_dist.summary.load import Results, load_results
from qshield_dist.summary.paper import compare
from qshield_dist.summary.plots import Figure, make_plots
from qshield_dist.summary.render import Section, render_md, render_tex, write_csvs
from qshield_dist.summary.sections import (
    cost_section,
    diagnostics_section,
    honesty_section,
    paper_section,
    robustness_section,
)
from qshield_dist.summary.sections_verdicts import (
    controls_section,
    sequential_section,
    verdict_section,
    worst_case_section,
)
from qshield_dist.summary.stats import MODELS
from qshield_dist.summary.tables import Tables, build_tables

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("md", "csv", "tex", "html")


@dataclass
class Options:
    formats: tuple[str, ...] = FORMATS
    pivot: bool = False  # attacks in rows instead of columns
    min_samples: int = 20
    margin: float = 0.02  # +- band of robust accuracy within which two variants count as equal
    estimand: str = MODELS  # the question the verdicts answer (stats.ESTIMANDS)
    plots: bool = True
    svg: bool = True
    sweep: str | None = None
    proxies: dict[str, str] = field(default_factory=dict)  # measured dataset -> paper dataset


@dataclass
class Summary:
    """What summarize() produced; `tables` and `paper` are the raw frames the tests check."""

    results: Results
    tables: Tables
    paper: pl.DataFrame
    sections: list[Section]
    figures: list[Figure]
    written: list[Path]


def _console(summary: Summary) -> None:
    t, res = summary.tables, summary.results
    log.info(
        "sweep %s: %d files; %d train, %d attack, %d diagnostic rows used;"
        " %d failed, %d skipped (NaN), %d missing, %d thin seeds",
        res.sweep,
        res.n_files,
        res.train.height,
        int(t.robustness["n_rows"].sum() or 0),
        res.diagnostic.height,
        t.failed.height,
        t.skipped.height,
        t.missing.height,
        t.low_samples.height,
    )
    for v in t.verdicts["verdict"]:
        log.info("verdict: %s", v)
    for n in t.notes:
        log.info("note: %s", n)


def _write(
    out: Path,
    title: str,
    stamp: str,
    sections: list[Section],
    tables: Tables,
    paper: pl.DataFrame,
    formats: tuple[str, ...],
) -> list[Path]:
    """The formats asked for, under `out`: report.md, tables.tex, report.html, one CSV per frame."""
    written: list[Path] = []
    if "md" in formats:
        path = out / "report.md"
        path.write_text(render_md(title, stamp, sections, "plots"))
        written.append(path)
    if "tex" in formats:
        path = out / "tables.tex"
        path.write_text(render_tex(t for sec in sections for t in sec.tables))
        written.append(path)
    if "html" in formats:
        path = out / "report.html"
        path.write_text(render_html(title, stamp, sections, tables.failed))
        written.append(path)
    if "csv" in formats:
        written += write_csvs(out, tables, paper)
    return written


def summarize(
    results: Results | str | Path, out_dir: str | Path | None = None, options: Options | None = None
) -> Summary:
    """The whole pipeline, on a results directory or its rows already loaded (load_results);
    files (report, CSV tables, plots) are written only under `out_dir`, when it is given.
    Raises SummaryError (load.py) for input that cannot be summarized."""
    options = options or Options()
    res = results if isinstance(results, Results) else load_results(results, options.sweep)
    tables = build_tables(res, options.min_samples, options.margin, options.estimand)
    paper = compare(tables, options.proxies)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    skipped: list[str] = []
    if options.plots and out is not None:
        figures, skipped = make_plots(tables, out / "plots", options.svg)

    def about(topic: str) -> list[Figure]:
        return [f for f in figures if f.topic == topic]

    sequential = sequential_section(res.root)
    sections = [
        verdict_section(tables, about("verdicts")),
        *([sequential] if sequential else []),
        controls_section(tables, about("controls")),
        worst_case_section(tables),
        diagnostics_section(tables),
        robustness_section(tables, options.pivot, about("robustness"), skipped),
        cost_section(tables, about("cost")),
        paper_section(paper, options.proxies),
        honesty_section(tables, res),
    ]
    written: list[Path] = []
    if out is not None:
        title = f"QShield sweep '{res.sweep}' - summary of {res.root}"
        now = dt.datetime.now(dt.timezone.utc)
        stamp = f"Generated {now:%Y-%m-%d %H:%M UTC} from {res.n_files} result files."
        written = _write(out, title, stamp, sections, tables, paper, options.formats)
    summary = Summary(res, tables, paper, sections, figures, written)
    _console(summary)
    if written:
        reports = ", ".join(p.name for p in written if p.suffix != ".csv")
        csvs = ", CSV tables" if "csv" in options.formats else ""
        log.info("report written to %s (%s)", out, reports + csvs)
    return summary
