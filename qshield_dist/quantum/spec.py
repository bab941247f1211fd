"""What defines the QShield circuit, as plain data: no torch, no PennyLane, so a sweep can be
validated and its memory estimated where neither is installed. circuits.py turns it into ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qshield_dist.vocabulary import ENCODINGS, ENTANGLEMENTS, NOISE_MODELS

# Shares of the noise strength p in the paper's "mixed" model, in the order they are applied.
MIXED_SHARES: tuple[tuple[str, float], ...] = (
    ("depolarizing", 0.4),
    ("amplitude_damping", 0.3),
    ("phase_damping", 0.3),
)


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
