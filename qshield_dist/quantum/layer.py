"""Torch module that runs the QShield circuit of `circuits.py` on a batch of angles.

Simulators:

- `compiled` (default, exact): the post-encoding part of the circuit does not depend on the
  data, so it is compiled once per CircuitSpec from the PennyLane ops (their matrices and Kraus
  operators, see `compile_body`). The encoded state is a product state, rho = (1/2^n) sum_P r_P P
  with r = kron_i (1, x_i, y_i, z_i) from each qubit's Bloch vector, so p = T^T r with the real
  readout matrix T (4^n x 2^n, `transfer_matrix`): the 2^n projectors pushed backwards through
  the body (Heisenberg picture) and Pauli-decomposed. Gradients are forward-mode (one extra
  kron variant per angle) so the backward pass is a single multiply-and-sum. Above
  TRANSFER_MAX_QUBITS it falls back to an exact batched density-matrix simulation applying the
  same local superoperators, with an adjoint (Heisenberg) backward pass, so no intermediate
  density matrix is stored for autograd.
- `qnode`: a PennyLane QNode on a named device, broadcast over the batch. `default.mixed` is
  exact for every noise model; state-vector devices run noisy circuits by Monte-Carlo
  trajectories over each channel's Pauli twirl (exact in expectation for Pauli-mixture channels,
  an approximation for amplitude damping: `noise_approx == "pauli_twirl"`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field

import pennylane as qml
import torch

from qshield_dist.quantum.circuits import (
    PAULIS,
    CircuitSpec,
    body_ops,
    circuit_ops,
    encoding_gates,
    encoding_ops,
    entanglement_pairs,
    is_pauli_mixture,
    noise_channels,
    pauli_twirl,
    probs_qfunc,
)

log = logging.getLogger(__name__)

SIMULATORS = ("compiled", "qnode")
MIXED_DEVICES = ("default.mixed",)
COMPILED_PATHS = ("auto", "transfer", "density")

# Above this many qubits the (B,4^n)x(4^n,2^n) readout product costs more than simulating the
# density matrix (8^n vs ~ops*4^n per sample) and M's 2^n*4^n floats get large (n=8: 128 MiB).
TRANSFER_MAX_QUBITS = 7
# Working memory one density-matrix chunk may use; the batch is split to stay under it.
DENSITY_CHUNK_BYTES = 512 * 2**20
# Rough factor: a Python-level float op count of the state per circuit op kept by backprop.
_QNODE_SAVED_PER_OP = 2


# --- compiled circuit: superoperators read from the PennyLane description --------------------


@dataclass(frozen=True)
class _Step:
    """One local superoperator, with its adjoint; a permutation (e.g. a CNOT) also as indices."""

    s: torch.Tensor  # (4^k, 4^k) on vec(rho) over `wires`, index (row bits, column bits)
    s_adj: torch.Tensor
    wires: tuple[int, ...]
    perm: torch.Tensor | None  # out[i] = in[perm[i]]
    perm_adj: torch.Tensor | None


@dataclass
class _Program:
    """Superoperators (4^k x 4^k, acting on vec(rho) over the op's wires) of the circuit body."""

    n: int
    superops: list[tuple[torch.Tensor, tuple[int, ...]]]
    _cast: dict = field(default_factory=dict)  # (dtype, device) -> steps; a cache

    def ops_for(self, dtype: torch.dtype, device: torch.device) -> list[_Step]:
        key = (dtype, str(device))
        if key not in self._cast:
            steps = []
            for s, w in self.superops:
                perm = perm_adj = None
                if _is_permutation(s):  # gather instead of a 4^k x 4^k matmul: memory-bound
                    perm = s.abs().argmax(dim=1).to(device)
                    perm_adj = s.abs().argmax(dim=0).to(device)
                steps.append(_Step(s.to(device=device, dtype=dtype), s.conj().T.to(device=device, dtype=dtype), w, perm, perm_adj))
            self._cast[key] = steps
        return self._cast[key]


def _is_permutation(s: torch.Tensor) -> bool:
    ones = (s - 1).abs() < 1e-12
    return bool(((s.abs() < 1e-12) | ones).all() and (ones.sum(0) == 1).all() and (ones.sum(1) == 1).all())


def _op_superop(op: qml.operation.Operator) -> torch.Tensor:
    """sum_k K (x) conj(K): maps vec(rho) (row index, column index) -> vec(E(rho)) on op.wires."""
    if isinstance(op, qml.operation.Channel):
        kraus = [torch.as_tensor(k, dtype=torch.complex128) for k in op.kraus_matrices()]
    else:
        kraus = [torch.as_tensor(qml.matrix(op, wire_order=op.wires), dtype=torch.complex128)]
    return sum(torch.kron(k, k.conj()) for k in kraus)


@functools.lru_cache(maxsize=64)
def compile_body(spec: CircuitSpec) -> _Program:
    """Body of the circuit as a list of local superoperators; consecutive ops on the same
    wires (e.g. the three channels of `mixed` noise) are fused into one."""
    superops: list[tuple[torch.Tensor, tuple[int, ...]]] = []
    for op in body_ops(spec):
        wires = tuple(int(w) for w in op.wires)
        s = _op_superop(op)
        if superops and superops[-1][1] == wires:
            superops[-1] = (s @ superops[-1][0], wires)
        else:
            superops.append((s, wires))
    return _Program(spec.qubits, superops)


def _apply_superop(t: torch.Tensor, step: _Step, n: int, adjoint: bool = False) -> torch.Tensor:
    """Apply a step (or its adjoint) on its wires to a batch of operators t, (B, 2,..,2, 2,..,2)."""
    k = len(step.wires)
    axes = [1 + w for w in step.wires] + [1 + n + w for w in step.wires]
    perm = step.perm_adj if adjoint else step.perm
    if perm is not None:
        local = torch.movedim(t, axes, list(range(1, 1 + 2 * k)))
        shape = local.shape
        out = local.reshape(shape[0], 4**k, -1).index_select(1, perm).reshape(shape)
        return torch.movedim(out, list(range(1, 1 + 2 * k)), axes)
    s = step.s_adj if adjoint else step.s
    out = torch.tensordot(s.reshape([2] * (4 * k)), t, dims=(list(range(2 * k, 4 * k)), axes))
    return torch.movedim(out, list(range(2 * k)), axes)


def _schrodinger(program: _Program, rho: torch.Tensor) -> torch.Tensor:
    for step in program.ops_for(rho.dtype, rho.device):
        rho = _apply_superop(rho, step, program.n)
    return rho


def _heisenberg(program: _Program, obs: torch.Tensor) -> torch.Tensor:
    """Adjoint channel: <O, E(rho)> = <E^dagger(O), rho>, E^dagger = ops reversed, each S^H."""
    for step in reversed(program.ops_for(obs.dtype, obs.device)):
        obs = _apply_superop(obs, step, program.n, adjoint=True)
    return obs


def _paulis(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.stack(PAULIS).to(device=device, dtype=dtype)  # (4, 2, 2)


def matrix_to_pauli(obs: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 2^n, 2^n) operators -> (B, 4^n) coefficients Tr(O P), P = P_0 (x) .. (x) P_{n-1}."""
    b = obs.shape[0]
    t = obs.reshape([b] + [2] * (2 * n))
    paulis = _paulis(obs.dtype, obs.device)
    for q in range(n):
        # Tr(O P) = sum_ij O[i, j] P[j, i]; the new Pauli axis lands at the end, in qubit order.
        t = torch.tensordot(t, paulis, dims=([1, 1 + n - q], [2, 1]))
    return t.reshape(b, 4**n)


def pauli_to_matrix(r: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 4^n) Pauli vector -> (B, 2,..,2, 2,..,2) density operator (1/2^n) sum_P r_P P."""
    b = r.shape[0]
    t = r.reshape([b] + [4] * n)
    paulis = _paulis(r.dtype, r.device)
    for _ in range(n):
        t = torch.tensordot(t, paulis, dims=([1], [0]))  # -> (..., i_q, j_q) appended
    order = [0] + [1 + 2 * q for q in range(n)] + [2 + 2 * q for q in range(n)]
    return t.permute(order) / 2**n


@functools.lru_cache(maxsize=16)
def transfer_matrix(spec: CircuitSpec) -> torch.Tensor:
    """Real (4^n, 2^n) float64 matrix T with p = r @ T for Pauli vector r of the encoded state.

    T[P, b] = Tr(E^dagger(|b><b|) P) / 2^n: the readout projectors pushed backwards through the
    body (Heisenberg picture), then Pauli-decomposed.
    """
    n = spec.qubits
    d = 2**n
    program = compile_body(spec)
    proj = torch.zeros(d, d, d, dtype=torch.complex128)
    proj[torch.arange(d), torch.arange(d), torch.arange(d)] = 1
    evolved = _heisenberg(program, proj.reshape([d] + [2] * (2 * n)))
    coeffs = matrix_to_pauli(evolved, n) / d
    imag = coeffs.imag.abs().max().item()
    if imag > 1e-9:  # Hermitian observables have real Pauli coefficients
        raise RuntimeError(f"transfer matrix not real (max imag {imag:.2e}); circuit compile bug")
    return coeffs.real.T.contiguous()


class _DensityEvolve(torch.autograd.Function):
    """Pauli vector (B, 4^n) -> probabilities (B, 2^n) by density-matrix simulation.

    The map is linear, so the backward pass is the adjoint channel applied to diag(grad):
    nothing but the program is saved, whatever the circuit length.
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, program: _Program, chunk: int) -> torch.Tensor:
        ctx.program, ctx.chunk = program, chunk
        n = program.n
        cdtype = torch.complex128 if r.dtype == torch.float64 else torch.complex64
        out = []
        for part in r.split(chunk):
            rho = _schrodinger(program, pauli_to_matrix(part.to(cdtype), n))
            out.append(torch.diagonal(rho.reshape(-1, 2**n, 2**n), dim1=1, dim2=2).real)
        return torch.cat(out).to(r.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        program, n = ctx.program, ctx.program.n
        cdtype = torch.complex128 if grad.dtype == torch.float64 else torch.complex64
        out = []
        for part in grad.split(ctx.chunk):
            g = torch.diag_embed(part.to(cdtype)).reshape([part.shape[0]] + [2] * (2 * n))
            out.append(matrix_to_pauli(_heisenberg(program, g), n).real / 2**n)
        return torch.cat(out).to(grad.dtype), None, None


# Bloch-vector components (x=0, y=1, z=2) rotated by each encoding gate: R_P(a) turns the
# vector by angle a about axis P, i.e. (u, v) -> (u cos a - v sin a, u sin a + v cos a).
_ROTATION_PLANES = {"RX": (1, 2), "RY": (2, 0), "RZ": (0, 1)}


@dataclass(frozen=True)
class _Stages:
    """`encoding_gates` regrouped as stages applied to all wires at once."""

    gates: tuple[str, ...]
    cols: tuple[tuple[int, ...], ...]  # per stage, the angle column of each wire
    order: tuple[int, ...]  # angle column of each (stage, wire) variant, stage-major

    def rows(self, stage: int) -> slice | list[int]:
        c = self.cols[stage]
        return slice(c[0], c[0] + len(c)) if c == tuple(range(c[0], c[0] + len(c))) else list(c)


@functools.lru_cache(maxsize=64)
def _encoding_stages(spec: CircuitSpec) -> _Stages:
    n = spec.qubits
    per_wire: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    for gate, wire, col in encoding_gates(spec):
        if gate not in _ROTATION_PLANES:
            raise NotImplementedError(f"compiled simulator: encoding gate {gate} is not a Pauli rotation")
        per_wire[wire].append((gate, col))
    gates, cols = [], []
    for stage in range(len(per_wire[0])):
        names = {g[stage][0] for g in per_wire if len(g) > stage}
        if len(names) != 1 or any(len(g) != len(per_wire[0]) for g in per_wire):
            raise NotImplementedError("compiled simulator: encoding with different gates per wire")
        gates.append(names.pop())
        cols.append(tuple(per_wire[w][stage][1] for w in range(n)))
    return _Stages(tuple(gates), tuple(cols), tuple(c for cs in cols for c in cs))


def encoded_factors(spec: CircuitSpec, angles: torch.Tensor, jacobian: bool = False) -> torch.Tensor:
    """Per-qubit Pauli factors (1, x, y, z) of the encoded product state, shape (n, 4, V, B).

    Variants and batch last: broadcast multiplies with a long contiguous inner axis are ~2x
    faster on CPU than with a size-4 one, and the kron then feeds one plain GEMM. V = 1 without `jacobian`. With it, V = 1 + n_angles: variant
    1 + stage*n + wire holds the factors with that wire's replaced by d(1, x, y, z)/d angle
    (forward-mode derivatives, so the transfer path needs no autograd graph). Derivative slots
    ride along through the later rotations of their wire; a stage's own slot is
    d/da R(a) v = (-v', u') in the rotation plane.
    """
    st_info = _encoding_stages(spec)
    n, b, n_stages = spec.qubits, angles.shape[0], len(st_info.gates)
    at = angles.T.contiguous()
    cos, sin = torch.cos(at), torch.sin(at)  # once for all columns: fewer small ops
    slots = 1 + n_stages if jacobian else 1
    zeros = angles.new_zeros(n, slots, b)
    z = zeros.clone()
    z[:, 0] = 1.0  # |0> has Bloch vector (0, 0, 1)
    comps = [zeros, zeros, z]
    for st, gate in enumerate(st_info.gates):
        ui, vi = _ROTATION_PLANES[gate]
        rows = st_info.rows(st)
        c, s = cos[rows].unsqueeze(1), sin[rows].unsqueeze(1)  # (n, 1, B)
        u, v = comps[ui], comps[vi]
        nu, nv = u * c - v * s, u * s + v * c
        if jacobian:
            nu[:, 1 + st] = -nv[:, 0]
            nv[:, 1 + st] = nu[:, 0]
        comps[ui], comps[vi] = nu, nv
    ones = torch.zeros_like(zeros)
    ones[:, 0] = 1.0  # the identity coefficient is 1, its derivatives 0
    all_slots = torch.stack([ones] + comps, dim=2)  # (n, slots, 4, B)
    value = all_slots[:, 0].unsqueeze(2)  # (n, 4, 1, B)
    if not jacobian:
        return value
    deriv = all_slots[:, 1:].permute(2, 1, 0, 3).unsqueeze(0)  # (1, 4, stage, wire, B)
    eye = torch.eye(n, dtype=angles.dtype, device=angles.device)[:, None, None, :, None]  # (q,1,1,w,1)
    variants = value.unsqueeze(3) * (1 - eye) + deriv * eye  # (qubit, 4, stage, wire, B)
    return torch.cat([value, variants.reshape(n, 4, n_stages * n, b)], dim=2)


def kron_factors(factors: torch.Tensor) -> torch.Tensor:
    """(n, 4, V, B) -> (4^n, V, B): r_P = prod_i factor_i[P_i], qubit 0 most significant."""
    n, _, v, b = factors.shape
    r = factors[n - 1].reshape(4, v * b)
    for q in range(n - 2, -1, -1):
        r = (factors[q].reshape(4, 1, v * b) * r.unsqueeze(0)).reshape(-1, v * b)
    return r.reshape(-1, v, b)


def pauli_vector(spec: CircuitSpec, angles: torch.Tensor) -> torch.Tensor:
    """(B, n_angles) -> (B, 4^n) Pauli vector r_P = Tr(rho P) of the encoded state (autograd)."""
    return kron_factors(encoded_factors(spec, angles))[:, 0].T


def density_matrix(spec: CircuitSpec, angles: torch.Tensor) -> torch.Tensor:
    """Exact output density matrices (B, 2^n, 2^n), complex, through the compiled body.

    For tests and diagnostics (purity, coherences); differentiable through autograd.
    """
    n = spec.qubits
    cdtype = torch.complex128 if angles.dtype == torch.float64 else torch.complex64
    rho = pauli_to_matrix(pauli_vector(spec, angles).to(cdtype), n)
    return _schrodinger(compile_body(spec), rho).reshape(-1, 2**n, 2**n)


class _TransferReadout(torch.autograd.Function):
    """p = T^T r(angles) with the Jacobian computed in the forward pass (forward mode).

    r is multilinear in the per-qubit factors and each angle moves one factor, so all
    n_angles directional derivatives cost one batched kron and one matmul alongside the value;
    the backward pass is then one multiply-and-sum. Far fewer small torch ops than reverse-mode
    autograd through the kron, which dominates the cost at n = 4.
    """

    @staticmethod
    def forward(ctx, angles: torch.Tensor, tt: torch.Tensor, spec: CircuitSpec) -> torch.Tensor:
        need = ctx.needs_input_grad[0]
        r = kron_factors(encoded_factors(spec, angles, jacobian=need))  # (4^n, V, B)
        out = (tt @ r.reshape(r.shape[0], -1)).reshape(tt.shape[0], r.shape[1], r.shape[2])
        if need:
            ctx.save_for_backward(out[:, 1:])
            ctx.order = _encoding_stages(spec).order
        return out[:, 0].T.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (jac,) = ctx.saved_tensors  # (2^n, n_angles, B), angles in (stage, wire) order
        g = (jac * grad.T.unsqueeze(1)).sum(0)  # (n_angles, B)
        order = ctx.order
        if order != tuple(range(len(order))):
            g = torch.empty_like(g).index_copy_(0, torch.tensor(order, device=g.device), g)
        return g.T, None, None


# --- memory estimates --------------------------------------------------------------------------


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


def compiled_path(spec: CircuitSpec, memory_bytes: int | None = None) -> str:
    """Which exact compiled path `auto` picks: 'transfer' (readout matrix) or 'density'."""
    memory = _available_memory() if memory_bytes is None else memory_bytes
    n = spec.qubits
    return "transfer" if n <= TRANSFER_MAX_QUBITS and _transfer_bytes(n, 1) <= memory else "density"


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
        path = compiled if compiled != "auto" else ("transfer" if n <= TRANSFER_MAX_QUBITS else "density")
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
        trial = CircuitSpec(n, spec.depth, spec.entanglement, spec.encoding, spec.noise_model, spec.noise_strength)
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


# --- the module ----------------------------------------------------------------------------


class QuantumLayer(torch.nn.Module):
    """Angles (B, n_angles) -> basis-state probabilities (B, 2^n), differentiable w.r.t. angles.

    Attributes: `noise_approx` ('exact' or 'pauli_twirl'), `stochastic` (trajectory sampling),
    `path` (which engine runs: 'transfer', 'density', 'qnode-mixed', 'qnode-statevector',
    'qnode-trajectories'). The layer has no parameters and no buffers, so it adds nothing to a
    checkpoint; compiled matrices live in caches keyed by the (hashable) spec.
    """

    def __init__(
        self,
        spec: CircuitSpec,
        simulator: str = "compiled",
        device: str = "default.mixed",
        trajectories: int = 0,
        seed: int | None = None,
        *,
        compiled: str = "auto",
    ):
        super().__init__()
        if simulator not in SIMULATORS:
            raise ValueError(f"simulator must be one of {SIMULATORS}, got {simulator!r}")
        if compiled not in COMPILED_PATHS:
            raise ValueError(f"compiled must be one of {COMPILED_PATHS}, got {compiled!r}")
        if trajectories < 0:
            raise ValueError(f"trajectories must be >= 0, got {trajectories}")
        self.spec, self.simulator, self.device_name = spec, simulator, device
        self.trajectories, self.seed = int(trajectories), seed
        self.stochastic = False
        self.noise_approx = "exact"
        self._qnodes: dict = {}
        self._cast: dict = {}

        if simulator == "compiled":
            # The compiled simulator is its own engine (runs where the angles live); the
            # PennyLane device name plays no role, so it is kept only for the record.
            if trajectories:
                raise ValueError("trajectories apply to qnode on a state-vector device; compiled is exact")
            self.path = compiled_path(spec) if compiled == "auto" else compiled
            return

        if device in MIXED_DEVICES:
            if trajectories:
                raise ValueError(f"{device} simulates noise exactly; trajectories must be 0, got {trajectories}")
            self.path = "qnode-mixed"
        elif spec.noisy:
            if trajectories <= 0:
                raise ValueError(
                    f"noise model {spec.noise_model!r} on state-vector device {device!r} runs by "
                    "Monte-Carlo trajectories: pass trajectories=K > 0 (or use default.mixed / compiled)"
                )
            self.path = "qnode-trajectories"
            self.stochastic = True
            self._plan = self._trajectory_plan()
            exact = all(is_pauli_mixture(op) for op in body_ops(spec) if isinstance(op, qml.operation.Channel))
            self.noise_approx = "exact" if exact else "pauli_twirl"
            # Without a seed, draws come from torch's global generator, which the trial seeds:
            # the same trial draws the same trajectories on every executor.
            self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        else:
            if trajectories:
                log.warning("trajectories=%d ignored: the circuit is noiseless", trajectories)
            self.path = "qnode-statevector"
        self._qdevice = qml.device(device, wires=spec.qubits)  # fails early on unknown devices

    # pickling (Ray, multiprocessing): QNodes and devices are rebuilt lazily
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_qnodes"], state["_cast"] = {}, {}
        state.pop("_qdevice", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.simulator == "qnode":
            self._qdevice = qml.device(self.device_name, wires=self.spec.qubits)

    def extra_repr(self) -> str:
        return f"{self.spec}, simulator={self.simulator!r}, path={self.path!r}"

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        if angles.shape[-1] != self.spec.n_angles:
            raise ValueError(
                f"{self.spec.encoding} on {self.spec.qubits} qubits takes {self.spec.n_angles} angles, "
                f"got shape {tuple(angles.shape)}"
            )
        if not angles.is_floating_point():
            raise TypeError(f"angles must be float32/float64, got {angles.dtype}")
        single = angles.dim() == 1
        batch = angles.unsqueeze(0) if single else angles
        if self.simulator == "compiled":
            # The readout map sums terms of both signs: in float32 a probability that is 0
            # comes out as about -2e-8, and a log-probability downstream would be NaN.
            probs = self._compiled(batch).clamp_min(0.0)
        elif self.path == "qnode-trajectories":
            probs = self._trajectories(batch)
        else:
            probs = self._run(batch).to(batch.dtype)
        return probs[0] if single else probs

    # compiled ---------------------------------------------------------------------------------
    def _compiled(self, angles: torch.Tensor) -> torch.Tensor:
        if self.path == "transfer":
            t = transfer_matrix(self.spec)
            key = (angles.dtype, str(angles.device))
            cast = self._cast.get(key)  # per-instance cache of the matrix in this dtype/device
            if cast is None:
                cast = self._cast[key] = t.T.contiguous().to(device=angles.device, dtype=angles.dtype)
            if not (torch.is_grad_enabled() and angles.requires_grad):
                angles = angles.detach()  # skips the forward-mode Jacobian
            return _TransferReadout.apply(angles, cast, self.spec)
        r = pauli_vector(self.spec, angles)
        chunk = max(1, DENSITY_CHUNK_BYTES // (4 * 4**self.spec.qubits * r.element_size() * 2))
        return _DensityEvolve.apply(r, compile_body(self.spec), chunk)

    # qnode --------------------------------------------------------------------------------------
    def _qdevice_kind(self) -> str:
        return "lightning" if self.device_name.startswith("lightning") else "backprop"

    def _qnode(self, kind: str, qfunc_factory) -> qml.QNode:
        if kind not in self._qnodes:
            if kind.endswith("adjoint"):
                diff = "adjoint"
            elif kind.endswith("nograd"):
                diff = None
            else:
                diff = "backprop"
            self._qnodes[kind] = qml.QNode(qfunc_factory(), self._qdevice, interface="torch", diff_method=diff)
        return self._qnodes[kind]

    def _run(self, angles: torch.Tensor, *extra) -> torch.Tensor:
        """Run the broadcast circuit; lightning has no backprop and its adjoint method cannot
        differentiate qml.probs, so with a gradient it reads expvals of the 2^n projectors."""
        spec = self.spec
        if self._qdevice_kind() == "lightning":
            if torch.is_grad_enabled() and angles.requires_grad:
                qnode = self._qnode(self.path + "-adjoint", lambda: self._qfunc(projectors=True))
                return torch.stack(list(qnode(angles, *extra)), dim=-1)
            qnode = self._qnode(self.path + "-nograd", lambda: self._qfunc(projectors=False))
        else:
            qnode = self._qnode(self.path, lambda: self._qfunc(projectors=False))
        out = qnode(angles, *extra)
        return out.reshape(angles.shape[0], 2**spec.qubits) if out.dim() == 1 else out

    def _qfunc(self, projectors: bool):
        spec = self.spec
        plan = getattr(self, "_plan", None)

        def readout():
            if projectors:
                n = spec.qubits
                return [qml.expval(qml.Projector([(b >> (n - 1 - q)) & 1 for q in range(n)], wires=spec.wires))
                        for b in range(2**n)]
            return qml.probs(wires=spec.wires)

        if plan is None:
            if not projectors:
                return probs_qfunc(spec)

            def qfunc(angles):
                circuit_ops(spec, angles)  # constructing the ops inside the QNode queues them
                return readout()

            return qfunc

        def qfunc_traj(angles, xbits, zbits):
            encoding_ops(spec, angles)
            with qml.QueuingManager.stop_recording():
                ops = body_ops(spec)
            for entry in plan:
                if entry[0] == "op":
                    qml.apply(ops[entry[1]])
                else:  # a sampled Pauli X^x Z^z (up to phase) as broadcast rotations
                    _, wire, j = entry
                    qml.RX(math.pi * xbits[:, j], wires=wire)
                    qml.RZ(math.pi * zbits[:, j], wires=wire)
            return readout()

        return qfunc_traj

    # trajectories -----------------------------------------------------------------------------
    def _trajectory_plan(self) -> list[tuple]:
        """Walk the body: keep unitaries, merge each run of channels on a wire (until a unitary
        touches it) into one sampled Pauli whose distribution is the XOR-convolution of the
        channels' twirls (independent Pauli errors compose by multiplying, phase ignored)."""
        plan: list[tuple] = []
        pending: dict[int, torch.Tensor] = {}
        self._flush_probs: list[torch.Tensor] = []

        def flush(wires) -> None:
            for w in wires:
                if w in pending:
                    plan.append(("pauli", w, len(self._flush_probs)))
                    self._flush_probs.append(pending.pop(w))

        with qml.QueuingManager.stop_recording():
            ops = body_ops(self.spec)
        for i, op in enumerate(ops):
            wires = [int(w) for w in op.wires]
            if isinstance(op, qml.operation.Channel):
                twirl = pauli_twirl(op)
                w = wires[0]
                pending[w] = _xor_convolve(pending[w], twirl) if w in pending else twirl
            else:
                flush(wires)
                plan.append(("op", i))
        flush(sorted(pending))
        return plan

    def _trajectories(self, angles: torch.Tensor) -> torch.Tensor:
        b, k = angles.shape[0], self.trajectories
        probs = torch.stack(self._flush_probs)  # (F, 4) over I, X, Y, Z
        draws = torch.multinomial(probs, b * k, replacement=True, generator=self._generator).T  # (BK, F)
        # I=(0,0) X=(1,0) Y=(1,1) Z=(0,1) as (x, z) bits
        xbits = ((draws == 1) | (draws == 2)).to(angles.dtype).to(angles.device)
        zbits = ((draws == 2) | (draws == 3)).to(angles.dtype).to(angles.device)
        rep = angles.repeat(k, 1)  # trajectory-major: row t*B + i is sample i, trajectory t
        out = self._run(rep, xbits, zbits)
        return out.reshape(k, b, -1).mean(0).to(angles.dtype)


def _xor_convolve(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Distribution of the product of two independent Paulis, indices I,X,Y,Z = bits (x,z)."""
    bits = [(0, 0), (1, 0), (1, 1), (0, 1)]
    index = {b: i for i, b in enumerate(bits)}
    out = torch.zeros(4, dtype=p.dtype)
    for i, (x1, z1) in enumerate(bits):
        for j, (x2, z2) in enumerate(bits):
            out[index[(x1 ^ x2, z1 ^ z2)]] += p[i] * q[j]
    return out
