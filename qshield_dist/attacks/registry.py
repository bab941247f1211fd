"""build_attack: the registry's names -> torchattacks attacks (or ours where torchattacks lacks one).

Every attack is built as `build_attack(name, model, params, n_classes, ...)` and called as
`attack(images, labels) -> adversarial images`, torchattacks' uniform shape. `params` is the
trial's (its identity) and is not changed; what actually runs differs from it in two ways, both
recorded in `attack.attack_config` (the attack row's `attack_config` column):

- EOT only where there is randomness: on a deterministic model `eot_iter` is 1 whatever the
  sweep says (every draw would be the same forward pass);
- on a stochastic model a success decision takes `eval_repeats` draws (the majority rule) in the
  attacks that make one themselves (Square, DeepFool, One-Pixel, AutoAttack's sequence).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torchattacks
from torchattacks.attack import Attack

from qshield_dist.attack_params import ATTACKS
from qshield_dist.attacks import streams
from qshield_dist.attacks.adaptive import BPDA
from qshield_dist.attacks.autoattack import AutoAttack
from qshield_dist.attacks.cw import CWBinarySearch
from qshield_dist.attacks.stochastic import (
    StochasticAPGD,
    StochasticDeepFool,
    StochasticOnePixel,
    StochasticSquare,
)

# Attacks that score or judge a point on `repeats` draws of a stochastic model.
_MAJORITY = ("square", "deepfool", "onepixel")


def _build(name: str, model: nn.Module, p: dict[str, Any], n_classes: int, stochastic: bool, repeats: int):
    rule = {"stochastic": stochastic, "repeats": repeats}
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=p["eps"])
    if name in ("pgd", "bpda_pgd"):
        return streams.PGD(model, **p)
    if name == "apgd":
        apgd = StochasticAPGD if stochastic and p["best_loss"] else streams.APGD
        return apgd(model, norm="Linf", **{k: v for k, v in p.items() if k != "best_loss"})
    if name == "bpda_apgd":
        return (StochasticAPGD if stochastic else streams.APGD)(model, norm="Linf", **p)
    if name == "vmifgsm":
        return streams.VMIFGSM(model, **p)
    if name == "cw":
        return CWBinarySearch(model, **p)
    if name == "deepfool":
        return StochasticDeepFool(model, **p, **rule)
    if name == "onepixel":
        return StochasticOnePixel(model, **p, **rule)
    if name == "square":
        return StochasticSquare(model, norm="Linf", **p, **rule)
    if name in ("autoattack", "bpda_autoattack"):
        # AutoAttack's own protocol for randomized defences is its 'rand' version
        # (APGD-CE and APGD-DLR with EOT over 20 draws); 'auto' picks it on a stochastic model.
        return AutoAttack(model, p["eps"], p["version"], n_classes, p["seed"], **rule)
    if name == "eot_pgd":
        return streams.EOTPGD(model, **p)
    raise KeyError(f"attack: got '{name}'; allowed: {', '.join(ATTACKS)}")


def build_attack(
    name: str,
    model: nn.Module,
    params: dict[str, Any],
    n_classes: int,
    *,
    stochastic: bool = False,
    eval_repeats: int = 1,
    twin: nn.Module | None = None,
    surrogate: nn.Module | None = None,
) -> Attack:
    """An attack for `model` (already wrapped in a CallCounter by the caller); `twin` for the
    attacks that need one (BPDA), `surrogate` for transfer. `attack.attack_config` says what runs."""
    if name not in ATTACKS:
        raise KeyError(f"attack: got '{name}'; allowed: {', '.join(ATTACKS)}")
    p = dict(params)
    if name == "transfer":
        if surrogate is None:
            raise ValueError("transfer needs a surrogate model")
        p.pop("surrogate")
        base = p.pop("base")
        # Crafted on the surrogate; the caller evaluates the examples on the target.
        attack = build_attack(base, surrogate, p, n_classes)
        crafted = attack.attack_config
        attack.attack_config = {"attack": "transfer", "surrogate": params["surrogate"], "crafted": crafted}
        return attack
    if ATTACKS[name].needs_twin:
        if twin is None:
            raise ValueError(f"{name} needs the model's differentiable twin")
        model = BPDA(model, twin)
    if "eot_iter" in p and not stochastic:
        p["eot_iter"] = 1  # EOT only where there is randomness
    repeats = eval_repeats if stochastic else 1
    attack = _build(name, model, p, n_classes, stochastic, repeats)
    # majority_repeats: the draws this attack's own success decisions take (None: it makes none)
    judges = name in _MAJORITY or isinstance(attack, AutoAttack)
    config: dict[str, Any] = {
        "attack": name,
        "class": type(attack).__name__,
        "majority_repeats": repeats if judges else None,
    }
    if isinstance(attack, AutoAttack):
        config.update(attack.suite_config())
    else:
        draws_per_score = repeats if name in _MAJORITY else 1
        config.update(params=p, eot=p.get("eot_iter", draws_per_score))
    if ATTACKS[name].needs_twin:
        config["gradient"] = "bpda"
    attack.attack_config = config
    return attack
