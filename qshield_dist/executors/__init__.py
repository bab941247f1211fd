"""Executors: where and when jobs run (base.py holds the contract), after submitit's AutoExecutor.

    make(name, **params)              the executor `name`, from plain keyword values
    LocalExecutor(workers)            worker processes on this machine  (executors/local.py)
    RayExecutor(address, max_retries) tasks on a running Ray cluster    (executors/ray.py)
    SlurmExecutor(folder, ...)        submitit job arrays per dependency (executors/slurm.py)

Executors know nothing of a sweep's config: the launcher reads it and passes plain values, as
submitit's `update_parameters` takes them. Each back-end is imported only when made, so
`import qshield_dist.executors` needs neither ray nor submitit.
"""

from __future__ import annotations

from typing import Any

from qshield_dist.executors.base import Executor, Job, ProgressSink, topological_waves
from qshield_dist.vocabulary import EXECUTORS

__all__ = ["Executor", "Job", "ProgressSink", "make", "topological_waves"]


def make(name: str, **params: Any) -> Executor:
    """The executor called `name` (local, ray or slurm), built with `params` as its keyword
    arguments."""
    if name == "local":
        from qshield_dist.executors.local import LocalExecutor

        return LocalExecutor(**params)
    if name == "ray":
        from qshield_dist.executors.ray import RayExecutor

        return RayExecutor(**params)
    if name == "slurm":
        from qshield_dist.executors.slurm import SlurmExecutor

        return SlurmExecutor(**params)
    raise ValueError(f"executor: got {name!r}; allowed: {', '.join(EXECUTORS)}")
