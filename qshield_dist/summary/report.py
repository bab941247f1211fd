"""Render the tables as Markdown, CSV, LaTeX (booktabs) and one self-contained HTML page.

`summarize()` is the whole pipeline: load -> tables -> paper comparison -> plots -> files.
Display tables are built once as plain text grids (TextTable) and rendered three ways, so
the Markdown, LaTeX and HTML always show the same numbers; the CSV files hold the raw,
unrounded long-form frames.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from qshield_dist.summary.load import Results, load_results
from qshield_dist.summary.paper import compare
from qshield_dist.summary.plots import Figure, make_plots
from qshield_dist.summary.tables import HYBRID, Tables, build_tables, params_text

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("md", "csv", "tex", "html")
LOW = "†"  # marks a cell with a seed below the sample threshold


@dataclass
class Options:
    formats: tuple[str, ...] = FORMATS
    pivot: bool = False  # attacks in rows instead of columns
    min_samples: int = 20
    plots: bool = True
    svg: bool = True
    sweep: str | None = None
    proxies: dict[str, str] = field(default_factory=dict)  # measured dataset -> paper dataset


@dataclass
class TextTable:
    title: str
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def __post_init__(self) -> None:
        # Cells come from nullable columns; one place turns None into a visible dash.
        self.rows = [["-" if c is None else str(c) for c in r] for r in self.rows]


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


@dataclass
class Summary:
    """What summarize() produced; `tables` and `paper` are the raw frames the tests check."""

    results: Results
    tables: Tables
    paper: pl.DataFrame
    sections: list[Section]
    figures: list[Figure]
    written: list[Path]


# ---------------------------------------------------------------- number formatting
def pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def pm(mean: float | None, std: float | None) -> str:
    """'mean ± std' in percent; std is n/a with a single seed (ddof=1)."""
    return f"{pct(mean)} ± {pct(std)}"


def num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def ratio(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}x"


# ---------------------------------------------------------------- sections
def _label_map(tables: Tables) -> dict[str, str]:
    return dict(zip(tables.variants["vkey"], tables.variants["label"]))


def _robustness_section(tables: Tables, pivot: bool) -> Section:
    sec = Section("Robustness")
    sec.add(
        f"Each cell: mean ± sample std (ddof=1; n/a with one seed) over seeds, in percent; [s = seeds, n = attacked samples summed over seeds]. "
        f"ASR = successful / attacked (correctly classified) samples; robust accuracy is over the whole test set. "
        f"{LOW} = a seed of this cell attacked fewer than {tables.min_samples} samples (kept in the mean, listed under Honesty)."
    )
    clean = {r["vkey"]: r for r in tables.clean.iter_rows(named=True)}
    for dataset in tables.variants["dataset"].unique().sort().to_list():
        variants = tables.variants.filter(pl.col("dataset") == dataset)
        cells = tables.robustness.filter(pl.col("dataset") == dataset).sort("attack_rank")
        attacks = cells["attack_label"].unique(maintain_order=True).to_list()
        lookup = {(r["vkey"], r["attack_label"]): r for r in cells.iter_rows(named=True)}

        def clean_cell(vkey: str) -> str:
            c = clean.get(vkey)
            return "n/a" if c is None else f"{pm(c['clean_mean'], c['clean_std'])} [s={c['clean_seeds']}]" + ("" if c["clean_source"] == "train rows" else " (attack rows)")

        def asr_cell(r: dict[str, Any]) -> str:
            return f"{pm(r['asr_mean'], r['asr_std'])} [s={r['n_seeds']}, n={r['n_attacked']}]{LOW if r['n_low'] else ''}"

        if not pivot:
            headers = ["model", "clean acc %"] + [h for a in attacks for h in (f"{a} ASR %", f"{a} robust acc %")]
            rows = []
            for v in variants.iter_rows(named=True):
                row = [v["label"], clean_cell(v["vkey"])]
                for a in attacks:
                    r = lookup.get((v["vkey"], a))
                    row += ["-", "-"] if r is None else [asr_cell(r), pm(r["robust_mean"], r["robust_std"])]
                rows.append(row)
        else:
            headers = ["attack", "model", "clean acc %", "ASR %", "robust acc %"]
            rows = []
            for a in attacks:
                for v in variants.iter_rows(named=True):
                    r = lookup.get((v["vkey"], a))
                    if r is not None:
                        rows.append([a, v["label"], clean_cell(v["vkey"]), asr_cell(r), pm(r["robust_mean"], r["robust_std"])])
        sec.add(TextTable(f"Robustness - {dataset}", headers, rows, _settings_caption(tables, dataset)))
        sec.add(_settings_table(tables, dataset))
    return sec


def _settings_caption(tables: Tables, dataset: str) -> str:
    s = tables.attacks.filter(pl.col("dataset") == dataset).sort("attack_rank")
    return "Attacks: " + "; ".join(f"{r['attack_label']} = {r['attack']} preset {r['attack_preset']} ({params_text(r['attack_params'])})" for r in s.iter_rows(named=True))


def _settings_table(tables: Tables, dataset: str) -> TextTable:
    s = tables.attacks.filter(pl.col("dataset") == dataset).sort("attack_rank")
    rows = [[r["attack_label"], r["attack_preset"], r["threat_model"] or "", params_text(r["attack_params"]), r["success_rule"] or "", r["eval_repeats"]] for r in s.iter_rows(named=True)]
    return TextTable(f"Attack settings - {dataset}", ["attack", "preset", "threat", "parameters", "success rule", "max eval repeats"], rows)


def _cost_section(tables: Tables) -> Section:
    sec = Section("Attack cost")
    sec.add(
        "Per attacked sample, pooled over seeds (total seconds / total attacked samples). Calls are batched model invocations (forward + backward); "
        "evals are samples pushed through the model. time ratio = calls ratio x time-per-call ratio (exact): more calls per sample is what the defence "
        "asks of the attack (e.g. repeated evaluations of a stochastic model), a slower call is the cost of the model itself (the quantum simulator)."
    )
    labels = _label_map(tables)
    for dataset in tables.cost["dataset"].unique().sort().to_list():
        cells = tables.cost.filter(pl.col("dataset") == dataset).join(tables.variants.select("vkey", "family", "label"), on="vkey").sort("attack_rank", "family", "label")
        base = tables.baselines.get(dataset, "none")
        rows = [
            [r["attack_label"], r["label"], num(r["sec_per_sample"]), num(r["fwd_calls_per_sample"]), num(r["bwd_calls_per_sample"]),
             num(r["fwd_evals_per_sample"]), num(r["bwd_evals_per_sample"]), ratio(r["time_ratio"]), ratio(r["calls_ratio"]),
             ratio(r["per_call_ratio"]), r["cost_driver"] or "-", f"s={r['n_seeds']}, n={r['n_attacked']}"]
            for r in cells.iter_rows(named=True)
        ]
        headers = ["attack", "model", "s/sample", "fwd calls/sample", "bwd calls/sample", "fwd evals/sample", "bwd evals/sample",
                   f"time ratio vs {base}", "calls ratio", "time/call ratio", "cost driver", "seeds, samples"]
        sec.add(TextTable(f"Attack cost - {dataset}", headers, rows, _settings_caption(tables, dataset)))
        for vkey, grp in cells.filter(pl.col("model") != base).filter(pl.col("time_ratio").is_not_null()).group_by("vkey", maintain_order=True):
            sec.add(_cost_sentence(dataset, labels[vkey[0]], base, grp))
    return sec


def _cost_sentence(dataset: str, label: str, base: str, grp: pl.DataFrame) -> str:
    parts = [f"{r['attack_label']} {ratio(r['time_ratio'])} = {ratio(r['calls_ratio'])} calls x {ratio(r['per_call_ratio'])} per call" for r in grp.iter_rows(named=True)]
    calls = sum(abs(math.log(r)) for r in grp["calls_ratio"] if r and r > 0)
    per_call = sum(abs(math.log(r)) for r in grp["per_call_ratio"] if r and r > 0)
    if calls == per_call == 0:
        verdict = "same cost as the baseline"
    elif calls > per_call:
        verdict = "the difference comes mainly from the number of model calls (the defence)"
    else:
        verdict = "the difference comes mainly from the time per model call (the model/simulator), not from more calls"
    return f"**{label}** ({dataset}) vs {base}: " + "; ".join(parts) + f" -> {verdict}."


def _paper_section(paper: pl.DataFrame, proxies: dict[str, str]) -> Section:
    sec = Section("Paper comparison")
    sec.add(
        "Published numbers (arXiv 2604.10933, qshield_dist/summary/paper_results.csv) beside the measured ones; diff = measured - paper "
        "(percentage points for accuracy and ASR). Times are compared as ratios to the CNN (the paper's seconds cover its own attacked set and hardware). "
        "`notes` lists what differs from the paper's setting; rows without a published counterpart are kept and marked."
    )
    if proxies:
        sec.add("Proxy datasets (not the paper's data): " + ", ".join(f"{k} compared with {v}" for k, v in proxies.items()))
    if not paper.height:
        sec.add("Nothing to compare.")
        return sec
    not_measured = paper.filter(pl.col("match") == "not measured here")
    shown = paper.filter(pl.col("match") != "not measured here")

    def fmt(metric: str, x: float | None, diff: bool = False) -> str:
        if x is None:
            return "-"
        if metric in ("accuracy", "asr"):
            return f"{100 * x:+.2f}" if diff else pct(x)
        return f"{x:+.3g}" if diff else ratio(x)

    rows = [
        [r["dataset"], r["label"] or "-", r["paper_model"] or "-", r["metric"], r["attack"] or "-", fmt(r["metric"], r["measured"]),
         fmt(r["metric"], r["paper"]), fmt(r["metric"], r["diff"], True), r["match"], r["notes"] or ""]
        for r in shown.iter_rows(named=True)
    ]
    sec.add(TextTable("Measured vs published", ["dataset", "model", "paper model", "metric", "attack", "measured", "paper", "diff", "match", "notes"], rows))
    if not_measured.height:
        grouped = not_measured.group_by("paper_dataset", "paper_model", maintain_order=True).agg(pl.col("attack").filter(pl.col("attack") != "").str.join(", "), pl.col("metric").unique().str.join(", "))
        sec.add(
            "Published but not measured here: " + "; ".join(f"{r['paper_dataset']} {r['paper_model']} ({r['metric']}{': ' + r['attack'] if r['attack'] else ''})" for r in grouped.iter_rows(named=True))
        )
    return sec


def _verdict_section(tables: Tables) -> Section:
    sec = Section("Verdicts")
    sec.add(
        "One line per HQCNN variant against its dataset's CNN baseline, over every attack that ran on the variant, adaptive ones included "
        "(mean ASR over seeds; lower is better). The strongest attack is the one with the highest ASR."
    )
    if not tables.verdicts.height:
        sec.add("No HQCNN variant in these results.")
    sec.add(*[f"- {v}" for v in tables.verdicts["verdict"]])
    return sec


def _controls_section(tables: Tables) -> Section:
    sec = Section("Controls: where does the gain come from?")
    c = tables.controls
    if not c.height:
        sec.add("No control rows (model 'hqcnn_backbone' or '<backbone>_equal_budget'): the gain cannot be attributed to the quantum branch or the backbone.")
        return sec
    labels = _label_map(tables)
    sec.add(
        "backbone alone = the hybrid's own trained backbone with the quantum branch removed, same attack. gain (pp of ASR) over the CNN baseline = "
        "backbone part (baseline -> backbone alone) + quantum part (backbone alone -> hybrid). The quantum part includes the fusion head: "
        "an entanglement 'none' variant with the same gain says the circuit's entanglement is not what helps."
    )
    rows = [
        [r["dataset"], labels.get(r["vkey_h"], r["vkey_h"]), r["attack_label"], pct(r["asr_hybrid"]), pct(r["asr_backbone_only"]), pct(r["asr_equal_budget"]),
         pct(r["asr_baseline"]), pct(r["gain_backbone"]), pct(r["gain_quantum"]), r["source"]]
        for r in c.iter_rows(named=True)
    ]
    sec.add(TextTable("Hybrid vs its backbone alone", ["dataset", "hybrid", "attack", "ASR hybrid %", "ASR backbone alone %", "ASR equal-budget backbone %", "ASR baseline %", "gain: backbone (pp)", "gain: quantum (pp)", "gain mainly from"], rows))
    for (vkey,), grp in c.group_by("vkey_h", maintain_order=True):
        q = grp["gain_quantum"].drop_nulls()
        b = grp["gain_backbone"].drop_nulls()
        if not q.len():
            continue
        qm, bm = q.mean(), (b.mean() if b.len() else 0.0)
        if qm <= 0 and bm <= 0:
            what = "no gain over the baseline to attribute"
        elif qm > bm:
            what = "the gain comes mainly from the quantum branch and its fusion head"
        else:
            what = "the gain comes mainly from the backbone (its training), not from the quantum branch"
        sec.add(f"- {labels.get(vkey, vkey)}: mean over {q.len()} attack(s): quantum part {pct(qm)} pp, backbone part {pct(bm)} pp -> {what}.")
    return sec


def _diagnostics_section(tables: Tables) -> Section:
    sec = Section("Gradient-masking diagnostics")
    d = tables.diagnostics
    if not d.height:
        sec.add("No stage=diagnostic rows in these results (enable eval.diagnostics in the sweep).")
        return sec
    labels = _label_map(tables)
    rows = [
        [r["dataset"] or "", labels.get(r["vkey"], r["vkey"]), r["diagnostic"] or "", "PASS" if r["n_pass"] == r["n"] else "FAIL",
         f"{r['n_pass']}/{r['n']}", f"{num(r['value_mean'])} ± {num(r['value_std'])}", (r["details"] or "")[:120]]
        for r in d.join(tables.variants.select("vkey", "dataset"), on="vkey", how="left").sort("dataset", "vkey", "diagnostic").iter_rows(named=True)
    ]
    sec.add(TextTable("Diagnostics per variant", ["dataset", "model", "diagnostic", "result", "seeds passed", "value mean ± std", "details (first seed)"], rows))
    n_fail = d.filter(pl.col("n_pass") < pl.col("n")).height
    sec.add(f"{n_fail} of {d.height} (variant, diagnostic) checks fail on at least one seed." if n_fail else f"All {d.height} (variant, diagnostic) checks pass on every seed.")
    return sec


def _honesty_section(tables: Tables, res: Results) -> Section:
    sec = Section("Honesty: what is missing, failed or thin")
    f = tables.failed
    sec.add(f"Failed trials: {f.height}." + (" Their error text:" if f.height else ""))
    if f.height:
        rows = [[r["stage"] or "", r["dataset"] or "", r["variant"] or "", r["attack"] or "-", r["seed"], r["trial_id"], r["error_line"]] for r in f.sort("stage", "dataset", "trial_id").iter_rows(named=True)]
        sec.add(TextTable("Failed trials", ["stage", "dataset", "variant", "attack", "seed", "trial", "error (first line; full text in failed.csv)"], rows))
    m = tables.missing
    if res.expected is not None:
        sec.add(f"Missing grid points (in manifest.json's expected_trials, no result file): {m.height}.")
        if m.height:
            counts = m.group_by("stage", "dataset").len().sort("stage", "dataset")
            sec.add(TextTable("Missing grid points", ["stage", "dataset", "missing trials"], [[str(a), str(b), str(n)] for a, b, n in counts.iter_rows()], "Trial ids in missing.csv."))
    low = tables.low_samples
    sec.add(f"Attack rows with fewer than {tables.min_samples} attacked samples: {low.height} (kept in the means, marked {LOW}).")
    if low.height:
        sec.add(TextTable("Thin seeds", ["dataset", "variant", "attack", "seed", "n attacked", "trial"], [[r["dataset"], r["variant"] or "", r["attack"], r["seed"], r["n_attacked"], r["trial_id"]] for r in low.iter_rows(named=True)]))
    s = tables.skipped
    sec.add(f"Rows skipped because a metric is NaN/null or nothing was attacked: {s.height} (not in any mean).")
    if s.height:
        sec.add(TextTable("Skipped rows", ["stage", "dataset", "variant", "attack", "seed", "trial", "reason"], [[r["stage"], r["dataset"] or "", r["variant"] or "", r["attack"] or "-", r["seed"], r["trial_id"], r["reason"]] for r in s.iter_rows(named=True)]))
    if tables.budget.height:
        sec.add(f"Attack rows whose adversarial examples broke the eps budget or the [0, 1] range (budget_ok = false): {tables.budget.height} - trial ids in budget.csv.")
    if tables.duplicates.height:
        labels = _label_map(tables)
        sec.add(TextTable("Cells with more rows than seeds", ["dataset", "model", "attack", "rows", "seeds"], [[r["dataset"], labels.get(r["vkey"], r["vkey"]), r["attack_label"], r["n_rows"], r["n_seeds"]] for r in tables.duplicates.iter_rows(named=True)]))
    sec.add(*[f"- note: {n}" for n in tables.notes])
    return sec


# ---------------------------------------------------------------- renderers
def _md_cell(x: str) -> str:
    return x.replace("|", "\\|").replace("\n", " ")


def render_md(title: str, sections: list[Section], figure_dir: str) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, str):
                out += [b, ""]
            elif isinstance(b, TextTable):
                out += [f"### {b.title}", "", "| " + " | ".join(map(_md_cell, b.headers)) + " |", "|" + "---|" * len(b.headers)]
                out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
                out += ["", b.caption, ""] if b.caption else [""]
            else:
                out += [f"![{b.title}]({figure_dir}/{b.name}.png)", "", f"*{b.caption}*", ""]
    return "\n".join(out)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"\dag{}", "×": r"$\times$", "≥": r"$\geq$", "->": r"$\rightarrow$"}


_TEX_TABLE = str.maketrans({k: v for k, v in _TEX.items() if len(k) == 1})


def tex_escape(x: str) -> str:
    return x.translate(_TEX_TABLE).replace("->", _TEX["->"])


def render_tex(tables: Iterable[TextTable]) -> str:
    out = ["% Generated by analysis/summarize.py. Needs \\usepackage{booktabs}; wide tables may need \\resizebox or landscape.", ""]
    for t in tables:
        out += [
            r"\begin{table}[ht]", r"\centering\scriptsize", f"\\caption{{{tex_escape(t.title)}}}",
            r"\begin{tabular}{" + "l" * len(t.headers) + "}", r"\toprule",
            " & ".join(tex_escape(h) for h in t.headers) + r" \\", r"\midrule",
        ]
        out += [" & ".join(tex_escape(c) for c in r) + r" \\" for r in t.rows]
        out += [r"\bottomrule", r"\end{tabular}"]
        if t.caption:
            out += [r"\par\smallskip\parbox{\linewidth}{\scriptsize " + tex_escape(t.caption) + "}"]
        out += [r"\end{table}", ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}
th,td{border-top:1px solid #ccc;border-bottom:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}th{background:#f3f3f3}
caption{caption-side:top;font-weight:bold;text-align:left}p.cap{font-size:.8em;color:#444}img{max-width:100%}figure{margin:1em 0}"""


