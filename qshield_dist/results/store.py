"""The results store: one results directory, its layout, its files and what is done in it.

Layout (hive style; a trial's files in a folder named by the two hex digits of its id after
its stage letter, so that 10^6 trials of a stage and dataset put about 3,900 files in each of
256 folders: parallel filesystems slow down past some 10^4 entries per folder):

    RESULTS/stage=attack/dataset=digits/3f/A3f...parquet     one trial's rows (<id>.failed.parquet: a failure row)
    RESULTS/stage=attack/dataset=digits/part-000001.parquet  a compacted part: many trials' ok rows
    RESULTS/stage=attack/dataset=digits/part-000002.failed.parquet   ... or their failure rows
    RESULTS/logs/stage=attack/dataset=digits/3f/A3f....log   a trial's log
    RESULTS/manifest.json                                    the sweep and its expected trials
    RESULTS/ledger.arrow                                     what each file holds (ledger.py)

`launch --compact` (compact.py) merges per-trial files into parts. A directory of the flat
layout (before the fan-out: `stage=S/dataset=D/<id>.parquet`, `logs/<id>.log`) is read as it
is; --compact migrates it. When several files hold rows of one trial (a retry after a
compaction, a compaction killed before it removed what it merged), one file's rows count,
by precedence(): ok rows before failure rows, then the trial's own file, then one of the flat
layout, then the newest part. Every reader follows it: this store, the ledger's users, the summary.

Every file is written atomically (fileio), so a reader only ever sees complete files.
ResultStore is the one way in: workers write and read rows through it, the launcher asks it
what is done (resume), the summary lists files and reads the manifest through it, and
nothing else spells a result file's name.

    store = ResultStore(results_dir, checkpoint_dir)
    store.write(trial, rows)                   # any process: one trial's rows, atomically
    store.read(trial) -> rows                  # its ok rows, wherever they count (failed=True: its failure row)
    store.statuses(stage, dataset, ids)        # ok | failed | missing: a worker's view, without the ledger
    store.refresh(repair=...)                  # bring the ledger up to date (the lease holder repairs)
    store.done(ids) -> Done                    # what counts as done (its seconds), why the rest runs again
    store.superseded(files)                    # rows that do not count: another file holds their trial
    store.stale(expected_ids) -> {path: why}   # files that are not the grid's current rows
    store.move_aside(files, stamp)             # RESULTS.pruned-<stamp>/, nothing deleted
    store.write_manifest(meta, trials); store.read_manifest()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qshield_dist.fileio import atomic_write_bytes, read_bytes
from qshield_dist.results.current import (
    CHECKPOINT_DIFFERS,
    CHECKPOINT_MISSING,
    OUTSIDE_GRID,
    not_done_reason,
    stale_reason,
)
from qshield_dist.results.ledger import Entry, Ledger, Refreshed, ResultFile
from qshield_dist.results.schema import VOLATILE_COLUMNS, rows_to_table

log = logging.getLogger(__name__)

FAILED_SUFFIX = ".failed.parquet"
MANIFEST = "manifest.json"
LOGS = "logs"
PREFIX_DIGITS = 2  # hex digits of a trial id naming its folder: 256 folders per stage and dataset
PART = re.compile(r"part-(\d+)(\.failed)?\.parquet")


class TrialRef(Protocol):
    """What the store needs of a trial (grid's trials have it; TrialKey is the bare form)."""

    @property
    def stage(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def trial_id(self) -> str: ...


class TrialKey(NamedTuple):
    stage: str
    dataset: str
    trial_id: str


@dataclass
class Done:
    status: dict[str, str] = field(default_factory=dict)  # trial id -> ok | failed: its stored rows count
    rerun: dict[str, str] = field(default_factory=dict)  # trial id -> why its stored rows do not count
    seconds: dict[str, float] = field(default_factory=dict)  # ok trial id -> its trial_seconds


class ManifestError(ValueError):
    """manifest.json is absent or not in the format write_manifest writes."""


class ResultStore:
    def __init__(
        self, results_dir: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str] | None = None
    ):
        """checkpoint_dir: where train trials' checkpoints are (needed by done() only)."""
        self.root = Path(results_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.ledger = Ledger(self.root)
        self._loaded = False
        self._by_trial: dict[str, list[Entry]] | None = None

    # -- layout ---------------------------------------------------------------------------

    def trial_path(self, trial: TrialRef, failed: bool = False) -> Path:
        """`<prefix>/<id>.parquet`, or `<prefix>/<id>.failed.parquet` for a failure row."""
        suffix = FAILED_SUFFIX if failed else ".parquet"
        return (
            self._folder(trial.stage, trial.dataset) / _prefix(trial.trial_id) / f"{trial.trial_id}{suffix}"
        )

    def flat_path(self, trial: TrialRef, failed: bool = False) -> Path:
        """Where the flat layout (before the fan-out) kept a trial's file: read, never written."""
        suffix = FAILED_SUFFIX if failed else ".parquet"
        return self._folder(trial.stage, trial.dataset) / f"{trial.trial_id}{suffix}"

    def part_path(self, stage: str, dataset: str, number: int, failed: bool = False) -> Path:
        """A compacted part: many trials' ok rows, or (failed) their failure rows."""
        return self._folder(stage, dataset) / f"part-{number:06d}{FAILED_SUFFIX if failed else '.parquet'}"

    def log_path(self, trial: TrialRef) -> Path:
        """Where a trial's log goes (every run of it appends)."""
        folder = self.root / LOGS / f"stage={trial.stage}" / f"dataset={trial.dataset}"
        return folder / _prefix(trial.trial_id) / f"{trial.trial_id}.log"

    def flat_log_path(self, trial_id: str) -> Path:
        """Where the flat layout kept a trial's log."""
        return self.root / LOGS / f"{trial_id}.log"

    def _folder(self, stage: str, dataset: str) -> Path:
        return self.root / f"stage={stage}" / f"dataset={dataset}"

    def checkpoint_path(self, train_id: str) -> Path:
        if self.checkpoint_dir is None:
            raise ValueError("this ResultStore was made without a checkpoint directory")
        return checkpoint_path(self.checkpoint_dir, train_id)

    def files(self) -> Iterator[ResultFile]:
        """Every complete result file, from names alone, sorted: trials' files in their
        folders, and beside the folders parts and files of the flat layout. Dot-files are the
        temporary files of atomic writes still in flight."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not (stage_dir.name.startswith("stage=") and stage_dir.is_dir()):
                continue
            stage = stage_dir.name[len("stage=") :]
            for dataset_dir in sorted(os.scandir(stage_dir.path), key=lambda e: e.name):
                if not dataset_dir.is_dir():
                    continue
                dataset = dataset_dir.name.removeprefix("dataset=")
                folder = f"{stage_dir.name}/{dataset_dir.name}/"
                for entry in sorted(os.scandir(dataset_dir.path), key=lambda e: e.name):
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        for name in sorted(os.listdir(entry.path)):
                            yield from self._file(stage, dataset, f"{folder}{entry.name}/", name)
                    else:
                        yield from self._file(stage, dataset, folder, entry.name)

    def _file(self, stage: str, dataset: str, folder: str, name: str) -> Iterator[ResultFile]:
        if name.startswith(".") or not name.endswith(".parquet"):
            return
        failed = name.endswith(FAILED_SUFFIX)
        trial_id = (
            None if PART.fullmatch(name) else name.removesuffix(FAILED_SUFFIX if failed else ".parquet")
        )
        yield ResultFile(stage, dataset, trial_id, failed, folder + name, self.root)

    def parts(self, stage: str, dataset: str, failed: bool | None = None) -> list[Path]:
        """The compacted parts of a stage and dataset, newest first (failed: only those of
        failure rows, or only those of ok rows)."""
        try:
            names = os.listdir(self._folder(stage, dataset))
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), name) for name in names if (m := PART.fullmatch(name))]
        if failed is not None:
            found = [(n, name) for n, name in found if name.endswith(FAILED_SUFFIX) == failed]
        return [self._folder(stage, dataset) / name for _, name in sorted(found, reverse=True)]

    # -- rows (any process) ---------------------------------------------------------------

    def write(self, trial: TrialRef, rows: Iterable[dict[str, Any]], mode: int = 0o600) -> Path:
        """One trial's rows as one Parquet file, atomically: the ok file when every row is ok
        (a failure row of an earlier run is then removed), else the failed file."""
        rows = list(rows)
        failed = any(row.get("status") != "ok" for row in rows)
        sink = pa.BufferOutputStream()
        pq.write_table(rows_to_table(rows), sink)
        path = self.trial_path(trial, failed)
        atomic_write_bytes(path, sink.getvalue().to_pybytes(), mode)
        if not failed:
            self.trial_path(trial, failed=True).unlink(missing_ok=True)
            self.flat_path(trial, failed=True).unlink(missing_ok=True)
        return path

    def read(self, trial: TrialRef, failed: bool = False) -> list[dict[str, Any]]:
        """The trial's ok rows (failed: its failure rows) from the file they count in: its own,
        one of the flat layout, or the newest part that holds it (FileNotFoundError if none)."""
        for path in (self.trial_path(trial, failed), self.flat_path(trial, failed)):
            try:
                return read_parquet(path)
            except FileNotFoundError:
                pass
        found = self._in_parts(trial.stage, trial.dataset, [trial.trial_id], failed)
        if trial.trial_id in found:
            return found[trial.trial_id].to_pylist()
        kind = "failure" if failed else "ok"
        raise FileNotFoundError(f"no {kind} rows of trial {trial.trial_id} in {self.root}")

    def statuses(self, stage: str, dataset: str, trial_ids: Iterable[str]) -> dict[str, str]:
        """ok | failed | missing per trial, from names and the parts' trial ids: what a worker
        can see now, without the ledger. An ok row anywhere wins over a failure row."""
        out = {}
        for trial_id in trial_ids:
            key = TrialKey(stage, dataset, trial_id)
            if self.trial_path(key).exists() or self.flat_path(key).exists():
                out[trial_id] = "ok"
            elif self.trial_path(key, failed=True).exists() or self.flat_path(key, failed=True).exists():
                out[trial_id] = "failed"
            else:
                out[trial_id] = "missing"
        not_ok = [t for t, s in out.items() if s != "ok"]
        if not_ok:
            out.update(dict.fromkeys(self._in_parts(stage, dataset, not_ok, False, ["trial_id"]), "ok"))
        missing = [t for t, s in out.items() if s == "missing"]
        if missing:
            out.update(dict.fromkeys(self._in_parts(stage, dataset, missing, True, ["trial_id"]), "failed"))
        return out

    def _in_parts(
        self, stage: str, dataset: str, trial_ids: list[str], failed: bool, columns: list[str] | None = None
    ) -> dict[str, pa.Table]:
        """trial id -> its rows in the newest part (of ok rows, or of failure rows) holding it."""
        out: dict[str, pa.Table] = {}
        wanted = set(trial_ids)
        for part in self.parts(stage, dataset, failed):
            if not wanted:
                break
            table = pq.read_table(part, columns=columns, filters=[("trial_id", "in", sorted(wanted))])
            ids = table.column("trial_id")
            for trial_id in set(ids.to_pylist()):
                out[trial_id] = table.filter(pc.equal(ids, trial_id))
            wanted -= out.keys()
        return out

    # -- what is done (the launcher) -------------------------------------------------------

    def refresh(self, repair: bool = False, mode: int = 0o600) -> Refreshed:
        """Bring the ledger in line with the files (reading only new or changed ones). With
        repair (the results lease's holder only): move corrupt files aside and save the ledger."""
        if not self._loaded:
            self.ledger.load()
            self._loaded = True
        found = self.ledger.refresh(self.files())
        self._by_trial = None
        for path, why in found.unreadable.items():
            log.warning("%s: %s; its trial counts as not done this time, the file is left alone", path, why)
        if found.corrupt:
            if repair:
                dest = self.move_aside(found.corrupt)
                log.warning(
                    "%d corrupt result file(s) moved to %s; their trials run again", len(found.corrupt), dest
                )
            else:
                log.warning(
                    "%d corrupt result file(s): %s", len(found.corrupt), ", ".join(map(str, found.corrupt))
                )
        if repair:
            self.save(mode)
        return found

    def save(self, mode: int = 0o600) -> None:
        """Save the ledger (the results lease's holder only)."""
        if self.root.is_dir():
            self.ledger.save(mode)

    def _trials(self) -> dict[str, list[Entry]]:
        if not self._loaded:
            self.refresh()
        if self._by_trial is None:
            self._by_trial = self.ledger.by_trial()
        return self._by_trial

    def done(self, trial_ids: Iterable[str]) -> Done:
        """Of `trial_ids`, those whose stored rows count, with their status (the files in the
        order of precedence(): an ok row wins over a failure row), and why the others' rows do
        not (results.current decides).
        Opens no result file (the ledger knows them); hashes a checkpoint only when its size or
        mtime changed since it last matched."""
        by_trial = self._trials()
        out = Done()
        for trial_id in trial_ids:
            for entry in sorted(
                by_trial.get(trial_id, ()), key=lambda e: precedence(e.rel, e.status != "ok")
            ):
                checkpoint = (
                    self._checkpoint(entry) if entry.stage == "train" and entry.status == "ok" else None
                )
                reason = not_done_reason(entry, checkpoint)
                if reason is None:
                    out.status[trial_id] = entry.status
                    if entry.status == "ok" and entry.seconds is not None:
                        out.seconds[trial_id] = entry.seconds
                    out.rerun.pop(trial_id, None)
                    break
                out.rerun.setdefault(trial_id, reason)
        return out

    def checkpoint_problems(self, rows: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """Of ok train rows given as (file, trial id), the file relative to the results
        directory, those whose checkpoint is not the one they describe, with why: done()'s rule
        for a few rows, without indexing every trial (launch --status)."""
        wanted: dict[str, set[str]] = {}
        for rel, trial_id in rows:
            wanted.setdefault(rel, set()).add(trial_id)
        out = {}
        for rel, trial_ids in wanted.items():
            _, _, entries = self.ledger.files.get(rel, (0, 0, []))
            for entry in entries:
                if entry.trial_id in trial_ids:
                    reason = self._checkpoint(entry)
                    if reason is not None:
                        out[(rel, entry.trial_id)] = reason
        return out

    def _checkpoint(self, entry: Entry) -> str | None:
        """Why the train row's checkpoint is not the one it describes, or None if it is."""
        path = self.checkpoint_path(entry.trial_id)
        try:
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) == (entry.checkpoint_size, entry.checkpoint_mtime_ns):
                return None
            digest = hashlib.sha256(read_bytes(path)).hexdigest()
        except FileNotFoundError:
            return CHECKPOINT_MISSING
        except OSError as exc:
            return f"its checkpoint is unreadable now ({exc})"
        if digest != entry.checkpoint_sha256:
            return CHECKPOINT_DIFFERS
        self.ledger.update(entry._replace(checkpoint_size=st.st_size, checkpoint_mtime_ns=st.st_mtime_ns))
        self._by_trial = None
        return None

    def superseded(self, files: list[ResultFile]) -> dict[str, set[str]]:
        """Of `files`, file (relative path) -> the trials whose rows in it do not count,
        because a file of higher precedence() holds the same trial. Empty when no trial is in
        two files, the common case. Reads the parts' trial_id column only."""
        ids: list[str] = []
        index: list[int] = []
        tables = []
        for i, file in enumerate(files):
            if file.trial_id is not None:
                ids.append(file.trial_id)
                index.append(i)
            else:
                held = pc.unique(pq.read_table(file.path, columns=["trial_id"]).column(0).combine_chunks())
                tables.append(pa.table({"trial_id": held, "file": pa.array([i] * len(held), pa.int64())}))
        singles = pa.table({"trial_id": pa.array(ids, pa.string()), "file": pa.array(index, pa.int64())})
        table = pa.concat_tables([singles, *tables])
        counts = table.group_by("trial_id").aggregate([("file", "count")])
        twice = counts.filter(pc.greater(counts.column("file_count"), 1)).column("trial_id")
        if len(twice) == 0:
            return {}
        held_by: dict[str, list[int]] = {}
        both = table.filter(pc.is_in(table.column("trial_id"), value_set=twice.combine_chunks()))
        for trial_id, i in zip(both.column("trial_id").to_pylist(), both.column("file").to_pylist()):
            held_by.setdefault(trial_id, []).append(i)
        out: dict[str, set[str]] = {}
        for trial_id, holders in held_by.items():
            ranked = sorted(holders, key=lambda i: precedence(files[i].rel, files[i].failed))
            for i in ranked[1:]:
                out.setdefault(files[i].rel, set()).add(trial_id)
        return out

    def stale(self, expected: set[str] | dict[str, Any], in_grid: bool = False) -> dict[Path, str]:
        """Files that are not the grid's current rows, with why: of trials outside `expected`,
        or of another version (an older schema) of a trial in it (in_grid: those only). Resume
        moves the latter aside before running their trials again; `launch --prune` moves both."""
        out: dict[Path, str] = {}
        for rel, (_, _, entries) in self._files().items():
            if in_grid and not any(e.trial_id in expected for e in entries):
                continue
            reasons = [
                stale_reason(e.stage, e.schema_version, e.results_version, e.train_version)
                or (None if e.trial_id in expected else OUTSIDE_GRID)
                for e in entries
            ]
            if entries and all(reasons):
                out[self.root / rel] = str(reasons[0])
        return out

    def _files(self) -> dict[str, tuple[int, int, list[Entry]]]:
        self._trials()
        return self.ledger.files

    def move_aside(self, files: dict[Path, str], stamp: str | None = None) -> Path:
        """Move files into `<results_dir>.pruned-<stamp>/`, keeping their relative paths, with
        `moved.tsv` listing each file and why (added to, if the folder exists). Nothing is deleted."""
        stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.root.with_name(f"{self.root.name}.pruned-{stamp}")
        listing = dest / "moved.tsv"
        lines = listing.read_text().splitlines() if listing.exists() else ["path\treason"]
        for path, reason in sorted(files.items()):
            relative = Path(path).relative_to(self.root)
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(path, target)
            lines.append(f"{relative}\t{reason}")
        atomic_write_bytes(listing, ("\n".join(lines) + "\n").encode())
        self.ledger.drop(files)
        self._by_trial = None
        return dest

    # -- the manifest ---------------------------------------------------------------------

    def write_manifest(
        self, meta: dict[str, Any], trials: dict[str, dict[str, Any]], mode: int = 0o600
    ) -> None:
        """The sweep's spec and its grid: `trials` maps every expected trial id to its stage,
        dataset and results version. read_manifest is its one reader."""
        manifest = {**meta, "expected_trials": trials}
        data = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
        atomic_write_bytes(self.root / MANIFEST, data, mode)

    def read_manifest(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(meta, trials) as write_manifest wrote them; ManifestError says why not."""
        path = self.root / MANIFEST
        try:
            manifest = json.loads(read_bytes(path))
        except FileNotFoundError:
            raise ManifestError(f"no {MANIFEST}") from None
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

    # -- parity ---------------------------------------------------------------------------

    def comparable_rows(self) -> dict[str, list[str]]:
        """trial_id -> its rows without VOLATILE_COLUMNS, each as canonical JSON (NaN compares
        equal to NaN), from the file they count in: what two runs of the same trials must
        agree on, bit for bit."""
        out: dict[str, list[str]] = {}
        source: dict[str, str] = {}
        for file in sorted(self.files(), key=lambda f: precedence(f.rel, f.failed)):
            for row in read_parquet(file.path):
                if source.setdefault(row["trial_id"], file.rel) != file.rel:
                    continue  # a file of higher precedence holds this trial
                row = {k: v for k, v in row.items() if k not in VOLATILE_COLUMNS}
                out.setdefault(row["trial_id"], []).append(json.dumps(row, sort_keys=True, default=str))
        return out


def precedence(rel: str, failed: bool) -> tuple[bool, int, int]:
    """Which file's rows of a trial count when several files hold it (the lowest first): ok
    rows before failure rows; then the trial's own file, then one of the flat layout (written
    before it), then a part, the newest (highest number) first. A compaction writes only rows
    that count, into a part numbered above the others, so the order holds after it too."""
    folder, _, name = rel.rpartition("/")
    part = PART.fullmatch(name)
    if part is not None:
        return (failed, 2, -int(part.group(1)))
    return (failed, 1 if folder.count("/") == 1 else 0, 0)


def _prefix(trial_id: str) -> str:
    """A trial's folder: the hex digits after its stage letter (ids are a letter and hex)."""
    return trial_id[1 : 1 + PREFIX_DIGITS] or "_"


def checkpoint_path(checkpoint_dir: str | os.PathLike[str], train_id: str) -> Path:
    """A train trial's checkpoint: content-addressed by its id, shared between sweeps."""
    return Path(checkpoint_dir) / f"{train_id}.pt"


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """A result file's rows (an OSError is retried, fileio.read_bytes)."""
    return pq.read_table(pa.BufferReader(read_bytes(path))).to_pylist()


def differing_trials(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Trial ids whose comparable rows differ between two results directories, with the
    columns that differ ('missing' where one side lacks the trial)."""
    rows_a, rows_b = ResultStore(a).comparable_rows(), ResultStore(b).comparable_rows()
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
