"""The summary tables, as long-form Polars frames: what was measured, aggregated over seeds.
Judgements on them (baselines, verdicts, cost drivers, controls) are verdicts.py's;
formatting is render.py's and sections.py's.

Conventions, stated once:
- A cell aggregates the rows of one (model variant, attack setting) over seeds: mean and
  SAMPLE standard deviation (ddof=1; null with one seed), the number of distinct seeds and
  the number of attacked samples summed over seeds.
- Costs are pooled over seeds: total attack seconds / total attacked samples (a seed
  with more samples weighs more, as it should for a per-sample time).
- The CNN baseline of a dataset is model 'cnn', else 'cnn_small', trained the standard way
  (verdicts.pick_baselines, which says so in the notes).
- Rows with fewer than `min_samples` attacked samples are kept in the means and flagged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from qshield_dist.attack_params import ATTACKS
from qshield_dist.config import ConfigError, SweepConfig, validate
from qshield_dist.grid import named_comparisons
from qshield_dist.summary.load import ATTACK_KEYS, SKIPPED_SETTING, VARIANT_KEYS, Results, collect
from qshield_dist.summary.paired import (
    AUTOATTACKS,
    autoattack_gaps,
    comparisons,
    expected_shards,
    load_points,
    worst_case_table,
)
from qshield_dist.summary.stats import MODELS
from qshield_dist.summary.verdicts import (
    HYBRID,
    baseline_rows,
    controls,
    cost_drivers,
    interval_verdicts,
    pick_baselines,
)
from qshield_dist.vocabulary import EQUAL_BUDGET, STANDARD, VS_CNN, VS_NAMED

# Shown in a variant's label when they vary across the sweep's hybrid variants.
_LABEL_FORMAT: dict[str, str] = {
    "entanglement": "{}",
    "depth": "d{}",
    "encoding": "{}",
    "noise_model": "{}",
    "noise_strength": "p={:g}",
    "fusion": "{}",
    "quantum_grad": "grad={}",
    "projection": "proj={}",
    "init": "init={}",
    "simulator": "{}",
    "device": "{}",
    "trajectories": "traj={}",
    "qubits": "q={}",
    "input_noise": "input_noise={:g}",
}
# Columns in registry order: the paper's eight attacks, then the adaptive ones.
_ATTACK_ORDER = {name: i for i, name in enumerate(ATTACKS)}


@dataclass
class Tables:
    """Everything the report shows; each frame documented where it is built."""

    variants: pl.DataFrame
    attacks: pl.DataFrame
    clean: pl.DataFrame
    robustness: pl.DataFrame
    cost: pl.DataFrame
    verdicts: pl.DataFrame  # one per hybrid variant and budget, from its paired comparison with the CNN
    paired: pl.DataFrame  # every paired comparison (paired.comparisons)
    worst_case: pl.DataFrame  # robust accuracy per L-inf attack and over all of them, per point
    controls: pl.DataFrame
    diagnostics: pl.DataFrame  # the diagnostic rows, and suite_vs_autoattack from `autoattack`
    autoattack: pl.DataFrame  # per variant and budget: AutoAttack against the rest of its suite
    failed: pl.DataFrame
    missing: pl.DataFrame
    low_samples: pl.DataFrame
    skipped: pl.DataFrame
    duplicates: pl.DataFrame
    budget: pl.DataFrame
    baselines: dict[str, str]  # dataset -> the vkey of its CNN baseline
    verdict_kind: str  # the paired comparisons the verdicts are: VS_CNN, or VS_NAMED (the sweep's compare:)
    min_samples: int
    margin: float  # the +- band within which two variants count as equal
    estimand: str  # the question the verdicts answer: stats.MODELS or stats.PROCEDURE
    # (a, b, eps) of each paired comparison -> per seed, both sides' 0/1 robust outcomes on their
    # common points in permutation order (what a sequential look reads)
    outcomes: dict[tuple[str, str, float], list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # verdicts (comparison x budget) with no paired points: no row, in Holm's family as not rejected
    unpaired: int = 0


def _vkey() -> pl.Expr:
    """One string per model variant: joins and lookups on one column, not on 16 nullable keys."""
    parts = [pl.col(k).cast(pl.String).fill_null("-") for k in VARIANT_KEYS]
    return pl.concat_str(parts, separator="|").alias("vkey")


def variant_table(*frames: pl.DataFrame) -> pl.DataFrame:
    """vkey -> variant columns, a short `label` and `family` (hqcnn* models are 'hybrid').

    The label names only the settings that vary between the hybrid variants present, so
    plots and tables stay readable; the full settings remain in the CSV.
    """
    if not any(f.height for f in frames):
        return pl.DataFrame(schema={"vkey": pl.String, "label": pl.String, "family": pl.String})
    present = [f.select(VARIANT_KEYS).unique() for f in frames if f.height]
    keys = pl.concat(present, how="vertical_relaxed").unique()
    hybrid = keys.filter(pl.col("entanglement").is_not_null())
    varying = [
        c for c in _LABEL_FORMAT if c == "entanglement" or (hybrid.height and hybrid[c].n_unique() > 1)
    ]
    labels = []
    for row in keys.iter_rows(named=True):
        if row["entanglement"] is None:
            label = row["model"]
        else:
            parts = [_LABEL_FORMAT[c].format(row[c]) for c in varying if row[c] is not None]
            label = f"{row['model']}[{row['backbone']}] " + " ".join(parts)
        if row["train_method"] not in (None, STANDARD):
            label += f" [{row['train_method']}]"
        labels.append(label + (f" [{row['control']}]" if row["control"] else ""))
    return (
        keys.with_columns(_vkey(), pl.Series("label", labels, pl.String))
        .with_columns(
            pl.when(pl.col("control").is_not_null())
            .then(pl.lit("control"))
            .when(pl.col("model") == HYBRID)
            .then(pl.lit("hybrid"))
            .otherwise(pl.lit("classical"))
            .alias("family")
        )
        .sort("dataset", "family", "label")
    )


def attack_settings(attack: pl.DataFrame) -> pl.DataFrame:
    """(dataset, attack, preset, params) -> `attack_label`, in the registry's order.

    `attack` is the per-cell aggregation (success_rule a list per row), a few hundred rows
    instead of a million.

    The label is the attack name, `[preset]` when not the paper's, and `#i` when one
    dataset ran the same attack and preset with several parameter sets.
    """
    settings = (
        attack.group_by(["dataset", *ATTACK_KEYS])
        .agg(
            pl.col("threat_model").first(),
            pl.col("eps").first(),
            pl.col("success_rule").explode().unique().sort().str.join(" / "),
            pl.col("eval_repeats").max(),
        )
        .with_columns(
            order=pl.col("attack").replace_strict(
                _ATTACK_ORDER, default=len(_ATTACK_ORDER), return_dtype=pl.Int64
            )
        )
        .sort("dataset", "order", "attack", "attack_preset", "attack_params")
    )
    labels = []
    seen: dict[tuple[str, str, str], int] = {}
    counts = settings.group_by("dataset", "attack", "attack_preset").len()
    many = {(d, a, p) for d, a, p, n in counts.iter_rows() if n > 1}
    for d, a, p in settings.select("dataset", "attack", "attack_preset").iter_rows():
        label = a if p == "paper" else f"{a}[{p}]"
        if (d, a, p) in many:
            seen[(d, a, p)] = seen.get((d, a, p), 0) + 1
            label += f"#{seen[(d, a, p)]}"
        labels.append(label)
    return settings.with_columns(pl.Series("attack_label", labels, pl.String)).with_row_index("attack_rank")


_SUMMED = (
    "n_points",
    "n_attacked",
    "n_success",
    "attack_seconds",
    "forward_calls",
    "backward_calls",
    "forward_samples",
    "backward_samples",
)


def _per_seed(a: pl.LazyFrame) -> pl.LazyFrame:
    """One row per (variant, attack setting, seed): its shards' rows joined. Counts and costs
    add up; ASR and robust accuracy are the shards' means weighted by their points (the seed's
    over all its points); `asr_worst` (the worst single evaluation) is the attacked-weighted mean
    of the shards' worst, an upper bound of the seed's when it has several shards.
    `duplicates`: rows beyond one per shard."""
    return a.group_by([*VARIANT_KEYS, *ATTACK_KEYS, "seed"]).agg(
        pl.col("threat_model").first(),
        pl.col("eps").first(),
        pl.col("success_rule").unique(),
        pl.col("eval_repeats").max(),
        pl.col("stochastic").any(),
        pl.col("variant").first(),
        *(pl.col(c).sum() for c in _SUMMED),
        # weighted by each shard's points: the seed's ASR and robust accuracy over all of them
        # (one shard: its own value, to the last bit)
        *(
            pl.when(pl.len() == 1)
            .then(pl.col(c).first())
            .otherwise((pl.col(c).fill_nan(0.0) * pl.col(w)).sum() / pl.col(w).sum())
            .alias(c)
            for c, w in (("asr", "n_attacked"), ("asr_worst", "n_attacked"), ("robust_acc", "n_points"))
        ),
        trial_id=pl.col("trial_id").sort().str.join(", "),  # its shards' trials
        n_shards=pl.col("shard").n_unique(),
        duplicates=pl.len() - pl.col("shard").n_unique(),
    )


def _attack_queries(res: Results, min_samples: int) -> dict[str, pl.LazyFrame]:
    """Everything tables need from the (many) attack rows, as lazy queries on the scan:
    aggregating inside the scan is ~3x faster than materializing a million rows first. A seed's
    shards are joined first (_per_seed): a cell's spread is over seeds, never over shards."""
    a = res.attack
    seeds = _per_seed(a)
    return {
        # seeds in order: a spread's last bits do not depend on the order the files were read
        "cells": seeds.sort("seed")
        .group_by([*VARIANT_KEYS, *ATTACK_KEYS])
        .agg(
            threat_model=pl.col("threat_model").first(),
            eps=pl.col("eps").first(),
            success_rule=pl.col("success_rule").list.explode(keep_nulls=False, empty_as_null=False).unique(),
            eval_repeats=pl.col("eval_repeats").max(),
            n_rows=(pl.col("n_shards") + pl.col("duplicates")).sum(),  # attack rows
            n_seeds=pl.col("seed").n_unique(),
            n_shards=pl.col("n_shards").sum(),
            n_attacked=pl.col("n_attacked").sum(),
            n_attacked_min=pl.col("n_attacked").min(),
            n_success=pl.col("n_success").sum(),
            # ASR over the seeds that attacked any point (a seed whose every point was wrong clean
            # has none: it adds nothing, never a NaN); null when no seed attacked a point
            asr_mean=pl.col("asr").filter(pl.col("n_attacked") > 0).mean(),
            asr_std=pl.col("asr").filter(pl.col("n_attacked") > 0).std(ddof=1),
            asr_worst_mean=pl.col("asr_worst").filter(pl.col("n_attacked") > 0).mean(),
            n_seeds_asr=(pl.col("n_attacked") > 0).sum().cast(pl.UInt32),
            robust_mean=pl.col("robust_acc").mean(),
            robust_std=pl.col("robust_acc").std(ddof=1),
            n_low=(pl.col("n_attacked") < min_samples).sum(),
            stochastic=pl.col("stochastic").any(),
            attack_seconds=pl.col("attack_seconds").sum(),
            forward_calls=pl.col("forward_calls").sum(),
            backward_calls=pl.col("backward_calls").sum(),
            forward_samples=pl.col("forward_samples").sum(),
            backward_samples=pl.col("backward_samples").sum(),
        ),
        # AutoAttack's own sanity checks, one set per AutoAttack row (few rows).
        "autoattack_checks": a.filter(pl.col("attack").is_in(AUTOATTACKS)).select(
            *VARIANT_KEYS, "seed", "attack", "stochastic", "details"
        ),
        # Thin seeds (all their shards together) and budget violations (per shard): few rows,
        # listed one by one.
        "low": seeds.filter(pl.col("n_attacked") < min_samples).select(
            "dataset", "variant", "attack", "attack_preset", "seed", "n_attacked", "trial_id"
        ),
        "budget": a.filter(pl.col("budget_ok") == False).select(  # noqa: E712
            "dataset", "variant", "attack", "seed", "trial_id"
        ),
        # Equal-budget baselines are trained as plain backbones (model 'cnn_small', more
        # epochs); their attack rows carry control 'equal_budget', linked by train_id.
        "equal_budget": a.filter(pl.col("control") == EQUAL_BUDGET)
        .select(pl.col("train_id").alias("trial_id"), pl.col("control").alias("_control"))
        .unique("trial_id"),
        # Clean accuracy on the shared attack set, per seed: each shard's clean evaluation of its
        # own points (every attack of a model finds the same one), weighted by its points.
        "clean_on_attack_set": a.group_by([*VARIANT_KEYS, "seed", "shard"])
        .agg(pl.col("clean_acc").first(), pl.col("n_points").first())
        .group_by([*VARIANT_KEYS, "seed"])
        .agg(clean_acc=(pl.col("clean_acc") * pl.col("n_points")).sum() / pl.col("n_points").sum()),
        "ids": a.select("trial_id")
        if (res.root / "manifest.json").exists()
        else a.select("trial_id").head(0),
    }


