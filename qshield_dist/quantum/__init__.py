"""QShield's quantum branch, each file one job, every import pointing down:

- `circuits.py`: the circuit, described once as PennyLane operations (and their Kraus matrices);
- `superop.py`: the fixed body compiled into local superoperators and a Pauli transfer matrix;
- `encoding.py`: the data-dependent encoding as per-qubit Pauli factors;
- `memory.py`: memory estimates and the rule that picks the compiled path;
- `trajectories.py`: Monte-Carlo trajectories over each channel's Pauli twirl;
- `layer.py`: `QuantumLayer`, the torch module that runs one of them.
"""

from qshield_dist.quantum.circuits import (
    CircuitSpec,
    body_ops,
    circuit_ops,
    encoding_gates,
    encoding_ops,
    entanglement_pairs,
    noise_channels,
    probs_qfunc,
)
from qshield_dist.quantum.encoding import density_matrix
from qshield_dist.quantum.layer import QuantumLayer
from qshield_dist.quantum.memory import check_fits, compiled_path, estimate_bytes
from qshield_dist.quantum.superop import transfer_matrix
from qshield_dist.quantum.trajectories import pauli_twirl

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
