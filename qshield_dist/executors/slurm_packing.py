"""Packing for the SLURM executor: which trials share an array task, what that task runs, and
how many tasks one array may hold.

Kept apart from slurm.py (submission, waiting, loss handling) because none of it watches the
queue or holds a run's state: grouping arithmetic (PackPlanner reads only the executor's
`durations` and `pack_minutes`), the callable pickled into each task, and one `scontrol` read,
so it can be tested, and reasoned about, on its own. slurm.py imports from here, never the
other way round, and re-exports the names it always had. (bench.slurm_packing benchmarks it.)

* Packing. A trial that takes seconds costs SLURM more to schedule than to run, so the trials
  of one group (one dependency level and stage, waiting for the same tasks: PackPlanner.plan;
  never a trial and its dependency) are packed into array tasks of about `pack_minutes` of
  expected work: best-fit decreasing on each trial's expected minutes,
  `durations[key]` if given (the launcher's: plan/durations.py), else its `timeout_min` (the
  conservative estimate); a trial longer than the target runs alone. A task is one `Pack`,
  submitit's `FunctionSequence`: it runs its trials in order and, being checkpointable, is
  what SLURM requeues on preemption or time-out (USR2 before the limit): the pickled sequence
  keeps the results of the trials already done, so the requeued task runs only the others.
  Trials are idempotent anyway (each writes its own result file atomically).
* A pack's time limit: twice its expected minutes, never less than its longest trial's own
  limit and never more than the sum of its trials' limits (with the default estimates: that
  sum). A pack that outruns it is requeued and carries on with its unfinished trials, up to
  `max_num_timeout` times.
* Statuses. Each trial adds its status ('ok', 'failed', or 'lost' when its fn raised) to its
  pack's status file as it finishes (one file per task, rewritten whole: atomic_write_bytes);
  slurm.py reads them back (read_statuses).
* Arrays. An array holds one group's packs (a stage has its own partition, time limit and
  resources; the group, its own dependencies). SLURM caps the array *index* at MaxArraySize - 1
  (and the task count at SchedulerParameters' max_array_tasks), read from `scontrol show
  config`, and TASKS_PER_FOLDER caps it for the files: a group of more packs than that is split
  into several arrays, each indexed from 0 again.
"""

from __future__ import annotations

import bisect
import math
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import submitit

from qshield_dist.executors.base import Job, checked_status, topological_waves
from qshield_dist.fileio import atomic_write_bytes, read_bytes

_MIN_TRIAL_MINUTES = 1 / 60  # a trial costs at least a second (imports, its result file)


class PackLost(RuntimeError):
    """A pack ran every trial but some were lost: the task must fail so afterok breaks."""


