"""Executors: where and when jobs run (base.py holds the contract), after submitit's AutoExecutor.

    make(config)                      the executor the sweep names, built from its config
    LocalExecutor(workers)            worker processes on this machine  (executors/local.py)
    RayExecutor(address, max_retries) tasks on a running Ray cluster    (executors/ray.py)
    SlurmExecutor(folder, ...)        submitit job arrays per wave      (executors/slurm.py)

Each back-end is imported only when made, so `import qshield_dist.executors` needs neither
ray nor submitit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qshield_dist.executors.base import Executor, Job, ProgressSink, Resources, topological_waves

if TYPE_CHECKING:
    from qshield_dist.config import SweepConfig

__all__ = ["Executor", "Job", "ProgressSink", "Resources", "make", "topological_waves"]


def make(cfg: SweepConfig) -> Executor:
    """The executor `cfg.executor` names, with its section of the config."""
    if cfg.executor == "local":
        from qshield_dist.executors.local import LocalExecutor

        return LocalExecutor(workers=cfg.workers)
    if cfg.executor == "ray":
        from qshield_dist.executors.ray import RayExecutor

        return RayExecutor(address=cfg.ray.address, max_retries=cfg.ray.max_retries)
    from qshield_dist.executors.slurm import SlurmExecutor

    s = cfg.slurm
    return SlurmExecutor(
        folder=s.folder or str(cfg.results_path / ".submitit"),
        partition=s.partition,
        time_min=s.time_min,
        gpus_per_task=s.gpus_per_task,
        cpus_per_task=s.cpus_per_task,
        mem_gb=s.mem_gb,
        array_parallelism=s.array_parallelism,
        pack_minutes=s.pack_minutes,
        max_num_timeout=s.max_num_timeout,
    )
