"""SLURM at scale: many no-op trials through SlurmExecutor's packed arrays on the dev cluster.

    python -m qshield_dist.bench.slurm_packing [--trials 2500] [--max-array 1001]
        [--pack-minutes 30] [--trial-minutes 1] [--timeout-min 10] [--dependencies SLOW_S]

Starts the one-node dev cluster (slurm/dev-cluster.sh start --state FILE) with MaxArraySize
--max-array (on a cluster that was running already: set with `dev-cluster.sh max-array` and set
back afterwards), submits --trials no-op trials (one dependency wave; each trial appends one
line to a shared log, so a trial run twice shows) with the executor told each takes
--trial-minutes (as `launch --plan` would tell it) and a limit of --timeout-min, waits for them,
and stops exactly the daemons it started. Prints one JSON object on stdout: arrays, tasks,
trials, statuses, lost, duplicated (trials that ran more than once), missing (never ran), wall
time from the first submission to the last result, and the time per trial and per task,
scheduler included. Root only (the dev cluster's daemons); logs on stderr.

--dependencies SLOW_S measures per-model dependencies instead: two trainings, a slow one
(SLOW_S seconds) and a fast one, each with three attacks, one trial per task; it prints how long
after the fast training ended its first attack started, from the trials' own clocks, and
whether that was before the slow training ended (executors/slurm.py's docstring has the figures).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qshield_dist.executors.base import Job

log = logging.getLogger("qshield_dist.bench.slurm_packing")
DEV_CLUSTER = Path(__file__).resolve().parents[2] / "slurm" / "dev-cluster.sh"


def _append_line(log_path: str, line: str) -> None:
    """One line at the end of `log_path` (O_APPEND: atomic, whatever else appends)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def noop_trial(log_path: str, key: str) -> str:
    """A trial that does nothing but say it ran: `key pid`."""
    _append_line(log_path, f"{key} {os.getpid()}")
    return "ok"


def timed_trial(log_path: str, key: str, sleep: float = 0.0) -> str:
    """Sleep, then append `key start end`."""
    start = time.time()
    time.sleep(sleep)
    _append_line(log_path, f"{key} {start:.3f} {time.time():.3f}")
    return "ok"


def _dev_cluster(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(DEV_CLUSTER), *args], capture_output=True, text=True, timeout=900, env=env)
    for line in proc.stderr.splitlines():
        log.info("%s", line)
    return proc


def measure(
    trials: int, max_array: int, pack_minutes: float, trial_minutes: float, timeout_min: int, root: Path
) -> dict[str, Any]:
    """Run the trials on the (running) cluster; the figures as a dict."""
    from qshield_dist.executors.slurm import SlurmExecutor, max_array_tasks

    limit = max_array_tasks()
    if limit != max_array:
        raise RuntimeError(f"the cluster allows {limit} tasks per array, not {max_array}")
    runs = root / "runs.log"
    res = {"cpus": 1, "gpus": 0, "mem_gb": 0.25, "timeout_min": timeout_min}
    keys = [f"noop{i:06d}" for i in range(trials)]
    jobs = [Job(k, functools.partial(noop_trial, str(runs), k), (), **res) for k in keys]
    ex = SlurmExecutor(
        folder=root / "submitit",
        partition="debug",
        poll_s=1.0,
        cpus_per_task=1,
        mem_gb=0.25,
        array_parallelism=max(1, os.cpu_count() or 1) * 4,
        pack_minutes=pack_minutes,
        durations={k: trial_minutes for k in keys},
    )
    start = time.perf_counter()
    statuses = ex.run(jobs)
    wall = time.perf_counter() - start
    ran = (
        collections.Counter(line.split()[0] for line in runs.read_text().splitlines())
        if runs.exists()
        else {}
    )
    tasks = sum(len(s.packs) for s in ex.submitted)
    return {
        "bench": "slurm_packing",
        "trials": trials,
        "max_array_size": max_array,
        "pack_minutes": pack_minutes,
        "trial_minutes_planned": trial_minutes,
        "timeout_min": timeout_min,
        "arrays": len(ex.submitted),
        "array_tasks": [len(s.packs) for s in ex.submitted],
        "array_after": [s.after for s in ex.submitted],
        "tasks": tasks,
        "trials_per_task": round(trials / tasks, 2) if tasks else None,
        "statuses": dict(collections.Counter(statuses.values())),
        "lost": sum(st == "lost" for st in statuses.values()),
        "duplicated": sum(n > 1 for n in ran.values()),
        "missing": sum(k not in ran for k in keys),
        "wall_s": round(wall, 1),
        "per_trial_ms": round(1000 * wall / trials, 1),
        "per_task_s": round(wall / tasks, 3) if tasks else None,
        "cpus": os.cpu_count(),
        "note": "wall time from the first sbatch to the last result, sacct polls (1 s) included",
    }


