"""AutoAttack at its authors' strength, composed from torchattacks' classes.

torchattacks' `AutoAttack` keeps its components at their class defaults, 10 iterations each
(and Square with its rescaled schedule); the authors (fra31/auto-attack, `set_version`) run:

- `standard`: APGD-CE 100 iterations, 1 restart; APGD-T 100 iterations over the top 9 target
  classes, 1 restart; FAB-T 100 iterations over 9 targets, 1 restart; Square 5,000 queries,
  p_init 0.8, 1 restart, no schedule rescaling;
- `rand` (randomized defences): APGD-CE and APGD-DLR, 100 iterations, EOT over 20 draws,
  1 restart.

`auto` picks `rand` on a stochastic model and `standard` otherwise. `fast` is not AutoAttack:
the same choice with 10-iteration components and 500 Square queries, for smoke runs; the row
records the version that ran. The sequence is `StochasticMultiAttack`, which records the
component that broke each point (the row's `point_broken_by`); on a stochastic model a sample
stays in play until the majority rule calls it broken, APGD is `StochasticAPGD` and Square
`StochasticSquare`; on a deterministic model EOT is 1 and the components are torchattacks',
with random starts drawn per point (streams.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torchattacks
from torchattacks.attack import Attack

from qshield_dist.attacks import streams
from qshield_dist.attacks.base import describe
from qshield_dist.attacks.stochastic import StochasticAPGD, StochasticMultiAttack, StochasticSquare
from qshield_dist.vocabulary import AUTOATTACK_VERSIONS

VERSIONS = AUTOATTACK_VERSIONS
AUTHORS_STEPS = 100
AUTHORS_TARGETS = 9
AUTHORS_EOT = 20
SQUARE_QUERIES = 5000
FAST_STEPS, FAST_QUERIES = 10, 500

# What a row records of each component (torchattacks' attribute names; thr_decr is rho).
_KEYS = ("eps", "steps", "n_restarts", "loss", "eot_iter", "thr_decr", "n_target_classes", "multi_targeted")
_KEYS += ("n_queries", "p_init", "rescale_schedule", "alpha_max", "eta", "beta", "seed", "repeats")


def resolve_version(version: str, stochastic: bool) -> tuple[str, bool]:
    """(the suite that runs: standard | rand, whether it runs at 10 iterations)."""
    if version not in VERSIONS:
        raise ValueError(f"autoattack version: got '{version}'; allowed: {', '.join(VERSIONS)}")
    if version in ("auto", "fast"):
        return ("rand" if stochastic else "standard"), version == "fast"
    return version, False


def components(
    model: nn.Module,
    eps: float,
    suite: str,
    n_classes: int,
    seed: int,
    *,
    stochastic: bool,
    repeats: int,
    fast: bool = False,
) -> list[Attack]:
    """The component attacks of `suite` ('standard' or 'rand') with the authors' parameters."""
    steps = FAST_STEPS if fast else AUTHORS_STEPS
    apgd = StochasticAPGD if stochastic else streams.APGD
    common = {"norm": "Linf", "eps": eps, "seed": seed}
    if suite == "rand":
        eot = AUTHORS_EOT if stochastic else 1  # EOT only where there is randomness
        return [
            apgd(model, steps=steps, n_restarts=1, loss=loss, eot_iter=eot, rho=0.75, **common)
            for loss in ("ce", "dlr")
        ]
    targets = min(AUTHORS_TARGETS, n_classes - 1)  # fewer classes than 10: every other class
    apgd_ce = apgd(model, steps=steps, n_restarts=1, loss="ce", eot_iter=1, rho=0.75, **common)
    per_class = {"n_restarts": 1, "n_classes": n_classes, **common}
    apgd_t = streams.APGDT(model, steps=steps, eot_iter=1, rho=0.75, **per_class)
    fab_t = streams.FAB(model, steps=steps, multi_targeted=True, **per_class)
    apgd_t.n_target_classes = fab_t.n_target_classes = targets  # torchattacks: n_classes - 1
    queries = FAST_QUERIES if fast else SQUARE_QUERIES
    square = StochasticSquare(
        model,
        n_queries=queries,
        n_restarts=1,
        p_init=0.8,
        loss="margin",
        resc_schedule=False,
        stochastic=stochastic,
        repeats=repeats,
        **common,
    )
    return [apgd_ce, apgd_t, fab_t, square]


def component_name(attack: Attack) -> str:
    """The authors' name of a component: apgd-ce, apgd-dlr, apgd-t, fab-t, square."""
    if isinstance(attack, torchattacks.APGDT):
        return "apgd-t"
    if isinstance(attack, torchattacks.APGD):
        return f"apgd-{attack.loss}"
    if isinstance(attack, torchattacks.FAB):
        return "fab-t" if attack.multi_targeted else "fab"
    return type(attack).__name__.lower().removeprefix("stochastic")


def component_config(attack: Attack) -> dict[str, Any]:
    params = describe(attack, _KEYS)
    if "thr_decr" in params:
        params["rho"] = params.pop("thr_decr")
    return {"name": component_name(attack), "class": type(attack).__name__, **params}


class AutoAttack(Attack):
    """AutoAttack's sequence of `components(...)`; `version` is the one that runs."""

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        version: str,
        n_classes: int,
        seed: int = 0,
        *,
        stochastic: bool = False,
        repeats: int = 1,
    ):
        super().__init__("AutoAttack", model)
        self.suite, fast = resolve_version(version, stochastic)
        self.version = "fast" if fast else self.suite
        self.eps, self.n_classes, self.seed = eps, n_classes, seed
        rule = {"stochastic": stochastic, "repeats": repeats}
        parts = components(model, eps, self.suite, n_classes, seed, fast=fast, **rule)
        self._autoattack = StochasticMultiAttack(parts, **rule)

    @property
    def components(self) -> list[Attack]:
        return list(self._autoattack.attacks)

    def suite_config(self) -> dict[str, Any]:
        """What ran: the version (standard | rand | fast), the suite and each component."""
        parts = [component_config(a) for a in self.components]
        eot = max(p.get("eot_iter", 1) for p in parts)
        return {"version": self.version, "suite": self.suite, "components": parts, "eot": eot}

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, labels = images.clone().detach().to(self.device), labels.clone().detach().to(self.device)
        return self._autoattack(images, labels)

    def sources(self) -> list[str | None]:
        """Per sample of the last call, the component whose image it returned (the first that
        broke the sample, or on a stochastic model the highest-loss one); None: clean."""
        names = [component_name(a) for a in self.components]
        return [names[k] if k >= 0 else None for k in self._autoattack.sources.tolist()]
