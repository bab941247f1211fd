"""What a trial fixes about the process that runs it, so that its numbers depend on its spec
alone (executor, worker count and machine load aside): intra-op threads, deterministic
kernels, the seeds of every generator it draws from; and its own log file.
"""

from __future__ import annotations

import json
import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits


@contextmanager
def fixed_numerics(threads: int) -> Iterator[str]:
    """Fix what a trial's floats depend on besides its spec, whatever process runs it: the
    intra-op threads of torch and of every BLAS/OpenMP pool loaded (reductions are summed in
    another order with another thread count), and deterministic kernels where torch has
    them. Yields the settings as JSON for the row; restores the previous ones afterwards."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at CUDA init
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.set_num_threads(threads)
    # warn_only: an op without a deterministic kernel (some CUDA backwards) warns, not fails.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    settings = {
        "threads": threads,
        "deterministic_algorithms": "warn_only",
        "cudnn_benchmark": False,
        "seeded": ["torch", "numpy", "random"],
    }
    try:
        with threadpool_limits(limits=threads):
            yield json.dumps(settings, sort_keys=True)
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]


@contextmanager
def trial_log(path: Path, mode: int) -> Iterator[None]:
    """Everything the project logs while a trial runs, and Python warnings, also go to the
    trial's own log file (appended: a retry or a requeue adds to it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if mode == 0o600 else 0o755)
    handler = logging.FileHandler(path)
    os.chmod(path, mode)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package, warn = logging.getLogger("qshield_dist"), logging.getLogger("py.warnings")
    before = package.level
    package.setLevel(min(before or logging.INFO, logging.INFO))
    package.addHandler(handler)
    warn.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warn.removeHandler(handler)
        package.removeHandler(handler)
        package.setLevel(before)
        handler.close()


def seed_everything(seed: int) -> None:
    """Seed every generator a trial draws from: torch (projections, input noise, trajectories,
    random starts, EOT), NumPy (One-Pixel's evolution) and Python's own."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
