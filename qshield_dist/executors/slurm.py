"""Run jobs on SLURM through submitit: one job array per dependency wave.

* Wave k is one array (`executor.batch()`); it waits for wave k-1 with
  `--dependency=afterok:<array id of wave k-1>`, so SLURM holds the whole DAG and nothing
  waits on this driver between waves.
* Each job runs inside `TrialRunner`, whose `checkpoint()` hands submitit the same call
  again: on preemption or time-out (SIGUSR2 before the limit) submitit requeues the task,
  and the trial resumes from the checkpoint cache. Trials are idempotent (atomic result
  files), so a re-run is safe.
* Waiting: every `poll_s` one `sacct` call (submitit's watcher) covers all arrays; a task
  whose result pickle exists is done ('ok'/'failed' as its fn returned; an exception -> 'lost');
  a task that ended without one (CANCELLED, FAILED, NODE_FAIL, OUT_OF_MEMORY, TIMEOUT after
  too many requeues) is 'lost'. A pending array task cancelled before SLURM gave it its own
  record never shows in sacct: one absent from both sacct and squeue for two polls is 'lost'.
* afterok is never satisfied once a task of a wave is lost: the later arrays would pend
  forever (DependencyNeverSatisfied). So when a wave has a loss, we let it finish, cancel the
  later arrays (none of their tasks can have started) and resubmit what can still run: the
  dependents of lost jobs are 'lost' without running, as the Executor contract says.
* The submitit folder (pickles, logs) is created 0700: pickles carry the trial's inputs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from qshield_dist.executors.base import Executor, Job, ProgressSink, checked_status, topological_waves

log = logging.getLogger(__name__)

# States in which a task may still run (or run again).
_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING",
           "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED",
           "READY", "RESV_DEL_HOLD", "STOPPED"}


class TrialRunner:
    """The callable submitit runs; checkpointable, so SLURM preemption/time-out requeues."""

    def __init__(self, fn: Callable[[], str], key: str):
        self.fn = fn
        self.key = key

    def __call__(self) -> str:
        return self.fn()

    def checkpoint(self) -> Any:
        import submitit

        # Same call again: the trial itself resumes from its checkpoint cache.
        return submitit.helpers.DelayedSubmission(self)


@dataclass
class _Wave:
    jobs: list[Job]
    array_id: str = ""
    sub: dict[str, Any] = field(default_factory=dict)  # key -> submitit Job


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, folder: str | os.PathLike[str], partition: str | None = None,
                 time_min: int | None = None, gpus_per_task: float | None = None,
                 cpus_per_task: int | None = None, mem_gb: float | None = None,
                 array_parallelism: int = 64, max_num_timeout: int = 3, poll_s: float = 5.0,
                 job_name: str = "qshield", additional_parameters: dict[str, Any] | None = None,
                 python: str | None = None):
        """Parameters left None come from the jobs' Resources (the largest in each wave).
        max_num_timeout: requeues on time-out before a task counts as lost."""
        self.folder = Path(folder)
        self.partition = partition
        self.time_min = time_min
        self.gpus_per_task = gpus_per_task
        self.cpus_per_task = cpus_per_task
        self.mem_gb = mem_gb
        self.array_parallelism = array_parallelism
        self.max_num_timeout = max_num_timeout
        self.poll_s = poll_s
        self.job_name = job_name
        self.additional_parameters = dict(additional_parameters or {})
        self.python = python
        self.array_ids: list[str] = []  # every array submitted, in order (tests, logs)

    # -- submission ---------------------------------------------------------------------

    def sbatch_parameters(self, wave: Sequence[Job], after: str | None) -> dict[str, Any]:
        """The parameters of wave's array, in submitit.SlurmExecutor's names (sbatch's, less the
        dashes): those set here, else the largest request among the wave's jobs. `after`: the
        array id the wave waits for. Needs no SLURM on this machine."""
        res = [job.resources for job in wave]
        cpus = self.cpus_per_task or max(1, int(max(r.cpus for r in res) + 0.999))
        gpus = self.gpus_per_task if self.gpus_per_task is not None else max(r.gpus for r in res)
        extra = dict(self.additional_parameters)
        if after:
            extra["dependency"] = f"afterok:{after}"
            # A broken dependency should not pend forever if we are gone.
            extra.setdefault("kill-on-invalid-dep", "yes")
        params: dict[str, Any] = {
            "job_name": self.job_name,
            "time": self.time_min or max(r.timeout_min for r in res),
            "cpus_per_task": cpus,
            "mem": _sbatch_mem(self.mem_gb or max(r.mem_gb for r in res)),
            "ntasks_per_node": 1,
            "nodes": 1,
            "array_parallelism": self.array_parallelism,
            "additional_parameters": extra,
        }
        if self.partition:
            params["partition"] = self.partition
        if gpus:
            # SLURM counts whole GPUs: a fractional request takes one.
            params["gpus_per_task"] = max(1, int(gpus + 0.999))
        return params

    def _executor(self, wave: list[Job], after: str | None) -> Any:
        import submitit

        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        # submitit.SlurmExecutor, not AutoExecutor(cluster="slurm"), which would only rename
        # generic parameters to these. Its constructor fails without srun on PATH: only
        # submitting needs SLURM, not sbatch_parameters.
        ex = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=self.max_num_timeout,
                                    **({"python": self.python} if self.python else {}))
        ex.update_parameters(**self.sbatch_parameters(wave, after))
        return ex

    def _submit_waves(self, waves: list[list[Job]], progress: ProgressSink) -> list[_Wave]:
        out: list[_Wave] = []
        after: str | None = None
        for jobs in waves:
            ex = self._executor(jobs, after)
            with ex.batch():
                handles = [ex.submit(TrialRunner(job.fn, job.key)) for job in jobs]
            wave = _Wave(jobs, str(handles[0].job_id).split("_")[0], {j.key: h for j, h in zip(jobs, handles)})
            self.array_ids.append(wave.array_id)
            log.info("submitted array %s: %d %s job(s)%s", wave.array_id, len(jobs),
                     jobs[0].stage, f" after {after}" if after else "")
            out.append(wave)
            after = wave.array_id
        return out

    # -- waiting ------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job], progress: ProgressSink | None = None) -> dict[str, str]:
        import submitit

        progress = progress or ProgressSink()
        by_key = {job.key: job for job in jobs}
        status: dict[str, str] = {}
        remaining = list(jobs)
        while remaining:
            waves = self._submit_waves(topological_waves(remaining), progress)
            started: set[str] = set()
            missing_polls: dict[str, int] = {}
            lost_wave = -1
            for index, wave in enumerate(waves):
                while any(key not in status for key in wave.sub):
                    self._poll(submitit, wave, status, started, missing_polls, progress)
                    if any(key not in status for key in wave.sub):
                        time.sleep(self.poll_s)
                if any(status[key] == "lost" for key in wave.sub):
                    lost_wave = index
                    break
            if lost_wave < 0:
                break
            # afterok can no longer hold for the later arrays: cancel them and start over
            # with what is left (dependents of lost jobs are lost without running).
            later = [w.array_id for w in waves[lost_wave + 1:]]
            if later:
                log.warning("a job of array %s was lost: cancelling arrays %s and resubmitting",
                            waves[lost_wave].array_id, ", ".join(later))
                subprocess.run(["scancel", *later], check=False)
            remaining = []
            for wave in waves[lost_wave + 1:]:
                for job in wave.jobs:
                    if any(status.get(dep) == "lost" for dep in job.deps):
                        status[job.key] = "lost"
                        progress.finished(job.key, "lost")
                    else:
                        remaining.append(job)
            # The transitive closure: a job whose dep just became lost is lost too.
            changed = True
            while changed:
                changed = False
                for job in list(remaining):
                    if any(status.get(dep) == "lost" for dep in job.deps):
                        remaining.remove(job)
                        status[job.key] = "lost"
                        progress.finished(job.key, "lost")
                        changed = True
        return {key: status[key] for key in by_key}

    def _poll(self, submitit: Any, wave: _Wave, status: dict[str, str], started: set[str],
              missing_polls: dict[str, int], progress: ProgressSink) -> None:
        handles = [h for key, h in wave.sub.items() if key not in status]
        if not handles:
            return
        handles[0].watcher.update()  # one sacct call for every registered array
        queued: set[str] | None = None
        for key, handle in wave.sub.items():
            if key in status:
                continue
            state = handle.watcher.get_state(handle.job_id, mode="cache").split()[0].upper()
            if state == "RUNNING" and key not in started:
                started.add(key)
                progress.started(key)
            if handle.paths.result_pickle.exists():
                st = self._outcome(key, handle)
            elif state in _ACTIVE:
                continue
            elif state == "UNKNOWN":
                if queued is None:
                    queued = _squeue_ids(wave.array_id)
                if handle.job_id in queued or _in_pending_range(handle.job_id, queued):
                    missing_polls.pop(key, None)
                    continue
                missing_polls[key] = missing_polls.get(key, 0) + 1
                if missing_polls[key] < 2:
                    continue
                log.error("job %s (%s) left the queue without an accounting record: lost", key, handle.job_id)
                st = "lost"
            else:
                # Finished without a result: cancelled, killed, node failure, out of memory.
                # COMPLETED without a result pickle yet: the file may lag behind; wait.
                if state == "COMPLETED" and missing_polls.get(key, 0) < 3:
                    missing_polls[key] = missing_polls.get(key, 0) + 1
                    continue
                log.error("job %s (%s) ended %s: lost", key, handle.job_id, state)
                st = "lost"
            if key not in started:
                started.add(key)
                progress.started(key)
            status[key] = st
            progress.finished(key, st)

    @staticmethod
    def _outcome(key: str, handle: Any) -> str:
        try:
            st = handle.result()
        except Exception as exc:  # the fn raised, or submitit gave up (UncompletedJobError)
            log.error("job %s (%s) lost: %s", key, handle.job_id, str(exc).strip().splitlines()[-1:] or exc)
            return "lost"
        return checked_status(key, st)


def _sbatch_mem(gb: float) -> str:
    """sbatch --mem as submitit's AutoExecutor writes mem_gb: whole GB, else MB."""
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def _squeue_ids(array_id: str) -> set[str]:
    """Ids of the array's tasks still in the queue, one per task (`-r`), e.g. {'12_3'}."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("squeue failed: %s", exc)
        return {"?"}  # unknown: treat as still queued
    if out.returncode != 0:
        # 'Invalid job id' once the whole array has left the queue.
        return set() if "Invalid job id" in out.stderr else {"?"}
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def _in_pending_range(job_id: str, queued: set[str]) -> bool:
    """'?' (squeue failed) counts as queued; so does a '12_[3-5]' range holding the task."""
    if "?" in queued:
        return True
    base, _, task = job_id.partition("_")
    for item in queued:
        if item.startswith(f"{base}_[") and task.isdigit():
            for part in item[len(base) + 2:].rstrip("]").split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= int(task) <= int(hi or lo):
                    return True
    return False
