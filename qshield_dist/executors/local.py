"""Run jobs in local worker processes, each as soon as its dependencies are done.

Workers are started with the 'spawn' context (torch and fork do not mix: a forked child
inherits OpenMP/CUDA state and can deadlock). Each trial fixes its own thread count (trial.py),
so the numbers do not depend on the worker count; the workers' thread pools start capped at
cpus // workers so that nothing oversubscribes before it does.

A worker process that dies (SIGKILL, OOM killer, segfault in a simulator) breaks the whole
ProcessPoolExecutor: every job submitted at that moment gets BrokenProcessPool. We then
start a fresh pool and resubmit those jobs. Each worker reports the jobs it starts on a
queue, so jobs still queued are resubmitted free. If one job was running, it killed its
worker: it is charged, and after `max_retries` + 1 deaths it is 'lost' (its dependents too).
If several were running, the culprit is unknown: they become suspects and are re-run one
at a time on an otherwise idle pool, where a death is attributable. Innocent bystanders are
therefore never lost. Trials are idempotent (checkpoint cache + atomic result files), so re-running
one is safe. An exception raised by a job's fn is not retried: it is 'lost' at once, the
same as Ray's retry_exceptions=False.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Hashable, Iterable, Sequence

from qshield_dist.executors.base import DependencyGraph, Executor, Job, ProgressSink, checked_status

log = logging.getLogger(__name__)

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def available_cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_started_queue: Any = None


def _init_worker(threads: int, started: Any) -> None:
    """Runs first in every worker: cap the thread pools before any trial computes."""
    global _started_queue
    _started_queue = started
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    # spawn re-imports the parent's __main__, which may have imported torch already:
    # the env var is then too late for its pool, so set it directly as well.
    if "torch" in sys.modules:
        try:
            sys.modules["torch"].set_num_threads(threads)
        except Exception as exc:  # pragma: no cover - defensive
            logging.getLogger(__name__).debug("torch.set_num_threads failed: %s", exc)


def _call(key: str, fn: Callable[[], str]) -> str:
    _started_queue.put(key)  # lets the parent tell started jobs from queued ones
    return fn()


class _ReadyJobs(list):
    """Keys ready to run, kept sorted by `priority` so that pop() takes the job with the most
    work waiting on it (then the first given): training does not queue behind attacks."""

    def __init__(self, priority: dict[str, Hashable], keys: Iterable[str] = ()):
        super().__init__()
        self._priority = priority
        self.extend(keys)

    def append(self, key: str) -> None:
        bisect.insort(self, key, key=self._priority.__getitem__)

    def extend(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.append(key)


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, workers: int = 1, max_retries: int = 1, in_process: bool = False):
        """workers: processes run at once. max_retries: re-runs of a job whose worker died.
        in_process: with workers=1, run jobs in this process (debugging; a crash in a trial
        then ends the sweep)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.max_retries = max_retries
        # Caps the pools a library may start before a trial fixes its own threads (trial.py):
        # N workers on N cores then never oversubscribe. The numbers do not depend on it.
        self.threads = max(1, available_cpus() // workers)
        self.in_process = in_process and workers == 1
        self.pools_created = 0  # tests and benchmarks read this

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        self.pools_created += 1
        ctx = mp.get_context("spawn")
        self._started = ctx.SimpleQueue()  # a fresh one: a killed worker may hold the old one's lock
        self._started_keys: set[str] = set()
        return cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(self.threads, self._started),
        )

    def _drain_started(self) -> set[str]:
        """Keys that started in the current pool so far."""
        while not self._started.empty():
            self._started_keys.add(self._started.get())
        return self._started_keys

    def run(self, jobs: Sequence[Job], progress: ProgressSink | None = None) -> dict[str, str]:
        progress = progress or ProgressSink()
        graph = DependencyGraph(jobs)
        by_key = graph.by_key
        ready = _ReadyJobs(graph.priority, graph.ready())
        attempts: dict[str, int] = {key: 0 for key in by_key}  # worker deaths while running
        announced: set[str] = set()

        def finish(key: str, st: str) -> None:
            progress.finished(key, st)
            newly_ready, lost = graph.finish(key, st)
            for child in lost:
                progress.finished(child, "lost")
            ready.extend(newly_ready)

        if self.in_process:
            while ready:
                key = ready.pop()
                progress.started(key)
                try:
                    st = by_key[key].fn()
                except Exception:
                    log.exception("job %s raised: lost", key)
                    st = "lost"
                finish(key, checked_status(key, st))
            return graph.statuses()

        pool = self._new_pool()
        running: dict[cf.Future[str], str] = {}
        suspects: set[str] = set()  # were running beside a worker death: re-run alone
        try:
            while ready or running:
                while ready and len(running) < self.workers:
                    solo = [k for k in ready if k in suspects]
                    if solo:
                        if running:
                            break  # a suspect runs only on an otherwise idle pool
                        key = solo[-1]
                        ready.remove(key)
                    else:
                        key = ready.pop()
                    if key not in announced:
                        announced.add(key)
                        progress.started(key)
                    try:
                        running[pool.submit(_call, key, by_key[key].fn)] = key
                    except BrokenProcessPool:
                        # The pool broke between our wait and this submit: retry on a new one.
                        ready.append(key)
                        pool = self._replace(pool)
                    if key in suspects:
                        break
                if not running:
                    continue
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                # Drain every time: an unread pipe fills up (64 KiB) and blocks the workers.
                started_now = self._drain_started()
                broken: list[str] = []
                for fut in done:
                    key = running.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        suspects.discard(key)
                        finish(key, checked_status(key, fut.result()))
                    elif isinstance(exc, BrokenProcessPool):
                        broken.append(key)
                    else:
                        log.error("job %s raised %s: %s (lost, not retried)", key, type(exc).__name__, exc)
                        finish(key, "lost")
                if not broken:
                    continue
                # Every other running future fails the same way; collect them now.
                for fut in list(running):
                    key = running.pop(fut)
                    try:
                        st = fut.result()
                    except BrokenProcessPool:
                        broken.append(key)
                    except Exception as exc:
                        log.error("job %s raised %s: %s (lost)", key, type(exc).__name__, exc)
                        finish(key, "lost")
                    else:
                        suspects.discard(key)
                        finish(key, checked_status(key, st))
                started_now = self._drain_started()
                pool = self._replace(pool)
                ran = [k for k in broken if k in started_now]
                ready.extend(k for k in broken if k not in started_now)  # were queued: free
                if len(ran) == 1:
                    # It ran alone (or beside queued jobs only): it killed its worker.
                    # Its retry runs alone too, so a second death is again its own.
                    self._charge(ran[0], attempts, ready, finish)
                    suspects.add(ran[0])
                else:
                    log.warning("a worker died running %s; re-running them one at a time", ", ".join(ran))
                    suspects.update(ran)
                    ready.extend(ran)
        except BaseException:
            # Ctrl-C or a kill: stop the workers now instead of waiting for their trials.
            # Results are written atomically, so a trial cut short leaves nothing behind
            # and simply runs again when the sweep is resumed.
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True, cancel_futures=True)
        return graph.statuses()

    def _replace(self, pool: cf.ProcessPoolExecutor) -> cf.ProcessPoolExecutor:
        log.warning("a worker process died; starting a new pool of %d", self.workers)
        pool.shutdown(wait=False, cancel_futures=True)
        time.sleep(0.05)  # let the dead pool's manager thread finish tearing down
        return self._new_pool()

    def _charge(
        self, key: str, attempts: dict[str, int], ready: _ReadyJobs, finish: Callable[[str, str], None]
    ) -> None:
        attempts[key] += 1
        if attempts[key] <= self.max_retries:
            log.warning("job %s killed its worker (%d time(s)); retrying", key, attempts[key])
            ready.append(key)
        else:
            log.error("job %s killed its worker %d times: lost", key, attempts[key])
            finish(key, "lost")
