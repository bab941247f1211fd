"""The one small interface every executor implements (after submitit's Executor).

An executor receives `Job`s: a picklable zero-argument callable plus the keys of the jobs it
depends on. It decides where and when each runs; it never knows what a model or an attack
is. A job's callable writes its own result file and returns its status ('ok' or 'failed');
an exception escaping it means the job was lost (crash, killed worker), which executors
retry with the mechanism their engine provides.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class Resources(BaseModel):
    """What one job asks for; also the sweep file's `resources.train` / `resources.attack`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)  # fractions allowed on Ray (0.25 -> four trials share one GPU)
    mem_gb: float = Field(4.0, gt=0)
    timeout_min: int = Field(240, ge=1)


@dataclass(frozen=True)
class Job:
    key: str  # the trial id
    fn: Callable[[], str]
    deps: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    stage: str = "train"


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


class DependencyGraph:
    """Who waits for whom among `jobs` (deps outside them count as done, from an earlier run),
    and the one rule for a lost job: its dependents are lost without running."""

    def __init__(self, jobs: Sequence[Job]):
        self.by_key = {job.key: job for job in jobs}
        if len(self.by_key) != len(jobs):
            raise ValueError("duplicate job keys")
        self.waiting = {job.key: {d for d in job.deps if d in self.by_key} for job in jobs}
        self.dependents: dict[str, list[str]] = {key: [] for key in self.by_key}
        for key, deps in self.waiting.items():
            for dep in deps:
                self.dependents[dep].append(key)
        self.status: dict[str, str] = {}

    def ready(self) -> list[str]:
        """The jobs with nothing to wait for, in the order given."""
        return [key for key, deps in self.waiting.items() if not deps]

    def finish(self, key: str, status: str) -> tuple[list[str], list[str]]:
        """Record `key`'s final status; returns the jobs that became ready, and those now lost
        because a job they (transitively) depend on is lost, each recorded too."""
        self.status[key] = status
        ready: list[str] = []
        lost: list[str] = []
        todo = [key]
        while todo:
            done = todo.pop()
            for child in self.dependents[done]:
                if child in self.status:
                    continue
                if self.status[done] == "lost":
                    self.status[child] = "lost"  # never ran: a dependency is missing
                    lost.append(child)
                    todo.append(child)
                    continue
                self.waiting[child].discard(done)
                if not self.waiting[child]:
                    ready.append(child)
        return ready, lost

    def statuses(self) -> dict[str, str]:
        """Every job's final status, in the order given; only a cycle leaves one unfinished."""
        missing = set(self.by_key) - set(self.status)
        if missing:
            raise ValueError(f"jobs never became ready (dependency cycle?): {sorted(missing)[:5]}")
        return {key: self.status[key] for key in self.by_key}


def topological_waves(jobs: Sequence[Job]) -> list[list[Job]]:
    """Group jobs into waves: every job's deps lie in earlier waves.

    Deps that are not among `jobs` are taken as already satisfied (done in an earlier run).
    """
    by_key = {job.key: job for job in jobs}
    level: dict[str, int] = {}

    def depth(key: str, trail: tuple[str, ...] = ()) -> int:
        if key in level:
            return level[key]
        if key in trail:
            raise ValueError(f"dependency cycle through {key}")
        job = by_key[key]
        inner = [depth(dep, trail + (key,)) + 1 for dep in job.deps if dep in by_key]
        level[key] = max(inner, default=0)
        return level[key]

    waves: dict[int, list[Job]] = {}
    for job in jobs:
        waves.setdefault(depth(job.key), []).append(job)
    return [waves[k] for k in sorted(waves)]


def checked_status(key: str, status: object) -> str:
    """A job's own return value as a final status: anything but 'ok'/'failed' is lost."""
    if status in ("ok", "failed"):
        return str(status)
    log.error("job %s returned %r, not 'ok'/'failed': counted as lost", key, status)
    return "lost"
