"""Every judgement of the summary, each made once: which baseline a variant is compared
with, the verdict of each hybrid against it, what drives an attack's cost, and where a
hybrid's gain comes from (its controls).

Shape: functions that take Polars frames (the long-form tables of tables.py) and return
frames. A judgement made per row and again per variant (cost driver, gain source) has its
rule in one Polars expression that both levels apply; its wording lives next to the rule.
Numbers are formatted for the report in sections.py. This module imports only load.py,
stats.py and grid.py (an equal-budget control's train settings), so tables.py and paired.py can
call it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import polars as pl

from qshield_dist.grid import equal_budget_train_config
from qshield_dist.summary.load import VARIANT_KEYS
from qshield_dist.summary.stats import MODELS, PROCEDURE, holm
from qshield_dist.vocabulary import (
    BACKBONE_ALONE_VS_CNN,
    BACKBONE_ONLY,
    EQUAL_BUDGET,
    STANDARD,
    VS_BACKBONE_ALONE,
    VS_CNN,
    VS_NAMED,
)

BASELINES: tuple[str, ...] = ("cnn", "cnn_small")  # the CNN baseline: the first one present
HYBRID = "hqcnn"


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


# ---------------------------------------------------------------- baselines
def pick_baselines(variants: pl.DataFrame) -> tuple[dict[str, str], list[str]]:
    """dataset -> the vkey of its CNN baseline (the first model of BASELINES present, trained
    with the standard method: an adversarially trained CNN is compared with, not the baseline),
    and the notes on datasets without a plain 'cnn'."""
    chosen: dict[str, str] = {}
    notes: list[str] = []
    plain = uncontrolled() & (pl.col("train_method").fill_null(STANDARD) == STANDARD)
    for dataset in variants["dataset"].unique().sort():
        mine = variants.filter((pl.col("dataset") == dataset) & plain).sort("train_config", nulls_last=False)
        for i, name in enumerate(BASELINES):
            found = mine.filter(pl.col("model") == name)
            if found.height:
                chosen[dataset] = found["vkey"][0]
                if i:
                    notes.append(f"{dataset}: no 'cnn' model, so the CNN baseline is '{name}'")
                if found.height > 1:
                    notes.append(
                        f"{dataset}: {found.height} plain '{name}' variants (train settings differ);"
                        f" the baseline is the one of train settings {found['train_config'][0]}"
                    )
                break
        else:
            notes.append(
                f"{dataset}: no CNN baseline ('cnn' or 'cnn_small'): ratios and verdicts are not computed"
            )
    return chosen, notes


def baseline_rows(rob: pl.DataFrame, baselines: dict[str, str]) -> pl.DataFrame:
    """The baseline's cells, one per (dataset, attack_label): what cost ratios and controls
    compare with."""
    return rob.filter(pl.col("vkey").is_in(list(baselines.values()))).unique(
        ["dataset", "attack_label"], keep="first"
    )


# ---------------------------------------------------------------- Holm's family
def verdict_kind(named: bool) -> str:
    """The kind of the report's verdicts: each hybrid against its CNN, or the sweep's compare:."""
    return VS_NAMED if named else VS_CNN


def in_holm_family(kinds: Sequence[str | None], kind: str) -> list[bool]:
    """Which comparisons form Holm's family: the report's verdicts (`kind`, verdict_kind), at every
    L-inf budget, complete or not (an incomplete one counts, as never rejected, and so does one
    with no paired points at a budget one side reached: paired.comparisons pads it). It is the one
    family of the report's Holm-adjusted p (`holm_adjusted`), of decide.py's sequential Holm
    (decisions.json) and of --plan's price (plan/decision.py counts the same comparisons). The
    controls (vs backbone alone, vs equal budget, backbone alone vs CNN, vs fixed randomness) ask
    another question, where a gain comes from, and are adjusted as a family of their own."""
    return [k == kind for k in kinds]


def holm_adjusted(p_values: Sequence[float], kinds: Sequence[str | None], kind: str) -> list[float]:
    """Holm-adjusted p-values in the order given: within the verdicts' family (in_holm_family)
    and, apart, within the controls'."""
    family = in_holm_family(kinds, kind)
    out = [math.nan] * len(p_values)
    for member in (True, False):
        where = [i for i, f in enumerate(family) if f == member]
        for i, p in zip(where, holm([p_values[i] for i in where])):
            out[i] = p
    return out


