"""Benchmark of the summary: a synthetic results directory of N rows in the compacted layout,
then the summary timed, with its peak memory.

    python -m qshield_dist.bench summary [--summary-rows N] [--summary-points P]

N is the number of attack rows (each with P per-point outcomes); the train, diagnostic and
failed rows of the seeds those take come on top (the JSON says how many rows in all).

Layout: what `launch --compact` leaves, with the real SCHEMA: per stage and dataset, parts of
up to PART_ROWS rows in row groups of ROW_GROUP_ROWS (store.part_path), plus a few failed
trials in their own files (store.trial_path). Every attack row keeps its per-point outcomes on
`points` test points (point_index, point_correct, point_broken, and point_broken_by on
AutoAttack rows), as a real attack row does, so the summary's per-point worst case, paired
comparisons, AutoAttack gaps and verdicts run on them: a point is correct clean for a model
and seed whatever the attack, and each attack breaks a share of the correct ones that depends
on the model and the attack. With `shards` > 1 (write_synthetic; the test of the packed
summary uses it) each attack row is one shard of a seed's permutation of the points.
Grid: 3 datasets x (dnn, cnn, cnn_small, 24 hybrids = 4 entanglements x 2 depths x 3 noise
strengths, their 24 backbone-only controls) x every attack of the registry (bpda_pgd on
hybrids only) x as many seeds as it takes; plus one train row per trained model and seed, 2 diagnostic
rows per hybrid and seed, a few failed trials, NaN rows, and a manifest listing every trial
id (plus some never run). Returns a JSON-able dict of timings and peak memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qshield_dist.attack_params import ATTACKS
from qshield_dist.peak_memory import peak_bytes, reset_peak
from qshield_dist.results.compact import PART_ROWS, ROW_GROUP_ROWS
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.schema import SCHEMA, SCHEMA_VERSION
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.summary.paired import AUTOATTACKS

log = logging.getLogger(__name__)

DATASETS = ("mnist", "organamnist", "cifar10")
ENTANGLEMENTS = ("none", "linear", "star", "full")
DEPTHS = (1, 2)
NOISE = (0.0, 0.005, 0.02)


def _variants() -> pl.DataFrame:
    rows: list[dict[str, Any]] = [{"model": m, "backbone": m} for m in ("dnn", "cnn", "cnn_small")]
    for ent in ENTANGLEMENTS:
        for depth in DEPTHS:
            for p in NOISE:
                q = {
                    "backbone": "cnn",
                    "entanglement": ent,
                    "depth": depth,
                    "encoding": "enhanced_angle",
                    "noise_model": "mixed",
                    "noise_strength": p,
                    "fusion": "dynamic",
                    "quantum_grad": "full",
                    "projection": "learned",
                    "init": "from_baseline",
                    "simulator": "compiled",
                    "device": "default.mixed",
                    "trajectories": 0,
                    "qubits": 4,
                }
                rows.append({"model": "hqcnn", **q})
                rows.append({"model": "hqcnn", "control": "backbone_only", **q})
    return pl.DataFrame(rows, infer_schema_length=None).with_row_index("v")


def _to_arrow(df: pl.DataFrame) -> pa.Table:
    """A frame with a subset of the columns -> a table of exactly SCHEMA (others null)."""
    n = df.height
    table = df.to_arrow()
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
        for f in SCHEMA
    ]
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def _write_parts(
    store: ResultStore, stage: str, df: pl.DataFrame, rows_per_file: int, points: int = 0, shards: int = 1
) -> int:
    """`df`'s rows as parts, per dataset; attack rows (points > 0) get their per-point columns
    and the metrics that follow from them."""
    n_files = 0
    for (dataset,), part in df.group_by("dataset", maintain_order=True):
        for number, i in enumerate(range(0, part.height, rows_per_file), start=1):
            chunk = part.slice(i, rows_per_file)
            table = _with_points(chunk, points, shards) if points else _to_arrow(chunk)
            path = store.part_path(stage, str(dataset), number)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
            n_files += 1
    return n_files


# What synthetic AutoAttack rows name as the component that broke a point.
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def _point_index(seed: np.ndarray, shard: np.ndarray | None, points: int, shards: int) -> np.ndarray:
    """Each row's point indices: 0 .. points - 1 unsharded; else its shard's consecutive slice
    of its seed's fixed permutation of a pool twice the attack set (so the permutation order
    is not the index order, as in a real sweep)."""
    if shard is None:
        return np.broadcast_to(np.arange(points, dtype=np.int64), (len(seed), points))
    pool = 2 * shards * points
    perms = {s: np.random.default_rng(int(s)).permutation(pool) for s in np.unique(seed)}
    out = np.empty((len(seed), points), dtype=np.int64)
    for s, perm in perms.items():
        rows = np.flatnonzero(seed == s)
        out[rows] = perm[shard[rows, None] * points + np.arange(points)[None, :]]
    return out


def _with_points(chunk: pl.DataFrame, points: int, shards: int = 1) -> pa.Table:
    """Attack rows with `points` per-point outcomes each. A point has, per model and seed, a
    clean outcome (95% correct) and a fragility; an attack breaks the correct points whose
    fragility, blurred a little per attack, is below its strength on that model (`base`), so
    the attacks of a model break overlapping points and its worst case is not all of them.
    AutoAttack rows name the component that broke each point. With shards > 1 each row is one
    shard of its (model, attack, seed). The counts and rates follow from the points, as a trial
    computes them. Reproducible."""
    v, a, seed = (chunk[c].to_numpy().astype(np.int64) for c in ("v", "a", "seed"))
    shard = chunk["shard"].to_numpy().astype(np.int64) if shards > 1 else None
    index = _point_index(seed, shard, points, shards)
    model = (v * 7919 + seed * 104729)[:, None] + index * 2654435761
    correct = model % 1000 >= 50
    fragility = (model // 1000 % 10007) / 10007
    rng = np.random.default_rng(int(v[0] * 1_000_003 + a[0] * 101 + seed[0]))
    blurred = 0.9 * fragility + 0.1 * rng.random(correct.shape)
    broken = correct & (blurred < chunk["base"].to_numpy()[:, None])
    n_attacked = correct.sum(axis=1).astype(np.int32)
    n_success = broken.sum(axis=1).astype(np.int32)
    asr = np.where(chunk["nan"].to_numpy(), np.nan, n_success / np.maximum(n_attacked, 1))
    calls = (1 + a * 3) * 2
    batches = np.ceil(n_attacked / 128)
    chunk = chunk.with_columns(
        pl.lit(points, pl.Int32).alias("n_points"),
        pl.Series("n_attacked", n_attacked),
        pl.Series("n_success", n_success),
        pl.Series("asr", asr),
        pl.Series("asr_worst", asr),
        pl.Series("robust_acc", (n_attacked - n_success) / points),
        pl.Series("clean_acc", n_attacked / points),
        pl.Series("attack_seconds", calls * chunk["per_call"].to_numpy() * n_attacked / 128),
        pl.Series("forward_calls", (calls // 2 * batches).astype(np.int64)),
        pl.Series("backward_calls", (calls // 2 * batches).astype(np.int64)),
        pl.Series("forward_samples", (calls // 2 * n_attacked).astype(np.int64)),
        pl.Series("backward_samples", (calls // 2 * n_attacked).astype(np.int64)),
    )
    table = _to_arrow(chunk)
    offsets = pa.array(np.arange(0, (len(v) + 1) * points, points, dtype=np.int64))
    lists = {
        "point_index": pa.array(index.astype(np.int32).ravel()),
        "point_correct": pa.array(correct.ravel()),
        "point_broken": pa.array(broken.ravel()),
    }
    for name, values in lists.items():
        column = pa.LargeListArray.from_arrays(offsets, values).cast(SCHEMA.field(name).type)
        table = table.set_column(SCHEMA.get_field_index(name), name, column)
    # point_broken_by: on AutoAttack rows only (null elsewhere), null where nothing broke
    aa = chunk["attack"].is_in(AUTOATTACKS).to_numpy()
    which = ((index[aa] + a[aa, None]) % len(COMPONENTS)).ravel()
    names = pa.DictionaryArray.from_arrays(
        pa.array(which.astype(np.int8), mask=~broken[aa].ravel()), pa.array(COMPONENTS)
    ).cast(pa.string())
    by_offsets = np.concatenate([[0], np.cumsum(np.where(aa, points, 0))]).astype(np.int64)
    column = pa.LargeListArray.from_arrays(pa.array(by_offsets), names, mask=pa.array(~aa))
    name = "point_broken_by"
    return table.set_column(SCHEMA.get_field_index(name), name, column.cast(SCHEMA.field(name).type))


def _train_key() -> pl.Expr:
    """A synthetic train trial's id: one per dataset, variant and seed."""
    return (
        pl.lit("T") + pl.col("dataset") + pl.col("v").cast(pl.String) + "_" + pl.col("seed").cast(pl.String)
    )