class _Trial:
    """One trial of a pack: runs fn and records its status in the pack's status file; its
    exception is its own loss."""

    def __init__(self, key: str, fn: Callable[[], str], status_file: Path):
        self.key = key
        self.fn = fn
        self.status_file = status_file

    def __call__(self) -> str:
        try:
            status = checked_status(self.key, self.fn())
        except Exception:
            print(f"trial {self.key} raised (lost):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            status = "lost"
        _record_status(self.status_file, self.key, status)
        return status


class Pack(submitit.helpers.FunctionSequence):
    """The callable of one array task: its trials, in order. A FunctionSequence, so a requeue
    (checkpoint on USR2) resumes with the trials that had not finished."""

    def __init__(self, trials: Sequence[_Trial]):
        super().__init__()
        self.keys = [t.key for t in trials]
        for trial in trials:
            self.add(trial)

    def __call__(self) -> list[str]:  # type: ignore[override]
        statuses = super().__call__()
        lost = [key for key, st in zip(self.keys, statuses) if st == "lost"]
        if lost:
            raise PackLost(f"{len(lost)} of {len(statuses)} trial(s) lost: {', '.join(lost[:5])}")
        return statuses


def read_statuses(status_file: Path) -> dict[str, str]:
    """The statuses a pack has recorded so far (trial key -> status); empty before its first."""
    try:
        text = read_bytes(status_file).decode()
    except FileNotFoundError:
        return {}
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def _record_status(status_file: Path, key: str, status: str) -> None:
    """Add one trial's status to its pack's file, rewritten whole (atomic_write_bytes): the
    pack's trials run one after the other in one process, so nothing else writes it meanwhile,
    and a requeued run adds to what the interrupted one recorded."""
    statuses = read_statuses(status_file)
    statuses[key] = status
    atomic_write_bytes(status_file, "".join(f"{k} {s}\n" for k, s in statuses.items()).encode())


def pack_jobs(jobs: Sequence[Job], minutes: Callable[[Job], float], target: float) -> list[list[Job]]:
    """Best-fit decreasing: packs of at most `target` expected minutes (a longer trial alone),
    the fewest such for equal trials; each pack, and the list of packs, in the caller's order.
    target <= 0: one trial per pack."""
    if target <= 0:
        return [[job] for job in jobs]
    cost = [max(minutes(job), _MIN_TRIAL_MINUTES) for job in jobs]
    eps = 1e-9 * target
    free: list[tuple[float, int]] = []  # (minutes left, pack), sorted: bisect finds the best fit
    packs: list[list[int]] = []
    for i in sorted(range(len(jobs)), key=lambda i: -cost[i]):  # stable: ties keep their order
        pos = bisect.bisect_left(free, (cost[i] - eps, -1))
        if pos < len(free):
            left, p = free.pop(pos)
            packs[p].append(i)
        else:
            left, p = target, len(packs)
            packs.append([i])
        left -= cost[i]
        if left > eps:
            bisect.insort(free, (left, p))
    ordered = sorted((sorted(p) for p in packs), key=lambda p: p[0])
    return [[jobs[i] for i in p] for p in ordered]


# submitit writes four files per task (its pickle, result, stdout and stderr) into its array's
# folder, and the status files are one per task too: arrays of at most 2,000 tasks keep every
# folder under about 10,000 entries (parallel filesystems slow down past some tens of thousands).
TASKS_PER_FOLDER = 2000


def split_arrays(n_packs: int, max_tasks: int) -> list[tuple[int, int]]:
    """(offset, count) of each array for n_packs tasks, no array above max_tasks tasks."""
    size = max(1, max_tasks)
    return [(o, min(size, n_packs - o)) for o in range(0, n_packs, size)]


def max_array_tasks(config: str | None = None) -> int:
    """The most tasks one array may have: MaxArraySize (indices run 0..MaxArraySize-1, so an
    array from index 0 holds MaxArraySize tasks; 0 disables arrays: 1, a plain job), lowered
    by SchedulerParameters' max_array_tasks. From `scontrol show config` unless given (which
    reports a MaxArraySize changed by `scontrol reconfigure` at once, though slurmctld 22.05
    validates arrays by the old one until it restarts)."""
    if config is None:
        config = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    size = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.M)
    limit = int(size.group(1)) if size else 1001  # SLURM's default
    tasks = re.search(r"max_array_tasks=(\d+)", config)
    if tasks:
        limit = min(limit, int(tasks.group(1)))
    return max(1, limit)


@dataclass
class ArrayPlan:
    """One array to submit: its dependency level, stage and packs, and the tasks it waits for
    (afterok): (n, i) is task i of the plan's n-th array, a string a submitted task's id."""

    level: int
    stage: str
    packs: list[list[Job]]
    after: frozenset[Hashable]


class PackPlanner:
    """The executor's packing policy, a mixin of SlurmExecutor: a trial's expected minutes, a
    pack's time limit, and a run's jobs as arrays of packs with their dependencies. Uses the
    executor's `durations` and `pack_minutes`."""

    durations: dict[str, float]
    pack_minutes: float

    def minutes(self, job: Job) -> float:
        """A job's expected minutes: durations[key], else its time limit."""
        return float(self.durations.get(job.key, job.timeout_min))

    def pack_time(self, pack: Sequence[Job]) -> int:
        """A pack's time limit in minutes (see the module docstring)."""
        limits = [job.timeout_min for job in pack]
        expected = sum(self.minutes(job) for job in pack)
        return int(min(sum(limits), max(max(limits), math.ceil(2 * expected))))

    def plan(
        self, jobs: Sequence[Job], max_tasks: int, placed: Mapping[str, str] | None = None
    ) -> list[ArrayPlan]:
        """The arrays to submit for `jobs`, dependencies first: per dependency level, the jobs
        of one stage that wait for the same tasks share an array (split at max_tasks).
        placed: key -> the id of the submitted task that holds it, for dependencies that are
        still running outside `jobs` (a dependency neither in `jobs` nor placed is done).
        Needs no SLURM."""
        where: dict[str, Hashable] = dict(placed or {})
        out: list[ArrayPlan] = []
        for level, wave in enumerate(topological_waves(jobs)):
            groups: dict[tuple[str, frozenset[Hashable]], list[Job]] = {}
            for job in wave:
                after = frozenset(where[d] for d in job.deps if d in where)
                groups.setdefault((job.stage, after), []).append(job)
            for (stage, after), members in groups.items():
                packs = pack_jobs(members, self.minutes, self.pack_minutes)
                for offset, count in split_arrays(len(packs), max_tasks):
                    number = len(out)
                    out.append(ArrayPlan(level, stage, packs[offset : offset + count], after))
                    for index, pack in enumerate(out[-1].packs):
                        for job in pack:
                            where[job.key] = (number, index)
        return out
