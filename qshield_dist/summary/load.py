"""Read a results directory into validated Polars frames, one per stage.

Files are listed once in Python (cheap: names only) so each stage is scanned lazily on
its own with only the columns it needs; `.failed.parquet` files are scanned separately.
Everything that makes a summary impossible (missing or empty directory, another schema
version, unreadable files, several sweeps mixed without --sweep) raises SummaryError with
a message for a person; rows that are merely unusable (NaN metrics) are set aside in
`Results.skipped` and reported, never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qshield_dist.results import SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)

# What identifies a model variant. The brief's list plus device, trajectories and qubits,
# which are schema columns that change the simulated model; constant in most sweeps.
VARIANT_KEYS: tuple[str, ...] = (
    "dataset", "model", "backbone", "entanglement", "depth", "encoding", "noise_model", "noise_strength",
    "fusion", "quantum_grad", "projection", "init", "simulator", "device", "trajectories", "qubits",
)
ATTACK_KEYS: tuple[str, ...] = ("attack", "attack_preset", "attack_params")
STAGES: tuple[str, ...] = ("train", "attack", "diagnostic")

_COMMON = ("schema_version", "sweep", "trial_id", "train_id", "status", "variant", "seed", *VARIANT_KEYS)
STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "train": (*_COMMON, "clean_acc", "n_test", "train_seconds", "train_steps", "train_epochs", "stochastic"),
    "attack": (
        *_COMMON, *ATTACK_KEYS, "threat_model", "eps", "eval_repeats", "success_rule", "stochastic", "clean_acc",
        "n_attacked", "n_success", "asr", "asr_worst", "robust_acc", "attack_seconds", "forward_calls",
        "backward_calls", "forward_samples", "backward_samples", "budget_ok",
    ),
    "diagnostic": (*_COMMON, "diagnostic", "diagnostic_value", "diagnostic_pass", "details"),
    "failed": (*_COMMON, "stage", *ATTACK_KEYS, "error"),
}
# An attack row is usable only when all of these are finite (n_attacked also > 0).
ATTACK_METRICS: tuple[str, ...] = ("asr", "robust_acc", "attack_seconds", "forward_calls", "backward_calls")


class SummaryError(Exception):
    """Input that cannot be summarized; the CLI logs the message and exits with code 2."""


@dataclass
class Results:
    """The usable rows of one sweep, by stage, plus everything the honesty section needs."""

    root: Path
    sweep: str
    train: pl.DataFrame
    attack: pl.DataFrame
    diagnostic: pl.DataFrame
    failed: pl.DataFrame  # status='failed' rows, error text included
    skipped: pl.DataFrame  # ok rows set aside: stage, trial_id, label, reason
    manifest: dict[str, Any] | None
    n_files: int
    notes: list[str] = field(default_factory=list)  # stated in the report


def _list_files(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Result files by stage (ok) and the failed ones, from directory names only."""
    ok: dict[str, list[str]] = {s: [] for s in STAGES}
    failed: list[str] = []
    for stage_dir in sorted(root.iterdir()):
        if not (stage_dir.is_dir() and stage_dir.name.startswith("stage=")):
            continue
        stage = stage_dir.name[len("stage="):]
        for dataset_dir in sorted(stage_dir.iterdir()):
            if not (dataset_dir.is_dir() and dataset_dir.name.startswith("dataset=")):
                continue
            for entry in os.scandir(dataset_dir):
                name = entry.name
                if name.startswith(".") or not name.endswith(".parquet"):
                    continue  # temp files of in-flight atomic writes
                if name.endswith(".failed.parquet"):
                    failed.append(entry.path)
                else:
                    ok.setdefault(stage, []).append(entry.path)
    return ok, failed


def _diagnose(files: list[str]) -> str:
    """Why a set of files cannot be read as one dataset: per-file schema and version."""
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


def _scan(files: list[str], columns: tuple[str, ...]) -> pl.DataFrame:
    """One lazy scan of same-schema files, only `columns` materialized."""
    if not files:
        return pl.from_arrow(SCHEMA.empty_table().select(list(columns)))  # type: ignore[return-value]
    lf = pl.scan_parquet(files, hive_partitioning=True, hive_schema={"stage": pl.String, "dataset": pl.String})
    try:
        return lf.select(list(columns)).collect()
    except Exception as exc:  # polars raises several error types for bad files; all mean "bad input"
        log.debug("scan failed: %s", exc)
        raise SummaryError(_diagnose(files)) from None


def _check_versions(frames: dict[str, pl.DataFrame], files: dict[str, list[str]]) -> None:
    bad = {s: df for s, df in frames.items() if df.height and (df["schema_version"] != SCHEMA_VERSION).any()}
    if bad:
        raise SummaryError(_diagnose([f for s in bad for f in files[s]]))


