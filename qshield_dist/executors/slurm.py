"""Run jobs on SLURM through submitit: packs of trials as array tasks, an array per stage and
per set of tasks its trials wait for.

* Packing (slurm_packing). Trials are packed into array tasks of about `pack_minutes` of
  expected work (never a trial and its dependency), each task one checkpointable `Pack` that a
  requeue resumes with its unfinished trials, under a time limit of about twice its expected
  minutes; more packs than one array may hold (MaxArraySize, and at most TASKS_PER_FOLDER so
  no folder grows past ~10,000 files) are split into several arrays.
* Dependencies per task, not per wave. The trials of one dependency level and stage that wait
  for the same tasks (those running their dependencies) share an array, which waits for exactly
  those tasks: `--dependency=afterok:12_3` (SLURM takes single array tasks), or `afterok:12`
  where it waits for every task of array 12. So a model's attacks and diagnostics start as
  soon as the task that trained it is done, not when the slowest training of the sweep is.
  Measured on the dev cluster (`python -m qshield_dist.bench.slurm_packing --dependencies 60`:
  a 60-s training and a fast one, three attacks each): the fast model's first attack started
  3.1 s after its training ended, against 61.2 s when every array of wave k waited for all
  arrays of wave k-1 (before this change: the slow training's remainder, plus scheduling); the
  wall time was the same (66 s against 70 s). The behaviour is tested (tests/test_slurm_cluster.py:
  test_a_models_attacks_start_when_its_training_is_done). Why not the alternatives: one array
  per trial exceeds what a scheduler takes (10^5-10^6 jobs) and loses the packing; `afterany`
  plus a small job per model that checks its training costs an extra job, and a scheduling
  cycle, on the critical path of every model, and a trial would have to check its own
  dependencies; `aftercorr` pairs task i with task i only. Packing within one group keeps
  trials of seconds in few tasks: a training task holding several models has one array of
  their attacks. SLURM holds the whole DAG; nothing waits on this driver between levels.
  An array of one pack is submitted as a plain job (submitit does so). Each dependency level
  shares `array_parallelism` among its arrays in proportion to their sizes; levels now overlap
  (a model's attacks run while another model trains), so more tasks than that may run at once.
* Arrays. One `executor.batch()` submits one `--array=0-(n-1)%p`, indexed from 0, of one
  stage's packs (its partition, time limit and resources are that stage's). Account, QoS,
  constraint and the setup lines (`module load ...`) are the same for every array.
* Files. Each run() has its folder (`folder/run-<time>-<id>/`): per array, submitit's folder
  `<array id>/` (pickles, results, logs: 4 files per task) and `status/<n>/` with one status
  file per task; the run folder holds two entries per array (that folder, and submitit's link
  to its script). So no folder holds more than about 4 x TASKS_PER_FOLDER files, whatever the
  number of trials.
* Statuses. Each trial adds its status ('ok', 'failed', or 'lost' when its fn raised) to its
  task's status file as it finishes: progress per trial, and the statuses of the finished
  trials of a task that was later cancelled. An exception ends the trial, not the pack: its
  siblings still run, and the pack then fails (non-zero exit), which breaks afterok.
  Waiting: every `poll_s` one `sacct` call (submitit's watcher) covers all arrays; a task that
  ended (result pickle, or a final SLURM state: CANCELLED, FAILED, NODE_FAIL, OUT_OF_MEMORY,
  TIMEOUT after too many requeues) leaves its trials without a status 'lost'. A pending array
  task cancelled before SLURM gave it its own record never shows in sacct: one absent from
  both sacct and squeue for two polls has ended. An array is looked at only once every task
  it waits for ended well: before that its tasks cannot have started.
* Losses. afterok is never satisfied once a task it names failed: the arrays waiting for it,
  and those waiting for them, would pend forever (DependencyNeverSatisfied; kill-on-invalid-dep
  has SLURM cancel them if this driver is gone). So once a failed task's trials all have their
  statuses, we cancel exactly those arrays (none of their tasks can have started) and resubmit
  what of them can still run, waiting for the tasks still running; every other array runs on.
  base.DependencyGraph decides what is lost: the dependents of a lost trial are lost without
  running, as the Executor contract says.
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
    TASKS_PER_FOLDER,
    Pack,
    PackPlanner,
    _Trial,
    max_array_tasks,
    read_statuses,
)
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
# Beyond this many task ids in one --dependency, an array waits for whole arrays instead.
_MAX_DEPENDENCIES = 64


@dataclass(eq=False)  # compared and hashed by identity
class _Task:
    handle: Any  # submitit Job
    array: Submitted
    keys: list[str]
    status_file: Path  # the statuses its trials recorded (slurm_packing.read_statuses)
    ended: bool = False  # SLURM is done with it (result pickle or a final state)
    broken: bool = False  # ended without success: afterok on it fails
    handled: bool = False  # broken, and the arrays waiting for it were cancelled and resubmitted
    settled: bool = False  # ended, and each of its trials has a final status (_settled)
    grace: int = 0  # polls waited for accounting or the result pickle to show up
    lag: int = 0  # polls waited, once ended, for the statuses its trials wrote
    announced: bool = False

    @property
    def task_id(self) -> str:
        """'12_3' for task 3 of array 12; '12' for a plain job (submitit submits one pack so)."""
        return str(self.handle.job_id)


@dataclass(eq=False)
class Submitted:
    """One array (a plain job when it holds one pack): its SLURM id, its packs' trial keys
    (task i runs packs[i]), the dependency ids it was submitted with (`--dependency=afterok:`
    those) and the tasks behind them."""

    array_id: str
    packs: list[list[str]]
    after: list[str] = field(default_factory=list)
    tasks: list[_Task] = field(default_factory=list, repr=False)
    waits_for: list[_Task] = field(default_factory=list, repr=False)
    dropped: bool = False  # cancelled because a task it waits for failed; its trials resubmitted


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

    def _submit(self, jobs: Sequence[Job], graph: DependencyGraph, run_dir: Path, max_tasks: int) -> None:
        """Plan `jobs` and submit their arrays, each waiting for the tasks that hold its
        trials' dependencies (those still to finish: submitted earlier or in this plan)."""
        placed = {
            key: task.task_id
            for key, task in self._holder.items()
            if key not in graph.status and not task.ended and not task.array.dropped
        }
        plans = self.plan(jobs, max_tasks, placed)
        level_packs: dict[int, int] = {}
        for p in plans:
            level_packs[p.level] = level_packs.get(p.level, 0) + len(p.packs)
        planned: list[list[_Task]] = []  # the tasks of each planned array, as submitted
        for p in plans:
            waits = [self._tasks[t] if isinstance(t, str) else planned[t[0]][t[1]] for t in p.after]
            waits.sort(key=lambda t: _id_order(t.task_id))
            after, waits = self._dependency(waits)
            # A level's arrays share array_parallelism in proportion to their sizes.
            share = max(1, self.array_parallelism * len(p.packs) // level_packs[p.level])
            status_dir = run_dir / "status" / str(len(self.submitted))
            status_dir.mkdir(parents=True)
            # submitit.SlurmExecutor, not AutoExecutor(cluster="slurm"), which would only rename
            # generic parameters to these. Its constructor fails without srun on PATH. Its folder:
            # one per array (%A), holding 4 files per task.
            ex = submitit.SlurmExecutor(folder=run_dir / "%A", max_num_timeout=self.max_num_timeout)
            ex.update_parameters(**self.sbatch_parameters(p.packs, after, share))
            files = [status_dir / str(i) for i in range(len(p.packs))]
            with ex.batch():
                handles = [
                    ex.submit(Pack([_Trial(j.key, j.fn, file) for j in pack]))
                    for pack, file in zip(p.packs, files)
                ]
            keys = [[j.key for j in pack] for pack in p.packs]
            sub = Submitted(str(handles[0].job_id).split("_")[0], keys, after, waits_for=waits)
            sub.tasks = [_Task(h, sub, k, f) for h, k, f in zip(handles, keys, files)]
            for task in sub.tasks:
                self._tasks[task.task_id] = task
                for key in task.keys:
                    self._holder[key] = task
            planned.append(sub.tasks)
            log.info(
                "submitted %s %s: %s, %d task(s), %d trial(s)%s",
                "array" if len(p.packs) > 1 else "job",
                sub.array_id,
                p.stage,
                len(p.packs),
                sum(len(k) for k in keys),
                f" after {':'.join(after)}" if after else "",
            )
            if self.on_submit is not None:
                self.on_submit(sub.array_id, sub.packs)
            self.array_ids.append(sub.array_id)
            self.submitted.append(sub)

    def _dependency(self, waits: Sequence[_Task]) -> tuple[list[str], list[_Task]]:
        """The ids for --dependency=afterok: of these tasks: an array's id where they are all
        of its tasks; if that leaves more than _MAX_DEPENDENCIES ids, their arrays' ids (waiting
        for more than needed, never for less). With the tasks SLURM will then wait for: a
        failure of any of them cancels the waiting array (kill-on-invalid-dep), so _resubmit
        and the polling must follow them, not only the tasks needed."""
        arrays = list(dict.fromkeys(t.array for t in waits))
        ids = []
        for array in arrays:
            mine = [t for t in waits if t.array is array]
            ids += [array.array_id] if len(mine) == len(array.tasks) else [t.task_id for t in mine]
        if len(ids) > _MAX_DEPENDENCIES:
            return [a.array_id for a in arrays], [t for a in arrays for t in a.tasks]
        return ids, list(waits)

    # -- waiting ------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job], progress: ProgressSink | None = None) -> dict[str, str]:
        progress = progress or ProgressSink()
        graph = DependencyGraph(jobs)
        if not jobs:
            return {}
        self._started: set[str] = set()
        self._holder: dict[str, _Task] = {}  # trial key -> the task that runs it (the latest)
        self._tasks: dict[str, _Task] = {}  # task id -> task
        first = len(self.submitted)
        max_tasks = min(max_array_tasks(), TASKS_PER_FOLDER)
        run_dir = self.folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        run_dir.mkdir(parents=True)
        for path in (self.folder, run_dir):
            os.chmod(path, 0o700)
        log.info(
            "slurm: %d job(s), packs of ~%g min, at most %d tasks per array",
            len(jobs),
            self.pack_minutes,
            max_tasks,
        )
        self._submit(jobs, graph, run_dir, max_tasks)
        while True:
            live = [a for a in self.submitted[first:] if not a.dropped]
            self._poll(live, graph, progress)
            tasks = [t for a in live for t in a.tasks]
            broken = [t for t in tasks if t.broken]
            if any(not t.handled for t in broken) and all(_settled(t, graph) for t in broken):
                self._resubmit(broken, live, graph, run_dir, max_tasks)
                continue
            if all(_settled(t, graph) for t in tasks):
                break
            time.sleep(self.poll_s)
        return graph.statuses()

    def _resubmit(
        self,
        broken: list[_Task],
        live: list[Submitted],
        graph: DependencyGraph,
        run_dir: Path,
        max_tasks: int,
    ) -> None:
        """afterok can no longer hold for the arrays that wait, directly or through another,
        for a broken task: cancel them (none of their tasks can have started) and submit again
        what of them can still run (the graph has already made the dependents of lost trials
        lost). Every other array runs on."""
        doomed: list[Submitted] = []
        bad = set(broken)
        for array in live:  # in submission order: an array after those it waits for
            if any(t in bad for t in array.waits_for):
                array.dropped = True
                doomed.append(array)
                bad.update(array.tasks)
        for task in broken:
            task.handled = True
        if not doomed:
            return
        log.warning(
            "task(s) %s failed: cancelling %s, which wait for them, and resubmitting",
            ", ".join(t.task_id for t in broken),
            ", ".join(a.array_id for a in doomed),
        )
        subprocess.run(["scancel", *(a.array_id for a in doomed)], check=False)
        keys = [k for a in doomed for pack in a.packs for k in pack if k not in graph.status]
        if keys:
            self._submit([graph.by_key[k] for k in keys], graph, run_dir, max_tasks)

    def _poll(self, live: list[Submitted], graph: DependencyGraph, progress: ProgressSink) -> None:
        """One look at the live arrays: one sacct call (submitit's watcher) for all of them,
        the status files of the tasks that may have written some, and what ended how. An array
        that waits for a task that has not ended well is not looked at: its tasks cannot have
        started, and if that task failed, _resubmit cancels it (or SLURM does: kill-on-invalid-dep)."""

        def finish(key: str, st: str) -> None:
            if key in graph.status:
                return
            progress.finished(key, st)
            for child in graph.finish(key, st)[1]:
                progress.finished(child, "lost")

        unended = [t for a in live for t in a.tasks if not t.ended]
        if unended:
            unended[0].handle.watcher.update()  # one sacct call for every registered array
        queued: dict[str, set[str]] = {}  # array id -> its task ids squeue still shows
        for array in live:  # in submission order: a task's dependencies are looked at before it
            if any(not t.ended or t.broken for t in array.waits_for):
                continue
            for task in array.tasks:
                if _settled(task, graph):
                    continue
                handle = task.handle
                state = "ENDED" if task.ended else handle.watcher.get_state(handle.job_id, mode="cache")
                state = state.split()[0].upper()
                if state != "PENDING":  # a pending task has recorded nothing
                    for key, st in read_statuses(task.status_file).items():
                        if key in task.keys and key not in graph.status:
                            self._announce([key], progress)
                            finish(key, checked_status(key, st))
                if task.ended:
                    continue
                if state == "RUNNING" and not task.announced:
                    task.announced = True
                    self._announce([k for k in task.keys if k not in graph.status], progress)
                if handle.paths.result_pickle.exists():
                    outcome = self._outcome(task)
                    task.ended = True
                    if outcome is not None:  # success: every trial's status
                        for key, st in zip(task.keys, outcome):
                            # Announced here too: the cached state may still have said PENDING
                            # on the look that first found the result (the task ran between looks).
                            if key not in graph.status:
                                self._announce([key], progress)
                            finish(key, checked_status(key, st))
                        continue
                    task.broken = True
                elif state in _ACTIVE:
                    continue
                elif state == "UNKNOWN":
                    if array.array_id not in queued:  # one squeue call per array, if any
                        queued[array.array_id] = queued_tasks(array.array_id)
                    in_queue = queued[array.array_id]
                    if handle.job_id in in_queue or _in_pending_range(handle.job_id, in_queue):
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
            # An ended task's trials without a status never finished: lost, once the statuses
            # they wrote have had two looks to show up (one may have preceded the task's end).
            for task in array.tasks:
                if not task.ended or _settled(task, graph):
                    continue
                missing = [k for k in task.keys if k not in graph.status]
                task.lag += 1
                if task.lag >= 2:
                    self._announce(missing, progress)
                    log.error("task %s ended without finishing %d trial(s): lost", task.task_id, len(missing))
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


def _settled(task: _Task, graph: DependencyGraph) -> bool:
    """Ended, and each of its trials has a final status (for good: remembered)."""
    task.settled = task.settled or (task.ended and all(k in graph.status for k in task.keys))
    return task.settled


def _id_order(task_id: str) -> tuple[int, int]:
    array, _, index = task_id.partition("_")
    return int(array), int(index or -1)


def _in_pending_range(job_id: str, queued: set[str]) -> bool:
    """UNKNOWN (squeue failed) counts as queued; so does a '12_[3-5]' range holding the task."""
    if UNKNOWN in queued:
        return True
    base, _, task = job_id.partition("_")
    return task.isdigit() and any(int(task) in task_indices(item, base) for item in queued)
