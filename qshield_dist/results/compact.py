"""Compaction (`launch SWEEP --compact`): per-trial result files merged into a few large
Parquet parts per stage and dataset, so that a big sweep's store holds tens of files where it
held 10^6, and a summary opens tens.

The launcher holds the results lease throughout. For each stage and dataset:
1. take the files whose rows all count: of trials in the grid, of the current versions, not in
   a SLURM array still queued (it could write them again), each the file whose rows count for
   its trial (store.precedence: a failure row superseded by an ok row stays where it is); and
   the parts of fewer than PART_ROWS rows whose rows all count, so that parts do not pile up;
2. stream their rows into new parts (ok rows and failure rows apart), of PART_ROWS rows at most
   and never splitting a file, each with ORIGINS in its footer: the files it holds, by path,
   size, mtime and inode as they were read. fileio.atomic_writer writes it: a dot-file,
   fsynced, renamed, its directory fsynced;
3. commit the index: the ledger reads the new parts and is saved;
4. only then remove the files merged, each only while it is still the one read (same size,
   mtime and inode), fsync their directories, and save the ledger again.

A kill at any point loses no row and duplicates none: before a part's rename only its dot-file
exists (the next compaction removes it); after it, a trial is in its old file and in the new
part, and every reader takes one of them (precedence: the old per-trial file, whose rows are
the same). The next --compact first removes the files that a part's ORIGINS lists and that are
still the ones it read, then goes on.

Directories of the flat layout (before the fan-out) are migrated on the way: their files are
merged like the others; the ones that do not count (another version, outside the grid) move
into their trial's folder, and flat logs into theirs. `migrated.tsv` lists every move.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Collection, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from qshield_dist.fileio import atomic_write_bytes, atomic_writer, fsync_dir, read_retried
from qshield_dist.results.current import stale_reason
from qshield_dist.results.ledger import Entry, ResultFile
from qshield_dist.results.schema import SCHEMA
from qshield_dist.results.store import PART, ResultStore, TrialKey, precedence

log = logging.getLogger(__name__)

PART_ROWS = 100_000  # rows per part at most: 10^6 trials of a stage and dataset make 10 parts
ROW_GROUP_ROWS = 4096  # rows per row group: what a part holds in memory while it is written
ORIGINS = "qshield.compacted_from"  # footer key: JSON [[path, size, mtime_ns, inode], ...]
MIGRATED = "migrated.tsv"


@dataclass
class Compacted:
    parts: list[str] = field(default_factory=list)  # the new parts, relative to the results directory
    merged: int = 0  # files merged into them
    rows: int = 0
    removed: int = 0  # files merged and removed, this run's and an interrupted run's
    migrated: int = 0  # files of the flat layout moved into their folders (listed in migrated.tsv)
    set_aside: int = 0  # superseded files of the flat layout, moved aside (store.move_aside)
    kept: Counter[str] = field(default_factory=Counter)  # per-trial files left as they are, by why


_Stat = tuple[int, int, int]  # size, mtime_ns, inode: a file as it was read


def _stat(st: os.stat_result) -> _Stat:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class _Source:
    """A file to merge, as the ledger knows it."""

    file: ResultFile
    rows: int


def compact(
    store: ResultStore,
    expected: Mapping[str, Mapping[str, Any]],
    in_flight: Collection[str] = (),
    *,
    part_rows: int = PART_ROWS,
    mode: int = 0o644,
    on_step: Callable[[str], None] | None = None,
) -> Compacted:
    """Compact `store`, whose results lease the caller holds, for the grid `expected` (trial
    id -> its stage and dataset, as sweep.manifest_trials gives them); `in_flight`: the
    trials of SLURM arrays still queued. on_step(name) is called after each step (written,
    synced, indexed, and midway through removing: the tests kill the process there)."""
    step = on_step or (lambda name: None)
    out = Compacted()
    _remove_temporaries(store)
    store.refresh(repair=True, mode=mode)
    out.removed = _remove_leftovers(store)
    if out.removed:
        log.info("removed %d files an interrupted compaction had merged", out.removed)
        store.refresh(repair=True, mode=mode)
    out.set_aside = _set_aside_superseded_flat(store)
    groups = _plan(store, expected, set(in_flight), part_rows, out.kept)
    read: list[tuple[Path, _Stat]] = []
    for (stage, dataset, failed), chunks in groups.items():
        number = _next_part(store, stage, dataset)
        for chunk in chunks:
            path = store.part_path(stage, dataset, number, failed)
            read += _write_part(store.root, path, chunk, mode, step)
            step("synced")
            out.parts.append(str(path.relative_to(store.root)))
            out.merged += len(chunk)
            out.rows += sum(s.rows for s in chunk)
            number += 1
    if out.parts:
        store.refresh(repair=True, mode=mode)  # the index: the ledger knows the new parts
        step("indexed")
        out.removed += _remove(read, step)
        store.refresh(repair=True, mode=mode)
    out.migrated = _migrate(store, expected, mode)
    if out.migrated:
        store.refresh(repair=True, mode=mode)
    return out


def _winners(store: ResultStore) -> dict[str, tuple[Any, str]]:
    """trial id -> (rank, file) of the file whose rows count for it (precedence)."""
    winner: dict[str, tuple[Any, str]] = {}
    for rel, (_, _, entries) in store.ledger.files.items():
        for e in entries:
            rank = precedence(rel, e.status != "ok")
            if e.trial_id not in winner or rank < winner[e.trial_id][0]:
                winner[e.trial_id] = (rank, rel)
    return winner


def _set_aside_superseded_flat(store: ResultStore) -> int:
    """A flat-layout file whose trial's rows count in another file (a retry's own file) counts
    for nothing now, but precedence ranks it above a part: once compaction merged the newer
    file into one, its older rows would count again. So it is moved aside, never deleted."""
    winner = _winners(store)
    stale = {
        file.path: "superseded: a newer file holds its trial (set aside by --compact)"
        for file in store.files()
        if file.trial_id is not None
        and file.rel.count("/") == 2  # stage=S/dataset=D/<id>.parquet
        and winner.get(file.trial_id, (None, file.rel))[1] != file.rel
    }
    if stale:
        dest = store.move_aside(stale)
        log.warning("moved %d superseded files of the flat layout aside, into %s", len(stale), dest)
    return len(stale)


def _plan(
    store: ResultStore, expected: Mapping[str, Any], in_flight: set[str], part_rows: int, kept: Counter[str]
) -> dict[tuple[str, str, bool], list[list[_Source]]]:
    """(stage, dataset, failed) -> the parts to write, each a list of files to merge."""
    files = {f.rel: f for f in store.files()}
    known = store.ledger.files
    winner = _winners(store)
    taken: dict[tuple[str, str, bool], list[_Source]] = {}
    small_parts: dict[tuple[str, str, bool], int] = {}
    for rel, file in files.items():
        if rel not in known:
            continue  # unreadable this time: the ledger has no entry
        entries = known[rel][2]
        why = _why_not(entries, rel, expected, in_flight, winner)
        if file.trial_id is not None and why is not None:
            kept[why] += 1
            continue
        if file.trial_id is None and (why is not None or len(entries) >= part_rows):
            continue
        group = (file.stage, file.dataset, file.failed)
        taken.setdefault(group, []).append(_Source(file, len(entries)))
        small_parts[group] = small_parts.get(group, 0) + (file.trial_id is None)
    plan = {}
    for group, sources in taken.items():
        if len(sources) == small_parts[group] and len(sources) < 2:
            continue  # one small part alone: nothing to merge it with
        chunks: list[list[_Source]] = [[]]
        for source in sources:
            if chunks[-1] and sum(s.rows for s in chunks[-1]) + source.rows > part_rows:
                chunks.append([])
            chunks[-1].append(source)
        plan[group] = chunks
    return plan


def _why_not(
    entries: list[Entry],
    rel: str,
    expected: Mapping[str, Any],
    in_flight: set[str],
    winner: dict[str, tuple[Any, str]],
) -> str | None:
    """Why a file's rows are not merged, or None when they all count."""
    if not entries:
        return "holds no row"
    for e in entries:
        if e.trial_id not in expected:
            return "not in this sweep's grid"
        if stale_reason(e.stage, e.schema_version, e.results_version, e.train_version) is not None:
            return "not of the current versions"
        if e.trial_id in in_flight:
            return "in a SLURM array still queued"
        if winner[e.trial_id][1] != rel:
            return "superseded by another file of its trial"
    return None


