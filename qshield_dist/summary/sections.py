"""The report's sections, one function each: tables, their frames and figures in, a Section out.

Sections choose what to show and word it; the judgements they show (verdicts, cost
drivers, where a gain comes from) are made in verdicts.py and only formatted here. A
figure goes beside the tables of its dataset. The sections of the paired judgements
(verdicts, controls, worst-case robust accuracy) are in sections_verdicts.py.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from qshield_dist.attack_params import params_text
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.summary.load import Results
from qshield_dist.summary.plots import Figure
from qshield_dist.summary.render import Section, TextTable, num, pct, ratio, size, spread
from qshield_dist.summary.tables import Tables
from qshield_dist.summary.verdicts import variant_cost_drivers

LOW = "†"  # marks a cell with a seed below the sample threshold


def label_map(tables: Tables) -> dict[str, str]:
    """Each variant's key -> its label in the report (sections_verdicts.py uses it too)."""
    return dict(zip(tables.variants["vkey"], tables.variants["label"]))


# ---------------------------------------------------------------- robustness
def robustness_section(tables: Tables, pivot: bool, figures: list[Figure], skipped: list[str]) -> Section:
    """Per dataset: ASR and robust accuracy per attack, the attack settings, the figures;
    then the notes on the figures skipped."""
    sec = Section("Robustness")
    sec.add(
        "Each cell: mean ± sample std (ddof=1) over seeds, in percent; with one seed, the value alone;"
        " [s = seeds when more than one, n = attacked samples summed over seeds]. "
        "ASR = successful / attacked (correctly classified) samples, the paper's metric, over the seeds that"
        " attacked any sample;"
        " robust accuracy = correct clean and not broken, over the shared attack set (the same points for every model). "
        f"{LOW} = a seed of this cell attacked fewer than {tables.min_samples} samples"
        " (kept in the mean, listed under Honesty). Attacks by name; their settings are in the attack-settings"
        " table under each robustness table."
    )
    clean = {r["vkey"]: r for r in tables.clean.iter_rows(named=True)}

    def clean_cell(vkey: str) -> str:
        c = clean.get(vkey)
        if c is None:
            return "n/a"
        source = "" if c["clean_source"] == "train rows" else " (attack rows)"
        seeds = f" [s={c['clean_seeds']}]" if c["clean_seeds"] > 1 else ""
        return spread(c["clean_mean"], c["clean_std"], c["clean_seeds"]) + seeds + source

    def asr_cell(r: dict[str, Any]) -> str:
        low = LOW if r["n_low"] else ""
        if r["asr_mean"] is None:  # no seed attacked a point: ASR (broken / attacked) is undefined
            return f"- (nothing attacked: no point correct clean) [{size(r['n_seeds'], 0)}]{low}"
        asr = spread(r["asr_mean"], r["asr_std"], r["n_seeds_asr"])
        return f"{asr} [{size(r['n_seeds'], r['n_attacked'])}]{low}"

    def robust_cell(r: dict[str, Any]) -> str:
        return spread(r["robust_mean"], r["robust_std"], r["n_seeds"])

    for dataset in tables.variants["dataset"].unique().sort().to_list():
        variants = tables.variants.filter(pl.col("dataset") == dataset)
        cells = tables.robustness.filter(pl.col("dataset") == dataset).sort("attack_rank")
        attacks = cells["attack_label"].unique(maintain_order=True).to_list()
        lookup = {(r["vkey"], r["attack_label"]): r for r in cells.iter_rows(named=True)}
        rows = []
        if not pivot:
            headers = ["model", "clean acc %"]
            headers += [h for a in attacks for h in (f"{a} ASR %", f"{a} robust acc %")]
            for v in variants.iter_rows(named=True):
                row = [v["label"], clean_cell(v["vkey"])]
                for a in attacks:
                    r = lookup.get((v["vkey"], a))
                    row += ["-", "-"] if r is None else [asr_cell(r), robust_cell(r)]
                rows.append(row)
        else:
            headers = ["attack", "model", "clean acc %", "ASR %", "robust acc %"]
            for a in attacks:
                for v in variants.iter_rows(named=True):
                    r = lookup.get((v["vkey"], a))
                    if r is not None:
                        rows.append([a, v["label"], clean_cell(v["vkey"]), asr_cell(r), robust_cell(r)])
        sec.add(TextTable(f"Robustness - {dataset}", headers, rows))
        sec.add(_settings_table(tables, dataset))
        sec.add(*[f for f in figures if f.dataset == dataset])
    return sec.add(*[f"- figure {s}" for s in skipped])