# ---------------------------------------------------------------- verdicts
_VERDICT_SCHEMA = {
    "dataset": pl.String,
    "vkey": pl.String,
    "label": pl.String,
    "baseline": pl.String,
    "vkey_b": pl.String,
    "eps": pl.Float64,
    "category": pl.String,
    "provisional": pl.Boolean,
    "lacks": pl.String,  # provisional: what each side's worst case lacks
    "missing": pl.String,  # incomplete: the attacks a side lacks on a seed
    "flags": pl.String,  # failed diagnostics of either model
    "diff": pl.Float64,
    "low": pl.Float64,
    "high": pl.Float64,
    "verdict": pl.String,
    "not_covered": pl.String,  # failed trials and skipped rows of the hybrid the verdict does not cover
}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def eps_text(eps: float) -> str:
    """An L-inf budget as people write it: 32/255 rather than 0.1255."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{eps:.4g}"


def sides_text(r: dict[str, Any], labels: dict[str, str], what: str) -> str:
    """`what` ('lacks': AutoAttack a worst case lacks; 'missing': attacks missing on a seed) per
    side of a comparison, named: '' when neither side has any."""
    return "; ".join(
        f"{labels.get(r[side], r[side])}: {r[f'{what}_{side}']}" for side in ("a", "b") if r[f"{what}_{side}"]
    )


def _interval(diff: float, low: float, high: float) -> str:
    return f"{_pct(diff)} [95% CI {_pct(low)}, {_pct(high)}]"


def question_text(r: dict[str, Any]) -> str:
    """How the verdict's question (a row of paired.comparisons' `estimand`) was answered."""
    if r["estimand"] == MODELS:
        seeds = "" if r["n_seeds"] == 1 else f", stratified by seed; per seed {r['per_seed']}"
        return f"{MODELS}: points as the unit{seeds}; McNemar's exact test"
    if r["n_seeds"] == 1:
        return f"{PROCEDURE}: undefined with one seed (seeds are its unit)"
    return f"{PROCEDURE}: seeds as the unit, t on {r['n_seeds'] - 1} df; per seed {r['per_seed']}"


def other_question_text(r: dict[str, Any]) -> str:
    """The answer to the question the verdict does not rest on."""
    if r["estimand"] == MODELS:
        if r["procedure_low"] is None:
            return f"{PROCEDURE}: undefined with one seed"
        return (
            f"{PROCEDURE} (seeds as the unit, t on {r['n_seeds'] - 1} df):"
            f" {_interval(r['procedure_diff'], r['procedure_low'], r['procedure_high'])}, p = {r['procedure_p']:.3g}"
        )
    return (
        f"{MODELS} (points as the unit, by seed): {_interval(r['diff'], r['models_low'], r['models_high'])},"
        f" McNemar p = {r['models_p']:.3g}"
    )


def resolve_text(r: dict[str, Any]) -> str:
    """What would decide an undecided comparison at the equivalence margin (power 0.8): points
    per seed at these seeds for the models, seeds at these points for the procedure."""
    seeds = "seed" if r["n_seeds"] == 1 else "seeds"
    points = f"≈ {int(r['points_needed'])} points per seed at {r['n_seeds']} {seeds} ({MODELS})"
    n = r["seeds_needed"]
    procedure = (
        "at least 2 seeds to estimate their spread"
        if math.isnan(n)
        else f"≈ {int(n)} seeds at {r['n_points']} points"
    )
    return f"{points}; {procedure} ({PROCEDURE})"


def comparison_text(r: dict[str, Any], labels: dict[str, str]) -> str:
    """One paired comparison as a sentence: the verdict, its numbers, the question it answers,
    the other question's answer, and what it rests on."""
    if r["low"] != r["low"]:  # no interval: the procedure with one seed
        difference = f"difference {_pct(r['diff'])}, no interval"
    else:
        difference = f"difference {_interval(r['diff'], r['low'], r['high'])}"
    text = (
        f"{labels.get(r['a'], r['a'])} vs {labels.get(r['b'], r['b'])} ({r['dataset']}): **{r['verdict']}**"
        + (f" (provisional: no {sides_text(r, labels, 'lacks')})" if r["provisional"] else "")
        + (f" (missing: {sides_text(r, labels, 'missing')})" if r["verdict"] == "incomplete" else "")
        + f"; robust accuracy {r['robust_a']:.1%} vs {r['robust_b']:.1%} under the worst case over"
        f" {r['attacks']} (L-inf eps {eps_text(r['eps'])}; {r['n_points']} points x {r['n_seeds']} seed(s)),"
        f" {difference} for {question_text(r)}; p = {r['p_value']:.3g}, Holm {r['p_holm']:.3g};"
        f" {other_question_text(r)}"
    )
    if r["verdict"] == "undecided":
        text += f"; to decide at the margin: {resolve_text(r)}"
    return text


