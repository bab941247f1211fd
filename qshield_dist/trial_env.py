"""What a trial fixes about the process that runs it, so that its numbers depend on its spec
alone (executor, worker count and machine load aside): the device its torch code runs on,
intra-op threads, deterministic kernels, the seeds of every generator it draws from; and its
own log file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from qshield_dist.vocabulary import CPU, CUDA

# cuBLAS picks its reduction order by workspace unless this is set, and reads it when the
# process makes its first cuBLAS handle: set when a worker imports the trial code, before any
# trial runs (a value already in the environment is kept: torch then refuses a nondeterministic
# one in a CUDA trial, naming it).
CUBLAS_WORKSPACE = ":4096:8"
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def cuda_missing() -> str | None:
    """Why this process cannot run a CUDA trial, or None when it can."""
    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    built = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"no CUDA device on {socket.gethostname()}{seen}: torch {torch.__version__} ({built}) finds none"


def torch_device(accelerator: str) -> torch.device:
    """The device a trial of this resolved accelerator runs on; a clear RuntimeError where this
    process has none (a worker without CUDA records it as the trial's failure)."""
    if accelerator == CPU:
        return torch.device("cpu")
    if accelerator != CUDA:
        raise ValueError(f"accelerator: got {accelerator!r}; allowed: {CPU}, {CUDA} (resolved)")
    problem = cuda_missing()
    if problem:
        raise RuntimeError(f"the trial asks for accelerator '{CUDA}', but there is {problem}")
    return torch.device(CUDA, torch.cuda.current_device())


def gpu_model(device: torch.device) -> str | None:
    """The GPU's model name for the row (a volatile column), None on the CPU."""
    return torch.cuda.get_device_name(device) if device.type == CUDA else None


@contextmanager
def fixed_numerics(threads: int, device: torch.device | None = None) -> Iterator[str]:
    """Fix what a trial's floats depend on besides its spec, whatever process runs it: the
    intra-op threads of torch and of every BLAS/OpenMP pool loaded (reductions are summed in
    another order with another thread count), and deterministic kernels where torch has
    them: on a CUDA device strictly (an op without a deterministic kernel raises, naming
    itself) and without TF32 (cuDNN would otherwise round convolution inputs to 10 bits).
    Yields the settings as JSON for the row; restores the previous ones afterwards."""
    cuda = device is not None and device.type == CUDA
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.set_num_threads(threads)
    # CPU: warn_only, as before CUDA trials existed (the row's settings stay those CPU ids mean).
    torch.use_deterministic_algorithms(True, warn_only=not cuda)
    torch.backends.cudnn.benchmark = False
    settings = {
        "threads": threads,
        "deterministic_algorithms": "on" if cuda else "warn_only",
        "cudnn_benchmark": False,
        "seeded": ["torch", "numpy", "random"],
    }
    if cuda:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        settings.update(
            accelerator=CUDA, cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"), tf32=False
        )
    try:
        with threadpool_limits(limits=threads):
            yield json.dumps(settings, sort_keys=True)
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]
        torch.backends.cudnn.allow_tf32 = before[4]
        torch.backends.cuda.matmul.allow_tf32 = before[5]


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