def _settings_table(tables: Tables, dataset: str) -> TextTable:
    s = tables.attacks.filter(pl.col("dataset") == dataset).sort("attack_rank")
    rows = [
        [
            r["attack_label"],
            r["attack_preset"],
            r["threat_model"] or "",
            params_text(r["attack_params"]),
            r["success_rule"] or "",
            r["eval_repeats"],
        ]
        for r in s.iter_rows(named=True)
    ]
    headers = ["attack", "preset", "threat", "parameters", "success rule", "max eval repeats"]
    return TextTable(f"Attack settings - {dataset}", headers, rows)


# ---------------------------------------------------------------- cost
def cost_section(tables: Tables, figures: list[Figure]) -> Section:
    sec = Section("Attack cost")
    sec.add(
        "Per attacked sample, pooled over seeds (total seconds / total attacked samples)."
        " Calls are batched model invocations (forward + backward); "
        "evals are samples pushed through the model."
        " time ratio = calls ratio x time-per-call ratio (exact): more calls per sample is what the defence "
        "asks of the attack (e.g. repeated evaluations of a stochastic model),"
        " a slower call is the cost of the model itself (the quantum simulator)."
    )
    labels = label_map(tables)
    for dataset in tables.cost["dataset"].unique().sort().to_list():
        cells = (
            tables.cost.filter(pl.col("dataset") == dataset)
            .join(tables.variants.select("vkey", "family", "label"), on="vkey")
            .sort("attack_rank", "family", "label")
        )
        base = labels.get(tables.baselines.get(dataset, ""), "none")
        rows = [
            [
                r["attack_label"],
                r["label"],
                num(r["sec_per_sample"]),
                num(r["fwd_calls_per_sample"]),
                num(r["bwd_calls_per_sample"]),
                num(r["fwd_evals_per_sample"]),
                num(r["bwd_evals_per_sample"]),
                ratio(r["time_ratio"]),
                ratio(r["calls_ratio"]),
                ratio(r["per_call_ratio"]),
                r["cost_driver"] or "-",
                size(r["n_seeds"], r["n_attacked"]),
            ]
            for r in cells.iter_rows(named=True)
        ]
        headers = [
            "attack",
            "model",
            "s/sample",
            "fwd calls/sample",
            "bwd calls/sample",
            "fwd evals/sample",
            "bwd evals/sample",
            f"time ratio vs {base}",
            "calls ratio",
            "time/call ratio",
            "cost driver",
            "seeds, samples",
        ]
        sec.add(TextTable(f"Attack cost - {dataset}", headers, rows))
        is_base = (pl.col("model") == base) & pl.col("control").is_null()
        compared = cells.filter(~is_base & pl.col("time_ratio").is_not_null())
        verdicts = dict(variant_cost_drivers(compared).select("vkey", "verdict").iter_rows())
        for (vkey,), grp in compared.group_by("vkey", maintain_order=True):
            parts = [
                f"{r['attack_label']} {ratio(r['time_ratio'])} = {ratio(r['calls_ratio'])} calls"
                f" x {ratio(r['per_call_ratio'])} per call"
                for r in grp.iter_rows(named=True)
            ]
            head = f"**{labels[vkey]}** ({dataset}) vs {base}: "
            sec.add(head + "; ".join(parts) + f" -> {verdicts[vkey]}.")
        sec.add(*[f for f in figures if f.dataset == dataset])
    return sec