def failed_checks(diagnostics: pl.DataFrame) -> dict[str, str]:
    """vkey -> its failed diagnostics, named (suite_vs_autoattack with its component), for the
    flags shown beside a verdict."""
    out: dict[str, list[str]] = {}
    for d in diagnostics.filter(pl.col("n_pass") < pl.col("n")).iter_rows(named=True):
        name = d["diagnostic"]
        details = json.loads(d["details"] or "{}")
        if details.get("responsible"):
            name += f" ({details['responsible']})"
        out.setdefault(d["vkey"], []).append(name)
    return {k: ", ".join(sorted(set(v))) for k, v in out.items()}


def flags_text(r: dict[str, Any], labels: dict[str, str], checks: dict[str, str]) -> str:
    """The failed diagnostics (`failed_checks`) of a comparison's two models ('' when none)."""
    return "; ".join(f"{labels.get(k, k)}: {checks[k]}" for k in (r["a"], r["b"]) if k in checks)


def interval_verdicts(
    paired: pl.DataFrame,
    variants: pl.DataFrame,
    failed: pl.DataFrame,
    skipped: pl.DataFrame,
    diagnostics: pl.DataFrame,
    kind: str = VS_CNN,
) -> pl.DataFrame:
    """One verdict per hybrid variant (and L-inf budget) against its dataset's CNN baseline
    (`kind` VS_CNN), or per comparison the sweep's `compare:` names (VS_NAMED),
    from the paired interval of worst-case robust accuracy (paired.py), never from a point
    estimate; what failed or was skipped is said, since the verdict does not cover it, and so
    are the failed diagnostics of either model (`flags`)."""
    labels = dict(zip(variants["vkey"], variants["label"]))
    n_failed_by = dict(failed.group_by("vkey").len().iter_rows())
    n_skipped_by = dict(skipped.filter(pl.col("stage") == "attack").group_by("vkey").len().iter_rows())
    checks = failed_checks(diagnostics)
    by_hybrid = {}
    for r in paired.filter(pl.col("kind") == kind).iter_rows(named=True):
        by_hybrid.setdefault(r["a"], []).append(r)
    rows: list[dict[str, Any]] = []
    judged = (
        pl.col("vkey").is_in(list(by_hybrid))
        if kind == VS_NAMED
        else (pl.col("model") == HYBRID) & uncontrolled()
    )
    for v in variants.filter(judged).iter_rows(named=True):
        head = {"dataset": v["dataset"], "vkey": v["vkey"], "label": v["label"]}
        found = by_hybrid.get(v["vkey"], [])
        if not found:
            text = (
                f"{v['label']} ({v['dataset']}): no L-inf attack in common with a CNN baseline: no verdict."
            )
            rows.append({**head, "category": "no comparison", "verdict": text})
        for r in found:
            text = comparison_text(r, labels)
            n_failed, n_skipped = n_failed_by.get(v["vkey"], 0), n_skipped_by.get(v["vkey"], 0)
            not_covered = None
            if n_failed or n_skipped:
                not_covered = f"{n_failed} failed trial(s), {n_skipped} attack row(s) skipped for NaN metrics"
                text += f"; not covered: {not_covered}"
            flags = flags_text(r, labels, checks)
            if flags:
                text += f"; failed diagnostics: {flags}"
            rows.append(
                {
                    **head,
                    "baseline": labels.get(r["b"], r["b"]),
                    "vkey_b": r["b"],
                    "eps": r["eps"],
                    "category": r["verdict"],
                    "provisional": r["provisional"],
                    "lacks": sides_text(r, labels, "lacks") or None,
                    "missing": sides_text(r, labels, "missing") or None,
                    "flags": flags or None,
                    "diff": r["diff"],
                    "low": r["low"],
                    "high": r["high"],
                    "verdict": text,
                    "not_covered": not_covered,
                }
            )
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
        pl.when(pl.col("time_ratio").is_null())
        .then(pl.lit(None, pl.String))
        .when(pl.col("vkey") == pl.col("baseline_vkey"))
        .then(pl.lit("(baseline)"))
        .when(_more_calls(calls, per_call, ties_to_calls=True))
        .then(pl.lit(CALLS))
        .otherwise(pl.lit(PER_CALL))
        .alias("cost_driver"),
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
        pl.when((calls == 0) & (per_call == 0))
        .then(pl.lit(_SAME_COST))
        .when(_more_calls(calls, per_call, ties_to_calls=False))
        .then(pl.lit(CALLS))
        .otherwise(pl.lit(PER_CALL))
    )
    return (
        pl.DataFrame(sums, schema={"vkey": pl.String, "calls": pl.Float64, "per_call": pl.Float64})
        .with_columns(driver.alias("cost_driver"))
        .with_columns(verdict=pl.col("cost_driver").replace_strict(_COST_TEXT, return_dtype=pl.String))
    )


