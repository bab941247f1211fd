"""Run jobs on SLURM through submitit: packs of trials as array tasks, arrays per dependency wave.

* Packing (slurm_packing). The trials of one dependency wave are packed into array tasks of
  about `pack_minutes` of expected work, each task one checkpointable `Pack` that a requeue
  resumes with its unfinished trials, under a time limit of about twice its expected minutes;
  a wave of more packs than one array may hold (MaxArraySize) is split into several arrays.
* Arrays. One `executor.batch()` submits one `--array=0-(n-1)%p`, indexed from 0, of one
  stage's packs (its partition, time limit and resources are that stage's); each array records
  the offset of its first pack in the wave (`submitted`). Account, QoS, constraint and the
  setup lines (`module load ...`) are the same for every array.
  Every array of wave k waits for all arrays of wave k-1 (`--dependency=afterok:A:B:...`), so
  SLURM holds the whole DAG and nothing waits on this driver between waves; the wave's
  `array_parallelism` is shared among its arrays in proportion to their sizes.
* Statuses. Each trial writes its status ('ok', 'failed', or 'lost' when its fn raised) to the
  run's status folder as it finishes: progress per trial, and the statuses of the finished
  trials of a task that was later cancelled. An exception ends the trial, not the pack: its
  siblings still run, and the pack then fails (non-zero exit), which breaks afterok.
  Waiting: every `poll_s` one `sacct` call (submitit's watcher) covers all arrays; a task that
  ended (result pickle, or a final SLURM state: CANCELLED, FAILED, NODE_FAIL, OUT_OF_MEMORY,
  TIMEOUT after too many requeues) leaves its trials without a status 'lost'. A pending array
  task cancelled before SLURM gave it its own record never shows in sacct: one absent from
  both sacct and squeue for two polls has ended.
* Losses. afterok is never satisfied once a task of a wave failed: the later arrays would pend
  forever (DependencyNeverSatisfied). So when a wave has a failed task, we let it finish,
  cancel the later arrays (none of their tasks can have started) and resubmit what can still
  run; base.DependencyGraph decides what is lost: the dependents of a lost trial are lost
  without running, as the Executor contract says.
* The submitit folder (pickles, logs, statuses) is created 0700: pickles carry the trial's inputs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import submitit

from qshield_dist.executors.base import (
    DependencyGraph,
    Executor,
    Job,
    ProgressSink,
    checked_status,
)
from qshield_dist.executors.slurm_packing import (
    Pack,
    PackPlanner,
    _status_name,
    _Trial,
    max_array_tasks,
)

# Moved to slurm_packing, still importable from here (tests, bench.slurm_packing; pickles of
# tasks submitted before the split name slurm.Pack and slurm._Trial, imported above).
from qshield_dist.executors.slurm_packing import PackLost as PackLost
from qshield_dist.executors.slurm_packing import pack_jobs as pack_jobs
from qshield_dist.executors.slurm_packing import split_arrays as split_arrays
from qshield_dist.executors.squeue import UNKNOWN, queued_tasks, task_indices

log = logging.getLogger(__name__)

# States in which a task may still run (or run again).
_ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "COMPLETING",
    "CONFIGURING",
    "RESIZING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SIGNALING",
    "STAGE_OUT",
    "PREEMPTED",
    "READY",
    "RESV_DEL_HOLD",
    "STOPPED",
}
_JOB_NAME = "qshield"


@dataclass
class _Task:
    handle: Any  # submitit Job
    keys: list[str]
    ended: bool = False  # SLURM is done with it (result pickle or a final state)
    broken: bool = False  # ended without success: afterok on its array fails
    grace: int = 0  # polls waited for accounting or the result pickle to show up
    lag: int = 0  # polls waited, once ended, for the statuses its trials wrote
    announced: bool = False


@dataclass
class Submitted:
    """One array: the wave it belongs to, its SLURM id, the offset of its first pack in the
    wave's packs (task index i holds pack offset + i), and its packs' trial keys."""

    wave: int
    array_id: str
    offset: int
    packs: list[list[str]]
    after: list[str] = field(default_factory=list)
    tasks: list[_Task] = field(default_factory=list, repr=False)


class SlurmExecutor(PackPlanner, Executor):
    name = "slurm"

    def __init__(
        self,
        folder: str | os.PathLike[str],
        partition: str | None = None,
        time_min: int | None = None,
        gpus_per_task: float | None = None,
        cpus_per_task: int | None = None,
        mem_gb: float | None = None,
        array_parallelism: int = 64,
        pack_minutes: float = 30.0,
        durations: Mapping[str, float] | None = None,
        max_num_timeout: int = 3,
        poll_s: float = 5.0,
        on_submit: Callable[[str, list[list[str]]], None] | None = None,
        account: str | None = None,
        qos: str | None = None,
        constraint: str | None = None,
        setup: Sequence[str] = (),
        stages: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        """Parameters left None come from the jobs' requests (the largest in each array).
        pack_minutes: expected work per array task (0: one trial per task). durations: expected
        minutes per job key (default: its timeout_min); also settable as an attribute
        before run(). max_num_timeout: requeues on time-out before a task counts as ended.
        on_submit(array_id, packs): called as each array is submitted, with its tasks' trial
        keys (the launcher records them, so a relaunch does not submit them again while they are
        queued); also settable as an attribute before run(). account, qos, constraint: sbatch's
        options of those names; setup: shell lines each task runs before its trials (`module
        load ...`). stages: stage -> {'partition': ..., 'time_min': ...}, what a stage's arrays
        take instead of `partition` and `time_min` (None values: those)."""
        self.folder = Path(folder)
        self.partition = partition
        self.time_min = time_min
        self.account, self.qos, self.constraint = account, qos, constraint
        self.setup = list(setup)
        self.stages = {stage: dict(values) for stage, values in (stages or {}).items()}
        self.gpus_per_task = gpus_per_task
        self.cpus_per_task = cpus_per_task
        self.mem_gb = mem_gb
        self.array_parallelism = array_parallelism
        self.pack_minutes = pack_minutes
        self.durations: dict[str, float] = dict(durations or {})
        self.max_num_timeout = max_num_timeout
        self.poll_s = poll_s
        self.on_submit = on_submit
        self.array_ids: list[str] = []  # every array submitted, in order (tests, logs)
        self.submitted: list[Submitted] = []

    # -- submission ---------------------------------------------------------------------

    def sbatch_parameters(
        self,
        packs: Sequence[Sequence[Job]] | Sequence[Job],
        after: str | Sequence[str] | None = None,
        parallelism: int | None = None,
    ) -> dict[str, Any]:
        """The parameters of one array of `packs` (a flat list of jobs: one pack each), all of
        one stage, in submitit.SlurmExecutor's names (sbatch's, less the dashes): those set here
        (the stage's own partition and time limit first), else the largest request among its
        jobs. `after`: the array id(s) it waits for. Needs no SLURM."""
        groups = [[p] if isinstance(p, Job) else list(p) for p in packs]
        jobs = [job for pack in groups for job in pack]
        stages = {job.stage for job in jobs}
        if len(stages) != 1:
            raise ValueError(f"an array holds the jobs of one stage; got {sorted(stages)}")
        own = self.stages.get(stages.pop(), {})
        partition = own.get("partition") or self.partition
        time_min = own.get("time_min") or self.time_min
        cpus = self.cpus_per_task or max(1, int(max(job.cpus for job in jobs) + 0.999))
        gpus = self.gpus_per_task if self.gpus_per_task is not None else max(job.gpus for job in jobs)
        extra: dict[str, Any] = {}
        deps = [after] if isinstance(after, str) else list(after or [])
        if deps:
            extra["dependency"] = "afterok:" + ":".join(deps)
            # A broken dependency should not pend forever if we are gone.
            extra["kill-on-invalid-dep"] = "yes"
        params: dict[str, Any] = {
            "job_name": _JOB_NAME,
            "time": time_min or max(self.pack_time(p) for p in groups),
            "cpus_per_task": cpus,
            "mem": _sbatch_mem(self.mem_gb or max(job.mem_gb for job in jobs)),
            "ntasks_per_node": 1,
            "nodes": 1,
            "array_parallelism": parallelism or self.array_parallelism,
            "additional_parameters": extra,
        }
        if partition:
            params["partition"] = partition
        for name in ("account", "qos", "constraint"):
            if getattr(self, name):
                params[name] = getattr(self, name)
        if self.setup:
            params["setup"] = list(self.setup)
        if gpus:
            # SLURM counts whole GPUs: a fractional request takes one.
            params["gpus_per_task"] = max(1, int(gpus + 0.999))
        return params

    def _submit(
        self, waves: list[list[tuple[int, list[list[Job]]]]], status_dir: Path, first_wave: int
    ) -> list[list[Submitted]]:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        out: list[list[Submitted]] = []
        after: list[str] = []
        for index, arrays in enumerate(waves, start=first_wave):
            total = sum(len(packs) for _, packs in arrays)
            mine: list[Submitted] = []
            for offset, packs in arrays:
                share = max(1, self.array_parallelism * len(packs) // total)
                # submitit.SlurmExecutor, not AutoExecutor(cluster="slurm"), which would only
                # rename generic parameters to these. Its constructor fails without srun on PATH.
                ex = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=self.max_num_timeout)
                ex.update_parameters(**self.sbatch_parameters(packs, after, share))
                with ex.batch():
                    handles = [ex.submit(Pack([_Trial(j.key, j.fn, status_dir) for j in p])) for p in packs]
                sub = Submitted(
                    index,
                    str(handles[0].job_id).split("_")[0],
                    offset,
                    [[j.key for j in p] for p in packs],
                    list(after),
                    [_Task(h, [j.key for j in p]) for h, p in zip(handles, packs)],
                )
                log.info(
                    "submitted array %s: wave %d, packs %d-%d (%d trials)%s",
                    sub.array_id,
                    index,
                    offset,
                    offset + len(packs) - 1,
                    sum(len(p) for p in packs),
                    f" after {':'.join(after)}" if after else "",
                )
                if self.on_submit is not None:
                    self.on_submit(sub.array_id, sub.packs)
                self.array_ids.append(sub.array_id)
                self.submitted.append(sub)
                mine.append(sub)
            out.append(mine)
            after = [s.array_id for s in mine]
        return out

    # -- waiting ------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job], progress: ProgressSink | None = None) -> dict[str, str]:
        progress = progress or ProgressSink()
        graph = DependencyGraph(jobs)
        if not jobs:
            return {}
        self._started: set[str] = set()
        max_tasks = max_array_tasks()
        run_dir = self.folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        status_dir = run_dir / "status"
        status_dir.mkdir(parents=True)
        for path in (self.folder, run_dir):
            os.chmod(path, 0o700)
        names = {_status_name(job.key): job.key for job in jobs}
        log.info(
            "slurm: %d job(s), packs of ~%g min, at most %d tasks per array",
            len(jobs),
            self.pack_minutes,
            max_tasks,
        )
        remaining = list(jobs)
        wave_no = 0
        while remaining:
            waves = self._submit(self.plan(remaining, max_tasks), status_dir, wave_no)
            broken_at = -1
            for index, arrays in enumerate(waves):
                tasks = [t for a in arrays for t in a.tasks]
                while True:
                    self._poll(tasks, arrays, graph, progress, status_dir, names)
                    if all(t.ended and all(k in graph.status for k in t.keys) for t in tasks):
                        break
                    time.sleep(self.poll_s)
                if any(t.broken for t in tasks):
                    broken_at = index
                    break
            if broken_at < 0:
                break
            # afterok can no longer hold for the later arrays: cancel them and start over with
            # what is left (the graph has already made the dependents of lost jobs lost).
            later = [a.array_id for arrays in waves[broken_at + 1 :] for a in arrays]
            if later:
                log.warning(
                    "a task of array(s) %s failed: cancelling arrays %s and resubmitting",
                    ", ".join(a.array_id for a in waves[broken_at]),
                    ", ".join(later),
                )
                subprocess.run(["scancel", *later], check=False)
            wave_no += broken_at + 1
            remaining = [job for job in remaining if job.key not in graph.status]
        return graph.statuses()

    def _poll(
        self,
        tasks: list[_Task],
        arrays: list[Submitted],
        graph: DependencyGraph,
        progress: ProgressSink,
        status_dir: Path,
        names: dict[str, str],
    ) -> None:
        def finish(key: str, st: str) -> None:
            if key in graph.status:
                return
            progress.finished(key, st)
            for child in graph.finish(key, st)[1]:
                progress.finished(child, "lost")

        live = [t for t in tasks if not t.ended]
        if live:
            live[0].handle.watcher.update()  # one sacct call for every registered array
        for name in os.listdir(status_dir):
            key = names.get(name)
            if key is not None and key not in graph.status:
                try:
                    st = (status_dir / name).read_text().strip()
                except OSError:
                    continue
                self._announce([key], progress)
                finish(key, checked_status(key, st))
        queued: set[str] | None = None
        for task in live:
            handle = task.handle
            state = handle.watcher.get_state(handle.job_id, mode="cache").split()[0].upper()
            if state == "RUNNING" and not task.announced:
                task.announced = True
                self._announce([k for k in task.keys if k not in graph.status], progress)
            if handle.paths.result_pickle.exists():
                outcome = self._outcome(task)
                task.ended = True
                if outcome is not None:  # success: every trial's status
                    for key, st in zip(task.keys, outcome):
                        finish(key, checked_status(key, st))
                    continue
                task.broken = True
            elif state in _ACTIVE:
                continue
            elif state == "UNKNOWN":
                if queued is None:
                    queued = set().union(*(queued_tasks(a.array_id) for a in arrays))
                if handle.job_id in queued or _in_pending_range(handle.job_id, queued):
                    task.grace = 0
                    continue
                task.grace += 1
                if task.grace < 2:
                    continue
                log.error("task %s left the queue without an accounting record", handle.job_id)
                task.ended = task.broken = True
            elif state == "COMPLETED" and task.grace < 3:
                task.grace += 1  # its result pickle may lag behind on a shared filesystem
                continue
            else:
                log.error("task %s ended %s", handle.job_id, state)
                task.ended = task.broken = True
        # An ended task's trials without a status never finished: lost, once the statuses they
        # wrote have had two listings to show up (one may have preceded the task's end).
        for task in tasks:
            missing = [k for k in task.keys if k not in graph.status]
            if task.ended and missing:
                task.lag += 1
                if task.lag >= 2:
                    self._announce(missing, progress)
                    log.error(
                        "task %s ended without finishing %d trial(s): lost", task.handle.job_id, len(missing)
                    )
                    for key in missing:
                        finish(key, "lost")

    def _announce(self, keys: list[str], progress: ProgressSink) -> None:
        for key in keys:
            if key not in self._started:
                self._started.add(key)
                progress.started(key)

    @staticmethod
    def _outcome(task: _Task) -> list[str] | None:
        """The pack's statuses from its result pickle, or None if it ended with an error."""
        try:
            return list(task.handle.result())
        except Exception as exc:  # PackLost, a crash, or submitit gave up (UncompletedJobError)
            lines = str(exc).strip().splitlines()
            log.error("task %s failed: %s", task.handle.job_id, lines[-1] if lines else type(exc).__name__)
            return None


def _sbatch_mem(gb: float) -> str:
    """sbatch --mem as submitit's AutoExecutor writes mem_gb: whole GB, else MB."""
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def _in_pending_range(job_id: str, queued: set[str]) -> bool:
    """UNKNOWN (squeue failed) counts as queued; so does a '12_[3-5]' range holding the task."""
    if UNKNOWN in queued:
        return True
    base, _, task = job_id.partition("_")
    return task.isdigit() and any(int(task) in task_indices(item, base) for item in queued)
