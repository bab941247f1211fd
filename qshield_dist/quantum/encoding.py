"""The data-dependent encoding as per-qubit Pauli factors of the encoded product state.

The encoding rotations act on |0> wire by wire, so the encoded state is a product state and its
Pauli vector is r = kron_i (1, x_i, y_i, z_i) of each qubit's Bloch vector; the compiled paths
(`superop.py`) take it from there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qshield_dist.quantum.spec import CircuitSpec, encoding_gates
from qshield_dist.quantum.superop import _schrodinger, compile_body, complex_dtype, pauli_to_matrix

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
    faster on CPU than with a size-4 one, and the kron then feeds one plain GEMM. V = 1 without
    `jacobian`. With it, V = 1 + n_angles: variant 1 + stage*n + wire holds the factors with that
    wire's replaced by d(1, x, y, z)/d angle (forward-mode derivatives, so the transfer path
    needs no autograd graph). Derivative slots ride along through the later rotations of their
    wire; a stage's own slot is d/da R(a) v = (-v', u') in the rotation plane.
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
    rho = pauli_to_matrix(pauli_vector(spec, angles).to(complex_dtype(angles.dtype)), n)
    return _schrodinger(compile_body(spec), rho).reshape(-1, 2**n, 2**n)