# ---------------------------------------------------------------- controls: where the gain comes from
def budget_train_config(hybrid: dict[str, Any]) -> str | None:
    """The train_config of a hybrid's equal-budget backbone (with train_method, its key beside
    the model): a hybrid from scratch had its backbone's budget, so its backbone trained its own
    way (the same settings); one from its baseline, the backbone trained for both runs
    (grid.equal_budget_train). paired.py and `controls` find the control by it."""
    if hybrid["init"] == "scratch":
        return hybrid["train_config"]
    return equal_budget_train_config(hybrid["train_config"])


_CONTROL_COLUMNS = [
    "dataset",
    "attack_label",
    "vkey_h",
    "asr_hybrid",
    "asr_backbone_only",
    "asr_equal_budget",
    "asr_baseline",
    "gain_backbone",
    "gain_quantum",
    "n_seeds",
    "n_attacked",
]


def controls(rob: pl.DataFrame, baselines: dict[str, str]) -> pl.DataFrame:
    """Per attack, what was measured: the hybrid, its own backbone alone (control backbone_only:
    same checkpoint, branch removed), its backbone trained with its whole budget (equal_budget)
    and the CNN baseline, same attack (ASR); the gain over the baseline splits into a backbone
    part (baseline -> backbone alone) and a quantum part (backbone alone -> hybrid). These are
    point estimates, shown as such: where the gain comes from is judged by `gain_sources`."""
    hyb = rob.filter((pl.col("model") == HYBRID) & uncontrolled())
    ctrl = rob.filter(pl.col("control") == BACKBONE_ONLY)
    eq = rob.filter(pl.col("control") == EQUAL_BUDGET)
    scratch = hyb.filter(pl.col("init") == "scratch").height
    if not hyb.height or not (ctrl.height or eq.height or scratch):
        kind = {"asr": pl.Float64, "gai": pl.Float64, "n_s": pl.UInt32, "n_a": pl.Int64}
        schema = {c: kind.get(c[:3], pl.String) for c in _CONTROL_COLUMNS}
        return pl.DataFrame(schema=schema)
    # The backbone-alone row keeps its hybrid's variant columns; only `control` differs, so
    # the two meet on the other variant columns (null meeting null, as in the string vkey).
    same_variant = [k for k in VARIANT_KEYS if k != "control"]
    ctrl = ctrl.select(*same_variant, "attack_label", pl.col("asr_mean").alias("asr_backbone_only"))
    # A hybrid from its baseline: the backbone trained alone for both runs (control equal_budget);
    # a hybrid from scratch got its backbone's budget: the backbone trained alone (no control).
    alone = rob.filter(uncontrolled() & (pl.col("model") != HYBRID)).with_columns(init=pl.lit("scratch"))
    eq = (
        pl.concat([eq.with_columns(init=pl.lit("from_baseline")), alone], how="diagonal_relaxed")
        .select(
            "dataset",
            "init",
            pl.col("model").alias("backbone"),
            "train_method",
            pl.col("train_config").alias("budget_config"),
            "attack_label",
            pl.col("asr_mean").alias("asr_equal_budget"),
        )
        .unique(["dataset", "init", "backbone", "train_method", "budget_config", "attack_label"])
    )
    budget_config = [budget_train_config(r) for r in hyb.select("init", "train_config").iter_rows(named=True)]
    hyb = hyb.with_columns(pl.Series("budget_config", budget_config, pl.String))
    base = baseline_rows(rob, baselines).select(
        "dataset", "attack_label", pl.col("asr_mean").alias("asr_baseline")
    )
    out = (
        hyb.select(
            *same_variant,
            "vkey",
            "budget_config",
            "attack_label",
            "attack_rank",
            "n_seeds",
            "n_attacked",
            asr_hybrid=pl.col("asr_mean"),
        )
        .join(ctrl, on=[*same_variant, "attack_label"], how="left", nulls_equal=True)
        .join(
            eq,
            on=["dataset", "init", "backbone", "train_method", "budget_config", "attack_label"],
            how="left",
            nulls_equal=True,
        )
        .join(base, on=["dataset", "attack_label"], how="left")
        .filter(pl.col("asr_backbone_only").is_not_null() | pl.col("asr_equal_budget").is_not_null())
        .with_columns(
            (pl.col("asr_baseline") - pl.col("asr_backbone_only")).alias("gain_backbone"),
            (pl.col("asr_backbone_only") - pl.col("asr_hybrid")).alias("gain_quantum"),
        )
        .sort("dataset", "vkey", "attack_rank")
        .rename({"vkey": "vkey_h"})
    )
    return out.select(_CONTROL_COLUMNS)


