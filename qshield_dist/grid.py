"""Sweep config -> train trials and attack trials, with stable content-addressed ids.

A trial's id is a hash of what determines its result (never of paths or the sweep's name),
so checkpoints are shared between sweeps and re-running a sweep finds what is done.

- One TrainTrial per (dataset, model spec, train config, seed). An HQCNN with
  `init: from_baseline` depends on its backbone's TrainTrial, added if the sweep lacks it.
- One AttackTrial per (TrainTrial, attack spec, control). `transfer` also depends on the
  surrogate's TrainTrial. BPDA attacks apply only to hybrids with a detached quantum branch.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, Iterator, TypeVar

from qshield_dist.attack_params import ATTACKS
from qshield_dist.config import EvalConfig, ModelSpec, SweepSpec, TrainConfig
from qshield_dist.datasets import DATASETS
from qshield_dist.results.current import STAGE_VERSIONS

V = TypeVar("V")


class cached_property(Generic[V]):  # named as the functools one it replaces
    """functools.cached_property without its lock, as it is from Python 3.12: before that the
    lock costs microseconds on each first access, and a paper-scale grid has 10^6 trials."""

    def __init__(self, fn: Callable[[Any], V]):
        self.fn, self.name = fn, fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@contextmanager
def many_objects() -> Iterator[None]:
    """Cyclic garbage collection paused while 10^6 trials (acyclic, long-lived) are made or
    walked: each collection would scan every object made so far, half the expansion's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _current_version(stage: str) -> Any:
    # Read when a trial is made, and carried with it to the process that runs it.
    return field(default_factory=lambda: STAGE_VERSIONS[stage])


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


_PLACEHOLDER = "\x00train id\x00"  # JSON-escaped to a string no trial id can contain
_PLACEHOLDER_JSON = json.dumps(_PLACEHOLDER)


def _attack_identity(key: tuple[Any, ...], train_id: str) -> dict[str, Any]:
    version, threads, attack, preset, params, eval_cfg, control, surrogate = key
    return {
        "version": version,
        "threads": threads,
        "train": train_id,
        "attack": attack,
        "preset": preset,
        "params": dict(params),
        "eval": eval_cfg.model_dump(exclude={"controls", "diagnostics"}),
        "control": control,
        "surrogate": surrogate,
    }


@functools.lru_cache(maxsize=4096)
def _attack_template(key: tuple[Any, ...]) -> tuple[str, str]:
    """The identity's JSON before and after the model's id."""
    before, after = canonical_json(_attack_identity(key, _PLACEHOLDER)).split(_PLACEHOLDER_JSON)
    return before, after


@dataclass(frozen=True)
class TrainTrial:
    dataset: str
    model: ModelSpec  # resolved
    train: TrainConfig
    seed: int
    train_size: int | None
    test_size: int | None
    baseline_id: str | None = None  # the backbone's train trial (init: from_baseline)
    threads: int = 1  # intra-op threads the trial fixes for itself
    version: int = _current_version("train")  # results version of the code that defines it
    stage: str = field(default="train", init=False)

    def identity(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "threads": self.threads,
            "dataset": self.dataset,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "model": self.model.model_dump(),
            "train": self.train.model_dump(),
            "seed": self.seed,
            "baseline": self.baseline_id,
        }

    @cached_property
    def trial_id(self) -> str:
        return "T" + stable_hash(self.identity())

    @cached_property
    def deps(self) -> tuple[str, ...]:
        return (self.baseline_id,) if self.baseline_id else ()


@dataclass(frozen=True)
class AttackTrial:
    train: TrainTrial
    attack: str
    preset: str
    params: tuple[tuple[str, Any], ...]  # resolved, sorted
    eval: EvalConfig
    control: str | None = None  # None | backbone_only | equal_budget
    surrogate: TrainTrial | None = None  # transfer
    threads: int = 1
    version: int = _current_version("attack")
    stage: str = field(default="attack", init=False)

    @property
    def dataset(self) -> str:
        return self.train.dataset

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @cached_property
    def trial_id(self) -> str:
        # The hash of _attack_identity(key, model's id), with the JSON of everything but the
        # model's id made once per attack configuration, not once per trial (a paper-scale grid
        # has about 10^6 attack trials, and `--plan` must expand one in seconds).
        surrogate = self.surrogate.trial_id if self.surrogate else None
        key = (
            self.version,
            self.threads,
            self.attack,
            self.preset,
            self.params,
            self.eval,
            self.control,
            surrogate,
        )
        try:
            before, after = _attack_template(key)
            # A train id is a letter and hex digits: its JSON is itself in quotes
            blob = f'{before}"{self.train.trial_id}"{after}'
        except TypeError:  # a parameter value that cannot be a cache key (a list): no shortcut
            blob = canonical_json(_attack_identity(key, self.train.trial_id))
        return "A" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    @cached_property
    def deps(self) -> tuple[str, ...]:
        return tuple(t.trial_id for t in (self.train, self.surrogate) if t is not None)


