"""Your own model through qshield_dist: a module defined in this script and trained here, put
through the suite with `qshield_dist.evaluate` against the project's CNN, then the same model
through a sweep file, examples/own_model.yaml. Run it from the repository root:

    python examples/own_model.py

The contract (`model: custom`): the module maps images in [0, 1], shaped as the dataset's
(N, 1, 28, 28 for digits), to logits. evaluate rebuilds it in its trials as SmallNet(**kwargs)
from this file and loads its state_dict, so the class is at the top level of this file and the
rest runs under `if __name__ == "__main__":` (a trial imports this file to find the class).
Results: results/own_model/evaluate (evaluate's) and results/own_model/yaml (the sweep file's);
run it again and nothing re-runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import qshield_dist


class SmallNet(nn.Module):
    """A small MLP: images in [0, 1] -> logits (no log-softmax: the project adds its own)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def train(net: nn.Module, steps: int = 300) -> None:
    """Plain training on the digits training split, as the project loads it (28x28, in [0, 1])."""
    from qshield_dist.data import load

    data = load("digits")[0]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(data.y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(data.x[batch]), data.y[batch]).backward()
        opt.step()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    columns = ("label", "baseline", "eps", "category", "diff", "low", "high")
    torch.manual_seed(0)
    net = SmallNet(width=64)
    train(net)

    # 1. The module in memory: FGSM and a 10-step PGD on 64 digits points, one seed, against the
    #    CNN the sweep trains (evaluate's defaults); the verdict is the project's paired one.
    report = qshield_dist.evaluate(net, kwargs={"width": 64}, results_dir="results/own_model/evaluate")
    print(report.verdicts.select(columns))
    print(report.robustness.select("model", "attack_label", "robust_mean"))

    # 2. The same model through a sweep file: its class by its file, its weights saved here.
    Path("results/own_model").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), "results/own_model/smallnet.pt")
    run = qshield_dist.run_sweep(qshield_dist.load_config("examples/own_model.yaml"))
    by_yaml = qshield_dist.summarize(run)
    print(by_yaml.verdicts.select(columns))
    same = by_yaml.verdicts.select(columns[2:]).equals(report.verdicts.select(columns[2:]))
    print(f"the same verdict and interval by both routes: {same}")


if __name__ == "__main__":
    main()