def gain_source(quantum: dict[str, Any] | None, backbone: dict[str, Any] | None, margin: float) -> str:
    """Where a hybrid's robustness gain over the CNN comes from, from two paired comparisons:
    the quantum part (hybrid vs its backbone alone; it includes the fusion head) and the
    backbone part (backbone alone vs the CNN). A part is a gain when its verdict is 'more
    robust', and no gain when its whole interval lies below +margin; anything else is open."""
    if quantum is None:
        return "no backbone-alone run"

    def part(r: dict[str, Any] | None) -> str:
        if r is None:
            return "none"
        if r["verdict"] == "incomplete":
            return "open"
        return "gain" if r["verdict"] == "more robust" else ("none" if r["high"] <= margin else "open")

    q, b = part(quantum), part(backbone)
    if q == "gain" and b == "gain":
        return "both"
    if q == "gain" and b == "none":
        return "quantum branch"
    if b == "gain" and q == "none":
        return "backbone"
    if q == "none" and b == "none":
        return "no gain"
    return "undecided"


_GAIN_TEXT = {
    "both": "the gain comes from both the quantum branch and the backbone",
    "quantum branch": "the gain comes mainly from the quantum branch (with its fusion head)",
    "backbone": "the gain comes mainly from the backbone, not from the quantum branch",
    "no gain": "neither the quantum branch nor the backbone is a gain",
    "undecided": "where the gain comes from is undecided",
    "no backbone-alone run": "where the gain comes from cannot be said: there is no backbone-alone run",
}


def gain_text(g: dict[str, Any]) -> str:
    """A row of `gain_sources` as a sentence: where the gain comes from, then each part's verdict."""
    parts = [
        f"{name}: {g[key]}"
        for name, key in (
            ("quantum part", "quantum"),
            ("backbone part", "backbone"),
            ("against the equal-budget backbone", "equal_budget"),
        )
        if g[key]
    ]
    return _GAIN_TEXT[g["source"]] + (f" ({'; '.join(parts)})" if parts else "") + "."


def gain_sources(paired: pl.DataFrame, margin: float) -> pl.DataFrame:
    """Per hybrid and budget: the quantum part, the backbone part and the equal-budget
    comparison, each as its paired verdict, and where the gain comes from (gain_source)."""
    parts: dict[tuple[str, float], dict[str, Any]] = {}
    for r in paired.iter_rows(named=True):
        # a hybrid from scratch whose backbone is the CNN: its "vs CNN" is its equal-budget comparison
        part = (
            "equal_budget"
            if r["equal_budget"]
            else {VS_BACKBONE_ALONE: "quantum", BACKBONE_ALONE_VS_CNN: "backbone"}.get(r["kind"])
        )
        if part:
            parts.setdefault((r["hybrid"], r["eps"]), {"vkey_h": r["hybrid"], "eps": r["eps"]})[part] = r
    rows = []
    for p in parts.values():
        q, b, e = p.get("quantum"), p.get("backbone"), p.get("equal_budget")
        rows.append(
            {
                "vkey_h": p["vkey_h"],
                "eps": p["eps"],
                "quantum": q["verdict"] if q else None,
                "backbone": b["verdict"] if b else None,
                "equal_budget": e["verdict"] if e else None,
                "source": gain_source(q, b, margin),
            }
        )
    schema = {
        "vkey_h": pl.String,
        "eps": pl.Float64,
        "quantum": pl.String,
        "backbone": pl.String,
        "equal_budget": pl.String,
        "source": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)
