"""The results ledger: what each result file holds, so that deciding what is done never opens
every file on every launch.

`RESULTS/ledger.arrow` (Arrow IPC) has one row per trial per result file: the file's path,
size and mtime_ns when it was read, and the facts resume decides on (trial id, stage, status,
schema and results versions, a train row's checkpoint sha256, whether a diagnostic's inputs
were all ok), plus, for a train row, the checkpoint's size and mtime_ns when its sha256 last
matched; and what `launch --status` and SLURM packing read: a failure row's error (its first
line) and the seconds its trial took (the row's trial_seconds). An entry is trusted only while
its file's size and mtime_ns are unchanged, as git's index trusts a file's stat: a new or
changed file is read once (its key columns), and a file that no longer decodes is corrupt.
Names alone could not say which schema a row has, whether its checkpoint is the one it
describes, or which trials a compacted file holds; reading every file on every launch would
cost as much as a summary.

Only the holder of the results lease saves it (atomically); anyone else refreshes a copy in
memory. A ledger that is missing or unreadable is rebuilt from the files. A compaction
commits it as its index (the new parts' entries) before it removes the files it merged.
"""

from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qshield_dist.fileio import atomic_write_bytes, read_bytes, read_retried

log = logging.getLogger(__name__)

LEDGER = "ledger.arrow"
LEDGER_FORMAT = 2  # the columns of ENTRY (2: error, seconds); a ledger of another format is rebuilt
_READERS = 8  # files read at once: on NFS the wait is latency, not CPU


class Entry(NamedTuple):
    rel: str  # the file, relative to the results directory
    size: int
    mtime_ns: int
    trial_id: str
    stage: str
    dataset: str
    status: str
    schema_version: int | None
    results_version: int | None
    train_version: int | None
    checkpoint_sha256: str | None
    inputs_ok: bool | None
    checkpoint_size: int | None = None  # the checkpoint's stat when its sha256 last matched
    checkpoint_mtime_ns: int | None = None
    error: str | None = None  # a failure row's error, its first line (ERROR_CHARS at most)
    seconds: float | None = None  # the row's trial_seconds: the whole trial, any stage


