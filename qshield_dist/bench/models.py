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
from qshield_dist.data import DATASETS
from qshield_dist.models import build_model


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pair(backbone: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    info = DATASETS["mnist"]
    torch.manual_seed(0)
    base = build_model(ModelSpec(model=backbone), info)
    hybrid = build_model(ModelSpec(model="hqcnn", backbone=backbone).resolved(info.classes), info)
    return base, hybrid


def train_step_ratio(backbone: str, batch: int = 128, repeats: int = 7) -> dict[str, Any]:
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    seconds = {}
    for name, model in zip(("backbone", "hqcnn"), _pair(backbone)):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            loss = F.nll_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seconds[name] = _median_seconds(step, repeats)
    return {
        "name": f"train_step_ratio[{backbone}]",
        "batch": batch,
        "backbone_s": seconds["backbone"],
        "hqcnn_s": seconds["hqcnn"],
        "ratio": seconds["hqcnn"] / seconds["backbone"],
        "target": 1.15 if backbone == "cnn_small" else 1.05,
    }


def pgd_ratio(backbone: str = "cnn_small", batch: int = 128, repeats: int = 5) -> dict[str, Any]:
    """PGD-10 time against the HQCNN / against its backbone, with the calls each made."""
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    params = ATTACKS["pgd"].params("mnist")
    out: dict[str, Any] = {"name": f"pgd10_ratio[{backbone}]", "batch": batch}
    for name, model in zip(("backbone", "hqcnn"), _pair(backbone)):
        counter = CallCounter(model.eval())
        attack = build_attack("pgd", counter, params, 10)
        out[f"{name}_s"] = _median_seconds(lambda: attack(x, y), repeats)
        counter.reset()
        attack(x, y)
        out[f"{name}_calls"] = [counter.forward_calls, counter.backward_calls]
    out["ratio"] = out["hqcnn_s"] / out["backbone_s"]
    out["target"] = 1.10
    return out


def run() -> list[dict[str, Any]]:
    return [train_step_ratio("cnn_small", repeats=30), train_step_ratio("cnn", repeats=5), pgd_ratio("cnn_small"), pgd_ratio("cnn", repeats=3)]
