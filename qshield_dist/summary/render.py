"""The report's blocks (TextTable, Section), the number formats, and the Markdown, LaTeX
(booktabs) and CSV writers; the HTML page is html_page.py's.

Display tables are built once as plain text grids (TextTable) and rendered in every format,
so the Markdown, LaTeX and HTML always show the same numbers; the CSV files hold the raw,
unrounded long-form frames. `Section` lives here, not in sections.py, because the
renderers walk it: sections.py builds Sections, the renderers only read them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from qshield_dist.summary.plots import Figure
from qshield_dist.summary.tables import Tables

BADGE_SEP = " · "  # between the badges of one cell ("undecided · provisional")


def anchor(title: str) -> str:
    """A heading's anchor as GitHub makes it (lower case, punctuation dropped, spaces to
    hyphens), so the Markdown's links and the HTML's ids are the same."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


@dataclass
class TextTable:
    title: str
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""
    badges: str | None = None  # the header of the column whose cells are badges (BADGE_SEP between them)

    def __post_init__(self) -> None:
        # Cells come from nullable columns; one place turns None into a visible dash.
        self.rows = [["-" if c is None else str(c) for c in r] for r in self.rows]

    @property
    def anchor(self) -> str:
        return anchor(self.title)


@dataclass
class Section:
    """A titled run of blocks, rendered in order: paragraphs (str), tables, figures."""

    title: str
    blocks: list[str | TextTable | Figure] = field(default_factory=list)

    def add(self, *blocks: str | TextTable | Figure) -> "Section":
        # Empty tables say so in one line rather than render as a bare header.
        self.blocks += [f"{b.title}: none." if isinstance(b, TextTable) and not b.rows else b for b in blocks]
        return self

    @property
    def tables(self) -> list[TextTable]:
        return [b for b in self.blocks if isinstance(b, TextTable)]

    @property
    def anchor(self) -> str:
        return anchor(self.title)


# ---------------------------------------------------------------- number formatting
def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if _missing(x) else f"{100 * x:.{digits}f}"


def spread(mean: float | None, std: float | None, n_seeds: int) -> str:
    """'mean ± std' in percent over seeds; the mean alone with one seed (no sample std)."""
    return pct(mean) if n_seeds <= 1 else f"{pct(mean)} ± {pct(std)}"


def size(n_seeds: int, n: int | None = None) -> str:
    """Seeds and samples of a cell: 'n=190'; 's=2, n=198' with several seeds."""
    parts = ([f"s={n_seeds}"] if n_seeds > 1 else []) + ([f"n={n}"] if n is not None else [])
    return ", ".join(parts) or "-"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if _missing(x) else f"{x:.{digits}g}"


def ratio(x: float | None) -> str:
    return "n/a" if _missing(x) else f"{x:.3g}x"


# ---------------------------------------------------------------- Markdown
def _md_cell(x: str) -> str:
    return x.replace("|", "\\|").replace("\n", " ")


def render_md(title: str, stamp: str, sections: list[Section], figure_dir: str) -> str:
    contents = " · ".join(f"[{sec.title}](#{sec.anchor})" for sec in sections)
    out = [f"# {title}", "", stamp, "", f"Contents: {contents}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, str):
                out += [b, ""]
            elif isinstance(b, TextTable):
                out += [f"### {b.title}", "", "| " + " | ".join(map(_md_cell, b.headers)) + " |"]
                out += ["|" + "---|" * len(b.headers)]
                out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
                out += ["", b.caption, ""] if b.caption else [""]
            else:
                out += [f"![{b.title}]({figure_dir}/{b.name}.png)", "", f"*{b.caption}*", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- LaTeX
_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "†": r"\dag{}",
    "×": r"$\times$",
    "≥": r"$\geq$",
    "≈": r"$\approx$",
    "·": r"$\cdot$",
    "->": r"$\rightarrow$",
}
_TEX_TABLE = str.maketrans({k: v for k, v in _TEX.items() if len(k) == 1})


def tex_escape(x: str) -> str:
    return x.translate(_TEX_TABLE).replace("->", _TEX["->"])


def render_tex(tables: Iterable[TextTable]) -> str:
    out = [
        "% Generated by analysis/summarize.py. Needs \\usepackage{booktabs};"
        " wide tables may need \\resizebox or landscape.",
        "",
    ]
    for t in tables:
        out += [
            r"\begin{table}[ht]",
            r"\centering\scriptsize",
            f"\\caption{{{tex_escape(t.title)}}}",
            r"\begin{tabular}{" + "l" * len(t.headers) + "}",
            r"\toprule",
            " & ".join(tex_escape(h) for h in t.headers) + r" \\",
            r"\midrule",
        ]
        out += [" & ".join(tex_escape(c) for c in r) + r" \\" for r in t.rows]
        out += [r"\bottomrule", r"\end{tabular}"]
        if t.caption:
            out += [r"\par\smallskip\parbox{\linewidth}{\scriptsize " + tex_escape(t.caption) + "}"]
        out += [r"\end{table}", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- CSV
def write_csvs(out: Path, tables: Tables, paper: pl.DataFrame) -> list[Path]:
    """The raw long-form frames, one CSV each, with the variant labels joined in."""
    labels = tables.variants.select("vkey", "label")
    order = ["dataset", "attack_rank", "label"]
    frames = {
        "variants": tables.variants,
        "attack_settings": tables.attacks,
        "clean_accuracy": tables.clean.join(labels, on="vkey", how="left"),
        "robustness": tables.robustness.join(labels, on="vkey", how="left").sort(order),
        "cost": tables.cost.join(labels, on="vkey", how="left").sort(order),
        "verdicts": tables.verdicts,
        "paired": tables.paired.join(
            labels.rename({"vkey": "a", "label": "label_a"}), on="a", how="left"
        ).join(labels.rename({"vkey": "b", "label": "label_b"}), on="b", how="left"),
        "worst_case": tables.worst_case.join(labels, on="vkey", how="left"),
        "controls": tables.controls.join(labels.rename({"vkey": "vkey_h"}), on="vkey_h", how="left"),
        "diagnostics": tables.diagnostics.join(labels, on="vkey", how="left"),
        "paper_comparison": paper,
        "failed": tables.failed,
        "missing": tables.missing,
        "low_samples": tables.low_samples,
        "skipped": tables.skipped,
        "budget": tables.budget,
    }
    written = []
    for name, df in frames.items():
        path = out / f"{name}.csv"
        # CSV holds no nested types; everything here is scalar.
        df.write_csv(path, float_precision=None)
        written.append(path)
    return written
