"""The report as one self-contained HTML page: readable offline, no JavaScript, images inline.

Tables are great_tables' (Polars' `DataFrame.style`): numbers right-aligned, text escaped,
badge cells formatted; this module adds only the page around them: a table of contents with
anchors, headers that stay on screen while a long table scrolls, figures as data URIs next
to the tables they illustrate (each PNG carries its own caption), and the full error text of
failed trials folded away.
"""

from __future__ import annotations

import base64
import html
import re

import polars as pl
from great_tables import GT

from qshield_dist.summary.plots import Figure
from qshield_dist.summary.render import BADGE_SEP, Section, TextTable, anchor

# A numeric cell: a number, possibly signed ("+6.2 [+2.3, +10.5]"), a ratio ("30x"), a count
# ("n=190", "s=2, n=198") or a placeholder; its column is right-aligned.
_NUMERIC = re.compile(r"^([+-]?\d|≈ ?\d|[sn]=\d|-$|n/a$)")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em 2em;max-width:120em;color:#222;line-height:1.35}
h1{font-size:1.35em;margin:.2em 0}h2{font-size:1.2em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1em 0 .2em}p{margin:.35em 0}p.stamp,p.cap{font-size:.8em;color:#555}
nav.toc{font-size:.85em;margin:.3em 0 .6em}nav.toc a{margin-right:.9em;white-space:nowrap}
ul{margin:.3em 0;padding-left:1.4em}
.gt_col_heading{position:sticky;top:0;z-index:1}.gt_row.gt_right{white-space:nowrap}
figure{margin:.6em 0 1.2em}figure img{max-width:100%;height:auto}
.badge{display:inline-block;padding:0 .45em;margin:1px 2px 1px 0;border-radius:.7em;font-size:.85em;
font-weight:600;white-space:nowrap;color:#fff;background:#777}
.badge.more-robust,.badge.pass{background:#1a7f37}.badge.less-robust,.badge.fail{background:#c62828}
.badge.equal{background:#1f5fa8}.badge.undecided{background:#b26a00}.badge.incomplete{background:#6a3fa0}
.badge.provisional{background:#fff;color:#b26a00;border:1px solid #b26a00}
"""


def _inline(text: str) -> str:
    """A paragraph's text: escaped, with the Markdown bold the sections use."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _badges(cell: str) -> str:
    if cell in ("", "-"):
        return html.escape(cell)
    return "".join(
        f"<span class='badge {anchor(word)}'>{html.escape(word)}</span>" for word in cell.split(BADGE_SEP)
    )


def _table(t: TextTable) -> str:
    columns = [f"c{i}" for i in range(len(t.headers))]
    frame = pl.DataFrame(
        {c: list(cells) for c, cells in zip(columns, zip(*t.rows))} if t.rows else None,
        schema=dict.fromkeys(columns, pl.String),
    )
    numeric = [c for c, cells in zip(columns, zip(*t.rows)) if all(_NUMERIC.match(x) for x in cells)]
    gt = (
        GT(frame, id=t.anchor + "-table")
        .cols_label(**dict(zip(columns, t.headers)))
        .cols_align("right", columns=numeric)
        .tab_options(
            container_overflow_x="visible",  # else the container scrolls, not the page: no sticky header
            container_overflow_y="visible",
            container_padding_y="0px",
            table_margin_left="0px",
            table_font_size="13px",
            data_row_padding="3px",
            column_labels_background_color="#f3f3f3",
        )
    )
    if t.badges in t.headers:
        gt = gt.fmt(_badges, columns=columns[t.headers.index(t.badges)])
    out = f"<h3 id='{t.anchor}'>{html.escape(t.title)}</h3>" + gt.as_raw_html()
    return out + (f"<p class='cap'>{_inline(t.caption)}</p>" if t.caption else "")


def _figure(f: Figure) -> str:
    # The PNG carries its title and caption (plots.py); the page does not repeat them.
    data = base64.b64encode(f.png).decode()
    alt = html.escape(f"{f.title}. {f.caption}", quote=True)
    return f"<figure id='{anchor(f.name)}'><img alt='{alt}' src='data:image/png;base64,{data}'></figure>"


def _blocks(blocks: list[str | TextTable | Figure]) -> list[str]:
    out: list[str] = []
    items: list[str] = []  # a run of "- " paragraphs becomes one list
    for b in [*blocks, ""]:
        if isinstance(b, str) and b.startswith("- "):
            items.append(f"<li>{_inline(b[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if isinstance(b, TextTable):
            out.append(_table(b))
        elif isinstance(b, Figure):
            out.append(_figure(b))
        elif b:
            out.append(f"<p>{_inline(b)}</p>")
    return out


def render_html(title: str, stamp: str, sections: list[Section], failed: pl.DataFrame) -> str:
    e = html.escape
    contents = "".join(f"<a href='#{sec.anchor}'>{e(sec.title)}</a>" for sec in sections)
    out = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1><p class='stamp'>{e(stamp)}</p>"
        f"<nav class='toc'><strong>Contents:</strong> {contents}</nav>"
    ]
    for sec in sections:
        out.append(f"<section><h2 id='{sec.anchor}'>{e(sec.title)}</h2>")
        out += _blocks(sec.blocks)
        # The full error text is too long for the tables: folded away under the honesty section.
        if sec.title.startswith("Honesty") and failed.height:
            out.append("<details><summary>Full error text of failed trials</summary>")
            for r in failed.iter_rows(named=True):
                out.append(f"<h4>{e(r['trial_id'])}</h4><pre>{e(r['error'] or '')}</pre>")
            out.append("</details>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)
