"""What the quantum branch costs inside a model: training-step and PGD time, HQCNN / backbone.

The HQCNN here is the configuration of the paper (4 qubits, depth 1, full entanglement,
mixed noise 0.005, enhanced_angle, dynamic fusion) on the project's compiled simulator.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from qshield_dist.attacks import ATTACKS, CallCounter, build_attack
from qshield_dist.config import ModelSpec
from qshield_dist.datasets import DATASETS
from qshield_dist.models import build_model


def _interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per function, timed in alternating rounds (order flipped every round) so
    that drift on a shared machine (other jobs, clock changes) hits both sides alike; timing one
    model's block after the other's biased the ratio by up to 15% here."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def mnist_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels of MNIST's shape."""
    info = DATASETS["mnist"]
    return torch.rand(batch, info.channels, info.size, info.size), torch.randint(0, info.classes, (batch,))


def _pair(backbone: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    info = DATASETS["mnist"]
    torch.manual_seed(0)
    base = build_model(ModelSpec(model=backbone), info)
    hybrid = build_model(ModelSpec(model="hqcnn", backbone=backbone).resolved(info.classes), info)
    return base, hybrid


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.nll_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_step_ratio(backbone: str, batch: int = 128, repeats: int = 7) -> dict[str, Any]:
    x, y = mnist_batch(batch)
    base, hybrid = _pair(backbone)
    seconds = _interleaved_medians(
        {"backbone": _train_step(base, x, y), "hqcnn": _train_step(hybrid, x, y)}, repeats
    )
    return {
        "name": f"train_step_ratio[{backbone}]",
        "batch": batch,
        "repeats": repeats,
        "backbone_s": seconds["backbone"],
        "hqcnn_s": seconds["hqcnn"],
        "ratio": seconds["hqcnn"] / seconds["backbone"],
        "target": 1.15 if backbone == "cnn_small" else 1.05,
    }


def pgd_ratio(backbone: str = "cnn_small", batch: int = 128, repeats: int = 5) -> dict[str, Any]:
    """PGD-10 time against the HQCNN / against its backbone, with the calls each made."""
    x, y = mnist_batch(batch)
    params = ATTACKS["pgd"].params("mnist")
    out: dict[str, Any] = {"name": f"pgd10_ratio[{backbone}]", "batch": batch, "repeats": repeats}
    counters = {
        name: CallCounter(model.eval()) for name, model in zip(("backbone", "hqcnn"), _pair(backbone))
    }
    classes = DATASETS["mnist"].classes
    attacks = {name: build_attack("pgd", counter, params, classes) for name, counter in counters.items()}
    seconds = _interleaved_medians({name: (lambda a=a: a(x, y)) for name, a in attacks.items()}, repeats)
    for name, counter in counters.items():
        out[f"{name}_s"] = seconds[name]
        counter.reset()
        attacks[name](x, y)
        out[f"{name}_calls"] = [counter.forward_calls, counter.backward_calls]
    out["ratio"] = out["hqcnn_s"] / out["backbone_s"]
    out["target"] = 1.10
    return out


def head_breakdown(batch: int = 128, repeats: int = 50) -> dict[str, Any]:
    """Forward + backward time of each part the HQCNN adds to its backbone, per batch: what
    is left of a ratio above 1 is split between the circuit and the paper's fusion MLP."""
    _, hybrid = _pair("cnn_small")
    hybrid.eval()
    features = hybrid.backbone(mnist_batch(batch)[0]).detach()
    angles = hybrid.encoder(features).detach()
    logp_c = F.log_softmax(features, dim=1)
    with torch.no_grad():
        logp_q = hybrid.quantum_logprobs(features)

    def backward_through(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
        return lambda: fn(*[t.clone().requires_grad_(True) for t in inputs]).sum().backward()

    seconds = _interleaved_medians(
        {
            "encoder": backward_through(hybrid.encoder, features),
            "quantum": backward_through(hybrid.quantum, angles),
            "fusion": backward_through(hybrid.fusion, logp_c, logp_q),
        },
        repeats,
    )
    return {
        "name": "hqcnn_head_breakdown",
        "batch": batch,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        **{f"{part}_ms": 1e3 * sec for part, sec in seconds.items()},
    }


def run() -> list[dict[str, Any]]:
    return [
        train_step_ratio("cnn_small", repeats=30),
        train_step_ratio("cnn", repeats=10),
        pgd_ratio("cnn_small", repeats=10),
        pgd_ratio("cnn", repeats=5),
        head_breakdown(),
    ]
