"""Verdicts from paired statistics on the shared attack set.

Every model of a dataset and seed answers on the same test points (data.shared_attack_set),
so two models can be compared point by point:

- A point is robust under a threat model when the model classifies it correctly clean and no
  attack of that threat model and budget broke it (the worst case over attacks, per point, as
  RobustBench and AutoAttack report). For a stochastic model "broke it" is the trial's rule:
  misclassified in a strict majority of one attack's evaluations; a minority of draws under
  several attacks never adds up to a break. Only L-inf attacks at one eps form such an
  ensemble; minimum-norm attacks (C&W, DeepFool: L2) and One-Pixel (L0) are reported beside it.
- A comparison of two variants uses the attacks both of them got, and only their common seeds;
  each side adds the attacks through a differentiable twin (BPDA) that only it got: they exist
  for a model whose gradient is hidden (a detached quantum branch), where they are the adaptive
  form of the plain attacks, which the other model already takes on its true gradient. Leaving
  them out would compare a masked model's weakest attacks with the other's strongest. The
  statistics are stats.py's (paired bootstrap, McNemar, Holm over the report).
- The verdict comes from the interval (stats.verdict) and is provisional unless at least one
  of those attacks ran at full strength (attack_params: AttackDef.full_strength).
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from qshield_dist.attack_params import ATTACKS
from qshield_dist.summary import stats
from qshield_dist.summary.load import VARIANT_KEYS, Results, collect

POINT_COLUMNS = (
    *VARIANT_KEYS,
    "seed",
    "attack",
    "attack_preset",
    "attack_params",
    "threat_model",
    "eps",
    "stochastic",
    "point_index",
    "point_correct",
    "point_broken",
)
WORST_CASE = "linf"  # the threat model whose attacks form the per-point worst case
TWIN_ATTACKS = tuple(name for name, a in ATTACKS.items() if a.needs_twin)  # BPDA: hidden gradients only
# (kind, the hybrid's side, the other side) of every comparison the report makes
KINDS = ("vs CNN", "vs backbone alone", "vs equal-budget backbone", "backbone alone vs CNN")


def load_points(res: Results, settings: pl.DataFrame, vkey: pl.Expr) -> pl.DataFrame:
    """One row per (attack row, point): vkey, dataset, seed, attack_label, threat model, eps,
    whether the attack ran at full strength, the point, correct clean, broken."""
    files = res.attack_files
    if not files:
        return pl.DataFrame(schema={"vkey": pl.String, "point_index": pl.Int32})
    scan = pl.scan_parquet(files, hive_partitioning=False).select(
        *POINT_COLUMNS, "trial_id", "sweep", "status"
    )
    scan = scan.filter(res.selected & (pl.col("status") == "ok"))
    if res.expected is not None:
        scan = scan.filter(pl.col("trial_id").is_in(res.expected["trial_id"].implode()))
    (rows,) = collect([scan.filter(pl.col("point_index").list.len() > 0)], files)
    if not rows.height:
        return pl.DataFrame(schema={"vkey": pl.String, "point_index": pl.Int32})
    rows = rows.join(
        settings.select("dataset", "attack", "attack_preset", "attack_params", "attack_label"),
        on=["dataset", "attack", "attack_preset", "attack_params"],
        how="left",
    )
    strong = [
        ATTACKS[a].full_strength(p, _params(js), bool(s)) if a in ATTACKS else False
        for a, p, js, s in rows.select("attack", "attack_preset", "attack_params", "stochastic").iter_rows()
    ]
    return (
        rows.with_columns(vkey, pl.Series("full_strength", strong, pl.Boolean))
        .select(
            "vkey",
            "dataset",
            "seed",
            "attack",
            "attack_label",
            "threat_model",
            "eps",
            "full_strength",
            "point_index",
            "point_correct",
            "point_broken",
        )
        .explode("point_index", "point_correct", "point_broken")
    )


def _params(text: str | None) -> dict[str, Any]:
    return json.loads(text or "{}")


def _twin_labels(points: pl.DataFrame) -> set[str]:
    return set(points.filter(pl.col("attack").is_in(TWIN_ATTACKS))["attack_label"])


def _robust(points: pl.DataFrame, attacks: set[str]) -> pl.DataFrame:
    """Per (seed, point): robust under every attack in `attacks` (the worst case)."""
    return (
        points.filter(pl.col("attack_label").is_in(sorted(attacks)))
        .group_by("seed", "point_index")
        .agg((pl.col("point_correct").all() & ~pl.col("point_broken").any()).alias("robust"))
    )


def _seed_pairs(a: pl.DataFrame, b: pl.DataFrame) -> list[tuple[list[int], list[int]]]:
    joined = a.join(b, on=["seed", "point_index"], suffix="_b").sort("seed", "point_index")
    return [
        (grp["robust"].cast(pl.Int8).to_list(), grp["robust_b"].cast(pl.Int8).to_list())
        for _, grp in joined.group_by("seed", maintain_order=True)
    ]


def _pairs_of(variants: pl.DataFrame, baselines: dict[str, str]) -> list[dict[str, Any]]:
    """Every comparison of the report: (kind, dataset, vkey_a, vkey_b, hybrid vkey)."""
    by = {
        (r["dataset"], r["model"], r["control"]): r
        for r in variants.iter_rows(named=True)
        if r["entanglement"] is None
    }
    same = [k for k in VARIANT_KEYS if k != "control"]
    out = []
    for h in variants.filter((pl.col("model") == "hqcnn") & pl.col("control").is_null()).iter_rows(
        named=True
    ):
        base = by.get((h["dataset"], baselines.get(h["dataset"]), None))
        alone = variants.filter(pl.col("control") == "backbone_only")
        alone = next((r for r in alone.iter_rows(named=True) if all(r[k] == h[k] for k in same)), None)
        budget = by.get((h["dataset"], h["backbone"], "equal_budget"))
        for kind, a, b in (
            ("vs CNN", h, base),
            ("vs backbone alone", h, alone),
            ("vs equal-budget backbone", h, budget),
            ("backbone alone vs CNN", alone, base),
        ):
            if a is not None and b is not None:
                out.append(
                    {
                        "kind": kind,
                        "dataset": h["dataset"],
                        "a": a["vkey"],
                        "b": b["vkey"],
                        "hybrid": h["vkey"],
                    }
                )
    return out


def comparisons(
    points: pl.DataFrame, variants: pl.DataFrame, baselines: dict[str, str], margin: float
) -> pl.DataFrame:
    """One row per comparison and L-inf budget: robust accuracies, the paired difference A - B
    with its 95% interval, McNemar's p (Holm-adjusted over the whole report), the verdict."""
    rows: list[dict[str, Any]] = []
    if points.height:
        linf = points.filter(pl.col("threat_model") == WORST_CASE)
        by_vkey = linf.partition_by("vkey", as_dict=True)
        for pair in _pairs_of(variants, baselines):
            a_all, b_all = by_vkey.get((pair["a"],)), by_vkey.get((pair["b"],))
            if a_all is None or b_all is None:
                continue
            for eps in sorted(set(a_all["eps"].drop_nulls()) & set(b_all["eps"].drop_nulls())):
                a, b = a_all.filter(pl.col("eps") == eps), b_all.filter(pl.col("eps") == eps)
                common = set(a["attack_label"]) & set(b["attack_label"])
                a_attacks, b_attacks = common | _twin_labels(a), common | _twin_labels(b)
                seeds = sorted(set(a["seed"]) & set(b["seed"]))
                a, b = a.filter(pl.col("seed").is_in(seeds)), b.filter(pl.col("seed").is_in(seeds))
                pairs = _seed_pairs(_robust(a, a_attacks), _robust(b, b_attacks)) if common and seeds else []
                if not pairs:
                    continue
                res = stats.compare(pairs)
                strong = sorted(
                    set(
                        a.filter(pl.col("full_strength") & pl.col("attack_label").is_in(a_attacks))[
                            "attack_label"
                        ]
                    )
                )
                attacks = ", ".join(sorted(common))
                if a_attacks - common:
                    attacks += f" (the first also {', '.join(sorted(a_attacks - common))})"
                if b_attacks - common:
                    attacks += f" (the second also {', '.join(sorted(b_attacks - common))})"
                rows.append(
                    {
                        **pair,
                        "eps": eps,
                        "attacks": attacks,
                        "full_strength": ", ".join(strong),
                        "n_points": res.n_points,
                        "n_seeds": res.n_seeds,
                        "robust_a": sum(sum(x) for x, _ in pairs) / sum(len(x) for x, _ in pairs),
                        "robust_b": sum(sum(y) for _, y in pairs) / sum(len(y) for _, y in pairs),
                        "diff": res.diff,
                        "low": res.low,
                        "high": res.high,
                        "per_seed": ", ".join(f"{d:+.1%}" for d in res.per_seed),
                        "a_only": res.a_only,
                        "b_only": res.b_only,
                        "p_value": res.p_value,
                        "points_needed": stats.points_to_resolve(pairs),
                    }
                )
    schema = {
        "kind": pl.String,
        "dataset": pl.String,
        "a": pl.String,
        "b": pl.String,
        "hybrid": pl.String,
        "eps": pl.Float64,
        "attacks": pl.String,
        "full_strength": pl.String,
        "n_points": pl.Int64,
        "n_seeds": pl.Int64,
        "robust_a": pl.Float64,
        "robust_b": pl.Float64,
        "diff": pl.Float64,
        "low": pl.Float64,
        "high": pl.Float64,
        "per_seed": pl.String,
        "a_only": pl.Int64,
        "b_only": pl.Int64,
        "p_value": pl.Float64,
        "points_needed": pl.Float64,
    }
    out = pl.DataFrame(rows, schema=schema)
    holm = stats.holm(out["p_value"].to_list())
    verdicts = [
        stats.verdict(r["low"], r["high"], p, margin) for r, p in zip(out.iter_rows(named=True), holm)
    ]
    return out.with_columns(
        pl.Series("p_holm", holm, pl.Float64),
        pl.Series("verdict", verdicts, pl.String),
        (pl.col("full_strength") == "").alias("provisional"),
    )