def _combos(variants: pl.DataFrame, shards: int, datasets: tuple[str, ...]) -> pl.DataFrame:
    """The attack rows of one seed: every variant x attack (BPDA on hybrids only) x dataset x shard."""
    attacks = pl.DataFrame({"attack": list(ATTACKS), "a": range(len(ATTACKS))})
    combos = variants.join(attacks, how="cross").filter(
        (pl.col("attack") != "bpda_pgd") | (pl.col("model") == "hqcnn")
    )
    combos = pl.concat([combos.with_columns(pl.lit(d).alias("dataset")) for d in datasets])
    if shards > 1:
        combos = combos.join(pl.DataFrame({"shard": np.arange(shards, dtype=np.int32)}), how="cross")
    return combos


def rows_per_seed(shards: int = 1, datasets: tuple[str, ...] = DATASETS) -> int:
    """Attack rows of one complete seed of the synthetic grid."""
    return _combos(_variants(), shards, datasets).height


def write_synthetic(
    root: Path,
    n_rows: int = 1_000_000,
    rows_per_file: int = PART_ROWS,
    points: int = 256,
    seed: int = 0,
    shards: int = 1,
    datasets: tuple[str, ...] = DATASETS,
) -> dict[str, Any]:
    """Write a synthetic sweep of exactly `n_rows` attack rows under `root`, each with `points`
    per-point outcomes (with shards > 1: one of `shards` shards of its model, attack and seed),
    plus the train, diagnostic and failed rows of their seeds; returns what it wrote."""
    rng = np.random.default_rng(seed)
    variants = _variants()
    combos = _combos(variants, shards, datasets)
    trained = variants.filter(pl.col("control").is_null())
    hybrids = variants.filter((pl.col("model") == "hqcnn") & pl.col("control").is_null())
    n_failed = 6
    n_seeds = math.ceil(n_rows / combos.height)
    seeds = pl.DataFrame({"seed": np.arange(n_seeds, dtype=np.int32)})

    common = {
        "schema_version": SCHEMA_VERSION,
        "train_version": STAGE_VERSIONS["train"],
        "sweep": "bench",
        "status": "ok",
    }
    attack = combos.join(seeds, how="cross")
    train = pl.concat([trained.with_columns(pl.lit(d).alias("dataset")) for d in datasets]).join(
        seeds, how="cross"
    )
    diag = pl.concat([hybrids.with_columns(pl.lit(d).alias("dataset")) for d in datasets]).join(
        seeds, how="cross"
    )
    diag = pl.concat(
        [diag.with_columns(pl.lit(name).alias("diagnostic")) for name in ("grad_norm_ratio", "bpda_gap")]
    )
    attack = attack.head(n_rows)

    n = attack.height
    base = 0.1 + 0.5 * ((attack["v"].to_numpy() * 7 + attack["a"].to_numpy() * 13) % 17) / 17
    nan = np.zeros(n, dtype=bool)
    nan[rng.choice(n, min(n, 10), replace=False)] = True  # set aside and reported by the summary
    hybrid = (attack["model"] == "hqcnn").to_numpy()
    per_call = np.where(hybrid, 0.5, 0.005) * rng.uniform(0.8, 1.2, n)
    params = {a: json.dumps(ATTACKS[a].params("mnist"), sort_keys=True) for a in ATTACKS}
    attack = attack.with_columns(
        pl.lit("attack").alias("stage"),
        pl.lit(STAGE_VERSIONS["attack"]).alias("results_version"),
        (pl.lit("A") + pl.int_range(pl.len()).cast(pl.String)).alias("trial_id"),
        _train_key().alias("train_id"),
        pl.col("model").alias("variant"),
        pl.lit("paper").alias("attack_preset"),
        pl.col("attack").replace_strict(params).alias("attack_params"),
        pl.col("attack")
        .replace_strict({a: d.threat_model for a, d in ATTACKS.items()})
        .alias("threat_model"),
        pl.lit(32 / 255).alias("eps"),
        pl.lit(1, pl.Int32).alias("eval_repeats"),
        pl.lit("misclassified (deterministic model, 1 evaluation)").alias("success_rule"),
        pl.lit(False).alias("stochastic"),
        pl.lit(True).alias("budget_ok"),
        pl.Series("base", base),
        pl.Series("nan", nan),
        pl.Series("per_call", per_call),
        **{k: pl.lit(v) for k, v in common.items()},
    )
    train = train.with_columns(
        pl.lit("train").alias("stage"),
        pl.lit(STAGE_VERSIONS["train"]).alias("results_version"),
        _train_key().alias("trial_id"),
        pl.col("model").alias("variant"),
        pl.Series("clean_acc", rng.uniform(0.85, 0.99, train.height)),
        pl.lit(256).alias("n_test"),
        pl.Series("train_seconds", rng.uniform(10, 100, train.height)),
        pl.lit(120).alias("train_steps"),
        **{k: pl.lit(v) for k, v in common.items()},
    )
    diag = diag.with_columns(
        pl.lit("diagnostic").alias("stage"),
        pl.lit(STAGE_VERSIONS["diagnostic"]).alias("results_version"),
        (pl.lit("D") + pl.int_range(pl.len()).cast(pl.String)).alias("trial_id"),
        pl.col("model").alias("variant"),
        pl.Series("diagnostic_value", rng.uniform(0, 1, diag.height)),
        (pl.Series(rng.uniform(0, 1, diag.height)) > 0.1).alias("diagnostic_pass"),
        pl.lit('{"note": "synthetic"}').alias("details"),
        **{k: pl.lit(v) for k, v in common.items()},
    )
    store = ResultStore(root)
    files = _write_parts(store, "attack", attack, rows_per_file, points, shards)
    files += _write_parts(store, "train", train.drop("v"), rows_per_file)
    files += _write_parts(store, "diagnostic", diag.drop("v"), rows_per_file)
    failed = attack.head(n_failed).with_columns(
        (pl.lit("F") + pl.int_range(pl.len()).cast(pl.String)).alias("trial_id"),
        pl.lit("failed").alias("status"),
        pl.lit("RuntimeError: synthetic failure\nTraceback ...").alias("error"),
    )
    for row in failed.iter_slices(1):
        path = store.trial_path(TrialKey("attack", row["dataset"][0], row["trial_id"][0]), failed=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_to_arrow(row.drop("v", "a", "base", "nan", "per_call")), path)
    files += n_failed
    ids = pl.concat(
        [
            attack.select("trial_id", "stage", "dataset"),
            train.select("trial_id", "stage", "dataset"),
            diag.select("trial_id", "stage", "dataset"),
            failed.select("trial_id", "stage", "dataset"),
        ]
    )
    expected = {t: {"stage": s, "dataset": d} for t, s, d in ids.iter_rows()}
    expected.update({f"Amissing{i}": {"stage": "attack", "dataset": "mnist"} for i in range(20)})
    ResultStore(root).write_manifest({"sweep": "bench"}, expected)
    total = attack.height + train.height + diag.height + n_failed
    return {
        "rows": total,
        "attack_rows": attack.height,
        "points_per_attack_row": points,
        "points": attack.height * points,
        "files": files,
        "rows_per_file": rows_per_file,
        "seeds": n_seeds,
        "manifest_trials": len(expected),
    }