def render_html(title: str, sections: list[Section], failed: pl.DataFrame) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{e(sec.title)}</h2>")
        for b in sec.blocks:
            if isinstance(b, str):
                out.append(f"<p>{e(b).replace('**', '')}</p>")
            elif isinstance(b, TextTable):
                out.append(f"<table><caption>{e(b.title)}</caption><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows]
                out.append("</table>" + (f"<p class='cap'>{e(b.caption)}</p>" if b.caption else ""))
            else:
                data = base64.b64encode(b.png).decode()
                out.append(f"<figure><img alt='{e(b.title)}' src='data:image/png;base64,{data}'><figcaption class='cap'>{e(b.caption)}</figcaption></figure>")
        if sec.title.startswith("Honesty") and failed.height:
            out.append("<details><summary>Full error text of failed trials</summary>")
            out += [f"<h4>{e(r['trial_id'])}</h4><pre>{e(r['error'] or '')}</pre>" for r in failed.iter_rows(named=True)]
            out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out)


def _write_csvs(out: Path, tables: Tables, paper: pl.DataFrame) -> list[Path]:
    labels = tables.variants.select("vkey", "label")
    frames = {
        "variants": tables.variants,
        "attack_settings": tables.attacks,
        "clean_accuracy": tables.clean.join(labels, on="vkey", how="left"),
        "robustness": tables.robustness.join(labels, on="vkey", how="left").sort("dataset", "attack_rank", "label"),
        "cost": tables.cost.join(labels, on="vkey", how="left").sort("dataset", "attack_rank", "label"),
        "verdicts": tables.verdicts,
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


def _console(summary: Summary) -> None:
    t, res = summary.tables, summary.results
    log.info(
        "sweep %s: %d files; %d train, %d attack, %d diagnostic rows used; %d failed, %d skipped (NaN), %d missing, %d thin seeds",
        res.sweep, res.n_files, res.train.height, int(t.robustness["n_rows"].sum() or 0), res.diagnostic.height, t.failed.height, t.skipped.height, t.missing.height, t.low_samples.height,
    )
    for v in t.verdicts["verdict"]:
        log.info("verdict: %s", v)
    for n in t.notes:
        log.info("note: %s", n)


def summarize(results_dir: str | Path, out_dir: str | Path, options: Options | None = None) -> Summary:
    """The whole pipeline; raises SummaryError (load.py) for input that cannot be summarized."""
    options = options or Options()
    res = load_results(results_dir, options.sweep)
    tables = build_tables(res, options.min_samples)
    paper = compare(tables, options.proxies)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        _verdict_section(tables), _robustness_section(tables, options.pivot), _cost_section(tables), _paper_section(paper, options.proxies),
        _controls_section(tables), _diagnostics_section(tables), _honesty_section(tables, res),
    ]
    figures: list[Figure] = []
    if options.plots:
        figures, skipped = make_plots(tables, out / "plots", options.svg)
        plot_sec = Section("Figures").add(*figures, *[f"- {s}" for s in skipped])
        sections.insert(3, plot_sec)
    title = f"QShield sweep '{res.sweep}' - summary of {res.root}"
    stamp = f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from {res.n_files} result files."
    sections[0].blocks.insert(0, stamp)
    written: list[Path] = []
    if "md" in options.formats:
        path = out / "report.md"
        path.write_text(render_md(title, sections, "plots"))
        written.append(path)
    if "tex" in options.formats:
        path = out / "tables.tex"
        path.write_text(render_tex(t for s in sections for t in s.tables))
        written.append(path)
    if "html" in options.formats:
        path = out / "report.html"
        path.write_text(render_html(title, sections, tables.failed))
        written.append(path)
    if "csv" in options.formats:
        written += _write_csvs(out, tables, paper)
    summary = Summary(res, tables, paper, sections, figures, written)
    _console(summary)
    log.info("report written to %s (%s)", out, ", ".join(p.name for p in written if p.suffix != ".csv") + (", CSV tables" if "csv" in options.formats else ""))
    return summary