def _train_rows(train: pl.DataFrame, equal_budget: pl.DataFrame) -> pl.DataFrame:
    """Train rows, with equal-budget baselines named as their attack rows name them."""
    if not equal_budget.height:
        return train
    return (
        train.join(equal_budget, on="trial_id", how="left")
        .with_columns(pl.coalesce("_control", "control").alias("control"))
        .drop("_control")
    )


def _clean(train: pl.DataFrame, attack_set: pl.DataFrame) -> pl.DataFrame:
    """Clean accuracy per variant over seeds, from train rows (each trained model's own clean
    evaluation, on data.test_size's subset of the test split), else, for a variant without
    them (a hybrid's backbone alone), on the shared attack set (the attack shards' own clean
    evaluations). `clean_attack_set`: the latter for every attacked variant, beside it."""
    agg = {
        "clean_mean": pl.col("clean_acc").mean(),
        "clean_std": pl.col("clean_acc").std(ddof=1),
        "clean_seeds": pl.col("seed").n_unique(),
    }
    from_train = (
        train.group_by(VARIANT_KEYS)
        .agg(**agg, train_seconds=pl.col("train_seconds").mean(), train_steps=pl.col("train_steps").mean())
        .with_columns(_vkey(), pl.lit("train rows").alias("clean_source"))
    )
    on_attack_set = (
        attack_set.group_by(VARIANT_KEYS)
        .agg(**agg)
        .with_columns(_vkey(), pl.lit("attack rows").alias("clean_source"))
    )
    fallback = on_attack_set.filter(~pl.col("vkey").is_in(from_train["vkey"].implode()))
    out = pl.concat([from_train, fallback], how="diagonal_relaxed").join(
        on_attack_set.select("vkey", pl.col("clean_mean").alias("clean_attack_set")), on="vkey", how="left"
    )
    return out.select(
        "vkey",
        "clean_mean",
        "clean_std",
        "clean_seeds",
        "clean_source",
        "clean_attack_set",
        "train_seconds",
        "train_steps",
    )