def _next_part(store: ResultStore, stage: str, dataset: str) -> int:
    parts = store.parts(stage, dataset)
    match = PART.fullmatch(parts[0].name) if parts else None
    return int(match.group(1)) + 1 if match else 1


def _write_part(
    root: Path, path: Path, sources: list[_Source], mode: int, step: Callable[[str], None]
) -> list[tuple[Path, _Stat]]:
    """Write one part from `sources`; returns each file as it was read (its stat)."""
    read: list[tuple[Path, _Stat]] = []
    with atomic_writer(path, mode) as handle:
        writer = pq.ParquetWriter(handle, SCHEMA)
        pending: list[pa.RecordBatch] = []
        for source in sources:
            opened, parquet = read_retried(source.file.path, _open)
            with opened:  # the stat is of the bytes read
                read.append((source.file.path, _stat(os.fstat(opened.fileno()))))
                cast = parquet.schema_arrow.remove_metadata() != SCHEMA.remove_metadata()
                for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
                    pending.append(batch.select(SCHEMA.names).cast(SCHEMA) if cast else batch)
                    if sum(b.num_rows for b in pending) >= ROW_GROUP_ROWS:
                        writer.write_table(pa.Table.from_batches(pending, SCHEMA))
                        pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending, SCHEMA))
        origins = [[str(p.relative_to(root)), *s] for p, s in read]
        writer.add_key_value_metadata({ORIGINS: json.dumps(origins)})
        writer.close()
        step("written")
    log.info("wrote %s: %d files", path, len(sources))
    return read


