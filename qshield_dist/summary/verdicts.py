"""Every judgement of the summary, each made once: which baseline a variant is compared
with, the verdict of each hybrid against it, what drives an attack's cost, and where a
hybrid's gain comes from (its controls).

Shape: functions that take Polars frames (the long-form tables of tables.py) and return
frames. A judgement made per row and again per variant (cost driver, gain source) has its
rule in one Polars expression that both levels apply; its wording lives next to the rule.
Numbers are formatted for the report in sections.py. This module imports only load.py, so
tables.py can call it.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from qshield_dist.summary.load import VARIANT_KEYS

BASELINES: tuple[str, ...] = ("cnn", "cnn_small")  # the CNN baseline: the first one present
HYBRID = "hqcnn"
BACKBONE_ONLY = "backbone_only"  # control: the hybrid's own backbone, quantum branch removed
EQUAL_BUDGET = "equal_budget"  # control: the backbone trained with the hybrid's whole budget


def uncontrolled() -> pl.Expr:
    """Rows of the models themselves, not of a control."""
    return pl.col("control").is_null()

# What drives a cost ratio (values of the cost table's `cost_driver` column).
CALLS = "number of calls (defence)"
PER_CALL = "time per call (model/simulator)"
_SAME_COST = "same cost"
_COST_TEXT = {
    _SAME_COST: "same cost as the baseline",
    CALLS: "the difference comes mainly from the number of model calls (the defence)",
    PER_CALL: "the difference comes mainly from the time per model call (the model/simulator),"
    " not from more calls",
}
# Where a hybrid's gain over the baseline comes from (values of the controls' `source`).
_GAIN_TEXT = {
    "no gain": "no gain over the baseline to attribute",
    "quantum branch": "the gain comes mainly from the quantum branch and its fusion head",
    "backbone": "the gain comes mainly from the backbone (its training), not from the quantum branch",
}


# ---------------------------------------------------------------- baselines
def pick_baselines(variants: pl.DataFrame) -> tuple[dict[str, str], list[str]]:
    """dataset -> its CNN baseline model, and the notes on datasets without 'cnn'."""
    chosen: dict[str, str] = {}
    notes: list[str] = []
    for dataset in variants["dataset"].unique().sort():
        models = set(variants.filter((pl.col("dataset") == dataset) & uncontrolled())["model"])
        for i, name in enumerate(BASELINES):
            if name in models:
                chosen[dataset] = name
                if i:
                    notes.append(f"{dataset}: no 'cnn' model, so the CNN baseline is '{name}'")
                break
        else:
            notes.append(
                f"{dataset}: no CNN baseline ('cnn' or 'cnn_small'): ratios and verdicts are not computed"
            )
    return chosen, notes


def baseline_rows(rob: pl.DataFrame, baselines: dict[str, str]) -> pl.DataFrame:
    """The baseline's cells, one per (dataset, attack_label): what cost ratios and controls
    compare with."""
    base = pl.DataFrame(
        {"dataset": list(baselines), "model": list(baselines.values())},
        schema={"dataset": pl.String, "model": pl.String},
    )
    # The baseline is a classical model: its variant columns besides model are null.
    return rob.filter(uncontrolled()).join(base, on=["dataset", "model"], how="semi").unique(
        ["dataset", "attack_label"], keep="first"
    )


def _compared_cell(
    r: dict[str, Any], base: pl.DataFrame, base_by: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The baseline cell a hybrid's cell is compared with: the same attack, else (bpda_pgd
    needs a hybrid) the baseline's strongest attack of the same threat model. Returns it and
    a note when substituted; (None, None) when there is nothing to compare with."""
    b = base_by.get(r["attack_label"])
    if b is not None:
        return b, None
    same = base.filter(pl.col("threat_model") == r["threat_model"])
    if not same.height:
        return None, None
    b = same.sort("asr_mean", descending=True).row(0, named=True)
    return b, f"{r['attack_label']} vs baseline's {b['attack_label']}"


