"""The QShield circuit, described once as PennyLane operations.

Every simulator (PennyLane QNodes in `layer.py`, Monte-Carlo trajectories in `trajectories.py`,
the compiled transfer-matrix / density-matrix paths in `superop.py`) reads the circuit from the
functions here, so there is a single description of its structure:

    encoding rotations, then `depth` times: a CNOT entanglement layer, then noise on every wire;
    readout: probabilities of all 2**n computational basis states (wire 0 = most significant bit).

Angle layout (the columns of the `angles` tensor):

- `angle`: shape (B, n); column i is the RY angle of wire i.
- `enhanced_angle`: shape (B, 3n), ordered [rx_0..rx_{n-1}, ry_0..ry_{n-1}, rz_0..rz_{n-1}];
  wire i gets RX(rx_i), then RY(ry_i), then RZ(rz_i), applied to |0>.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import pennylane as qml
import torch

from qshield_dist.vocabulary import ENCODINGS, ENTANGLEMENTS, NOISE_MODELS

# Shares of the noise strength p in the paper's "mixed" model, in the order they are applied.
MIXED_SHARES: tuple[tuple[str, float], ...] = (
    ("depolarizing", 0.4),
    ("amplitude_damping", 0.3),
    ("phase_damping", 0.3),
)

_CHANNELS: dict[str, Callable[..., qml.operation.Channel]] = {
    "depolarizing": qml.DepolarizingChannel,
    "amplitude_damping": qml.AmplitudeDamping,
    "phase_damping": qml.PhaseDamping,
}


@dataclass(frozen=True)
class CircuitSpec:
    """Everything that defines the circuit; hashable, so it keys the compiled caches."""

    qubits: int
    depth: int = 1
    entanglement: str = "full"
    encoding: str = "enhanced_angle"
    noise_model: str = "mixed"
    noise_strength: float = 0.005

    def __post_init__(self) -> None:
        if not isinstance(self.qubits, int) or self.qubits < 1:
            raise ValueError(f"CircuitSpec.qubits must be an int >= 1, got {self.qubits!r}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"CircuitSpec.depth must be an int >= 1, got {self.depth!r}")
        for key, value, allowed in (
            ("entanglement", self.entanglement, ENTANGLEMENTS),
            ("encoding", self.encoding, ENCODINGS),
            ("noise_model", self.noise_model, NOISE_MODELS),
        ):
            if value not in allowed:
                raise ValueError(f"CircuitSpec.{key} must be one of {allowed}, got {value!r}")
        p = float(self.noise_strength)
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise ValueError(f"CircuitSpec.noise_strength must be in [0, 1], got {self.noise_strength!r}")

    @property
    def n_angles(self) -> int:
        """Number of angle columns the circuit reads."""
        return self.qubits if self.encoding == "angle" else 3 * self.qubits

    @property
    def noisy(self) -> bool:
        return self.noise_model != "none" and self.noise_strength > 0

    @property
    def wires(self) -> list[int]:
        return list(range(self.qubits))


def entanglement_pairs(pattern: str, n: int) -> list[tuple[int, int]]:
    """CNOT (control, target) pairs of one entanglement layer, in application order."""
    if pattern == "none" or n < 2:
        return []
    if pattern == "linear":
        return [(i, i + 1) for i in range(n - 1)]
    if pattern == "ring":
        # For n == 2 the closing pair (1, 0) is a different CNOT from (0, 1), so keep it; only a
        # literal duplicate would be dropped (none occurs for n >= 2).
        pairs = [(i, i + 1) for i in range(n - 1)] + [(n - 1, 0)]
        return list(dict.fromkeys(pairs))
    if pattern == "star":
        return [(0, i) for i in range(1, n)]
    if pattern == "full":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    raise ValueError(f"unknown entanglement {pattern!r}; expected one of {ENTANGLEMENTS}")


def encoding_gates(spec: CircuitSpec) -> list[tuple[str, int, int]]:
    """(gate name, wire, angle column) for each encoding rotation, in application order."""
    n = spec.qubits
    if spec.encoding == "angle":
        return [("RY", i, i) for i in range(n)]
    return [(gate, i, k * n + i) for i in range(n) for k, gate in enumerate(("RX", "RY", "RZ"))]


def noise_channels(spec: CircuitSpec) -> list[tuple[str, float]]:
    """(channel name, strength) applied to every wire after each entanglement layer."""
    if not spec.noisy:
        return []
    p = float(spec.noise_strength)
    if spec.noise_model == "mixed":
        return [(name, share * p) for name, share in MIXED_SHARES]
    return [(spec.noise_model, p)]


def encoding_ops(spec: CircuitSpec, angles) -> list[qml.operation.Operator]:
    """The data-dependent part; `angles` is (B, n_angles) (broadcast) or (n_angles,)."""
    return [getattr(qml, gate)(angles[..., col], wires=wire) for gate, wire, col in encoding_gates(spec)]


def body_ops(spec: CircuitSpec) -> list[qml.operation.Operator]:
    """The data-independent part: `depth` x (CNOT layer, noise on every wire)."""
    ops: list[qml.operation.Operator] = []
    pairs = entanglement_pairs(spec.entanglement, spec.qubits)
    channels = noise_channels(spec)
    for _ in range(spec.depth):
        ops.extend(qml.CNOT(wires=[c, t]) for c, t in pairs)
        for wire in spec.wires:
            ops.extend(_CHANNELS[name](p, wires=wire) for name, p in channels)
    return ops


def circuit_ops(spec: CircuitSpec, angles) -> list[qml.operation.Operator]:
    return encoding_ops(spec, angles) + body_ops(spec)


def probs_qfunc(spec: CircuitSpec) -> Callable:
    """Quantum function for a QNode: queues the whole circuit, returns all basis probabilities."""

    def qfunc(angles):
        circuit_ops(spec, angles)  # constructing the ops inside the QNode queues them
        return qml.probs(wires=spec.wires)

    return qfunc


# --- the ops as matrices: what the compiled simulator and the Pauli twirl are built from -------

PAULIS = (
    torch.eye(2, dtype=torch.complex128),
    torch.tensor([[0, 1], [1, 0]], dtype=torch.complex128),
    torch.tensor([[0, -1j], [1j, 0]], dtype=torch.complex128),
    torch.tensor([[1, 0], [0, -1]], dtype=torch.complex128),
)


def kraus_operators(op: qml.operation.Operator) -> list[torch.Tensor]:
    """Kraus operators of `op` on its own wires, complex128; a gate has one, its matrix."""
    if isinstance(op, qml.operation.Channel):
        return [torch.as_tensor(k, dtype=torch.complex128) for k in op.kraus_matrices()]
    return [torch.as_tensor(qml.matrix(op, wire_order=op.wires), dtype=torch.complex128)]


def kraus_superop(kraus: Sequence[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w_k K_k (x) conj(K_k), the map vec(rho) -> vec(sum_k w_k K_k rho K_k^dagger) with
    vec's index (row bits, column bits); w_k = 1 when `weights` is None."""
    if weights is None:  # no multiply by 1: the compiled matrices stay what they always were
        return sum(torch.kron(k, k.conj()) for k in kraus)
    return sum(w * torch.kron(k, k.conj()) for w, k in zip(weights, kraus))
