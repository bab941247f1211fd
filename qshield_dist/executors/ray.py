"""Run jobs as plain Ray tasks on a running Ray cluster.

* One task per job (Ray Tune costs about a second per trial here; a task a few ms).
* Dependencies are expressed by passing the dependency tasks' ObjectRefs as arguments:
  Ray starts a task only once its arguments exist, so Ray schedules the whole DAG itself.
  A dependency that raised (lost) makes its dependents fail without running: 'lost' too.
* Worker or node death is retried by Ray (`max_retries`); an exception from the job's
  fn is not (`retry_exceptions=False`): it is a bug or a lost trial, reported as 'lost'.
* Token authentication: pass `token_file` (or set RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH in the
  environment, as slurm/run.sh does). address='local' starts a private loopback cluster
  with a fresh token for this run and stops it afterwards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from qshield_dist.executors.base import (
    DependencyGraph,
    Executor,
    Job,
    ProgressSink,
    checked_status,
    topological_waves,
)

log = logging.getLogger(__name__)


def _run_job(fn: Callable[[], str], *_deps: Any) -> str:
    # _deps are the dependencies' statuses: only there so Ray waits for them.
    return fn()


class RayExecutor(Executor):
    name = "ray"

    def __init__(
        self,
        address: str = "auto",
        max_retries: int = 3,
        token_file: str | os.PathLike[str] | None = None,
        local_cpus: int | None = None,
        shutdown: bool = False,
    ):
        """address: 'auto' (the cluster this node belongs to / RAY_ADDRESS), 'host:port', or
        'local' (start a private loopback cluster for this run, with `local_cpus`).
        shutdown: disconnect from the cluster when run() returns."""
        self.address = address
        self.max_retries = max_retries
        self.token_file = Path(token_file) if token_file else None
        self.local_cpus = local_cpus
        self.shutdown = shutdown
        self._private_head: Any = None

    def connect(self) -> None:
        import ray

        from qshield_dist import cluster

        if ray.is_initialized():
            return
        address = self.address
        loopback = cluster.is_loopback(address)
        if address == "local":
            token = cluster.new_token_file()
            self._private_head = cluster.start_head(token, num_cpus=self.local_cpus)
            address, self.token_file = self._private_head.address, token
        if self.token_file is not None:
            cluster.use_token_in_this_process(self.token_file, loopback)
        elif loopback:
            # Token from the environment (RAY_AUTH_*), left as it is; only keep loopback.
            env_token = os.environ.get("RAY_AUTH_TOKEN_PATH")
            if env_token and os.environ.get("RAY_AUTH_MODE") == "token":
                cluster.use_token_in_this_process(env_token, loopback=True)
            else:
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = False
        log.info("connecting to ray at %s", address)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._private_head is not None:
            self._private_head.stop()
            self._private_head = None

    def run(self, jobs: Sequence[Job], progress: ProgressSink | None = None) -> dict[str, str]:
        import ray

        progress = progress or ProgressSink()
        self.connect()
        try:
            return self._run(ray, jobs, progress)
        finally:
            if self.shutdown or self._private_head is not None:
                self.close()

    def _options(self, job: Job) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "num_cpus": job.cpus,
            "num_gpus": job.gpus,
            "max_retries": self.max_retries,
            "retry_exceptions": False,
            "name": f"{job.stage}:{job.key}",
        }
        # No `memory` request: Ray's memory accounting counts the whole node, and a 4 GB
        # request per trial would leave most CPUs idle.
        return opts

    def _run(self, ray: Any, jobs: Sequence[Job], progress: ProgressSink) -> dict[str, str]:

        remote = ray.remote(_run_job)
        refs: dict[str, Any] = {}
        key_of: dict[Any, str] = {}
        # Submit in dependency order so every dep's ref exists when its dependents are built.
        for wave in topological_waves(jobs):
            for job in wave:
                dep_refs = [refs[d] for d in job.deps if d in refs]
                ref = remote.options(**self._options(job)).remote(job.fn, *dep_refs)
                refs[job.key] = ref
                key_of[ref] = job.key
        graph = DependencyGraph(jobs)
        # Ray does not say when a task starts; 'started' means ready to run (queued or running).
        for key in graph.ready():
            progress.started(key)

        pending = list(refs.values())
        while pending:
            done, pending = ray.wait(
                pending, num_returns=min(len(pending), 64), timeout=0.5, fetch_local=True
            )
            for ref in done:
                key = key_of[ref]
                if key in graph.status:
                    continue  # already lost with a dependency; its task failed without running
                try:
                    st = checked_status(key, ray.get(ref))
                except Exception as exc:  # RayTaskError, WorkerCrashedError, NodeDiedError, ...
                    log.error("job %s lost: %s", key, _short_error(exc))
                    st = "lost"
                progress.finished(key, st)
                ready, lost = graph.finish(key, st)
                for child in ready:
                    progress.started(child)
                for child in lost:
                    progress.finished(child, "lost")
        return graph.statuses()


def _short_error(exc: BaseException) -> str:
    """The innermost error line of a Ray error (its traceback text is long and repeated)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"