def worst_case_table(points: pl.DataFrame) -> pl.DataFrame:
    """Per variant and L-inf budget: robust accuracy under each attack and under all of them
    at once (per point), mean over seeds; n = points per seed."""
    schema = {
        "vkey": pl.String,
        "eps": pl.Float64,
        "attack_label": pl.String,
        "robust": pl.Float64,
        "n_points": pl.Int64,
        "n_seeds": pl.Int64,
    }
    if not points.height:
        return pl.DataFrame(schema=schema)
    linf = points.filter(pl.col("threat_model") == WORST_CASE)
    per_point = pl.col("point_correct") & ~pl.col("point_broken")
    each = linf.group_by("vkey", "eps", "attack_label", "seed").agg(
        per_point.mean().alias("r"), pl.len().alias("n")
    )
    worst = (
        linf.group_by("vkey", "eps", "seed", "point_index")
        .agg((pl.col("point_correct").all() & ~pl.col("point_broken").any()).alias("robust"))
        .group_by("vkey", "eps", "seed")
        .agg(pl.col("robust").mean().alias("r"), pl.len().alias("n"))
        .with_columns(pl.lit("worst case").alias("attack_label"))
    )
    both = pl.concat([each, worst.select(each.columns)])
    return (
        both.group_by("vkey", "eps", "attack_label")
        .agg(
            pl.col("r").mean().alias("robust"),
            pl.col("n").max().cast(pl.Int64).alias("n_points"),
            pl.col("seed").n_unique().cast(pl.Int64).alias("n_seeds"),
        )
        .select(list(schema))
    )