def measure_dependencies(slow_s: float, root: Path) -> dict[str, Any]:
    """A fast and a slow training, three attacks each (see the module docstring)."""
    from qshield_dist.executors.slurm import SlurmExecutor

    runs = root / "runs.log"
    res = {"cpus": 1, "gpus": 0, "mem_gb": 0.25, "timeout_min": 10}

    def job(key: str, deps: tuple[str, ...] = (), sleep: float = 0.0) -> Job:
        fn = functools.partial(timed_trial, str(runs), key, sleep)
        return Job(key, fn, deps, stage="attack" if deps else "train", **res)

    jobs = [job("slow", sleep=slow_s), job("fast")]
    jobs += [job(f"{model}-attack-{i}", (model,)) for model in ("fast", "slow") for i in range(3)]
    ex = SlurmExecutor(root / "submitit", partition="debug", poll_s=1.0, mem_gb=0.25, pack_minutes=0)
    start = time.time()
    statuses = ex.run(jobs)
    times = {
        key: (float(a), float(b)) for key, a, b in (line.split() for line in runs.read_text().splitlines())
    }
    first = min(times[f"fast-attack-{i}"][0] for i in range(3))
    return {
        "bench": "slurm_dependencies",
        "slow_training_s": slow_s,
        "statuses": dict(collections.Counter(statuses.values())),
        "first_fast_attack_after_fast_training_s": round(first - times["fast"][1], 1),
        "first_fast_attack_after_start_s": round(first - start, 1),
        "before_slow_training_ended": first < times["slow"][1],
        "arrays": len(ex.submitted),
        "wall_s": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qshield_dist.bench.slurm_packing", description=__doc__.splitlines()[0]
    )
    p.add_argument("--trials", type=int, default=2500)
    p.add_argument("--max-array", type=int, default=1001, help="the cluster's MaxArraySize")
    p.add_argument("--pack-minutes", type=float, default=30.0)
    p.add_argument("--trial-minutes", type=float, default=1.0, help="what the executor is told a trial takes")
    p.add_argument("--timeout-min", type=int, default=10, help="each trial's time limit")
    p.add_argument("--keep", action="store_true", help="keep the submitit folder (logs, pickles)")
    p.add_argument(
        "--dependencies", type=float, metavar="SLOW_S", help="measure per-model dependencies instead"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        log.error("the dev SLURM cluster needs root")
        return 77
    root = Path(tempfile.mkdtemp(prefix="qshield-bench-slurm-"))
    state = root / "started"
    env = dict(os.environ, DEV_SLURM_MAX_ARRAY=str(args.max_array))
    restore: str | None = None
    code = 1
    try:
        proc = _dev_cluster("start", "--state", str(state), env=env)
        if proc.returncode != 0:
            log.error("dev-cluster.sh start failed (%d)", proc.returncode)
            return 1
        from qshield_dist.executors.slurm import max_array_tasks

        if max_array_tasks() != args.max_array:
            # A cluster that was running (someone's) with another MaxArraySize: set it, set it back.
            proc = _dev_cluster("max-array", str(args.max_array))
            if proc.returncode != 0:
                return 1
            restore = proc.stdout.strip()
        if args.dependencies is not None:
            result = measure_dependencies(args.dependencies, root)
            code = 0 if result["statuses"] == {"ok": 8} else 1
        else:
            result = measure(
                args.trials, args.max_array, args.pack_minutes, args.trial_minutes, args.timeout_min, root
            )
            code = 0 if result["lost"] == result["duplicated"] == result["missing"] == 0 else 1
        sys.stdout.write(json.dumps(result) + "\n")
    finally:
        if restore is not None:
            _dev_cluster("max-array", restore)
        if state.exists() and state.read_text().strip():
            proc = _dev_cluster("stop", "--state", str(state))
            if proc.returncode != 0:
                log.error("dev-cluster.sh stop --state %s failed: daemons may be left running", state)
                code = 1
        else:
            log.info("the cluster was running before: left running")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log.info("kept %s", root)
    return code


if __name__ == "__main__":
    sys.exit(main())