# ---------------------------------------------------------------- verdicts
_VERDICT_SCHEMA = {
    "dataset": pl.String, "vkey": pl.String, "label": pl.String, "baseline": pl.String, "category": pl.String,
    "wins": pl.Int64, "compared": pl.Int64, "strongest_attack": pl.String, "strongest_asr": pl.Float64,
    "baseline_strongest_attack": pl.String, "baseline_strongest_asr": pl.Float64, "verdict": pl.String,
}


def variant_verdicts(
    rob: pl.DataFrame, variants: pl.DataFrame, baselines: dict[str, str], failed: pl.DataFrame,
    skipped: pl.DataFrame,
) -> pl.DataFrame:
    """One verdict per hybrid variant against its dataset's CNN baseline, over EVERY attack
    that ran on it (adaptive ones included): wins = attacks with a lower mean ASR."""
    rows: list[dict[str, Any]] = []
    by_vkey = rob.partition_by("vkey", as_dict=True)
    n_failed_by = dict(failed.group_by("vkey").len().iter_rows())
    n_skipped_by = dict(skipped.filter(pl.col("stage") == "attack").group_by("vkey").len().iter_rows())
    empty = rob.head(0)
    for v in variants.filter((pl.col("model") == HYBRID) & uncontrolled()).iter_rows(named=True):
        dataset, base_model = v["dataset"], baselines.get(v["dataset"])
        mine = by_vkey.get((v["vkey"],), empty).sort("attack_rank")
        head = {"dataset": dataset, "vkey": v["vkey"], "label": v["label"]}
        if not mine.height:
            text = f"{v['label']} ({dataset}): no usable attack rows."
            rows.append({**head, "category": "no attacks", "verdict": text})
            continue
        if base_model is None:
            text = f"{v['label']} ({dataset}): no CNN baseline to compare with."
            rows.append({**head, "category": "no baseline", "verdict": text})
            continue
        base = rob.filter((pl.col("dataset") == dataset) & (pl.col("model") == base_model) & uncontrolled())
        base_by = {r["attack_label"]: r for r in base.iter_rows(named=True)}
        wins, compared, substituted = 0, 0, []
        for r in mine.iter_rows(named=True):
            b, note = _compared_cell(r, base, base_by)
            if b is None:
                continue
            if note:
                substituted.append(note)
            compared += 1
            wins += r["asr_mean"] < b["asr_mean"]
        strongest = mine.sort("asr_mean", descending=True).row(0, named=True)
        b_strongest = base.sort("asr_mean", descending=True).row(0, named=True) if base.height else None
        category = "none" if compared == 0 or wins == 0 else ("every" if wins == compared else "some")
        text = (
            f"{v['label']} ({dataset}): beats {base_model} (lower ASR) on {category} of its attacks"
            f" ({wins}/{compared})"
            f"; strongest attack {strongest['attack_label']} ASR {strongest['asr_mean']:.1%}"
        )
        if b_strongest is not None:
            beaten = strongest["asr_mean"] < b_strongest["asr_mean"]
            text += (
                f" vs {base_model}'s strongest {b_strongest['attack_label']} {b_strongest['asr_mean']:.1%}"
                f" -> {'beats' if beaten else 'does NOT beat'} it under the strongest attack"
            )
        if substituted:
            text += f" (no baseline run of: {', '.join(substituted)})"
        n_failed, n_skipped = n_failed_by.get(v["vkey"], 0), n_skipped_by.get(v["vkey"], 0)
        if n_failed or n_skipped:
            text += (
                f"; not covered: {n_failed} failed trial(s),"
                f" {n_skipped} attack row(s) skipped for NaN metrics"
            )
        rows.append({
            **head, "baseline": base_model, "category": category, "wins": wins, "compared": compared,
            "strongest_attack": strongest["attack_label"], "strongest_asr": strongest["asr_mean"],
            "baseline_strongest_attack": b_strongest["attack_label"] if b_strongest else None,
            "baseline_strongest_asr": b_strongest["asr_mean"] if b_strongest else None, "verdict": text,
        })
    return pl.DataFrame(rows, schema=_VERDICT_SCHEMA)


