"""Compile the fixed circuit body into local superoperators and a Pauli transfer (readout) matrix.

The post-encoding part of the circuit does not depend on the data, so it is compiled once per
CircuitSpec from the PennyLane ops (their matrices and Kraus operators, see `compile_body`).
The encoded state is a product state, rho = (1/2^n) sum_P r_P P, so the probabilities are
p = T^T r with the real readout matrix T (4^n x 2^n, `transfer_matrix`): the 2^n projectors
pushed backwards through the body (Heisenberg picture) and Pauli-decomposed. Above a few
qubits the layer instead evolves density matrices with the same local superoperators
(`_schrodinger` forward, `_heisenberg` for the adjoint).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pennylane as qml
import torch

from qshield_dist.quantum.circuits import PAULIS, body_ops, kraus_operators, kraus_superop
from qshield_dist.quantum.spec import CircuitSpec


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
                s_dev = s.to(device=device, dtype=dtype)
                s_adj = s.conj().T.to(device=device, dtype=dtype)
                steps.append(_Step(s_dev, s_adj, w, perm, perm_adj))
            self._cast[key] = steps
        return self._cast[key]


def _is_permutation(s: torch.Tensor) -> bool:
    ones = (s - 1).abs() < 1e-12
    zero_or_one = ((s.abs() < 1e-12) | ones).all()
    return bool(zero_or_one and (ones.sum(0) == 1).all() and (ones.sum(1) == 1).all())


def _op_superop(op: qml.operation.Operator) -> torch.Tensor:
    """sum_k K (x) conj(K): maps vec(rho) (row index, column index) -> vec(E(rho)) on op.wires."""
    return kraus_superop(kraus_operators(op))


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


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype density operators of a real `dtype` batch are simulated in."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


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


# --- Pauli conversions ----------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _paulis(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.stack(PAULIS).to(device=device, dtype=dtype)  # (4, 2, 2), made once per device


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
    # compiled once on the host, in float64; the layer casts it to each device it runs on
    proj = torch.zeros(d, d, d, dtype=torch.complex128, device="cpu")
    diagonal = torch.arange(d, device="cpu")
    proj[diagonal, diagonal, diagonal] = 1
    evolved = _heisenberg(program, proj.reshape([d] + [2] * (2 * n)))
    coeffs = matrix_to_pauli(evolved, n) / d
    imag = coeffs.imag.abs().max().item()
    if imag > 1e-9:  # Hermitian observables have real Pauli coefficients
        raise RuntimeError(f"transfer matrix not real (max imag {imag:.2e}); circuit compile bug")
    return coeffs.real.T.contiguous()