def _robustness(cells: pl.DataFrame, skipped: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One row per (variant, attack setting): ASR and robust accuracy over seeds, sums for
    costs; and the attack settings table derived from it, which also names the settings of
    set-aside rows (their per-point outcomes still count)."""
    agg = cells.with_columns(_vkey(), (pl.col("n_success") / pl.col("n_attacked")).alias("asr_pooled"))
    set_aside = skipped.filter(pl.col("stage") == "attack").select(
        "dataset", *ATTACK_KEYS, "threat_model", "eps", pl.concat_list("success_rule"), "eval_repeats"
    )
    settings = attack_settings(pl.concat([agg, set_aside], how="diagonal_relaxed"))
    rob = agg.drop("threat_model", "eps", "success_rule", "eval_repeats").join(
        settings.select("dataset", *ATTACK_KEYS, "attack_label", "attack_rank", "threat_model", "eps"),
        on=["dataset", *ATTACK_KEYS],
        how="left",
    )
    return rob, settings


def _cost(rob: pl.DataFrame, baselines: dict[str, str]) -> pl.DataFrame:
    """Per attacked sample: seconds and model calls; ratios to the baseline, decomposed.

    time ratio = calls ratio x time-per-call ratio exactly, since seconds per sample =
    calls per sample x seconds per call. More calls is what the defence asks of an attack
    (e.g. repeated evaluations of a stochastic model); a slower call is the simulator.
    """
    calls = pl.col("forward_calls") + pl.col("backward_calls")
    cost = rob.with_columns(
        (pl.col("attack_seconds") / pl.col("n_attacked")).alias("sec_per_sample"),
        (pl.col("forward_calls") / pl.col("n_attacked")).alias("fwd_calls_per_sample"),
        (pl.col("backward_calls") / pl.col("n_attacked")).alias("bwd_calls_per_sample"),
        (pl.col("forward_samples") / pl.col("n_attacked")).alias("fwd_evals_per_sample"),
        (pl.col("backward_samples") / pl.col("n_attacked")).alias("bwd_evals_per_sample"),
        (calls / pl.col("n_attacked")).alias("calls_per_sample"),
        pl.when(calls > 0).then(pl.col("attack_seconds") / calls).alias("sec_per_call"),
    )
    base = baseline_rows(cost, baselines).select(
        "dataset",
        "attack_label",
        pl.col("model").alias("baseline"),
        pl.col("vkey").alias("baseline_vkey"),
        pl.col("sec_per_sample").alias("_b_sps"),
        pl.col("calls_per_sample").alias("_b_cps"),
        pl.col("sec_per_call").alias("_b_spc"),
    )
    cost = cost.join(base, on=["dataset", "attack_label"], how="left").with_columns(
        (pl.col("sec_per_sample") / pl.col("_b_sps")).alias("time_ratio"),
        (pl.col("calls_per_sample") / pl.col("_b_cps")).alias("calls_ratio"),
        (pl.col("sec_per_call") / pl.col("_b_spc")).alias("per_call_ratio"),
    )
    log_time = pl.col("time_ratio").log()
    cost = cost.with_columns(
        # Share of log(time ratio) explained by the number of calls: 1 -> all defence, 0 -> all simulator.
        pl.when(log_time.abs() > 1e-12).then(pl.col("calls_ratio").log() / log_time).alias("calls_share"),
    )
    return cost_drivers(cost).drop("_b_sps", "_b_cps", "_b_spc", "baseline_vkey")


DIAGNOSTIC_SCHEMA = {
    "vkey": pl.String,
    "diagnostic": pl.String,
    "n": pl.UInt32,
    "n_pass": pl.UInt32,
    "value_mean": pl.Float64,
    "value_std": pl.Float64,
    "details": pl.String,
}


def _diagnostics(res: Results) -> pl.DataFrame:
    d = res.diagnostic
    if not d.height:
        return pl.DataFrame(schema=DIAGNOSTIC_SCHEMA)
    return (
        d.group_by([*VARIANT_KEYS, "diagnostic"])
        .agg(
            n=pl.len(),
            n_pass=pl.col("diagnostic_pass").fill_null(False).sum().cast(pl.UInt32),
            value_mean=pl.col("diagnostic_value").mean(),
            value_std=pl.col("diagnostic_value").std(ddof=1),
            details=pl.col("details").drop_nulls().first(),
        )
        .with_columns(_vkey())
        .select("vkey", "diagnostic", "n", "n_pass", "value_mean", "value_std", "details")
    )


def _gap_diagnostics(gaps: pl.DataFrame) -> pl.DataFrame:
    """suite_vs_autoattack as rows of the diagnostics table (its seeds pooled: all pass or none)."""
    rows = [
        {
            "vkey": g["vkey"],
            "diagnostic": "suite_vs_autoattack",
            "n": g["n_seeds"],
            "n_pass": g["n_seeds"] if g["passed"] else 0,
            "value_mean": g["diff"],
            "value_std": None,
            "details": json.dumps(
                {
                    "rule": "AutoAttack must not break more points than the rest of the suite by more than"
                    " 2 standard errors (paired on the shared points)",
                    "eps": g["eps"],
                    "points": g["n_points"],
                    "autoattack_only": g["autoattack_only"],
                    "rest_only": g["rest_only"],
                    "se": g["se"],
                    "responsible": g["responsible"],
                    "beyond_rest_by_component": g["components"],
                }
            ),
        }
        for g in gaps.iter_rows(named=True)
    ]
    return pl.DataFrame(rows, schema=DIAGNOSTIC_SCHEMA)


def _sanity_diagnostics(rows: pl.DataFrame) -> pl.DataFrame:
    """AutoAttack's sanity checks (attacks/autoattack.sanity_checks) as `autoattack_sanity` rows
    of the diagnostics table: a softmax output, autograd calls in the forward pass, or an output
    that moves between passes of a model the sweep calls deterministic (so AutoAttack ran its
    'standard' version where 'rand' was needed) each fail it."""
    by_vkey: dict[str, list[set[str]]] = {}
    for r in rows.with_columns(_vkey()).iter_rows(named=True):
        checks = json.loads(r["details"] or "{}").get("autoattack_checks") or {}
        tripped = {k for k in ("probability_output", "dynamic") if checks.get(k)}
        if checks.get("randomized") and not r["stochastic"]:
            tripped.add("randomized but evaluated as deterministic")
        by_vkey.setdefault(r["vkey"], []).append(tripped)
    out = [
        {
            "vkey": vkey,
            "diagnostic": "autoattack_sanity",
            "n": len(runs),
            "n_pass": sum(not t for t in runs),
            "value_mean": None,
            "value_std": None,
            "details": json.dumps(
                {
                    "rule": "AutoAttack's checks: no softmax output, no autograd calls at inference, and no"
                    " randomness in a model evaluated as deterministic",
                    "responsible": ", ".join(sorted(set().union(*runs))) or None,
                }
            ),
        }
        for vkey, runs in by_vkey.items()
    ]
    return pl.DataFrame(out, schema=DIAGNOSTIC_SCHEMA)


def _missing(res: Results, ids: pl.DataFrame, notes: list[str]) -> pl.DataFrame:
    """Trials the manifest's grid expects (key `expected_trials`) with no result file."""
    schema = {"trial_id": pl.String, "stage": pl.String, "dataset": pl.String}
    manifest, expected = res.manifest, res.expected
    if manifest is None or expected is None:
        return pl.DataFrame(schema=schema)
    if manifest.get("sweep") not in (None, res.sweep):
        notes.append(
            f"manifest.json belongs to sweep '{manifest.get('sweep')}', not '{res.sweep}':"
            " grid completeness not checked"
        )
        return pl.DataFrame(schema=schema)
    # Anti-joins in Polars: a big sweep's manifest lists every trial (a million is plausible).
    present = pl.concat(
        [ids, *(df.select("trial_id") for df in (res.train, res.diagnostic, res.failed, res.skipped))]
    )
    extra = present.join(expected, on="trial_id", how="anti")["trial_id"].n_unique()
    if extra:
        notes.append(
            f"{extra} trial(s) have results but are not in the manifest's grid"
            " (an earlier grid of this sweep?)"
        )
    return expected.join(present, on="trial_id", how="anti").sort("stage", "dataset", "trial_id")


def named_pairs(res: Results, train: pl.DataFrame, notes: list[str]) -> list[tuple[str, str]] | None:
    """The sweep's `compare:` as (vkey_a, vkey_b); None without one. The launcher records it in
    the manifest resolved to variant ids (`comparisons`), which map to variants through the train
    rows; a manifest from before that is resolved here from its spec, by the grid's rule."""
    manifest = res.manifest or {}
    spec = manifest.get("spec")
    if not spec or not spec.get("compare"):
        return None
    pairs = [tuple(c) for c in manifest.get("comparisons") or []]
    if not pairs:
        try:
            pairs = named_comparisons(validate(SweepConfig(**spec)))
        except (ConfigError, ValueError) as exc:
            notes.append(
                f"the manifest's compare: could not be read ({exc}): each hybrid is compared with the CNN"
            )
            return None
    vkeys = dict(train.with_columns(_vkey()).select("variant_id", "vkey").unique("variant_id").iter_rows())
    found = [(vkeys[a], vkeys[b]) for _, a, b in pairs if a in vkeys and b in vkeys]
    if len(found) < len(pairs):
        notes.append(
            f"{len(pairs) - len(found)} of the {len(pairs)} comparisons compare: names lack a train row"
        )
    return found


def build_tables(res: Results, min_samples: int = 20, margin: float = 0.02, estimand: str = MODELS) -> Tables:
    """All tables of the report from the loaded results."""
    notes: list[str] = []
    names, queries = zip(*_attack_queries(res, min_samples).items())
    got = dict(zip(names, collect(list(queries), res.attack_files)))
    train = _train_rows(res.train, got["equal_budget"])
    rob, settings = _robustness(got["cells"], res.skipped)
    # Variant keys from the aggregated attack cells (small), train and diagnostic rows.
    variants = variant_table(train, rob, res.diagnostic)
    clean = _clean(train, got["clean_on_attack_set"])
    baselines, baseline_notes = pick_baselines(variants)
    notes += baseline_notes
    failed = res.failed.with_columns(
        _vkey(), pl.col("error").fill_null("").str.split("\n").list.first().alias("error_line")
    )
    skipped = res.skipped.with_columns(_vkey())
    low, budget = got["low"], got["budget"]
    dup = rob.filter(pl.col("n_rows") > pl.col("n_shards"))
    dup = dup.select("dataset", "vkey", "attack_label", "n_rows", "n_shards")
    if dup.height:
        notes.append(
            f"{dup.height} cell(s) have several rows for one shard of a seed:"
            " the variant key may miss a distinguishing setting (listed below)"
        )
    missing = _missing(res, got["ids"], notes)
    notes = res.notes + notes
    points = load_points(res, settings, _vkey())
    named = named_pairs(res, train, notes)
    verdict_kind = VS_CNN if named is None else VS_NAMED
    outcomes: dict[tuple[str, str, float], list[tuple[np.ndarray, np.ndarray]]] = {}
    without: list[str] = []
    paired = comparisons(
        points,
        variants,
        baselines,
        margin,
        estimand=estimand,
        named=named,
        expected=expected_shards(res),
        outcomes=outcomes,
        unpaired=without,
    )
    unpaired = sum(kind == verdict_kind for kind in without)
    if unpaired:
        notes.append(
            f"{unpaired} verdict(s) have no paired points (a side without L-inf rows at a budget the other"
            " reached): no row, but counted in Holm's family as not rejected"
        )
    gaps = autoattack_gaps(points)
    checks = _sanity_diagnostics(got["autoattack_checks"])
    diagnostics = pl.concat([_diagnostics(res), _gap_diagnostics(gaps), checks])
    return Tables(
        variants=variants,
        attacks=settings,
        clean=clean,
        robustness=rob,
        cost=_cost(rob, baselines),
        verdicts=interval_verdicts(paired, variants, failed, skipped, diagnostics, verdict_kind),
        paired=paired,
        worst_case=worst_case_table(points),
        controls=controls(rob, baselines),
        diagnostics=diagnostics,
        autoattack=gaps,
        failed=failed,
        missing=missing,
        low_samples=low,
        skipped=skipped.drop("vkey", *[k for k in VARIANT_KEYS if k != "dataset"], *SKIPPED_SETTING),
        duplicates=dup,
        budget=budget,
        baselines=baselines,
        verdict_kind=verdict_kind,
        min_samples=min_samples,
        margin=margin,
        estimand=estimand,
        outcomes=outcomes,
        unpaired=unpaired,
        notes=notes,
    )
