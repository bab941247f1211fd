"""Parquet results: the row schema, atomic writes, and what is already done (resume).

Layout (hive style, one file per trial):

    RESULTS/stage=train/dataset=digits/<trial_id>.parquet
    RESULTS/stage=attack/dataset=digits/<trial_id>.parquet
    RESULTS/stage=diagnostic/dataset=digits/<trial_id>.parquet
    RESULTS/manifest.json

A file is written to a temporary name in the same directory and renamed into place, so a
reader (or a resumed sweep) only ever sees complete files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Column -> Arrow type. Every row has every column (missing values are null), so files
# from one schema version always concatenate.
SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("sweep", pa.string()),
        ("stage", pa.string()),  # train | attack | diagnostic
        ("trial_id", pa.string()),
        ("train_id", pa.string()),  # the train trial whose checkpoint this row used
        ("status", pa.string()),  # ok | failed
        ("error", pa.string()),
        ("dataset", pa.string()),
        ("model", pa.string()),  # dnn | cnn | cnn_small | hqcnn | <model>+backbone_only ...
        ("variant", pa.string()),  # human-readable model variant label
        ("backbone", pa.string()),
        ("entanglement", pa.string()),
        ("depth", pa.int32()),
        ("encoding", pa.string()),
        ("noise_model", pa.string()),
        ("noise_strength", pa.float64()),
        ("fusion", pa.string()),
        ("quantum_grad", pa.string()),
        ("projection", pa.string()),
        ("device", pa.string()),
        ("simulator", pa.string()),
        ("trajectories", pa.int32()),
        ("noise_approx", pa.string()),  # exact | pauli_twirl
        ("qubits", pa.int32()),
        ("init", pa.string()),
        ("input_noise", pa.float64()),
        ("stochastic", pa.bool_()),
        ("attack", pa.string()),
        ("attack_preset", pa.string()),
        ("attack_params", pa.string()),  # JSON
        ("threat_model", pa.string()),  # linf | l2 | l0 | none
        ("eps", pa.float64()),
        ("seed", pa.int32()),
        ("eval_repeats", pa.int32()),
        ("success_rule", pa.string()),
        ("n_test", pa.int32()),
        ("clean_acc", pa.float64()),
        ("clean_acc_worst", pa.float64()),
        ("n_attacked", pa.int32()),
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
        ("train_seconds", pa.float64()),
        ("train_epochs", pa.int32()),
        ("train_steps", pa.int64()),
        ("peak_rss_mb", pa.float64()),
        ("executor", pa.string()),
        ("host", pa.string()),
        ("versions", pa.string()),  # JSON
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
COLUMNS = SCHEMA.names


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


def write_rows(path: Path, rows: Iterable[dict[str, Any]], mode: int = 0o600) -> None:
    """Write one trial's rows as one Parquet file, atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(rows_to_table(rows), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes(), mode)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def trial_path(results_dir: Path, stage: str, dataset: str, trial_id: str) -> Path:
    return Path(results_dir) / f"stage={stage}" / f"dataset={dataset}" / f"{trial_id}.parquet"


def scan_done(results_dir: Path) -> dict[str, str]:
    """trial_id -> status ('ok' or 'failed') for every complete result file.

    Only file names are listed for ok trials: a failed trial is marked by a `.failed`
    suffix in its name, so deciding what is done never opens a Parquet file.
    """
    done: dict[str, str] = {}
    root = Path(results_dir)
    if not root.exists():
        return done
    for stage_dir in root.iterdir():
        if not stage_dir.name.startswith("stage="):
            continue
        for dataset_dir in stage_dir.iterdir():
            if not dataset_dir.is_dir():
                continue
            for entry in os.scandir(dataset_dir):
                name = entry.name
                if name.startswith(".") or not name.endswith(".parquet"):
                    continue
                stem = name[: -len(".parquet")]
                if stem.endswith(".failed"):
                    done.setdefault(stem[: -len(".failed")], "failed")
                else:
                    done[stem] = "ok"
    return done


def write_manifest(results_dir: Path, manifest: dict[str, Any]) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    atomic_write_bytes(Path(results_dir) / "manifest.json", data)
