"""The one small interface every executor implements (after submitit's Executor).

An executor receives `Job`s: a picklable zero-argument callable, the keys of the jobs it
depends on, and what it asks of a machine as plain values (submitit's `update_parameters`
names them the same way). It decides where and when each runs; it never knows what a model, an
attack or a sweep is. A job's callable writes its own result file and returns its status
('ok' or 'failed'); an exception escaping it means the job was lost (crash, killed worker),
which executors retry with the mechanism their engine provides.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Callable, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    key: str  # the trial id
    fn: Callable[[], str]
    deps: tuple[str, ...] = ()
    stage: str = "train"
    # What one job asks for; the launcher passes the sweep's `resources:` values.
    cpus: float = field(kw_only=True)
    gpus: float = field(kw_only=True)  # fractions allowed on Ray (0.25: four jobs share one GPU)
    mem_gb: float = field(kw_only=True)
    timeout_min: int = field(kw_only=True)


class Executor(abc.ABC):
    """Runs jobs respecting their dependencies; returns key -> final status."""

    name: str = "base"

    @abc.abstractmethod
    def run(self, jobs: Sequence[Job], progress: "ProgressSink | None" = None) -> dict[str, str]:
        """Statuses are 'ok', 'failed' (the trial recorded a failure row) or 'lost'
        (the job could not be run to completion, even after retries)."""


class ProgressSink:
    """Callbacks an executor calls; the launcher turns them into a progress bar."""

    def started(self, key: str) -> None:  # pragma: no cover - default no-op
        pass

    def finished(self, key: str, status: str) -> None:  # pragma: no cover - default no-op
        pass


def _sorter(jobs: Sequence[Job]) -> tuple[dict[str, Job], TopologicalSorter[str]]:
    """The jobs by key, and a prepared TopologicalSorter of them: deps outside `jobs` count
    as done (from an earlier run); a duplicate key or a cycle is a ValueError."""
    by_key = {job.key: job for job in jobs}
    if len(by_key) != len(jobs):
        raise ValueError("duplicate job keys")
    sorter: TopologicalSorter[str] = TopologicalSorter()
    for job in jobs:  # every node first: ready jobs come out in the order given
        sorter.add(job.key)
    for job in jobs:
        sorter.add(job.key, *(d for d in job.deps if d in by_key))
    try:
        sorter.prepare()
    except CycleError as exc:
        raise ValueError(f"dependency cycle: {' -> '.join(exc.args[1])}") from None
    return by_key, sorter


class DependencyGraph:
    """Who waits for whom among `jobs` (graphlib.TopologicalSorter), and the one rule for a
    lost job: its dependents, transitively, are lost at once, without running. Jobs may
    finish in any order (a poll can see a job's status before its dependency's)."""

    def __init__(self, jobs: Sequence[Job]):
        self.by_key, self._sorter = _sorter(jobs)
        self._dependents: dict[str, list[str]] = {key: [] for key in self.by_key}
        for job in jobs:
            for dep in dict.fromkeys(job.deps):
                if dep in self.by_key:
                    self._dependents[dep].append(job.key)
        self._released: set[str] = set()  # handed out by the sorter
        self.status: dict[str, str] = {}
        # How much work waits on each job, counted along every path (a diamond counts twice):
        # run the jobs that unlock the most first, so training does not queue behind attacks.
        order = {key: i for i, key in enumerate(self.by_key)}
        self.waiting_on: dict[str, int] = {}
        for key in reversed(topological_order(jobs)):
            self.waiting_on[key] = sum(1 + self.waiting_on[c] for c in self._dependents[key])
        self.priority = {key: (self.waiting_on[key], -order[key]) for key in self.by_key}

    def ready(self) -> list[str]:
        """The jobs that have nothing left to wait for and were not returned before, in the
        order given (at the start: every job without a dependency among `jobs`)."""
        ready: list[str] = []
        while batch := self._sorter.get_ready():
            self._released.update(batch)
            ready += [key for key in batch if key not in self.status]
            finished = [key for key in batch if key in self.status]  # lost, or finished early
            if not finished:
                break
            self._sorter.done(*finished)
        return ready

    def finish(self, key: str, status: str) -> tuple[list[str], list[str]]:
        """Record `key`'s final status; returns the jobs that became ready, and those now lost
        because a job they (transitively) depend on is lost, each recorded too."""
        self.status[key] = status
        lost: list[str] = []
        todo = [key] if status == "lost" else []
        while todo:
            for child in self._dependents[todo.pop()]:
                if child not in self.status:
                    self.status[child] = "lost"  # never ran: a dependency is missing
                    lost.append(child)
                    todo.append(child)
        if key in self._released:
            self._sorter.done(key)
        return self.ready(), lost

    def statuses(self) -> dict[str, str]:
        """Every job's final status, in the order given."""
        missing = [key for key in self.by_key if key not in self.status]
        if missing:
            raise ValueError(f"jobs never finished: {missing[:5]}")
        return {key: self.status[key] for key in self.by_key}


def topological_order(jobs: Sequence[Job]) -> list[str]:
    """Every job's key after the keys of its dependencies among `jobs`."""
    return [key for wave in topological_waves(jobs) for key in (job.key for job in wave)]


def topological_waves(jobs: Sequence[Job]) -> list[list[Job]]:
    """Group jobs into waves, each in the order given: every job's deps lie in earlier waves
    (deps that are not among `jobs` count as done, in an earlier run)."""
    by_key, sorter = _sorter(jobs)
    order = {key: i for i, key in enumerate(by_key)}
    waves = []
    while sorter.is_active():
        wave = sorted(sorter.get_ready(), key=order.__getitem__)
        waves.append([by_key[key] for key in wave])
        sorter.done(*wave)
    return waves


def checked_status(key: str, status: object) -> str:
    """A job's own return value as a final status: anything but 'ok'/'failed' is lost."""
    if status in ("ok", "failed"):
        return str(status)
    log.error("job %s returned %r, not 'ok'/'failed': counted as lost", key, status)
    return "lost"
