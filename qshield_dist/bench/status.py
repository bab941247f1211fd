"""Benchmark of `launch --status` on a synthetic store of 10^6 trials.

    python -m qshield_dist.bench status

The store: the real hive layout, each Parquet file holding `rows_per_file` trials' key columns
(the compacted layout the ledger already reads: 10^6 one-row files would time the filesystem,
not the status); 2% train trials (each with a small checkpoint file, as done() checks them),
90% attack and 8% diagnostic trials; 85% of them done, 5% failed with one of 20 errors, the
rest never run; 1% of the trials in recorded SLURM arrays, half their tasks running.

Untimed: writing the store, a first refresh that reads every file into the ledger and hashes
the checkpoints (the launcher does this once, then saves the ledger). Timed, in a fresh
ResultStore as `--status` makes one: the refresh (load ledger.arrow, list and stat every file,
read none), the queue from squeue's answers (given here: no cluster; one squeue call per array
comes on top), and the counting. The grid itself (the sweep's expected trials) is not built:
`--dry-run` times that.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from qshield_dist.lease import RecordedArray
from qshield_dist.peak_memory import peak_bytes, reset_peak
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.schema import SCHEMA_VERSION
from qshield_dist.results.store import ResultStore
from qshield_dist.status import render, slurm_queue, sweep_status

log = logging.getLogger(__name__)

SHARES = {"train": 0.02, "attack": 0.90, "diagnostic": 0.08}
ARRAY_PACKS = 100  # tasks per recorded array, 1 trial each


def write_store(
    root: Path, checkpoints: Path, n_trials: int, rows_per_file: int, seed: int = 0
) -> dict[str, Any]:
    """The synthetic store under `root`; returns the expected trials (id -> stage) and the arrays."""
    rng = np.random.default_rng(seed)
    counts = {stage: round(n_trials * share) for stage, share in SHARES.items()}
    counts["attack"] = n_trials - counts["train"] - counts["diagnostic"]
    stages = np.repeat(list(counts), list(counts.values()))
    trial_ids = np.array([f"{s[0].upper()}{i:015x}" for i, s in enumerate(stages)])
    outcome = rng.choice(["ok", "failed", "none"], n_trials, p=[0.85, 0.05, 0.10])
    frame = pl.DataFrame(
        {
            "trial_id": trial_ids,
            "stage": stages,
            "dataset": "mnist",
            "status": outcome,
            "schema_version": np.full(n_trials, SCHEMA_VERSION, np.int32),
            "train_version": np.full(n_trials, STAGE_VERSIONS["train"], np.int32),
            "kind": rng.integers(0, 20, n_trials),
        }
    ).with_columns(
        results_version=pl.col("stage").replace_strict(STAGE_VERSIONS, return_dtype=pl.Int32),
        error=pl.when(pl.col("status") == "failed").then(
            pl.format("RuntimeError: synthetic failure {}\nTraceback ...", pl.col("kind"))
        ),
        inputs=pl.when(pl.col("stage") == "diagnostic").then(pl.lit('{"A": "ok"}')),
    )
    frame = frame.filter(pl.col("status") != "none").drop("kind")
    # a done train trial's checkpoint, whose sha256 its row records
    ok_train = frame.filter((pl.col("stage") == "train") & (pl.col("status") == "ok"))["trial_id"].to_list()
    checkpoints.mkdir(parents=True)
    digests = {}
    for trial_id in ok_train:
        data = trial_id.encode()
        (checkpoints / f"{trial_id}.pt").write_bytes(data)
        digests[trial_id] = hashlib.sha256(data).hexdigest()
    frame = frame.with_columns(
        checkpoint_sha256=pl.col("trial_id").replace_strict(digests, default=None, return_dtype=pl.String)
    )
    files = 0
    store = ResultStore(root)
    for (stage,), part in frame.group_by("stage", maintain_order=True):
        for i in range(0, part.height, rows_per_file):
            # compacted parts (ok and failed rows together: the ledger reads each row's status)
            path = store.part_path(str(stage), "mnist", i // rows_per_file + 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part.slice(i, rows_per_file).to_arrow(), path)
            files += 1
    in_arrays = trial_ids[rng.choice(n_trials, n_trials // 100, replace=False)].tolist()
    arrays = {
        str(1000 + k): RecordedArray(root / "unused", chunk, [[key] for key in chunk])
        for k, chunk in enumerate(
            in_arrays[i : i + ARRAY_PACKS] for i in range(0, len(in_arrays), ARRAY_PACKS)
        )
    }
    expected = dict(zip(trial_ids.tolist(), stages.tolist()))
    return {"expected": expected, "arrays": arrays, "files": files, "rows": frame.height}


def _answers(arrays: dict[str, RecordedArray]) -> dict[str, dict[str, str]]:
    """What squeue would say: the first half of each array's tasks running, the rest pending."""
    half = ARRAY_PACKS // 2
    return {
        array_id: {
            **{f"{array_id}_{i}": "RUNNING" for i in range(min(half, len(a.packs or ())))},
            f"{array_id}_[{half}-{ARRAY_PACKS - 1}%{half}]": "PENDING",
        }
        for array_id, a in arrays.items()
    }


def bench_status(n_trials: int = 1_000_000, rows_per_file: int = 1000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qshield-status-bench-") as tmp:
        root, checkpoints = Path(tmp) / "results", Path(tmp) / "checkpoints"
        start = time.perf_counter()
        made = write_store(root, checkpoints, n_trials, rows_per_file)
        first = ResultStore(root, checkpoints)
        first.refresh(repair=True)  # reads every file once
        first.done([k for k, s in made["expected"].items() if s == "train"])  # hashes the checkpoints once
        first.save()
        setup_s = time.perf_counter() - start
        log.info(
            "status bench: %d trials in %d files written and indexed in %.1f s",
            n_trials,
            made["files"],
            setup_s,
        )

        reset_peak()
        t0 = time.perf_counter()
        store = ResultStore(root, checkpoints)
        refreshed = store.refresh()
        t1 = time.perf_counter()
        answers = _answers(made["arrays"])
        queue = slurm_queue(made["arrays"], answers.get)
        t2 = time.perf_counter()
        report = sweep_status(store, made["expected"], queue)
        text = render({**report, "results": str(root), "launcher": None}, "bench")
        t3 = time.perf_counter()
    stages = report["stages"]
    return {
        "bench": "status",
        "trials": n_trials,
        "rows": made["rows"],
        "files": made["files"],
        "files_read": refreshed.read,
        "refresh_s": round(t1 - t0, 3),
        "queue_s": round(t2 - t1, 3),
        "count_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3),
        "peak_rss_mb": round(peak_bytes() / 2**20, 1),
        "setup_s": round(setup_s, 1),
        "done": sum(s["done"] for s in stages.values()),
        "failed": sum(s["failed"] for s in stages.values()),
        "running": sum(s["running"] or 0 for s in stages.values()),
        "queued": sum(s["queued"] or 0 for s in stages.values()),
        "missing": sum(s["missing"] for s in stages.values()),
        "failure_groups": len(report["failures"]),
        "text_lines": len(text.splitlines()),
    }
