"""Executors: where and when jobs run (see base.py for the contract).

    LocalExecutor(workers)            worker processes on this machine  (executors/local.py)
    RayExecutor(address, max_retries) tasks on a running Ray cluster    (executors/ray.py)
    SlurmExecutor(folder, ...)        submitit job arrays per wave      (executors/slurm.py)

Imported lazily, so `import qshield_dist.executors` needs neither ray nor submitit.
"""

from __future__ import annotations

import importlib
from typing import Any

from qshield_dist.executors.base import Executor, Job, ProgressSink, Resources, topological_waves

_LAZY = {
    "LocalExecutor": "qshield_dist.executors.local",
    "RayExecutor": "qshield_dist.executors.ray",
    "SlurmExecutor": "qshield_dist.executors.slurm",
}

__all__ = ["Executor", "Job", "ProgressSink", "Resources", "topological_waves", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
