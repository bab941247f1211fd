"""What batching the draws of a stochastic model saves: k forward calls vs one HQCNN.draws(x, k).

EOT and majority evaluation take k draws of the paper-mode HQCNN (a fresh random projection
per call, so a draw cannot be k stacked copies of the batch in one call). `HQCNN.draws` runs
the backbone once and applies k random matrices in one batched product; the loop is what
`draws()` falls back to for a model without it. Both are timed on the same batch, without a
gradient (majority evaluation, Square's and One-Pixel's scores) and with one (an EOT gradient:
the mean cross-entropy over the draws, backward to the input).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from qshield_dist.bench.models import _interleaved_medians, mnist_batch
from qshield_dist.config import ModelSpec
from qshield_dist.datasets import DATASETS
from qshield_dist.models import build_model


def paper_hybrid(backbone: str, input_noise: float = 0.0) -> torch.nn.Module:
    info = DATASETS["mnist"]
    torch.manual_seed(0)
    spec = ModelSpec(
        model="hqcnn", backbone=backbone, projection="paper", quantum_grad="detached", input_noise=input_noise
    )
    return build_model(spec.resolved(info.classes), info).eval()


def _task(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, batched: bool, grad: bool
) -> Callable[[], None]:
    def run() -> None:
        inputs = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = model.draws(inputs, k) if batched else torch.stack([model(inputs) for _ in range(k)])
            if grad:
                F.nll_loss(out.flatten(0, 1), y.repeat(k)).backward()

    return run


def compare(
    backbone: str, k: int, grad: bool, input_noise: float = 0.0, batch: int = 128, repeats: int = 7
) -> dict[str, Any]:
    model = paper_hybrid(backbone, input_noise)
    x, y = mnist_batch(batch)
    seconds = _interleaved_medians(
        {"looped": _task(model, x, y, k, False, grad), "batched": _task(model, x, y, k, True, grad)}, repeats
    )
    return {
        "name": f"draws[{backbone}]",
        "k": k,
        "batch": batch,
        "gradient": grad,
        "input_noise": input_noise,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "looped_s": seconds["looped"],
        "batched_s": seconds["batched"],
        "speedup": seconds["looped"] / seconds["batched"],
    }


def run() -> list[dict[str, Any]]:
    rows = [compare(b, k, grad) for b in ("cnn_small", "cnn") for grad in (False, True) for k in (5, 20)]
    # With input noise every copy of the batch goes through the backbone: the saving is the
    # per-call overhead only.
    return rows + [compare("cnn_small", k, False, input_noise=0.01) for k in (5, 20)]


if __name__ == "__main__":
    import json

    for row in run():
        print(json.dumps(row), flush=True)
