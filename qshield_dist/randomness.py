"""Which models draw fresh randomness on every forward call (stochastic models), decided from
their settings alone: the one rule the model code and the grid both use. Free of torch, so the
grid knows it while expanding a sweep (an attack on a stochastic model depends on
`eval.eval_repeats`; on a deterministic one it does not). A custom model (`model: custom`)
says so itself: `stochastic: true` in its entry.
"""

from __future__ import annotations

from qshield_dist.quantum.spec import CircuitSpec
from qshield_dist.vocabulary import MIXED_DEVICES


def samples_trajectories(circuit: CircuitSpec, simulator: str, device: str, trajectories: int) -> bool:
    """Does the quantum layer sample Monte-Carlo trajectories: a noisy circuit run through a
    PennyLane state-vector device (the compiled path and density-matrix devices are exact)?"""
    return simulator == "qnode" and device not in MIXED_DEVICES and circuit.noisy and trajectories > 0


def random_projection(circuit: CircuitSpec, n_classes: int, projection: str) -> bool:
    """Does the paper's projection draw a fresh random matrix on each call? It does with
    `enhanced_angle` when there are fewer features (the class logits) than angles."""
    return projection == "paper" and circuit.encoding == "enhanced_angle" and n_classes < circuit.n_angles


def hybrid_is_stochastic(
    circuit: CircuitSpec,
    n_classes: int,
    *,
    projection: str,
    input_noise: float,
    simulator: str,
    device: str,
    trajectories: int,
) -> bool:
    """Is an HQCNN with these settings stochastic (a classical model never is)?"""
    return (
        random_projection(circuit, n_classes, projection)
        or input_noise > 0
        or samples_trajectories(circuit, simulator, device, trajectories)
    )
