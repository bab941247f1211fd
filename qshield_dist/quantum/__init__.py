"""QShield's quantum branch, each file one job, every import pointing down:

- `spec.py`: what defines the circuit, as plain data (no torch, no PennyLane);
- `circuits.py`: the circuit, described once as PennyLane operations (and their Kraus matrices);
- `superop.py`: the fixed body compiled into local superoperators and a Pauli transfer matrix;
- `encoding.py`: the data-dependent encoding as per-qubit Pauli factors;
- `memory.py`: memory estimates and the rule that picks the compiled path (no torch);
- `trajectories.py`: Monte-Carlo trajectories over each channel's Pauli twirl;
- `layer.py`: `QuantumLayer`, the torch module that runs one of them.

Names are imported from their module on first use, so `qshield_dist.quantum.spec` and
`qshield_dist.quantum.memory` load without torch (validating a sweep needs only those).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CircuitSpec": "spec",
    "encoding_gates": "spec",
    "entanglement_pairs": "spec",
    "noise_channels": "spec",
    "body_ops": "circuits",
    "circuit_ops": "circuits",
    "encoding_ops": "circuits",
    "probs_qfunc": "circuits",
    "density_matrix": "encoding",
    "QuantumLayer": "layer",
    "check_fits": "memory",
    "compiled_path": "memory",
    "estimate_bytes": "memory",
    "transfer_matrix": "superop",
    "pauli_twirl": "trajectories",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"qshield_dist.quantum.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