def bench_summary(
    n_rows: int = 1_000_000,
    points: int = 256,
    rows_per_file: int = PART_ROWS,
    plots: bool = True,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Time the summary of a synthetic sweep, with its peak memory: tables and verdicts only,
    then with plots. JSON-able dict."""
    from qshield_dist.summary.report import Options, summarize

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp) / "results"
        start = time.perf_counter()
        wrote = write_synthetic(root, n_rows, rows_per_file, points)
        gen = time.perf_counter() - start
        out: dict[str, Any] = {"benchmark": "summary", **wrote, "generate_seconds": round(gen, 2)}
        # Wall time is what was asked; CPU time (all threads of this process) is steadier on
        # a shared machine, where wall time also counts other people's work.
        reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        summary = summarize(root, Path(tmp) / "report_tables", Options(plots=False))
        out["tables_seconds"] = round(time.perf_counter() - start, 3)
        out["tables_cpu_seconds"] = round(time.process_time() - cpu, 3)
        out["tables_peak_rss_gb"] = round(peak_bytes() / 2**30, 2)
        out["load_average_1min"] = round(os.getloadavg()[0], 2)
        out["cells"] = summary.tables.robustness.height
        out["variants"] = summary.tables.variants.height
        out["verdicts"] = summary.tables.verdicts.height
        out["paired_comparisons"] = summary.tables.paired.height
        out["verdicts_by_category"] = dict(Counter(summary.tables.verdicts["category"].to_list()))
        if plots:
            start = time.perf_counter()
            summary = summarize(root, Path(tmp) / "report_full", Options(plots=True))
            out["with_plots_seconds"] = round(time.perf_counter() - start, 3)
            out["with_plots_peak_rss_gb"] = round(peak_bytes() / 2**30, 2)
            out["figures"] = len(summary.figures)
            start = time.perf_counter()
            summarize(root, Path(tmp) / "report_png", Options(plots=True, svg=False))
            out["with_plots_png_only_seconds"] = round(time.perf_counter() - start, 3)
    return out
