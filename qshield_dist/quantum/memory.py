"""Memory estimates of each simulator, the check that a request fits, and the one rule that picks
the compiled path (`compiled_path`). Estimates, not measurements: they exist to refuse a sweep
that cannot run before it starts, and to name the largest qubit count that would.
"""

from __future__ import annotations

import dataclasses
import math
import os

from qshield_dist.quantum.spec import CircuitSpec, entanglement_pairs, noise_channels
from qshield_dist.vocabulary import MIXED_DEVICES, SIMULATORS

# Above this many qubits the (B,4^n)x(4^n,2^n) readout product costs more than simulating the
# density matrix (8^n vs ~ops*4^n per sample) and M's 2^n*4^n floats get large (n=8: 128 MiB).
TRANSFER_MAX_QUBITS = 7
# Working memory one density-matrix chunk may use; the batch is split to stay under it.
DENSITY_CHUNK_BYTES = 512 * 2**20
# Rough factor: a Python-level float op count of the state per circuit op kept by backprop.
_QNODE_SAVED_PER_OP = 2


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _n_ops(spec: CircuitSpec) -> int:
    """Gate and channel count of the full circuit (what a QNode applies one by one)."""
    pairs = len(entanglement_pairs(spec.entanglement, spec.qubits))
    return spec.n_angles + spec.depth * (pairs + spec.qubits * len(noise_channels(spec)))


def _auto_path(n: int, memory: float) -> str:
    return "transfer" if n <= TRANSFER_MAX_QUBITS and _transfer_bytes(n, 1) <= memory else "density"


def compiled_path(spec: CircuitSpec, memory_bytes: int | None = None) -> str:
    """Which exact compiled path `auto` picks: 'transfer' (readout matrix) or 'density'."""
    memory = _available_memory() if memory_bytes is None else memory_bytes
    return _auto_path(spec.qubits, memory)


def density_chunk(n: int, element_size: int) -> int:
    """Samples per density-matrix chunk: ~4 live (4^n)-sized operators per sample, complex."""
    return max(1, DENSITY_CHUNK_BYTES // (4 * 4**n * element_size * 2))


def _transfer_bytes(n: int, batch: int) -> int:
    # build: 2^n observables of 2^n x 2^n complex128, ~3 live copies; T float64 + a cast copy;
    # per sample: the (1 + 3n) forward-mode variants of r and the kron's last intermediate
    # (float64 worst case), plus the saved Jacobian (small).
    return 3 * 8**n * 16 + 2 * 8**n * 8 + batch * (1 + 3 * n) * 4**n * 8 * 2


def _density_bytes(n: int, batch: int) -> int:
    # per sample kept for autograd: r and the kron factors; working set: >= one sample's chunk
    # of ~4 complex128 density operators (state, tensordot output, permuted copy, Pauli vector).
    return batch * 2 * 4**n * 8 + max(DENSITY_CHUNK_BYTES, 4 * 4**n * 16)


def estimate_bytes(
    spec: CircuitSpec,
    simulator: str,
    device: str,
    batch: int,
    *,
    trajectories: int = 0,
    grad: bool = True,
    compiled: str = "auto",
) -> int:
    """Rough peak memory of one forward(+backward) call; estimates, not measurements."""
    n = spec.qubits
    if simulator == "compiled":
        # `auto` as if memory were unlimited: the estimate is what the preferred path needs.
        path = compiled if compiled != "auto" else _auto_path(n, math.inf)
        return _transfer_bytes(n, batch) if path == "transfer" else _density_bytes(n, batch)
    n_ops = _n_ops(spec)
    if device in MIXED_DEVICES:  # backprop keeps every intermediate density matrix
        return batch * 4**n * 16 * (_QNODE_SAVED_PER_OP * n_ops + 4)
    k = max(trajectories, 1) if spec.noisy else 1
    if device.startswith("lightning"):
        # tapes run one by one in C++; results kept for all; adjoint over 2^n projector
        # observables holds one state per observable.
        per_tape = 2**n * 16 * 4 + (4**n * 16 if grad else 0)
        return per_tape + batch * k * 2**n * 8 * 2
    return batch * k * 2**n * 16 * (_QNODE_SAVED_PER_OP * n_ops + 4)


def check_fits(
    spec: CircuitSpec,
    simulator: str,
    device: str,
    batch: int,
    memory_bytes: int | None = None,
    *,
    trajectories: int = 0,
    grad: bool = True,
    compiled: str = "auto",
) -> None:
    """Raise ValueError, before running anything, when the request would not fit in memory.

    `memory_bytes` defaults to the host's MemAvailable. The message names the largest qubit
    count that fits for the same simulator, device and batch.
    """
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {SIMULATORS}, got {simulator!r}")
    memory = _available_memory() if memory_bytes is None else int(memory_bytes)
    kw = dict(trajectories=trajectories, grad=grad, compiled=compiled)
    need = estimate_bytes(spec, simulator, device, batch, **kw)
    if need <= memory:
        return
    fits = 0
    for n in range(1, 64):
        trial = dataclasses.replace(spec, qubits=n)
        if estimate_bytes(trial, simulator, device, batch, **kw) > memory:
            break
        fits = n
    where = f"{simulator}" + (f" on {device}" if simulator == "qnode" else "")
    raise ValueError(
        f"{spec.qubits} qubits with {where}, batch {batch}"
        + (f", {trajectories} trajectories" if trajectories else "")
        + f" needs ~{need / 2**30:.2f} GiB but only {memory / 2**30:.2f} GiB is available; "
        + (f"at most {fits} qubits fit for this path and batch" if fits else "not even 1 qubit fits")
        + " (estimate)."
    )
