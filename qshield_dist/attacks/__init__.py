"""Attack registry over torchattacks, with the paper's parameters as the `paper` preset.

Every attack is built as `build_attack(name, model, params, n_classes)` and called as
`attack(images, labels) -> adversarial images`, torchattacks' uniform shape. We write only
what torchattacks lacks, one module per family:

- `registry`: `build_attack`, the registry's names -> attacks, and what each run records;
- `base`: `CallCounter` (counts every forward and backward call the attack asks of the
  model), batched draws of a stochastic model, the majority rule;
- `stochastic`: Square, DeepFool, One-Pixel, APGD and AutoAttack's sequence made complete for a
  stochastic model (success by a strict majority of draws, scores averaged over draws);
- `autoattack`: AutoAttack at its authors' strength, composed from torchattacks' classes;
- `adaptive`: BPDA (forward through the real model, backward through its differentiable twin);
  transfer is built in the registry (examples crafted on a surrogate model);
- `cw`: C&W with a per-sample binary search over c (the paper used ART's).
"""

from __future__ import annotations

from qshield_dist.attack_params import ATTACKS
from qshield_dist.attacks.adaptive import BPDA
from qshield_dist.attacks.autoattack import AutoAttack
from qshield_dist.attacks.base import CallCounter, draws
from qshield_dist.attacks.cw import CWBinarySearch
from qshield_dist.attacks.registry import build_attack
from qshield_dist.attacks.stochastic import (
    StochasticAPGD,
    StochasticDeepFool,
    StochasticMultiAttack,
    StochasticOnePixel,
    StochasticSquare,
)

__all__ = [
    "ATTACKS",
    "AutoAttack",
    "BPDA",
    "CWBinarySearch",
    "CallCounter",
    "StochasticAPGD",
    "StochasticDeepFool",
    "StochasticMultiAttack",
    "StochasticOnePixel",
    "StochasticSquare",
    "build_attack",
    "draws",
]