# ---------------------------------------------------------------- what drives cost
def _more_calls(calls: pl.Expr, per_call: pl.Expr, ties_to_calls: bool) -> pl.Expr:
    """The one rule: the number of calls drives a time ratio when |log calls ratio| is the
    larger part of it, against |log time-per-call ratio|. The per-row column calls a tie
    'calls', the per-variant sentence 'time per call': kept as found, to change nothing."""
    return calls >= per_call if ties_to_calls else calls > per_call


def cost_drivers(cost: pl.DataFrame) -> pl.DataFrame:
    """`cost` with `cost_driver` per row: null without a time ratio, '(baseline)' for the
    baseline itself, else CALLS or PER_CALL."""
    calls, per_call = pl.col("calls_ratio").log().abs(), pl.col("per_call_ratio").log().abs()
    return cost.with_columns(
        pl.when(pl.col("time_ratio").is_null()).then(pl.lit(None, pl.String))
        .when((pl.col("model") == pl.col("baseline")) & uncontrolled()).then(pl.lit("(baseline)"))
        .when(_more_calls(calls, per_call, ties_to_calls=True)).then(pl.lit(CALLS))
        .otherwise(pl.lit(PER_CALL)).alias("cost_driver"),
    )


def _log_sum(ratios: pl.Series) -> float:
    return sum(abs(math.log(r)) for r in ratios if r and r > 0)


def variant_cost_drivers(compared: pl.DataFrame) -> pl.DataFrame:
    """One row per variant (vkey, first-seen order) of cost rows already compared with a
    baseline: sum over its attacks of |log ratio| for calls and for time per call (ratios
    that are null, zero or NaN left out) -> `cost_driver` and its sentence, `verdict`."""
    # Summed in Python, group by group: a Polars sum may add in another order, and the
    # rule compares the two sums, so a tie could fall the other way.
    sums = [
        {"vkey": vkey, "calls": _log_sum(grp["calls_ratio"]), "per_call": _log_sum(grp["per_call_ratio"])}
        for (vkey,), grp in compared.group_by("vkey", maintain_order=True)
    ]
    calls, per_call = pl.col("calls"), pl.col("per_call")
    driver = (
        pl.when((calls == 0) & (per_call == 0)).then(pl.lit(_SAME_COST))
        .when(_more_calls(calls, per_call, ties_to_calls=False)).then(pl.lit(CALLS))
        .otherwise(pl.lit(PER_CALL))
    )
    return (
        pl.DataFrame(sums, schema={"vkey": pl.String, "calls": pl.Float64, "per_call": pl.Float64})
        .with_columns(driver.alias("cost_driver"))
        .with_columns(verdict=pl.col("cost_driver").replace_strict(_COST_TEXT, return_dtype=pl.String))
    )


# ---------------------------------------------------------------- controls: where the gain comes from
def _gain_source(quantum: pl.Expr, backbone: pl.Expr) -> pl.Expr:
    """The one rule for where a gain in ASR points over the baseline comes from, given the
    quantum part (backbone alone -> hybrid) and the backbone part (baseline -> backbone
    alone); a missing backbone part counts as 0."""
    backbone = backbone.fill_null(0)
    return (
        pl.when(quantum.is_null()).then(pl.lit("no backbone-only run"))
        .when((quantum <= 0) & (backbone <= 0)).then(pl.lit("no gain"))
        .when(quantum > backbone).then(pl.lit("quantum branch"))
        .otherwise(pl.lit("backbone"))
    )


_CONTROL_COLUMNS = [
    "dataset", "attack_label", "vkey_h", "asr_hybrid", "asr_backbone_only", "asr_equal_budget",
    "asr_baseline", "gain_backbone", "gain_quantum", "source",
]