@dataclass(frozen=True)
class DiagnosticTrial:
    """Gradient-masking checks for one trained model, after its attack trials."""

    train: TrainTrial
    attack_ids: tuple[str, ...]  # the model's attack trials whose rows the checks compare
    eval: EvalConfig
    threads: int = 1
    version: int = _current_version("diagnostic")
    stage: str = field(default="diagnostic", init=False)

    @property
    def dataset(self) -> str:
        return self.train.dataset

    @cached_property
    def trial_id(self) -> str:
        return "D" + stable_hash(
            {
                "version": self.version,
                "threads": self.threads,
                "train": self.train.trial_id,
                "attacks": sorted(self.attack_ids),
                "eval": self.eval.model_dump(exclude={"controls"}),
            }
        )

    @cached_property
    def deps(self) -> tuple[str, ...]:
        return (self.train.trial_id, *self.attack_ids)


Trial = TrainTrial | AttackTrial | DiagnosticTrial


@dataclass
class Grid:
    train: list[TrainTrial]
    attack: list[AttackTrial]
    diagnostic: list[DiagnosticTrial] = field(default_factory=list)

    @property
    def trials(self) -> list[Trial]:
        return [*self.train, *self.attack, *self.diagnostic]


def build_grid(spec: SweepSpec) -> Grid:
    """Expand a validated sweep into trials (config.validate has done every check)."""
    with many_objects():
        return _expand(spec)


def _expand(spec: SweepSpec) -> Grid:
    cfg = spec.config
    train: dict[str, TrainTrial] = {}
    attack: dict[str, AttackTrial] = {}
    own_attacks: dict[str, list[str]] = {}  # train id -> its uncontrolled attack trials (diagnostics)
    # Every train trial shares the sweep's train config, sizes and threads: a backbone or
    # surrogate trained alone is determined by (dataset, seed, architecture), and an equal-budget
    # control also by whether the hybrid was pre-trained. Made once each, not once per hybrid.
    alone: dict[tuple[Any, ...], TrainTrial] = {}

    def add(trial: TrainTrial) -> TrainTrial:
        return train.setdefault(trial.trial_id, trial)

    def train_trial(dataset: str, model: ModelSpec, seed: int, baseline_id: str | None = None) -> TrainTrial:
        sizes = (cfg.data.train_size, cfg.data.test_size)
        return TrainTrial(dataset, model, cfg.train, seed, *sizes, baseline_id, threads=cfg.threads)

    def trained_alone(dataset: str, seed: int, name: str) -> TrainTrial:
        key = (dataset, seed, name)
        if key not in alone:
            alone[key] = add(train_trial(dataset, ModelSpec(model=name), seed))
        return alone[key]

    def equal_budget(hybrid: TrainTrial) -> TrainTrial:
        key = (hybrid.dataset, hybrid.seed, hybrid.model.backbone, hybrid.baseline_id is not None)
        if key not in alone:
            alone[key] = add(_equal_budget_baseline(hybrid))
        return alone[key]

    for dataset in cfg.datasets:
        info = DATASETS[dataset]
        attacks = []
        for a in spec.attacks:
            params = ATTACKS[a.name].params(dataset, a.preset, a.params)
            attacks.append((a, ATTACKS[a.name].needs_twin, params, tuple(sorted(params.items()))))
        for seed in cfg.seeds:
            for raw in spec.models:
                model = raw.resolved(info.classes)
                baseline_id = None
                if model.model == "hqcnn" and model.init == "from_baseline":
                    baseline_id = trained_alone(dataset, seed, model.backbone).trial_id
                trial = add(train_trial(dataset, model, seed, baseline_id))
                controls = cfg.eval.controls if model.model == "hqcnn" else []
                for spec_a, needs_twin, params, resolved in attacks:
                    if needs_twin and not (model.model == "hqcnn" and model.quantum_grad == "detached"):
                        # BPDA replaces a detached quantum branch's gradient by its twin's; a
                        # classical model or a full-gradient hybrid has nothing to replace
                        continue
                    surrogate = (
                        trained_alone(dataset, seed, params["surrogate"])
                        if spec_a.name == "transfer"
                        else None
                    )
                    for control in [None, *(controls if not needs_twin else [])]:
                        target = equal_budget(trial) if control == "equal_budget" else trial
                        a = AttackTrial(
                            target,
                            spec_a.name,
                            spec_a.preset,
                            resolved,
                            cfg.eval,
                            control,
                            surrogate,
                            cfg.threads,
                        )
                        if a.trial_id not in attack:
                            attack[a.trial_id] = a
                            if control is None:
                                own_attacks.setdefault(target.trial_id, []).append(a.trial_id)
    diagnostic = []
    if cfg.eval.diagnostics:
        for train_id, attack_ids in own_attacks.items():
            diagnostic.append(DiagnosticTrial(train[train_id], tuple(attack_ids), cfg.eval, cfg.threads))
    return Grid(list(train.values()), list(attack.values()), diagnostic)


def _equal_budget_baseline(hybrid: TrainTrial) -> TrainTrial:
    """The hybrid's backbone architecture trained alone for as many optimizer steps as the
    hybrid got in total: its baseline pre-training plus its own run (same data, same batch)."""
    epochs = hybrid.train.epochs * (2 if hybrid.baseline_id else 1)
    max_steps = (
        hybrid.train.max_steps * 2
        if hybrid.train.max_steps and hybrid.baseline_id
        else hybrid.train.max_steps
    )
    train = hybrid.train.model_copy(update={"epochs": epochs, "max_steps": max_steps})
    return replace(hybrid, model=ModelSpec(model=hybrid.model.backbone), train=train, baseline_id=None)