def _open(path: Path) -> tuple[BinaryIO, pq.ParquetFile]:
    """An open file and its Parquet footer, read."""
    handle = open(path, "rb")
    try:
        return handle, pq.ParquetFile(handle)
    except BaseException:
        handle.close()
        raise


def _remove_temporaries(store: ResultStore) -> None:
    """Dot-files of parts that a killed compaction was writing (nobody else writes parts)."""
    for folder in store.root.glob("stage=*/dataset=*"):
        for path in folder.glob(".part-*.tmp"):
            log.info("removing %s, a part an interrupted compaction did not finish", path)
            path.unlink()


def _remove_leftovers(store: ResultStore) -> int:
    """Remove the files that a part lists in ORIGINS and that are still the ones it read: an
    interrupted compaction wrote the part, then stopped before removing them."""
    both = set()
    for entries in store.ledger.by_trial().values():
        rels = {e.rel for e in entries}
        if len(rels) > 1:
            both |= {rel for rel in rels if PART.fullmatch(rel.rpartition("/")[2])}
    merged: list[tuple[Path, _Stat]] = []
    for rel in sorted(both):
        try:
            meta = pq.read_metadata(store.root / rel).metadata or {}
        except (OSError, pa.ArrowException) as exc:
            log.warning("%s: its list of merged files is unreadable (%s): left as it is", rel, exc)
            continue
        for origin, size, mtime_ns, inode in json.loads(meta.get(ORIGINS.encode(), b"[]")):
            merged.append((store.root / origin, (size, mtime_ns, inode)))
    return _remove(merged, lambda name: None)


def _remove(merged: list[tuple[Path, _Stat]], step: Callable[[str], None]) -> int:
    """Remove each file merged while it is still the one read; fsync their directories."""
    removed = 0
    folders = set()
    for i, (path, was) in enumerate(merged):
        if i == len(merged) // 2:
            step("removing")
        try:
            now = _stat(os.stat(path))
        except FileNotFoundError:
            continue
        if now != was:
            log.warning(
                "%s changed since it was merged: left as it is (its rows count over the part's)", path
            )
            continue
        path.unlink()
        removed += 1
        folders.add(path.parent)
    for folder in folders:
        fsync_dir(folder)
    return removed


def _migrate(store: ResultStore, expected: Mapping[str, Mapping[str, Any]], mode: int) -> int:
    """Move what is left of the flat layout into the fan-out: result files into their trial's
    folder, logs into theirs (a log's stage and dataset from the ledger, else the grid). A file
    whose new place is taken stays. Every move is listed in migrated.tsv."""
    moves = []
    for file in store.files():
        if file.trial_id is not None and file.rel.count("/") == 2:  # stage=S/dataset=D/<id>.parquet
            key = TrialKey(file.stage, file.dataset, file.trial_id)
            moves.append((file.path, store.trial_path(key, file.failed)))
    logs = store.flat_log_path("x").parent
    if logs.is_dir():
        by_trial = store.ledger.by_trial()
        for entry in os.scandir(logs):
            trial_id = entry.name.removesuffix(".log")
            if not entry.is_file() or entry.name.startswith(".") or trial_id == entry.name:
                continue
            known = by_trial.get(trial_id)
            where = (known[0].stage, known[0].dataset) if known else None
            spec = expected.get(trial_id, {})
            if where is None and "stage" in spec and "dataset" in spec:
                where = (spec["stage"], spec["dataset"])
            if where is not None:
                moves.append((Path(entry.path), store.log_path(TrialKey(*where, trial_id))))
    moved = []
    for old, new in moves:
        if new.exists():
            log.warning("%s stays in the flat layout: %s exists", old, new)
            continue
        new.parent.mkdir(parents=True, exist_ok=True)
        os.rename(old, new)
        moved.append((old, new))
    if not moved:
        return 0
    for folder in {p.parent for pair in moved for p in pair}:
        fsync_dir(folder)
    listing = store.root / MIGRATED
    lines = listing.read_text().splitlines() if listing.exists() else ["from\tto"]
    lines += [f"{old.relative_to(store.root)}\t{new.relative_to(store.root)}" for old, new in moved]
    atomic_write_bytes(listing, ("\n".join(lines) + "\n").encode(), mode)
    log.info("moved %d files of the flat layout into their folders; the list is %s", len(moved), listing)
    return len(moved)