def _read_manifest(root: Path, notes: list[str]) -> dict[str, Any] | None:
    path = root / "manifest.json"
    if not path.exists():
        notes.append("no manifest.json: missing grid points cannot be listed")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        notes.append(f"manifest.json unreadable ({exc}): missing grid points cannot be listed")
        return None
    if not isinstance(manifest, dict):
        notes.append("manifest.json is not a JSON object: ignored")
        return None
    return manifest


def _choose_sweep(frames: dict[str, pl.DataFrame], sweep: str | None) -> str:
    counts: dict[str, int] = {}
    for df in frames.values():
        for name, n in df.group_by("sweep").len().iter_rows():
            counts[str(name)] = counts.get(str(name), 0) + n
    if sweep is not None:
        if sweep not in counts:
            raise SummaryError(f"--sweep {sweep}: no rows of that sweep here; sweeps found: {', '.join(sorted(counts)) or 'none'}")
        return sweep
    if len(counts) > 1:
        listed = ", ".join(f"{k} ({v} rows)" for k, v in sorted(counts.items()))
        raise SummaryError(f"rows of several sweeps are mixed here: {listed}; summarize one with --sweep NAME")
    return next(iter(counts))


def _nonfinite(col: str) -> pl.Expr:
    c = pl.col(col)
    return c.is_null() | (c.cast(pl.Float64).is_nan() | c.cast(pl.Float64).is_infinite()).fill_null(True)


def _set_aside(attack: pl.DataFrame, train: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Split off rows whose metrics are NaN/null (or with nothing attacked), with the reason."""
    reasons = [pl.when(_nonfinite(c)).then(pl.lit(f"{c} is NaN/null")) for c in ATTACK_METRICS]
    reasons.append(pl.when(pl.col("n_attacked").fill_null(0) <= 0).then(pl.lit("n_attacked = 0")))
    attack = attack.with_columns(pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("_reason"))
    train = train.with_columns(pl.when(_nonfinite("clean_acc")).then(pl.lit("clean_acc is NaN/null")).alias("_reason"))
    cols = ["stage", "dataset", "trial_id", "variant", "attack", "seed", "reason"]
    skipped = pl.concat(
        [
            attack.filter(pl.col("_reason") != "").select(pl.lit("attack").alias("stage"), "dataset", "trial_id", "variant", "attack", "seed", pl.col("_reason").alias("reason")),
            train.filter(pl.col("_reason").is_not_null()).select(pl.lit("train").alias("stage"), "dataset", "trial_id", "variant", pl.lit(None, pl.String).alias("attack"), "seed", pl.col("_reason").alias("reason")),
        ]
    ).select(cols)
    return attack.filter(pl.col("_reason") == "").drop("_reason"), train.filter(pl.col("_reason").is_null()).drop("_reason"), skipped


def load_results(root: str | Path, sweep: str | None = None) -> Results:
    """Validated rows of one sweep under `root`; raises SummaryError for unusable input."""
    root = Path(root)
    if not root.exists():
        raise SummaryError(f"results directory {root} does not exist (run the sweep first, or pass RESULTS_DIR)")
    if not root.is_dir():
        raise SummaryError(f"{root} is not a directory")
    files, failed_files = _list_files(root)
    n_files = sum(map(len, files.values())) + len(failed_files)
    if n_files == 0:
        raise SummaryError(f"no result files under {root} (expected stage=*/dataset=*/*.parquet): has the sweep run?")
    unknown = sorted(s for s in files if s not in STAGES and files[s])
    notes: list[str] = []
    if unknown:
        notes.append(f"ignored result files of unknown stages: {', '.join(unknown)}")

    frames = {s: _scan(files[s], STAGE_COLUMNS[s]) for s in STAGES}
    frames["failed"] = _scan(failed_files, STAGE_COLUMNS["failed"])
    _check_versions(frames, {**files, "failed": failed_files})
    chosen = _choose_sweep(frames, sweep)
    frames = {k: v.filter(pl.col("sweep") == chosen) for k, v in frames.items()}

    # A trial re-run successfully after a failure keeps only its ok file; if both are seen
    # (a rename raced the listing) the ok one wins.
    ok_ids = pl.concat([frames[s].select("trial_id") for s in STAGES])["trial_id"]
    failed = frames["failed"].filter(~pl.col("trial_id").is_in(ok_ids.implode()))

    attack, train, skipped = _set_aside(frames["attack"], frames["train"])
    if attack.height + train.height + frames["diagnostic"].height == 0:
        raise SummaryError(
            f"nothing to summarize in {root} (sweep {chosen}): {failed.height} failed trial(s), "
            f"{skipped.height} row(s) with NaN/null metrics"
        )
    return Results(
        root=root, sweep=chosen, train=train, attack=attack, diagnostic=frames["diagnostic"], failed=failed,
        skipped=skipped, manifest=_read_manifest(root, notes), n_files=n_files, notes=notes,
    )