# ---------------------------------------------------------------- paper
def _paper_cell(metric: str, x: float | None, diff: bool = False) -> str:
    if x is None:
        return "-"
    if metric in ("accuracy", "asr"):
        return f"{100 * x:+.2f}" if diff else pct(x)
    return f"{x:+.3g}" if diff else ratio(x)


def paper_section(paper: pl.DataFrame, proxies: dict[str, str]) -> Section:
    sec = Section("Paper comparison")
    sec.add(
        "Published numbers (arXiv 2604.10933, qshield_dist/summary/paper_results.csv)"
        " beside the measured ones; diff = measured - paper "
        "(percentage points for accuracy and ASR). Times are compared as ratios to the CNN"
        " (the paper's seconds cover its own attacked set and hardware). "
        "`notes` lists what differs from the paper's setting."
        " Only measurements with a published counterpart are listed; one line counts the others."
    )
    if proxies:
        pairs = ", ".join(f"{k} compared with {v}" for k, v in proxies.items())
        sec.add("Proxy datasets (not the paper's data): " + pairs)
    if not paper.height:
        sec.add("Nothing to compare.")
        return sec
    not_measured = paper.filter(pl.col("match") == "not measured here")
    no_counterpart = paper.filter(pl.col("match").str.starts_with("no counterpart"))
    shown = paper.filter(
        (pl.col("match") != "not measured here") & ~pl.col("match").str.starts_with("no counterpart")
    )
    rows = [
        [
            r["dataset"],
            r["label"] or "-",
            r["paper_model"] or "-",
            r["metric"],
            r["attack"] or "-",
            _paper_cell(r["metric"], r["measured"]),
            r["n"] or "-",
            _paper_cell(r["metric"], r["paper"]),
            _paper_cell(r["metric"], r["diff"], True),
            r["match"],
            r["notes"] or "",
        ]
        for r in shown.iter_rows(named=True)
    ]
    headers = [
        "dataset",
        "model",
        "paper model",
        "metric",
        "attack",
        "measured",
        "seeds, samples",
        "paper",
        "diff",
        "match",
        "notes",
    ]
    if rows:
        sec.add(TextTable("Measured vs published", headers, rows))
    if no_counterpart.height:
        datasets = ", ".join(sorted(set(no_counterpart["dataset"])))
        sec.add(
            f"{no_counterpart.height} measurement(s) have no published counterpart (dataset, model or metric"
            f" not in the paper; {datasets}); they are in paper_comparison.csv."
        )
    if not_measured.height:
        grouped = not_measured.group_by("paper_dataset", "paper_model", maintain_order=True).agg(
            pl.col("attack").filter(pl.col("attack") != "").str.join(", "),
            pl.col("metric").unique().str.join(", "),
        )
        items = []
        for r in grouped.iter_rows(named=True):
            attack = f": {r['attack']}" if r["attack"] else ""
            items.append(f"{r['paper_dataset']} {r['paper_model']} ({r['metric']}{attack})")
        sec.add("Published but not measured here: " + "; ".join(items))
    return sec


# ---------------------------------------------------------------- diagnostics
def diagnostics_section(tables: Tables) -> Section:
    sec = Section("Gradient-masking diagnostics")
    d = tables.diagnostics
    if not d.height:
        sec.add("No stage=diagnostic rows in these results (enable eval.diagnostics in the sweep).")
        return sec
    labels = label_map(tables)
    per_variant = d.join(tables.variants.select("vkey", "dataset"), on="vkey", how="left")
    per_variant = per_variant.sort("dataset", "vkey", "diagnostic")
    rows = [
        [
            r["dataset"] or "",
            labels.get(r["vkey"], r["vkey"]),
            r["diagnostic"] or "",
            "PASS" if r["n_pass"] == r["n"] else "FAIL",
            f"{r['n_pass']}/{r['n']}",
            num(r["value_mean"]) if r["n"] <= 1 else f"{num(r['value_mean'])} ± {num(r['value_std'])}",
            (r["details"] or "")[:120],
        ]
        for r in per_variant.iter_rows(named=True)
    ]
    headers = [
        "dataset",
        "model",
        "diagnostic",
        "result",
        "seeds passed",
        "value (mean ± std over seeds)",
        "details (first seed)",
    ]
    sec.add(TextTable("Diagnostics per variant", headers, rows, badges="result"))
    n_fail = d.filter(pl.col("n_pass") < pl.col("n")).height
    sec.add(
        f"{n_fail} of {d.height} (variant, diagnostic) checks fail on at least one seed."
        if n_fail
        else f"All {d.height} (variant, diagnostic) checks pass on every seed."
    )
    return sec


