"""Monte-Carlo trajectories: noise on a state-vector device as sampled Paulis.

Each channel is replaced by its Pauli twirl (exact in expectation for Pauli-mixture channels,
an approximation for amplitude damping). The plan walks the circuit body once; the layer then
draws one Pauli per merged run of channels per trajectory and queues the plan in its QNode.
"""

from __future__ import annotations

import math

import pennylane as qml
import torch

from qshield_dist.quantum.circuits import PAULIS, body_ops, kraus_operators, kraus_superop
from qshield_dist.quantum.spec import CircuitSpec

# One plan entry: ("op", index into body_ops) or ("pauli", wire, index into the flush probs).
PlanEntry = tuple


def pauli_twirl(channel: qml.operation.Channel) -> torch.Tensor:
    """Probabilities (I, X, Y, Z) of a one-qubit channel's Pauli twirl: sum_k |Tr(P K_k)|^2 / 4."""
    if len(channel.wires) != 1:
        raise ValueError(f"Pauli twirl implemented for one-qubit channels, got {channel}")
    kraus = kraus_operators(channel)
    probs = torch.stack([sum(torch.abs(torch.trace(p.conj().T @ k)) ** 2 for k in kraus) / 4 for p in PAULIS])
    return probs / probs.sum()


def is_pauli_mixture(channel: qml.operation.Channel, atol: float = 1e-12) -> bool:
    """True when the channel equals its own Pauli twirl (so trajectories sampling it are exact)."""
    twirled = kraus_superop(PAULIS, weights=pauli_twirl(channel))
    return bool(torch.allclose(kraus_superop(kraus_operators(channel)), twirled, atol=atol))


def twirl_is_exact(spec: CircuitSpec) -> bool:
    """Whether sampling the twirls reproduces every channel of the body exactly."""
    ops = body_ops(spec)
    return all(is_pauli_mixture(op) for op in ops if isinstance(op, qml.operation.Channel))


def _xor_convolve(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Distribution of the product of two independent Paulis, indices I,X,Y,Z = bits (x,z)."""
    bits = [(0, 0), (1, 0), (1, 1), (0, 1)]
    index = {b: i for i, b in enumerate(bits)}
    out = torch.zeros(4, dtype=p.dtype, device=p.device)
    for i, (x1, z1) in enumerate(bits):
        for j, (x2, z2) in enumerate(bits):
            out[index[(x1 ^ x2, z1 ^ z2)]] += p[i] * q[j]
    return out


def trajectory_plan(spec: CircuitSpec) -> tuple[list[PlanEntry], list[torch.Tensor]]:
    """Walk the body: keep unitaries, merge each run of channels on a wire (until a unitary
    touches it) into one sampled Pauli whose distribution is the XOR-convolution of the
    channels' twirls (independent Pauli errors compose by multiplying, phase ignored).

    Returns the plan and, per "pauli" entry, its (I, X, Y, Z) probabilities.
    """
    plan: list[PlanEntry] = []
    pending: dict[int, torch.Tensor] = {}
    flush_probs: list[torch.Tensor] = []

    def flush(wires) -> None:
        for w in wires:
            if w in pending:
                plan.append(("pauli", w, len(flush_probs)))
                flush_probs.append(pending.pop(w))

    with qml.QueuingManager.stop_recording():
        ops = body_ops(spec)
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
    return plan, flush_probs


def sample_paulis(
    flush_probs: list[torch.Tensor],
    count: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `count` trajectories' Paulis: (x bits, z bits), each (count, n_pauli_entries)."""
    probs = torch.stack(flush_probs)  # (F, 4) over I, X, Y, Z
    draws = torch.multinomial(probs, count, replacement=True, generator=generator).T  # (count, F)
    # I=(0,0) X=(1,0) Y=(1,1) Z=(0,1) as (x, z) bits
    xbits = ((draws == 1) | (draws == 2)).to(dtype).to(device)
    zbits = ((draws == 2) | (draws == 3)).to(dtype).to(device)
    return xbits, zbits


def queue_plan(plan: list[PlanEntry], spec: CircuitSpec, xbits: torch.Tensor, zbits: torch.Tensor) -> None:
    """Inside a QNode: queue the body with each sampled Pauli X^x Z^z (up to phase) as broadcast
    rotations, one trajectory per row of the bits."""
    with qml.QueuingManager.stop_recording():
        ops = body_ops(spec)
    for entry in plan:
        if entry[0] == "op":
            qml.apply(ops[entry[1]])
        else:
            _, wire, j = entry
            qml.RX(math.pi * xbits[:, j], wires=wire)
            qml.RZ(math.pi * zbits[:, j], wires=wire)