ENTRY = pa.schema(
    [
        ("rel", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("trial_id", pa.string()),
        ("stage", pa.string()),
        ("dataset", pa.string()),
        ("status", pa.string()),
        ("schema_version", pa.int32()),
        ("results_version", pa.int32()),
        ("train_version", pa.int32()),
        ("checkpoint_sha256", pa.string()),
        ("inputs_ok", pa.bool_()),
        ("checkpoint_size", pa.int64()),
        ("checkpoint_mtime_ns", pa.int64()),
        ("error", pa.string()),
        ("seconds", pa.float64()),
    ],
    metadata={"ledger_format": str(LEDGER_FORMAT)},
)
assert ENTRY.names == list(Entry._fields)
# The row columns an entry is made of (a column a file lacks is read as null).
_KEY_COLUMNS = (
    "trial_id",
    "stage",
    "dataset",
    "status",
    "schema_version",
    "results_version",
    "train_version",
    "checkpoint_sha256",
    "inputs",
    "error",
    "trial_seconds",
)
ERROR_CHARS = 300


class ResultFile(NamedTuple):
    """A result file as its name describes it (names only, nothing read)."""

    stage: str
    dataset: str
    trial_id: str | None  # None: a compacted part, whose trials only its rows say
    failed: bool
    rel: str  # its path relative to the results directory (a string: 10^6 Paths cost seconds)
    root: Path

    @property
    def path(self) -> Path:
        return self.root / self.rel


@dataclass
class Refreshed:
    """What a refresh found beyond the files it could trust or read."""

    read: int = 0  # files (re)read
    corrupt: dict[Path, str] = field(default_factory=dict)  # do not decode: moved aside by the lease holder
    unreadable: dict[Path, str] = field(default_factory=dict)  # OSError after retries: left alone


class Ledger:
    def __init__(self, root: Path):
        self.root = Path(root)
        # rel -> size, mtime_ns, entries; a file's tuple is replaced when it changes, never edited
        self.files: dict[str, tuple[int, int, list[Entry]]] = {}
        # The table load() read, and each file's tuple as it made it: table() reuses the rows
        # of the files whose tuple is still that one, rather than rebuild them from Python.
        self._loaded: tuple[pa.Table, dict[str, tuple[int, int, list[Entry]]]] | None = None

    @property
    def path(self) -> Path:
        return self.root / LEDGER

    def load(self) -> None:
        """The saved ledger, or an empty one (rebuilt by the next refresh) if absent or unusable."""
        self.files = {}
        self._loaded = None
        try:
            data = read_bytes(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("ledger %s unreadable (%s): every result file is read again", self.path, exc)
            return
        try:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
            if table.schema.metadata.get(b"ledger_format") != str(LEDGER_FORMAT).encode():
                raise ValueError(f"ledger format {table.schema.metadata.get(b'ledger_format')}")
            table = table.select(ENTRY.names)
        except Exception as exc:  # any decoding error: the ledger is only a cache of the files
            log.warning("ledger %s unusable (%s): every result file is read again", self.path, exc)
            return
        columns = [table.column(name).to_pylist() for name in ENTRY.names]
        for entry in map(Entry._make, zip(*columns)):
            self.files.setdefault(entry.rel, (entry.size, entry.mtime_ns, []))[2].append(entry)
        self._loaded = (table, dict(self.files))

    def table(self, columns: Iterable[str] | None = None) -> pa.Table:
        """The entries as an Arrow table of ENTRY's columns (`columns`: only those): the rows
        loaded of files unchanged since, and the other files' entries converted."""
        wanted = set(ENTRY.names if columns is None else columns)
        schema = pa.schema([f for f in ENTRY if f.name in wanted], metadata=ENTRY.metadata)
        changed = list(self.files.values())
        kept = None
        if self._loaded is not None:
            loaded, as_loaded = self._loaded
            same = [rel for rel, known in self.files.items() if as_loaded.get(rel) is known]
            if len(same) == len(as_loaded) == len(self.files):
                return loaded.select(schema.names).cast(schema)
            same_set = set(same)
            changed = [known for rel, known in self.files.items() if rel not in same_set]
            mask = pc.is_in(loaded.column("rel"), value_set=pa.array(same, pa.string()))
            kept = loaded.filter(mask).select(schema.names).cast(schema)
        entries = [e for _, _, file_entries in changed for e in file_entries]
        index = {name: i for i, name in enumerate(ENTRY.names)}
        built = pa.Table.from_pydict({n: [e[index[n]] for e in entries] for n in schema.names}, schema=schema)
        return built if kept is None else pa.concat_tables([kept, built])

    def save(self, mode: int) -> None:
        sink = io.BytesIO()
        with pa.ipc.new_file(sink, ENTRY) as writer:
            writer.write_table(self.table())
        atomic_write_bytes(self.path, sink.getvalue(), mode)

    def refresh(self, listing: Iterable[ResultFile]) -> Refreshed:
        """Bring the entries in line with the files: keep those whose file has the same size
        and mtime_ns, read the others, drop the entries of files that are gone."""
        found = Refreshed()
        kept: dict[str, tuple[int, int, list[Entry]]] = {}
        to_read: list[tuple[ResultFile, int, int]] = []
        root = str(self.root)
        for file in listing:
            try:
                st = os.stat(os.path.join(root, file.rel))
            except FileNotFoundError:
                continue  # moved away since it was listed
            known = self.files.get(file.rel)
            if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
                kept[file.rel] = known
            else:
                to_read.append((file, st.st_size, st.st_mtime_ns))
        with ThreadPoolExecutor(max_workers=_READERS) as pool:
            for (file, size, mtime), result in zip(to_read, pool.map(lambda t: self._read(*t), to_read)):
                if isinstance(result, list):
                    kept[file.rel] = (size, mtime, result)
                elif isinstance(result, OSError):
                    found.unreadable[file.path] = f"unreadable ({type(result).__name__}: {result})"
                else:
                    found.corrupt[file.path] = f"corrupt Parquet ({result})"
        found.read = len(to_read)
        self.files = kept
        return found

    def _read(self, file: ResultFile, size: int, mtime_ns: int) -> list[Entry] | OSError | str:
        """The file's entries; an OSError that outlived the retries; or why it does not decode."""
        if file.trial_id is None:  # a part is large: only its key columns are read
            try:
                table = read_retried(file.path, _key_columns)
            except OSError as exc:  # after retries (a decoding error may say OSError too): left alone
                return exc
            except Exception as exc:  # not Parquet: the file's own error
                return f"{type(exc).__name__}: {exc}"
        else:
            try:
                data = read_bytes(file.path)
            except OSError as exc:
                return exc
            try:
                table = _key_columns(pa.BufferReader(data))
            except Exception as exc:  # decoding bytes already in memory: any error is the file's own
                return f"{type(exc).__name__}: {exc}"
        names = set(table.column_names)
        column = {
            c: table.column(c).to_pylist() if c in names else [None] * table.num_rows for c in _KEY_COLUMNS
        }
        entries = []
        for i in range(table.num_rows):
            row = {c: column[c][i] for c in _KEY_COLUMNS}
            stage = row["stage"] or file.stage
            error = row["error"].strip().partition("\n")[0][:ERROR_CHARS] if row["error"] else None
            entries.append(
                Entry(
                    rel=file.rel,
                    size=size,
                    mtime_ns=mtime_ns,
                    trial_id=row["trial_id"] or file.trial_id or "",
                    stage=stage,
                    dataset=row["dataset"] or file.dataset,
                    status=row["status"] or ("failed" if file.failed else "ok"),
                    schema_version=row["schema_version"],
                    results_version=row["results_version"],
                    train_version=row["train_version"],
                    checkpoint_sha256=row["checkpoint_sha256"],
                    inputs_ok=_inputs_ok(row["inputs"]) if stage == "diagnostic" else None,
                    error=error,
                    seconds=row["trial_seconds"],
                )
            )
        return entries

    def by_trial(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for _, _, entries in self.files.values():
            for entry in entries:
                out.setdefault(entry.trial_id, []).append(entry)
        return out

    def drop(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self.files.pop(str(Path(path).relative_to(self.root)), None)

    def update(self, entry: Entry) -> None:
        """Replace the entry of the same file and trial (a checkpoint verified)."""
        size, mtime, entries = self.files[entry.rel]
        self.files[entry.rel] = (
            size,
            mtime,
            [entry if e.trial_id == entry.trial_id else e for e in entries],
        )


def _key_columns(source: Path | pa.BufferReader) -> pa.Table:
    parquet = pq.ParquetFile(source)
    return parquet.read(columns=[c for c in _KEY_COLUMNS if c in parquet.schema_arrow.names])


def _inputs_ok(inputs: str | None) -> bool:
    """A diagnostic row's inputs column: every attack it read was ok."""
    if not inputs:
        return False
    try:
        statuses = json.loads(inputs)
    except ValueError:
        return False
    return isinstance(statuses, dict) and all(s == "ok" for s in statuses.values())
