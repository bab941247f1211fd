"""The sweep's current grid and what is set aside from it, for load.py.

manifest.json lists the trials of the current grid; it is parsed in a worker process while
load.py lists the files. Files of an older schema, and rows of trials the manifest does not
list (another results version, a grid point removed from the sweep), are set aside: counted
by reason, never summarized and never an error.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qshield_dist.results.current import OUTSIDE_GRID, stale_reason
from qshield_dist.results.schema import SCHEMA, SCHEMA_VERSION
from qshield_dist.results.store import MANIFEST, ManifestError, ResultStore


def set_aside_files(
    by_kind: dict[str, list[str]], keep: Any, set_aside: dict[str, int]
) -> dict[str, list[str]]:
    """Split every kind's files by `keep(path)` (None: keep, else the reason); the rows of the
    others are counted by their reason."""
    kept: dict[str, list[str]] = {}
    for kind, files in by_kind.items():
        kept[kind] = []
        for path in files:
            reason = keep(path)
            if reason is None:
                kept[kind].append(path)
                continue
            try:
                rows = pq.read_metadata(path).num_rows
            except (OSError, pa.ArrowException):
                rows = 1
            set_aside[reason] = set_aside.get(reason, 0) + rows
    return kept


def schema_problem(path: str) -> str | None:
    """Why a file cannot be read as the current schema, or None if it can."""
    try:
        parquet = pq.ParquetFile(path)
        found = {f.name: f.type for f in parquet.schema_arrow}
        first = parquet.read_row_group(0, columns=["schema_version"]) if "schema_version" in found else None
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable Parquet ({type(exc).__name__})"
    schema = first.column(0)[0].as_py() if first is not None and first.num_rows else None
    if schema != SCHEMA_VERSION:
        return stale_reason(None, schema, None, None)
    if any(found.get(f.name) != f.type for f in SCHEMA):
        return f"other columns than schema version {SCHEMA_VERSION} (written by an unreleased build?)"
    return None


_SEP = "\x1f"  # joins trial ids for the trip between processes (ids are hex hashes)


def _read_manifest(root: Path) -> tuple[dict[str, Any] | None, str | None, tuple[str, str, str] | None]:
    """The manifest (without its trial list), a note when it is absent or unusable
    (tolerated: a sweep may predate it), and its trials as three joined strings (ids, stages,
    datasets): cheap to send back from a worker process."""
    try:
        manifest, trials = ResultStore(root).read_manifest()
    except ManifestError as exc:
        return (
            None,
            f"{exc}: the current grid is not known, so every result file is summarized and missing trials are not listed",
            None,
        )
    joined = (
        _SEP.join(trials),
        _SEP.join(str(t.get("stage") or "") for t in trials.values()),
        _SEP.join(str(t.get("dataset") or "") for t in trials.values()),
    )
    return manifest, None, joined


def start_manifest_job(
    root: Path,
) -> Future[tuple[dict[str, Any] | None, str | None, tuple[str, str, str] | None]]:
    """Parse manifest.json in a forked process while the files are listed: json.loads holds
    the GIL for the whole parse (1.6 s for a million trials)."""
    executor: Any
    if "fork" in multiprocessing.get_all_start_methods() and (root / MANIFEST).exists():
        executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    else:
        executor = ThreadPoolExecutor(max_workers=1)
    job = executor.submit(_read_manifest, root)
    executor.shutdown(wait=False)
    return job


def resolve_manifest(job: Future[Any], notes: list[str]) -> tuple[dict[str, Any] | None, pl.DataFrame | None]:
    """The manifest and its trials as a frame (trial_id, stage, dataset), or None for each
    that is not known; why not is added to `notes`."""
    try:
        manifest, note, joined = job.result()
    except Exception as exc:  # a dead worker must not sink the report: the grid check is skipped, and said so
        manifest, note, joined = None, f"manifest.json could not be read ({type(exc).__name__}: {exc})", None
    if note:
        notes.append(note)
    if joined is None:
        return manifest, None
    expected = pl.DataFrame({"trial_id": [joined[0]], "stage": [joined[1]], "dataset": [joined[2]]})
    expected = (
        expected.select(pl.all().str.split(_SEP))
        .explode(pl.all())
        .with_columns(pl.col("stage", "dataset").replace("", None))
    )
    return manifest, expected.filter(pl.col("trial_id") != "")


def stale_counts(frames: list[pl.DataFrame], set_aside: dict[str, int]) -> None:
    """Add rows outside the manifest's grid, counted per (stage, versions), to `set_aside` by
    the reason results.current gives (the launcher's --prune says the same)."""
    for counts in frames:
        for stage, schema, results_version, train_version, n in counts.iter_rows():
            reason = stale_reason(stage, schema, results_version, train_version) or OUTSIDE_GRID
            set_aside[reason] = set_aside.get(reason, 0) + n


STALE_KEYS = ("stage", "schema_version", "results_version", "train_version")


def reasons_text(counts: dict[str, int]) -> str:
    """Set-aside row counts by reason, for a person: "3 reason a; 1 reason b"."""
    return "; ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"
