"""Read a results directory into validated Polars frames, one per stage.

Files are listed once through the results store (cheap: names only) so each stage is
scanned lazily on its own with only the columns it needs; `.failed.parquet` files are
scanned separately. Per-trial files and compacted parts are read alike; where two files hold
one trial (a retry, an interrupted compaction), the rows of the one the store's precedence
names count and the others' are dropped (ResultStore.superseded; only the parts' trial ids
are read to know it). Only the sweep's current grid is summarized: rows are selected by the
trial ids manifest.json lists (never by the volatile `sweep` column, so renaming a sweep
keeps its rows); files of an older schema and rows of trials it does not list (another
results version, a grid point removed from the sweep) are set aside and counted by reason
in `Results.set_aside` (current_grid.py), never mixed in and never an error. Without a
manifest, the `sweep` column tells sweeps apart.
Everything that makes a summary impossible (missing or empty directory, unreadable files,
several sweeps mixed without --sweep) raises SummaryError with a message for a person; rows
that are merely unusable (NaN metrics) are set aside in `Results.skipped` and reported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qshield_dist.results.schema import MODEL_COLUMNS, SCHEMA, SCHEMA_VERSION
from qshield_dist.results.store import ResultStore
from qshield_dist.summary.current_grid import (
    STALE_KEYS,
    reasons_text,
    resolve_manifest,
    schema_problem,
    set_aside_files,
    stale_counts,
    start_manifest_job,
)
from qshield_dist.vocabulary import STAGES

log = logging.getLogger(__name__)

# What identifies a model variant: the resolved model spec's columns, how it was trained (a
# PGD-trained CNN is not the plain one) and the control (a hybrid's backbone alone, or its
# backbone trained with the hybrid's budget).
VARIANT_KEYS: tuple[str, ...] = ("dataset", *MODEL_COLUMNS, "train_method", "train_config", "control")
ATTACK_KEYS: tuple[str, ...] = ("attack", "attack_preset", "attack_params")

_DROPPED = {"_file": pl.String, "trial_id": pl.String}
_COMMON = (
    "schema_version",
    "results_version",
    "train_version",
    "stage",
    "sweep",
    "trial_id",
    "train_id",
    "status",
    "variant",
    "variant_id",
    "seed",
    *VARIANT_KEYS,
)
STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "train": (*_COMMON, "clean_acc", "n_test", "train_seconds", "train_steps", "train_epochs", "stochastic"),
    "attack": (
        *_COMMON,
        *ATTACK_KEYS,
        "threat_model",
        "eps",
        "eval_repeats",
        "success_rule",
        "stochastic",
        "clean_acc",
        "n_points",
        "n_attacked",
        "n_success",
        "asr",
        "asr_worst",
        "robust_acc",
        "attack_seconds",
        "forward_calls",
        "backward_calls",
        "forward_samples",
        "backward_samples",
        "budget_ok",
        "shard",
        "details",
    ),
    "diagnostic": (*_COMMON, "diagnostic", "diagnostic_value", "diagnostic_pass", "details"),
    "failed": (*_COMMON, *ATTACK_KEYS, "shard", "error"),
}
# An attack row is usable only when all of these are finite and it has points; its ASR too
# unless the model got none of its points right clean (a shard can: its points count as not
# robust, and it adds nothing to the seed's ASR).
ATTACK_METRICS: tuple[str, ...] = ("robust_acc", "attack_seconds", "forward_calls", "backward_calls")


class SummaryError(Exception):
    """Input that cannot be summarized; the CLI logs the message and exits with code 2."""


@dataclass
class Results:
    """The usable rows of one sweep, by stage, plus everything the honesty section needs."""

    root: Path
    sweep: str
    train: pl.DataFrame
    attack: pl.LazyFrame  # usable attack rows (the bulk): aggregated lazily by tables.py
    diagnostic: pl.DataFrame
    failed: pl.DataFrame  # status='failed' rows, error text included
    skipped: pl.DataFrame  # ok rows set aside: stage, trial_id, label, reason
    manifest: dict[str, Any] | None  # manifest.json without its trial list
    expected: pl.DataFrame | None  # the manifest's trials: (trial_id, stage, dataset)
    n_files: int
    set_aside: dict[str, int] = field(default_factory=dict)  # files not of the current grid, by reason
    notes: list[str] = field(default_factory=list)  # stated in the report
    attack_files: list[str] = field(default_factory=list)  # to name bad files if a later collect fails
    # Rows of parts that do not count, (file, trial_id): another file holds their trial (scan()).
    dropped: pl.DataFrame | None = None
    # Which rows of the grid are the summarized sweep's: all of them with a manifest (selected
    # by trial id), else those whose `sweep` column names it.
    selected: pl.Expr = field(default_factory=lambda: pl.lit(True))


def _list_files(root: Path) -> tuple[dict[str, list[str]], list[str], pl.DataFrame | None, str | None]:
    """Result files by stage (ok) and the failed ones, without the files whose trial another
    file holds with precedence (a failure row retried with success, a per-trial file already
    compacted); the rows of parts in the same case, as (file, trial_id); a note saying how
    many were left out."""
    store = ResultStore(root)
    files = list(store.files())
    try:
        superseded = store.superseded(files)
    except (OSError, pa.ArrowException) as exc:
        raise SummaryError(f"a compacted part under {root} is unreadable ({exc})") from None
    ok: dict[str, list[str]] = {s: [] for s in STAGES}
    failed: list[str] = []
    in_parts: list[tuple[str, str]] = []
    for file in files:
        if file.trial_id is None:  # a part: its other rows count
            in_parts += [(str(file.path), t) for t in superseded.get(file.rel, ())]
        elif file.rel in superseded:
            continue
        (failed if file.failed else ok.setdefault(file.stage, [])).append(str(file.path))
    dropped = pl.DataFrame(in_parts, schema=_DROPPED, orient="row") if in_parts else None
    note = None
    if superseded:
        trials = {t for ids in superseded.values() for t in ids}
        note = (
            f"the rows of {len(trials)} trial(s) in {len(superseded)} file(s) are not summarized: another file"
            " holds the same trial (a failed trial retried with success, or a compaction stopped before it"
            " removed what it merged); its rows count"
        )
    return ok, failed, dropped, note


def _diagnose(files: list[str]) -> str:
    """Why a set of files cannot be read as one dataset: per-file schema and version, or that
    files listed a moment ago are gone (a --compact merged them while the summary read)."""
    gone = [path for path in files if not os.path.exists(path)]
    if gone:
        return (
            f"{len(gone)} result file(s) disappeared while the summary read them (e.g. {gone[0]}): the"
            " results directory changed under it, as `launch --compact` does; run the summary again"
        )
    expected = {f.name: f.type for f in SCHEMA}
    problems: list[str] = []
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{path}: unreadable Parquet ({exc})")
            continue
        found = {f.name: f.type for f in schema}
        version = "?"
        if "schema_version" in found:
            try:
                versions = pq.read_table(path, columns=["schema_version"]).column(0).unique().to_pylist()
                version = ",".join(str(v) for v in versions)
            except (OSError, pa.ArrowException):
                pass
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        changed = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        if missing or extra or changed or version not in (str(SCHEMA_VERSION), "?"):
            parts = [f"schema_version {version}"]
            parts += [f"missing {missing[:5]}"] if missing else []
            parts += [f"extra {extra[:5]}"] if extra else []
            parts += [f"other types {changed[:5]}"] if changed else []
            problems.append(f"{path}: " + "; ".join(parts))
    if not problems:
        return "the files could not be read together (no single file is at fault)"
    head = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return f"{len(problems)} file(s) do not match results schema_version {SCHEMA_VERSION}:\n  {head}{more}"


def _lazy(files: list[str], kind: str, dropped: pl.DataFrame | None) -> pl.LazyFrame:
    """A lazy scan of one kind of file (a stage, or the failed ones) with its columns."""
    columns = list(STAGE_COLUMNS[kind])
    if not files:
        return pl.from_arrow(SCHEMA.empty_table().select(columns)).lazy()  # type: ignore[union-attr]
    return scan(files, dropped, hive=True).select(columns)


def scan(files: list[str], dropped: pl.DataFrame | None, hive: bool = False) -> pl.LazyFrame:
    """A lazy scan of result files without the `dropped` rows (Results.dropped). hive: the
    stage and dataset from the paths (stage=*/dataset=*) rather than from the rows."""
    hive_schema = {"stage": pl.String, "dataset": pl.String} if hive else None
    lf = pl.scan_parquet(
        files,
        hive_partitioning=hive,
        hive_schema=hive_schema,
        include_file_paths="_file" if dropped is not None else None,
    )
    if dropped is None:
        return lf
    return lf.join(dropped.lazy(), on=["_file", "trial_id"], how="anti").drop("_file")


def collect(queries: list[pl.LazyFrame], files: list[str]) -> list[pl.DataFrame]:
    """Collect lazy queries together (Polars runs them in parallel); a file that cannot be
    read as this schema turns into a SummaryError naming the files at fault."""
    try:
        return pl.collect_all(queries)
    except Exception as exc:  # polars raises several error types for bad files; all mean "bad input"
        log.debug("scan failed: %s", exc)
        raise SummaryError(_diagnose(files)) from None


def _choose_sweep(counts_by_kind: list[pl.DataFrame], sweep: str | None) -> tuple[str, bool]:
    """The sweep to summarize and whether others are present (then rows must be filtered)."""
    counts: dict[str, int] = {}
    for df in counts_by_kind:
        for name, n in df.iter_rows():
            counts[str(name)] = counts.get(str(name), 0) + n
    if sweep is not None:
        if sweep not in counts:
            raise SummaryError(
                f"--sweep {sweep}: no rows of that sweep here; sweeps found: {', '.join(sorted(counts)) or 'none'}"
            )
        return sweep, len(counts) > 1
    if len(counts) > 1:
        listed = ", ".join(f"{k} ({v} rows)" for k, v in sorted(counts.items()))
        raise SummaryError(
            f"rows of several sweeps are mixed here: {listed}; summarize one with --sweep NAME"
        )
    return next(iter(counts)), False


def _nonfinite(col: str) -> pl.Expr:
    c = pl.col(col)
    return c.is_null() | (c.cast(pl.Float64).is_nan() | c.cast(pl.Float64).is_infinite()).fill_null(True)


def bad_attack_row() -> pl.Expr:
    """An attack row no mean may use: a NaN/null metric, or nothing attacked."""
    return pl.any_horizontal(*[_nonfinite(c) for c in ATTACK_METRICS], *_unusable())


def _unusable() -> tuple[pl.Expr, pl.Expr]:
    """An ASR that is NaN/null where points were attacked; no points at all."""
    attacked = pl.col("n_attacked").fill_null(0) > 0
    return _nonfinite("asr") & attacked, pl.col("n_points").fill_null(0) <= 0


# What a set-aside attack row keeps of its setting (tables.attack_settings labels it).
SKIPPED_SETTING = ("attack_preset", "attack_params", "threat_model", "eps", "success_rule", "eval_repeats")


def _skipped(attack: pl.LazyFrame, train: pl.DataFrame) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """The set-aside rows with their reason (a query for attack rows, collected later)."""
    bad_asr, no_points = _unusable()
    reasons = [pl.when(bad_asr).then(pl.lit("asr is NaN/null"))]
    reasons += [pl.when(_nonfinite(c)).then(pl.lit(f"{c} is NaN/null")) for c in ATTACK_METRICS]
    reasons.append(pl.when(no_points).then(pl.lit("n_points = 0, n_attacked = 0")))
    cols = (
        "dataset",
        "trial_id",
        "variant",
        "seed",
        *VARIANT_KEYS[1:],
    )  # keys: to tie a skipped row to its variant
    bad_attack = attack.filter(bad_attack_row()).select(
        pl.lit("attack").alias("stage"),
        *cols,
        "attack",
        pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("reason"),
        # the attack's setting: its per-point outcomes still count (a model that gets every point
        # wrong is 0% robust on them), so the summary must still name the attack
        *SKIPPED_SETTING,
    )
    bad_train = train.filter(_nonfinite("clean_acc")).select(
        pl.lit("train").alias("stage"),
        *cols,
        pl.lit(None, pl.String).alias("attack"),
        pl.lit("clean_acc is NaN/null").alias("reason"),
    )
    return bad_attack, bad_train


def _scan(
    by_kind: dict[str, list[str]],
    grid: pl.Series | None,
    set_aside: dict[str, int],
    dropped: pl.DataFrame | None,
) -> tuple[dict[str, list[str]], list[pl.DataFrame]]:
    """Versions, sweep counts and the small stages of the rows in the grid, collected
    together, and the rows outside it counted by reason into `set_aside`. Files that are not
    of the current schema (written before a schema change) are set aside and the scan runs
    again without them: an older file is never an error."""
    for attempt in range(2):
        lazy = {k: _lazy(v, k, dropped) for k, v in by_kind.items()}
        kept = {k: _in_grid(lf, grid) for k, lf in lazy.items()}
        versions = [lf.select(pl.col("schema_version").unique()) for lf in lazy.values()]
        sweeps = [lf.group_by("sweep").len() for lf in kept.values()]
        stale = (
            [
                lf.filter(~pl.col("trial_id").is_in(grid.implode())).group_by(STALE_KEYS).len()
                for lf in lazy.values()
            ]
            if grid is not None
            else []
        )
        queries = [*versions, *sweeps, *(kept[k] for k in ("train", "diagnostic", "failed")), *stale]
        all_files = [f for v in by_kind.values() for f in v]
        try:
            out = pl.collect_all(queries)
        except Exception as exc:  # polars raises several error types for files of another schema
            log.debug("scan failed: %s", exc)
            out = None
        if out is not None and all(
            (v["schema_version"] == SCHEMA_VERSION).all() for v in out[: len(by_kind)]
        ):
            stale_counts(out[2 * len(by_kind) + 3 :], set_aside)
            return by_kind, out[: 2 * len(by_kind) + 3]
        if attempt == 1:
            break
        by_kind = set_aside_files(by_kind, schema_problem, set_aside)
    raise SummaryError(_diagnose(all_files))


def _in_grid(lf: pl.LazyFrame, grid: pl.Series | None) -> pl.LazyFrame:
    return lf if grid is None else lf.filter(pl.col("trial_id").is_in(grid.implode()))


def load_results(root: str | Path, sweep: str | None = None) -> Results:
    """Validated rows of one sweep under `root`; raises SummaryError for unusable input.

    Train, diagnostic and failed rows (one per trained model / check / failure) are read
    eagerly; attack rows, the bulk, stay a lazy query that tables.py aggregates in the scan.
    """
    root = Path(root)
    if not root.exists():
        raise SummaryError(
            f"results directory {root} does not exist (run the sweep first, or pass RESULTS_DIR)"
        )
    if not root.is_dir():
        raise SummaryError(f"{root} is not a directory")
    # A big sweep's manifest is tens of MB of JSON: parse it while the files are listed.
    manifest_job = start_manifest_job(root)
    files, failed_files, dropped, superseded = _list_files(root)
    n_files = sum(map(len, files.values())) + len(failed_files)
    if n_files == 0:
        raise SummaryError(
            f"no result files under {root} (expected stage=*/dataset=*/ with trials' files or compacted parts): has the sweep run?"
        )
    unknown = sorted(s for s in files if s not in STAGES and files[s])
    notes: list[str] = []
    if unknown:
        notes.append(f"ignored result files of unknown stages: {', '.join(unknown)}")
    if superseded:
        notes.append(superseded)

    by_kind = {**{s: files[s] for s in STAGES}, "failed": failed_files}
    manifest, expected = resolve_manifest(manifest_job, notes)
    if manifest is not None and sweep is not None and manifest.get("sweep") not in (None, sweep):
        notes.append(
            f"manifest.json belongs to sweep '{manifest.get('sweep')}', not '{sweep}': the grid is not checked"
        )
        manifest = expected = None
    grid = expected["trial_id"] if expected is not None else None
    set_aside: dict[str, int] = {}
    by_kind, out = _scan(by_kind, grid, set_aside, dropped)
    if set_aside:
        notes.append(
            f"{sum(set_aside.values())} result row(s) set aside, not summarized: {reasons_text(set_aside)} (`launch --prune` moves their files)"
        )
    small = ["train", "diagnostic", "failed"]
    n = len(by_kind)
    counts = out[n : 2 * n]
    if not any(c.height for c in counts):
        raise SummaryError(
            f"no result row under {root} belongs to the current grid of its manifest ({reasons_text(set_aside)}): rerun the sweep"
        )
    if grid is not None:  # the manifest's trial ids select the rows, whatever sweep name they carry
        chosen, several = str((manifest or {}).get("sweep") or sweep or root.name), False
    else:
        chosen, several = _choose_sweep(counts, sweep)
    selected = pl.col("sweep") == chosen if several else pl.lit(True)
    frames = {k: v.filter(selected) for k, v in zip(small, out[2 * n :])}
    attack = _in_grid(_lazy(by_kind["attack"], "attack", dropped), grid).filter(selected)

    bad_attack, bad_train = _skipped(attack, frames["train"])
    (skipped_attack,) = collect([bad_attack], by_kind["attack"])
    skipped = pl.concat([skipped_attack, bad_train], how="diagonal_relaxed")
    train = frames["train"].filter(~_nonfinite("clean_acc"))
    attack_counts = dict(out[n + list(by_kind).index("attack")].iter_rows())
    n_attack_ok = (
        attack_counts.get(chosen, 0) if several else sum(attack_counts.values())
    ) - skipped_attack.height
    if n_attack_ok == 0 and train.height + frames["diagnostic"].height == 0:
        raise SummaryError(
            f"nothing to summarize in {root} (sweep {chosen}): {frames['failed'].height} failed trial(s), "
            f"{skipped.height} row(s) with NaN/null metrics"
        )
    return Results(
        root=root,
        sweep=chosen,
        train=train,
        attack=attack.filter(~bad_attack_row()),
        diagnostic=frames["diagnostic"],
        failed=frames["failed"],
        skipped=skipped,
        manifest=manifest,
        expected=expected,
        n_files=n_files,
        set_aside=set_aside,
        notes=notes,
        attack_files=by_kind["attack"],
        dropped=dropped,
        selected=selected,
    )