# ---------------------------------------------------------------- honesty
def honesty_section(tables: Tables, res: Results) -> Section:
    sec = Section("Honesty: what is missing, failed or thin")
    f = tables.failed
    sec.add(f"Failed trials: {f.height}." + (" Their error text:" if f.height else ""))
    if f.height:
        rows = [
            [
                r["stage"] or "",
                r["dataset"] or "",
                r["variant"] or "",
                r["attack"] or "-",
                r["seed"],
                r["trial_id"],
                r["error_line"],
                str(
                    ResultStore(res.root).log_path(
                        TrialKey(r["stage"] or "", r["dataset"] or "", r["trial_id"])
                    )
                ),
            ]
            for r in f.sort("stage", "dataset", "trial_id").iter_rows(named=True)
        ]
        headers = [
            "stage",
            "dataset",
            "variant",
            "attack",
            "seed",
            "trial",
            "error (first line; full text in failed.csv)",
            "log",
        ]
        sec.add(
            TextTable(
                "Failed trials", headers, rows, "Each trial's log (every run of it) is in its log file."
            )
        )
    m = tables.missing
    if res.expected is not None:
        sec.add(f"Missing grid points (in manifest.json's expected_trials, no result file): {m.height}.")
        if m.height:
            counts = m.group_by("stage", "dataset").len().sort("stage", "dataset")
            rows = [[str(a), str(b), str(n)] for a, b, n in counts.iter_rows()]
            headers = ["stage", "dataset", "missing trials"]
            sec.add(TextTable("Missing grid points", headers, rows, "Trial ids in missing.csv."))
    low = tables.low_samples
    sec.add(
        f"Seeds with fewer than {tables.min_samples} attacked samples (all their shards together):"
        f" {low.height} (kept in the means, marked {LOW})."
    )
    if low.height:
        rows = [
            [r["dataset"], r["variant"] or "", r["attack"], r["seed"], r["n_attacked"]]
            for r in low.iter_rows(named=True)
        ]
        headers = ["dataset", "variant", "attack", "seed", "n attacked"]
        sec.add(TextTable("Thin seeds", headers, rows))
    s = tables.skipped
    sec.add(
        f"Rows skipped because a metric is NaN/null or nothing was attacked: {s.height} (not in any mean)."
    )
    if s.height:
        rows = [
            [
                r["stage"],
                r["dataset"] or "",
                r["variant"] or "",
                r["attack"] or "-",
                r["seed"],
                r["trial_id"],
                r["reason"],
            ]
            for r in s.iter_rows(named=True)
        ]
        headers = ["stage", "dataset", "variant", "attack", "seed", "trial", "reason"]
        sec.add(TextTable("Skipped rows", headers, rows))
    if tables.budget.height:
        sec.add(
            "Attack rows whose adversarial examples broke the eps budget or the [0, 1] range"
            f" (budget_ok = false): {tables.budget.height} - trial ids in budget.csv."
        )
    if tables.duplicates.height:
        labels = label_map(tables)
        rows = [
            [r["dataset"], labels.get(r["vkey"], r["vkey"]), r["attack_label"], r["n_rows"], r["n_shards"]]
            for r in tables.duplicates.iter_rows(named=True)
        ]
        headers = ["dataset", "model", "attack", "rows", "shards"]
        sec.add(TextTable("Cells with more rows than shards", headers, rows))
    sec.add(*[f"- note: {n}" for n in tables.notes])
    return sec
