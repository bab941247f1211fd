"""The trials' representative kinds behind `--plan` (plan/__init__.py): what a trial's cost depends on.

A trial's group is its stage and model kind (and, for an attack, the attack, its preset and its
surrogate's kind); one representative per group is calibrated (an `Item`) and every trial of
the group is extrapolated from it. A model kind is what makes cost differ: model, backbone,
simulator and device, qubits, trajectories, projection, input noise, image shape (channels,
size); a custom model's own settings and code. A hybrid on a device this machine lacks is stood in for by its backbone alone. `_shape`
is the rest of what an estimate reads of a trial, so that trials equal in it share one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from qshield_dist.config import ModelSpec
from qshield_dist.datasets import DATASETS
from qshield_dist.grid import AttackTrial, TrainTrial, Trial
from qshield_dist.vocabulary import BACKBONE_ONLY, STANDARD


def _standin(spec: ModelSpec, usable: dict[str, bool]) -> ModelSpec:
    """A hybrid on a device this machine lacks is estimated from its backbone alone, the closest
    kind that runs here (a lower bound: without the circuit and a stochastic model's draws)."""
    if spec.model == "hqcnn" and spec.simulator == "qnode" and not usable.get(spec.device, True):
        return ModelSpec(model=spec.backbone)
    return spec


def model_kind(spec: ModelSpec, dataset: str) -> tuple[Any, ...]:
    info = DATASETS[dataset]
    kind: tuple[Any, ...] = (spec.model, info.channels, info.size)
    if spec.custom is not None:  # each custom model costs what its own code does
        kind += (spec.custom,)
    if spec.model == "hqcnn":
        kind += (
            spec.backbone,
            spec.simulator,
            spec.device,
            spec.qubits,
            spec.trajectories,
            spec.projection,
            spec.input_noise > 0,
            spec.depth if spec.simulator == "qnode" else None,
        )
    return kind


@dataclass
class Item:
    """One calibration: the representative of every trial of its group."""

    stage: str
    trial: Trial  # the representative, its hybrid's backbone where the hybrid's device is unusable
    trains: dict[str, TrainTrial]
    synthetic: bool
    key: str = ""
    record: dict[str, Any] | None = None
    cached: bool = False

    @property
    def label(self) -> str:
        t = self.trial
        train = t if isinstance(t, TrainTrial) else t.train
        what = f"{train.model.label.split(' ')[0]} on {t.dataset}"
        if isinstance(t, AttackTrial):
            what += f" / {t.attack} ({t.preset})" + (f" [{t.control}]" if t.control else "")
        return f"{t.stage}: {what}"


def _group(t: Trial, usable: dict[str, bool], kinds: dict[Any, tuple[Any, ...]]) -> tuple[Any, ...]:
    """What a trial's cost depends on; `kinds` memoizes the model kind per train trial and control."""
    train = t if isinstance(t, TrainTrial) else t.train
    control = getattr(t, "control", None) == BACKBONE_ONLY
    kind = kinds.get((train.trial_id, control))
    if kind is None:
        spec = _standin(train.model, usable)
        # the hybrid's backbone alone is what a backbone_only control attacks
        spec = ModelSpec(model=spec.backbone) if control and spec.model == "hqcnn" else spec
        kind = kinds[(train.trial_id, control)] = model_kind(spec, t.dataset)
    if isinstance(t, AttackTrial):
        surrogate = model_kind(t.surrogate.model, t.dataset) if t.surrogate else None
        return ("attack", kind, t.attack, t.preset, surrogate)
    if isinstance(t, TrainTrial) and t.train.method != STANDARD:
        # a robust method's step also runs its inner maximisation: calibrated apart
        return (t.stage, kind, t.train.method, t.train.steps)
    return (t.stage, kind)


def cost_key(t: Trial, kinds: dict[Any, tuple[Any, ...]]) -> tuple[Any, ...]:
    """Everything a trial's running time depends on: its group (stage, model kind, attack,
    preset, surrogate kind), dataset and `_shape`; trials equal in it take the same time, up to
    noise (SLURM packing takes one's time from another's, plan/durations.py). `kinds` memoizes."""
    return (_group(t, {}, kinds), t.dataset, _shape(t))


def _with_standins(t: Trial, usable: dict[str, bool]) -> Trial:
    train = t if isinstance(t, TrainTrial) else t.train
    spec = _standin(train.model, usable)
    if spec is train.model:
        return t
    backbone = replace(train, model=spec, baseline_id=None)
    if isinstance(t, TrainTrial):
        return backbone
    if isinstance(t, AttackTrial):
        return replace(t, train=backbone, control=None)
    return replace(t, train=backbone)


def _trains_of(t: Trial, by_id: dict[str, TrainTrial]) -> dict[str, TrainTrial]:
    todo = [t if isinstance(t, TrainTrial) else t.train]
    if isinstance(t, AttackTrial) and t.surrogate:
        todo.append(t.surrogate)
    out: dict[str, TrainTrial] = {}
    while todo:
        train = todo.pop()
        out[train.trial_id] = train
        if train.baseline_id:
            todo.append(by_id[train.baseline_id])
    return out


def _shape(t: Trial) -> tuple[Any, ...]:
    """Everything `estimate` reads of a trial besides its group and dataset."""
    train = t if isinstance(t, TrainTrial) else t.train
    sizes = (train.train_size, train.test_size)
    if isinstance(t, TrainTrial):
        return (*sizes, t.train.epochs, t.train.batch_size, t.train.max_steps)
    if isinstance(t, AttackTrial):
        return (*sizes, t.attack, t.params, t.points, t.eval.batch_size, t.eval.eval_repeats)
    return (*sizes, t.checks, t.eval.pool_size(t.dataset), t.eval.diagnostic_size, t.eval.eval_repeats)
