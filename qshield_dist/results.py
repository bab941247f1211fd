"""Parquet results: the row schema, atomic writes, and what is already done (resume).

Layout (hive style, one file per trial):

    RESULTS/stage=train/dataset=digits/<trial_id>.parquet
    RESULTS/stage=attack/dataset=digits/<trial_id>.parquet
    RESULTS/stage=diagnostic/dataset=digits/<trial_id>.parquet
    RESULTS/manifest.json

A file is written to a temporary name in the same directory and renamed into place, so a
reader (or a resumed sweep) only ever sees complete files. This module is the only place that
spells a result file's name or the manifest's format.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import typing
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from qshield_dist.config import ModelSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = (
    3  # the columns below (3: point_broken_by); an older file is set aside by the summary, never an error
)

# What each stage computes. A trial's id hashes its stage's version, so a bump re-runs that
# stage and everything after it (an attack id hashes its train id), never what comes before.
# Bump in the same commit as a change that alters what the stage computes, or a default that
# ids leave out (grid.py hashes only what differs from its default); tests/golden/ holds one
# golden trial per stage that fails when numbers move while the version does not.
TRAIN_VERSION = 3  # 3: canonical ids (numbers in one spelling, only what differs from its default)
# Attack 4: AutoAttack at its authors' strength; EOT only on stochastic models; the row's attack_config.
# 5: canonical ids (no diagnostic_size; eval_repeats only for stochastic models).
# 6: random starts drawn per point (attacks/streams.py), so a point's outcome does not depend on its
# batch; no attack stops on draws of a stochastic model; AutoAttack's rows record which component
# broke each point and its sanity checks.
ATTACK_VERSION = 6
# 5: canonical ids; 6: restart_sensitivity, selectable checks; reads attack version 6's rows
DIAGNOSTIC_VERSION = 6
STAGE_VERSIONS = {"train": TRAIN_VERSION, "attack": ATTACK_VERSION, "diagnostic": DIAGNOSTIC_VERSION}


def _model_columns() -> list[tuple[str, pa.DataType]]:
    """ModelSpec's fields as (column, Arrow type): the one list of a model's settings."""
    columns = []
    for name, info in ModelSpec.model_fields.items():
        kinds = [a for a in (typing.get_args(info.annotation) or (info.annotation,)) if a is not type(None)]
        arrow = {int: pa.int32(), float: pa.float64()}.get(kinds[0], pa.string())  # Literal -> string
        columns.append((name, arrow))
    return columns


MODEL_COLUMNS = tuple(name for name, _ in _model_columns())

# Column -> Arrow type. Every row has every column (missing values are null), so files
# from one schema version always concatenate.
SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("results_version", pa.int32()),  # the trial's STAGE_VERSIONS[stage], part of its id
        ("train_version", pa.int32()),  # the train version of the model the row used
        ("sweep", pa.string()),
        ("stage", pa.string()),  # train | attack | diagnostic
        ("trial_id", pa.string()),
        ("train_id", pa.string()),  # the train trial whose checkpoint this row used
        ("status", pa.string()),  # ok | failed
        ("error", pa.string()),
        ("dataset", pa.string()),
        # the resolved model spec, one column per ModelSpec field (model: the checkpoint's model;
        # backbone: the model itself for a classical one)
        *_model_columns(),
        ("control", pa.string()),  # null | backbone_only (the hybrid's backbone alone) | equal_budget
        ("variant_id", pa.string()),  # hash of the resolved model spec and the control: the variant's key
        ("variant", pa.string()),  # human-readable model variant label
        ("noise_approx", pa.string()),  # exact | pauli_twirl
        ("stochastic", pa.bool_()),
        ("attack", pa.string()),
        ("attack_preset", pa.string()),
        ("attack_params", pa.string()),  # JSON
        ("attack_config", pa.string()),  # JSON: what ran (version, components, EOT, majority repeats)
        ("threat_model", pa.string()),  # linf | l2 | l0 | none
        ("eps", pa.float64()),
        ("seed", pa.int32()),
        ("eval_repeats", pa.int32()),
        ("success_rule", pa.string()),
        ("n_test", pa.int32()),
        ("clean_acc", pa.float64()),
        ("clean_acc_worst", pa.float64()),
        ("n_points", pa.int32()),  # the shared attack set: the same test points for every model
        ("n_attacked", pa.int32()),  # its points the model classifies correctly clean (attacked)
        ("n_success", pa.int32()),
        ("asr", pa.float64()),
        ("asr_worst", pa.float64()),
        ("robust_acc", pa.float64()),
        ("attack_seconds", pa.float64()),
        ("forward_calls", pa.int64()),  # model invocations (batches)
        ("backward_calls", pa.int64()),
        ("forward_samples", pa.int64()),  # samples through the model, summed over calls
        ("backward_samples", pa.int64()),
        ("linf_max", pa.float64()),
        ("l2_mean", pa.float64()),
        ("budget_ok", pa.bool_()),
        ("diagnostic", pa.string()),
        ("diagnostic_value", pa.float64()),
        ("diagnostic_pass", pa.bool_()),
        ("details", pa.string()),  # JSON, free-form extra measurements
        # Per point of the shared attack set, in the row itself so they are written with it:
        ("point_index", pa.list_(pa.int32())),  # test-set index
        ("point_correct", pa.list_(pa.bool_())),  # correct when clean (a majority of evaluations)
        ("point_broken", pa.list_(pa.bool_())),  # the attack succeeded (never for a clean-wrong point)
        # AutoAttack: the component that broke the point (apgd-ce, apgd-t, fab-t, square, ...)
        ("point_broken_by", pa.list_(pa.string())),
        ("point_eval_wrong", pa.list_(pa.list_(pa.bool_()))),  # stochastic models: each evaluation's outcome
        ("train_seconds", pa.float64()),
        ("train_epochs", pa.int32()),
        ("train_steps", pa.int64()),
        ("peak_rss_mb", pa.float64()),
        ("threads", pa.int32()),  # intra-op threads the trial fixed for itself (part of its id)
        ("determinism", pa.string()),  # JSON: the numeric settings the trial ran under
        ("executor", pa.string()),
        ("host", pa.string()),
        ("versions", pa.string()),  # JSON
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
COLUMNS = SCHEMA.names

# Columns that say where, when and how fast a trial ran. Every other column is a function of
# the trial's spec: the same trial id gives the same values on every executor and machine
# load (bit-identical on the same hardware and software). Tests compare rows without these.
VOLATILE_COLUMNS = (
    "sweep",
    "executor",
    "host",
    "versions",
    "created_at",
    "attack_seconds",
    "train_seconds",
    "peak_rss_mb",
)


@lru_cache(maxsize=1)
def package_versions() -> str:
    """The software a row was computed with, as JSON (a volatile column: the host's)."""
    found = {"python": platform.python_version()}
    for pkg in ("torch", "pennylane", "torchattacks", "qshield-dist"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return json.dumps(found, sort_keys=True)


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) -> Arrow table with exactly SCHEMA; unknown keys are an error."""
    rows = list(rows)
    for row in rows:
        extra = set(row) - set(COLUMNS)
        if extra:
            raise KeyError(f"row has columns not in the results schema: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    columns["schema_version"] = [SCHEMA_VERSION] * len(rows)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def comparable_rows(results_dir: Path) -> dict[str, list[str]]:
    """trial_id -> its rows without VOLATILE_COLUMNS, each as canonical JSON (NaN compares
    equal to NaN): what two runs of the same trials must agree on, bit for bit."""
    out: dict[str, list[str]] = {}
    for _, trial_id, _, path in result_files(results_dir):
        rows = [{k: v for k, v in row.items() if k not in VOLATILE_COLUMNS} for row in read_rows(path)]
        out[trial_id] = [json.dumps(row, sort_keys=True, default=str) for row in rows]
    return out


def differing_trials(a: Path, b: Path) -> dict[str, list[str]]:
    """Trial ids whose comparable rows differ between two results directories, with the
    columns that differ ('missing' where one side lacks the trial)."""
    rows_a, rows_b = comparable_rows(a), comparable_rows(b)
    diff: dict[str, list[str]] = {}
    for trial_id in sorted(rows_a.keys() | rows_b.keys()):
        left, right = rows_a.get(trial_id), rows_b.get(trial_id)
        if left is None or right is None or len(left) != len(right):
            diff[trial_id] = ["missing" if left is None or right is None else "row count"]
        elif left != right:
            cols: set[str] = set()
            for x, y in zip(left, right):
                row_a, row_b = json.loads(x), json.loads(y)
                cols |= {
                    k
                    for k in row_a.keys() | row_b.keys()
                    if json.dumps(row_a.get(k)) != json.dumps(row_b.get(k))
                }
            diff[trial_id] = sorted(cols)
    return diff


def write_rows(path: Path, rows: Iterable[dict[str, Any]], mode: int = 0o600) -> None:
    """Write one trial's rows as one Parquet file, atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(rows_to_table(rows), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes(), mode)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def trial_path(results_dir: Path, stage: str, dataset: str, trial_id: str, failed: bool = False) -> Path:
    """Where a trial's rows live: `<id>.parquet`, or `<id>.failed.parquet` for a failure row."""
    suffix = FAILED_SUFFIX if failed else ".parquet"
    return Path(results_dir) / f"stage={stage}" / f"dataset={dataset}" / f"{trial_id}{suffix}"


FAILED_SUFFIX = ".failed.parquet"


def trial_log_path(results_dir: Path, trial_id: str) -> Path:
    """Where a trial's log goes (every run of it appends): RESULTS/logs/<trial_id>.log."""
    return Path(results_dir) / "logs" / f"{trial_id}.log"


def result_files(results_dir: Path) -> Iterator[tuple[str, str, bool, Path]]:
    """(stage, trial_id, failed, path) for every complete result file (names only, no reads).
    Dot-files are the temporary files of atomic writes still in flight."""
    root = Path(results_dir)
    if not root.is_dir():
        return
    for stage_dir in sorted(root.iterdir()):
        if not (stage_dir.is_dir() and stage_dir.name.startswith("stage=")):
            continue
        stage = stage_dir.name[len("stage=") :]
        for dataset_dir in sorted(stage_dir.iterdir()):
            if not dataset_dir.is_dir():
                continue
            for entry in sorted(os.scandir(dataset_dir), key=lambda e: e.name):
                name = entry.name
                if name.startswith(".") or not name.endswith(".parquet"):
                    continue
                failed = name.endswith(FAILED_SUFFIX)
                trial_id = name[: -len(FAILED_SUFFIX)] if failed else name[: -len(".parquet")]
                yield stage, trial_id, failed, Path(entry.path)


def scan_done(results_dir: Path) -> dict[str, str]:
    """trial_id -> status ('ok' or 'failed') for every complete result file.

    Decided from file names alone (a failed trial's file ends in `.failed.parquet`), so
    resuming never opens a Parquet file. An ok file wins over a failed one of the same trial.
    """
    done: dict[str, str] = {}
    for _, trial_id, failed, _ in result_files(results_dir):
        if failed:
            done.setdefault(trial_id, "failed")
        else:
            done[trial_id] = "ok"
    return done


MANIFEST = "manifest.json"


def write_manifest(
    results_dir: Path, meta: dict[str, Any], trials: dict[str, dict[str, Any]], mode: int = 0o600
) -> None:
    """The sweep's spec and its grid: `trials` maps every expected trial id to its stage,
    dataset and results version. `read_manifest` is its one reader."""
    manifest = {**meta, "expected_trials": trials}
    data = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
    atomic_write_bytes(Path(results_dir) / MANIFEST, data, mode)


class ManifestError(ValueError):
    """manifest.json is absent or not in the format write_manifest writes."""


def read_manifest(results_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(meta, trials) as write_manifest wrote them; ManifestError says why not."""
    path = Path(results_dir) / MANIFEST
    if not path.exists():
        raise ManifestError(f"no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{MANIFEST} unreadable ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST} is not a JSON object")
    trials = manifest.pop("expected_trials", None)
    if not isinstance(trials, dict) or not all(isinstance(v, dict) for v in trials.values()):
        raise ManifestError(
            f"{MANIFEST} has no 'expected_trials' mapping of trial id -> {{stage, dataset, version}}"
        )
    return manifest, trials


def stored_versions(path: Path) -> dict[str, Any]:
    """schema_version, results_version and train_version of a result file (absent columns
    are left out). Reads three columns of the file's first row group only."""
    names = set(pq.read_schema(path).names)
    wanted = [c for c in ("schema_version", "results_version", "train_version") if c in names]
    table = pq.ParquetFile(path).read_row_group(0, columns=wanted) if wanted else None
    return {c: table.column(c)[0].as_py() for c in wanted} if table is not None and table.num_rows else {}


def stale_reason(stage: str, path: Path) -> str:
    """Why a result file of a trial outside the current grid is stale, for a person."""
    try:
        found = stored_versions(path)
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable ({type(exc).__name__})"
    schema = found.get("schema_version")
    if schema != SCHEMA_VERSION:
        return f"schema version {schema if schema is not None else '?'} (current {SCHEMA_VERSION})"
    if found.get("results_version") != STAGE_VERSIONS.get(stage):
        return f"{stage} version {found.get('results_version')} (current {STAGE_VERSIONS.get(stage)})"
    if found.get("train_version") != STAGE_VERSIONS["train"]:
        return f"built on a model of train version {found.get('train_version')} (current {STAGE_VERSIONS['train']})"
    return "not in this sweep's grid"


def move_aside(results_dir: Path, files: dict[Path, str], stamp: str) -> Path:
    """Move result files into `<results_dir>.pruned-<stamp>/`, keeping their relative paths,
    with `moved.tsv` listing each file and why. Nothing is deleted."""
    root = Path(results_dir)
    dest = root.with_name(f"{root.name}.pruned-{stamp}")
    lines = ["path\treason"]
    for path, reason in sorted(files.items()):
        relative = Path(path).relative_to(root)
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(path, target)
        lines.append(f"{relative}\t{reason}")
    atomic_write_bytes(dest / "moved.tsv", ("\n".join(lines) + "\n").encode())
    return dest
