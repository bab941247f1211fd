"""The QShield circuit, described once as PennyLane operations (its spec is spec.py).

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

from typing import Callable, Sequence

import pennylane as qml
import torch

from qshield_dist.quantum.spec import CircuitSpec, encoding_gates, entanglement_pairs, noise_channels

_CHANNELS: dict[str, Callable[..., qml.operation.Channel]] = {
    "depolarizing": qml.DepolarizingChannel,
    "amplitude_damping": qml.AmplitudeDamping,
    "phase_damping": qml.PhaseDamping,
}


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

# Host constants: circuits are compiled on the host, and the compiled matrices are cast to the
# device a layer runs on (superop.py, layer.py).
PAULIS = (
    torch.eye(2, dtype=torch.complex128, device="cpu"),
    torch.tensor([[0, 1], [1, 0]], dtype=torch.complex128, device="cpu"),
    torch.tensor([[0, -1j], [1j, 0]], dtype=torch.complex128, device="cpu"),
    torch.tensor([[1, 0], [0, -1]], dtype=torch.complex128, device="cpu"),
)


def kraus_operators(op: qml.operation.Operator) -> list[torch.Tensor]:
    """Kraus operators of `op` on its own wires, complex128; a gate has one, its matrix."""
    if isinstance(op, qml.operation.Channel):
        return [torch.as_tensor(k, dtype=torch.complex128, device="cpu") for k in op.kraus_matrices()]
    return [torch.as_tensor(qml.matrix(op, wire_order=op.wires), dtype=torch.complex128, device="cpu")]


def kraus_superop(kraus: Sequence[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w_k K_k (x) conj(K_k), the map vec(rho) -> vec(sum_k w_k K_k rho K_k^dagger) with
    vec's index (row bits, column bits); w_k = 1 when `weights` is None."""
    if weights is None:  # no multiply by 1: the compiled matrices stay what they always were
        return sum(torch.kron(k, k.conj()) for k in kraus)
    return sum(w * torch.kron(k, k.conj()) for w, k in zip(weights, kraus))