def controls(rob: pl.DataFrame, baselines: dict[str, str]) -> pl.DataFrame:
    """Hybrid vs its own backbone alone (control backbone_only: same checkpoint, branch
    removed) and its backbone trained with its budget (equal_budget) vs the CNN baseline, same attack. Gain over the baseline = backbone part (baseline ->
    backbone alone) + quantum-branch part (backbone alone -> hybrid); `source` per row.
    """
    hyb = rob.filter((pl.col("model") == HYBRID) & uncontrolled())
    ctrl = rob.filter(pl.col("control") == BACKBONE_ONLY)
    eq = rob.filter(pl.col("control") == EQUAL_BUDGET)
    if not hyb.height or not (ctrl.height or eq.height):
        schema = {c: (pl.Float64 if c.startswith(("asr", "gain")) else pl.String) for c in _CONTROL_COLUMNS}
        return pl.DataFrame(schema=schema)
    # The backbone-alone row keeps its hybrid's variant columns; only `control` differs, so
    # the two meet on the other variant columns (null meeting null, as in the string vkey).
    same_variant = [k for k in VARIANT_KEYS if k != "control"]
    ctrl = ctrl.select(*same_variant, "attack_label", pl.col("asr_mean").alias("asr_backbone_only"))
    eq = eq.select(
        "dataset", pl.col("model").alias("backbone"), "attack_label",
        pl.col("asr_mean").alias("asr_equal_budget"),
    ).unique(["dataset", "backbone", "attack_label"])
    base = baseline_rows(rob, baselines).select(
        "dataset", "attack_label", pl.col("asr_mean").alias("asr_baseline")
    )
    out = (
        hyb.select(*same_variant, "vkey", "attack_label", "attack_rank", asr_hybrid=pl.col("asr_mean"))
        .join(ctrl, on=[*same_variant, "attack_label"], how="left", nulls_equal=True)
        .join(eq, on=["dataset", "backbone", "attack_label"], how="left")
        .join(base, on=["dataset", "attack_label"], how="left")
        .filter(pl.col("asr_backbone_only").is_not_null() | pl.col("asr_equal_budget").is_not_null())
        .with_columns(
            (pl.col("asr_baseline") - pl.col("asr_backbone_only")).alias("gain_backbone"),
            (pl.col("asr_backbone_only") - pl.col("asr_hybrid")).alias("gain_quantum"),
        )
        .with_columns(_gain_source(pl.col("gain_quantum"), pl.col("gain_backbone")).alias("source"))
        .sort("dataset", "vkey", "attack_rank")
        .rename({"vkey": "vkey_h"})
    )
    return out.select(_CONTROL_COLUMNS)


def variant_gains(rows: pl.DataFrame) -> pl.DataFrame:
    """Per hybrid (vkey_h, first-seen order) with a backbone-alone run: the mean quantum and
    backbone parts over its attacks (no backbone part -> 0) -> `source` by the same rule as
    each row of `rows` (the controls table), and its sentence, `verdict`."""
    # Series means, group by group: a group_by mean can round a near-zero mean to the other
    # sign, which the report shows (-0.00 vs 0.00) and the rule compares.
    means = []
    for (vkey,), grp in rows.group_by("vkey_h", maintain_order=True):
        q, b = grp["gain_quantum"].drop_nulls(), grp["gain_backbone"].drop_nulls()
        if q.len():
            means.append({"vkey_h": vkey, "n_attacks": q.len(), "gain_quantum": q.mean(),
                          "gain_backbone": b.mean() if b.len() else 0.0})
    schema = {
        "vkey_h": pl.String, "n_attacks": pl.Int64, "gain_quantum": pl.Float64, "gain_backbone": pl.Float64,
    }
    return (
        pl.DataFrame(means, schema=schema)
        .with_columns(_gain_source(pl.col("gain_quantum"), pl.col("gain_backbone")).alias("source"))
        .with_columns(verdict=pl.col("source").replace_strict(_GAIN_TEXT, return_dtype=pl.String))
    )
