"""QShield's quantum branch: the circuit (circuits.py) and the torch layer that runs it (layer.py)."""

from qshield_dist.quantum.circuits import (
    CircuitSpec,
    body_ops,
    circuit_ops,
    encoding_gates,
    encoding_ops,
    entanglement_pairs,
    noise_channels,
    pauli_twirl,
    probs_qfunc,
)
from qshield_dist.quantum.layer import (
    QuantumLayer,
    check_fits,
    compiled_path,
    density_matrix,
    estimate_bytes,
    transfer_matrix,
)

__all__ = [
    "CircuitSpec",
    "QuantumLayer",
    "body_ops",
    "check_fits",
    "circuit_ops",
    "compiled_path",
    "density_matrix",
    "encoding_gates",
    "encoding_ops",
    "entanglement_pairs",
    "estimate_bytes",
    "noise_channels",
    "pauli_twirl",
    "probs_qfunc",
    "transfer_matrix",
]
