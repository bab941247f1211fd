"""Dispatch and bookkeeping benchmarks for the executors (JSON-able dicts).

    python -m qshield_dist.bench dispatch

* local_dispatch / ray_dispatch: no-op jobs per second through LocalExecutor and
  RayExecutor (a private loopback Ray cluster with token auth, started and stopped here;
  its start-up time is reported separately, not counted).
* local_efficiency: equal CPU-bound jobs on workers=1 vs workers=2:
  efficiency = (t1 / t2) / 2 (1.0 is perfect; it drops if others use the cores).
* resume_done: time for ResultStore to decide what is done among N result files (real
  one-row Parquet files): the first launch reads every file into the ledger, a relaunch
  trusts the ledger and only stats them.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from qshield_dist.executors.base import Job

log = logging.getLogger(__name__)


def _noop() -> str:
    return "ok"


def _spin(seconds: float) -> str:
    """Busy loop for `seconds` of this process's CPU time."""
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        for i in range(10_000):
            x += i * i
    return "ok"


def _jobs(n: int, fn: Callable[[], str], cpus: float = 1.0) -> list[Job]:
    return [Job(f"j{i:06d}", fn, (), cpus=cpus, gpus=0, mem_gb=4, timeout_min=240) for i in range(n)]


def local_dispatch(n_jobs: int = 2000, workers: int = 2) -> dict[str, Any]:
    from qshield_dist.executors.local import LocalExecutor

    ex = LocalExecutor(workers=workers)
    start = time.perf_counter()
    result = ex.run(_jobs(n_jobs, _noop))
    wall = time.perf_counter() - start
    assert set(result.values()) == {"ok"}
    return {
        "bench": "local_dispatch",
        "jobs": n_jobs,
        "workers": workers,
        "seconds": round(wall, 3),
        "trials_per_s": round(n_jobs / wall, 1),
        "note": "includes starting the worker pool",
    }


def ray_dispatch(n_jobs: int = 2000, cpus: int = 2) -> dict[str, Any]:
    import ray

    from qshield_dist import cluster
    from qshield_dist.executors.ray import RayExecutor

    with tempfile.TemporaryDirectory(prefix="qshield-bench-ray-") as tmp:
        t0 = time.perf_counter()
        token = cluster.new_token_file(Path(tmp) / "auth")
        head = cluster.start_head(token, num_cpus=cpus, object_store_mb=100, temp_dir=Path(tmp) / "ray")
        try:
            ex = RayExecutor(address=head.address, token_file=token)
            ex.connect()
            startup = time.perf_counter() - t0
            ex.run(_jobs(cpus * 2, _noop))  # warm the worker processes
            # 1 CPU per job, as trials ask (fractional CPUs make Ray start a worker process
            # per concurrent task, which measures process start-up, not dispatch).
            start = time.perf_counter()
            result = ex.run(_jobs(n_jobs, _noop, cpus=1.0))
            wall = time.perf_counter() - start
            assert set(result.values()) == {"ok"}
        finally:
            if ray.is_initialized():
                ray.shutdown()
            head.stop()
    return {
        "bench": "ray_dispatch",
        "jobs": n_jobs,
        "cluster_cpus": cpus,
        "cluster_start_s": round(startup, 2),
        "seconds": round(wall, 3),
        "trials_per_s": round(n_jobs / wall, 1),
        "note": "cluster start not counted; 1 CPU per job",
    }


def local_efficiency(n_jobs: int = 8, job_cpu_s: float = 0.5) -> dict[str, Any]:
    from qshield_dist.executors.local import LocalExecutor

    fn = functools.partial(_spin, job_cpu_s)
    times = {}
    for workers in (1, 2):
        ex = LocalExecutor(workers=workers)
        start = time.perf_counter()
        ex.run(_jobs(n_jobs, fn))
        times[workers] = time.perf_counter() - start
    speedup = times[1] / times[2]
    return {
        "bench": "local_efficiency",
        "jobs": n_jobs,
        "job_cpu_s": job_cpu_s,
        "seconds_w1": round(times[1], 3),
        "seconds_w2": round(times[2], 3),
        "ideal_seconds_w2": round(n_jobs * job_cpu_s / 2, 3),
        "speedup": round(speedup, 3),
        "efficiency": round(speedup / 2, 3),
        "note": "each run starts its own pool (spawn), counted in both",
        "cpus_available": len(os.sched_getaffinity(0)),
    }


def resume_done_time(n_files: int = 100_000, failed_every: int = 20) -> dict[str, Any]:
    from qshield_dist.results.current import STAGE_VERSIONS
    from qshield_dist.results.store import ResultStore, TrialKey

    with tempfile.TemporaryDirectory(prefix="qshield-bench-scan-") as tmp:
        root, checkpoints = Path(tmp) / "results", Path(tmp) / "ckpt"
        store = ResultStore(root)
        ids = []
        t0 = time.perf_counter()
        for i in range(n_files):
            stage = "train" if i % 10 == 0 else "attack"
            key = TrialKey(stage, "digits", f"{stage[0].upper()}{i:016x}")
            row = {"stage": stage, "dataset": "digits", "trial_id": key.trial_id}
            row.update(
                status="failed" if i % failed_every == 0 else "ok", results_version=STAGE_VERSIONS[stage]
            )
            store.write(key, [{**row, "train_version": STAGE_VERSIONS["train"]}])
            ids.append(key.trial_id)
        create = time.perf_counter() - t0
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fresh = ResultStore(root, checkpoints)
            fresh.refresh(repair=True)  # the first run builds the ledger; later ones trust it
            done = fresh.done(ids)
            runs.append(time.perf_counter() - start)
        # every file judged; ok train rows are not done (no checkpoint here), as resume decides
        assert len(done.status) + len(done.rerun) == n_files
    return {
        "bench": "resume_done",
        "files": n_files,
        "first_launch_s": round(runs[0], 3),
        "relaunch_s_best": round(min(runs[1:]), 4),
        "seconds_runs": [round(r, 4) for r in runs],
        "create_files_s": round(create, 2),
        "note": "warm page cache (files just created); one-row files; first launch reads each into the ledger",
    }


def run_all(n_jobs: int = 2000, n_files: int = 100_000, ray_bench: bool = True) -> list[dict[str, Any]]:
    out = [local_dispatch(n_jobs), local_efficiency(), resume_done_time(n_files)]
    if ray_bench:
        out.append(ray_dispatch(n_jobs))
    return out
