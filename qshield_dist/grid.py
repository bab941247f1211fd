"""Sweep config -> train trials and attack trials, with stable content-addressed ids.

A trial's id is a hash of what determines its result (never of paths or the sweep's name),
so checkpoints are shared between sweeps and re-running a sweep finds what is done.

- One TrainTrial per (dataset, model spec, train config, seed). An HQCNN with
  `init: from_baseline` depends on its backbone's TrainTrial, added if the sweep lacks it.
- One AttackTrial per (TrainTrial, attack spec, control, shard of the shared attack set).
  `transfer` also depends on the surrogate's TrainTrial. BPDA attacks apply only to hybrids
  with a detached quantum branch. A shard's id hashes its index and size, never how many
  shards the sweep asks for (`eval.attack_size`).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, Iterator, TypeVar

from pydantic import BaseModel

from qshield_dist.attack_params import ATTACKS
from qshield_dist.code_snapshot import parse_ref
from qshield_dist.config import CustomSpec, EvalConfig, ModelSpec, SweepConfig, SweepSpec, TrainConfig
from qshield_dist.datasets import DATASETS
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.vocabulary import (
    CHECKS_ON_ATTACK_ROWS,
    CPU,
    DETERMINISTIC_CONTROLS,
    DIAGNOSTICS,
    EQUAL_BUDGET,
    FIXED_RANDOMNESS,
    RESTART,
    STANDARD,
)

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


# --- ids ---------------------------------------------------------------------------------------
# A trial's id hashes the canonical JSON of what determines its result. Canonical: one spelling
# per value (`1`, `1.0` and `1e0` are one number; a boolean is never a number), and only what
# differs from its default (a config field added later at its default changes no id). The other
# side of that rule: changing a default changes what existing ids mean, so it needs a version
# bump (results.py), like any change to what a stage computes.


_PLAIN = frozenset({str, int, bool, type(None)})  # already canonical
_SCALARS = _PLAIN | {float}


def canonical(obj: Any) -> Any:
    """`obj` with every integral float as an int, tuples as lists (dict keys as given)."""
    # (leaves of a plain type are taken as they are without a call: ids of 10^6 trials)
    if isinstance(obj, dict):
        return {k: v if v.__class__ in _PLAIN else canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [v if v.__class__ in _PLAIN else canonical(v) for v in obj]
    if isinstance(obj, float):
        return int(obj) if obj.is_integer() else obj
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def _same_value(a: Any, b: Any) -> bool:
    """Are `a` and `b` one value for an id (1 and 1.0 are; True and 1 are not)?"""
    if a.__class__ is b.__class__ and a.__class__ in _SCALARS:
        return a == b
    if isinstance(a, (dict, list, tuple)) or isinstance(b, (dict, list, tuple)):
        return canonical_json(a) == canonical_json(b)
    return a == b and isinstance(a, bool) == isinstance(b, bool)


_NO_DEFAULT = object()  # one value for an id with nothing but itself


def _changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that differ from `defaults` (a key without a default stays)."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key, _NO_DEFAULT)
        # _same_value, its usual case inlined: one scalar type on both sides
        if value.__class__ is default.__class__ and value.__class__ in _SCALARS:
            if value != default:
                out[key] = value
        elif not _same_value(value, default):
            out[key] = value
    return out


@functools.cache
def _fields(cls: type[BaseModel]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A config model's field names, and their defaults (required fields have none)."""
    fields = cls.model_fields
    defaults = {n: f.get_default(call_default_factory=True) for n, f in fields.items() if not f.is_required()}
    return tuple(fields), defaults


@functools.cache  # keyed by a class, a model name and a class count: no two differ yet compare equal
def _model_defaults(cls: type[ModelSpec], model: str, n_classes: int) -> dict[str, Any]:
    """A resolved model spec's defaults: its class's, then what `resolved` fills in (a hybrid's)."""
    resolved = cls(model=model).resolved_defaults(n_classes) if model == "hqcnn" else {}
    return {**_fields(cls)[1], **resolved}


def changed_fields(
    model: BaseModel, defaults: dict[str, Any] | None = None, exclude: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A config model's fields that differ from `defaults` (default: its class's field
    defaults), less `exclude`: what an id hashes of it."""
    names, class_defaults = _fields(type(model))
    values = {name: getattr(model, name) for name in names if name not in exclude}
    return _changed(values, class_defaults if defaults is None else defaults)


def model_identity(model: ModelSpec, n_classes: int) -> dict[str, Any]:
    """What an id hashes of a resolved model spec: its name and the fields that differ from
    their resolved defaults; of a custom model, its code's digest and the module names of its
    factory and twin, never their paths (CustomSpec)."""
    identity = changed_fields(model, _model_defaults(type(model), model.model, n_classes))
    if model.custom is not None:
        identity["custom"] = custom_identity(model.custom)
    return identity


def custom_identity(custom: CustomSpec) -> dict[str, Any]:
    """What a custom model's ids hash, and its rows' `custom` column says: the code's digest,
    the factory's module name, and what else was given."""
    twin = custom.differentiable_twin
    return {
        "factory": parse_ref(custom.factory).name,
        "code": custom.code,
        **_given(
            kwargs=custom.kwargs or None,
            stochastic=custom.stochastic or None,
            twin=parse_ref(twin).name if twin else None,
            weights=custom.weights_sha256,
        ),
    }


def _given(**entries: Any) -> dict[str, Any]:
    """The entries that are not None (an identity's optional parts)."""
    return {k: v for k, v in entries.items() if v is not None}


def _on(accelerator: str) -> str | None:
    """What an id hashes of a trial's accelerator: nothing for cpu (the default, so CPU ids
    stay those from before accelerators), the kind otherwise: one id never means both."""
    return None if accelerator == CPU else accelerator


# EvalConfig fields that decide which trials exist, not what one computes.
_EVAL_NOT_RESULTS = frozenset({"controls", "diagnostics", "until_decided"})
# What an attack trial does not read: the diagnostics' sample, and how many shards there are
# (its own shard's index and size are hashed instead).
_EVAL_NOT_ATTACK = _EVAL_NOT_RESULTS | {"diagnostic_size", "attack_size", "shard_size"}
# What a diagnostic trial does not read: how many points the attacks cover (its checks are
# hashed, restart_sensitivity's points when it runs, and the attack trials a check compares).
_EVAL_NOT_DIAGNOSTIC = _EVAL_NOT_RESULTS | {"attack_size", "shard_size"}
# Read only for a stochastic model (evaluations per point).
_EVAL_STOCHASTIC_ONLY = frozenset({"eval_repeats"})


def _eval_identity(eval_cfg: EvalConfig, exclude: frozenset[str], stochastic: bool) -> dict[str, Any]:
    return changed_fields(eval_cfg, exclude=exclude if stochastic else exclude | _EVAL_STOCHASTIC_ONLY)


_PLACEHOLDER = "\x00train id\x00"  # JSON-escaped to a string no trial id can contain
_PLACEHOLDER_JSON = json.dumps(_PLACEHOLDER)
_SHARD_PLACEHOLDER_JSON = json.dumps("\x00shard\x00")
# Attack id templates (the identity's JSON before and after the model's id), keyed by the
# identity of the trial's params and eval objects (shared by every trial of one attack
# configuration in a grid) and the exact repr of its other parts: never by ==, under which
# 1 == 1.0 == True. Each entry holds those objects, so their ids cannot be reused while it lives.
_TEMPLATES: dict[tuple[Any, ...], tuple[tuple[Any, ...], str, str]] = {}
_TEMPLATES_MAX = 4096


@dataclass(frozen=True)
class TrainTrial:
    dataset: str
    model: ModelSpec  # resolved
    train: TrainConfig
    seed: int
    train_size: int | None
    test_size: int | None
    baseline_id: str | None = None  # the backbone's train trial (init: from_baseline)
    threads: int = 1  # intra-op threads the trial fixes for itself (its stage's resolved_threads)
    accelerator: str = CPU  # resolved: cpu | cuda (what its torch code runs on)
    version: int = _current_version("train")  # results version of the code that defines it
    stage: str = field(default="train", init=False)

    def identity(self) -> dict[str, Any]:
        classes = DATASETS[self.dataset].classes
        return {
            "version": self.version,
            "threads": self.threads,
            "dataset": self.dataset,
            "seed": self.seed,
            "model": model_identity(self.model, classes),
            "train": changed_fields(self.train),
            **_given(
                # a custom model's robust training crafts its examples through its twin (BPDA,
                # train_methods.gradient_view), since 2026-12-04: such a trial's id says so
                crafted="twin"
                if self.model.custom
                and self.model.custom.differentiable_twin
                and self.train.method != STANDARD
                else None,
                train_size=self.train_size,
                test_size=self.test_size,
                baseline=self.baseline_id,
                accelerator=_on(self.accelerator),
            ),
        }

    @cached_property
    def trial_id(self) -> str:
        return "T" + stable_hash(self.identity())

    @cached_property
    def deps(self) -> tuple[str, ...]:
        return (self.baseline_id,) if self.baseline_id else ()

    @cached_property
    def stochastic(self) -> bool:
        """Does the trained model draw fresh randomness on every call (randomness.py)?"""
        return self.model.stochastic(DATASETS[self.dataset].classes)


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
    accelerator: str = CPU
    shard: int = 0  # which slice of the seed's permutation of the pool (data.shard_positions)
    shard_size: int = 1  # points per shard (the sweep's eval.shard_stride); the last may hold fewer
    version: int = _current_version("attack")
    stage: str = field(default="attack", init=False)

    @property
    def dataset(self) -> str:
        return self.train.dataset

    @property
    def points(self) -> int:
        """The points of this trial's shard."""
        return max(0, min(self.shard_size, self.eval.pool_size(self.dataset) - self.shard * self.shard_size))

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def target_stochastic(self) -> bool:
        """Is the model under attack stochastic? A backbone_only control attacks the hybrid's
        classical backbone alone, fixed_randomness the hybrid frozen to one draw (trial._attack_target)."""
        return self.train.stochastic and self.control not in DETERMINISTIC_CONTROLS

    def identity(self, train_id: str, shard: Any = None) -> dict[str, Any]:
        """What determines the attack's result, with `train_id` as the model's id (and `shard`
        as its shard index, by default its own)."""
        paper = ATTACKS[self.attack].params(self.dataset, self.preset)
        return {
            "version": self.version,
            "threads": self.threads,
            "train": train_id,
            "attack": self.attack,
            "preset": self.preset,
            "params": _changed(dict(self.params), paper),
            "eval": _eval_identity(self.eval, _EVAL_NOT_ATTACK, self.target_stochastic),
            "shard": self.shard if shard is None else shard,
            "shard_size": self.shard_size,
            **_given(
                control=self.control,
                surrogate=self.surrogate.trial_id if self.surrogate else None,
                accelerator=_on(self.accelerator),
            ),
        }

    @cached_property
    def trial_id(self) -> str:
        # The hash of identity(model's id), with the JSON of everything but the model's id made
        # once per attack configuration, not once per trial (a paper-scale grid has about 10^6
        # attack trials, and `--plan` must expand one in seconds).
        surrogate = self.surrogate.trial_id if self.surrogate else None
        key = (
            id(self.params),
            id(self.eval),
            repr(self.version),
            repr(self.threads),
            repr(self.shard_size),
            self.accelerator,
            self.attack,
            self.preset,
            self.train.dataset,
            self.train.stochastic and self.control not in DETERMINISTIC_CONTROLS,  # target_stochastic
            self.control,
            surrogate,
        )
        entry = _TEMPLATES.get(key)
        if entry is None:
            if len(_TEMPLATES) >= _TEMPLATES_MAX:
                _TEMPLATES.clear()
            text = canonical_json(self.identity(_PLACEHOLDER, "\x00shard\x00"))
            # "shard" sorts before "train": the shard's slot comes first
            head, rest = text.split(_SHARD_PLACEHOLDER_JSON)
            middle, tail = rest.split(_PLACEHOLDER_JSON)
            entry = _TEMPLATES[key] = ((self.params, self.eval), head, middle, tail)
        # A train id is a letter and hex digits: its JSON is itself in quotes; a shard index's
        # is its digits
        blob = f'{entry[1]}{self.shard}{entry[2]}"{self.train.trial_id}"{entry[3]}'
        return "A" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    @cached_property
    def deps(self) -> tuple[str, ...]:
        return tuple(t.trial_id for t in (self.train, self.surrogate) if t is not None)


@dataclass(frozen=True)
class DiagnosticTrial:
    """Gradient-masking checks for one trained model. A model has up to two: the checks that
    compare its attack rows (CHECKS_ON_ATTACK_ROWS), after its attack trials (`attack_ids`), and
    the checks that attack the model themselves, which read no attack row (`attack_ids` empty):
    so a larger attack set (a sequential look) re-runs only the cheap comparisons."""

    train: TrainTrial
    attack_ids: tuple[str, ...]  # the model's attack trials whose rows the checks compare, if any
    eval: EvalConfig
    threads: int = 1
    accelerator: str = CPU
    checks: tuple[str, ...] = ()  # the checks it runs, in DIAGNOSTICS' order
    version: int = _current_version("diagnostic")
    stage: str = field(default="diagnostic", init=False)

    @property
    def dataset(self) -> str:
        return self.train.dataset

    def identity(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "threads": self.threads,
            "train": self.train.trial_id,
            "attacks": sorted(self.attack_ids),
            "checks": list(self.checks),
            "eval": _eval_identity(self.eval, self._not_read, self.train.stochastic),
            **_given(
                # the points it attacks: a slice of the permutation, never attack_size itself
                restart_points=self.eval.restart_points(self.dataset) if RESTART in self.checks else None,
                accelerator=_on(self.accelerator),
            ),
        }

    @property
    def _not_read(self) -> frozenset[str]:
        """The eval fields its checks do not read: comparisons of attack rows alone take no sample."""
        on_rows_only = set(self.checks) <= set(CHECKS_ON_ATTACK_ROWS)
        return _EVAL_NOT_DIAGNOSTIC | {"diagnostic_size"} if on_rows_only else _EVAL_NOT_DIAGNOSTIC

    @cached_property
    def trial_id(self) -> str:
        return "D" + stable_hash(self.identity())

    @cached_property
    def deps(self) -> tuple[str, ...]:
        return (self.train.trial_id, *self.attack_ids)


Trial = TrainTrial | AttackTrial | DiagnosticTrial


def variant_id(train: TrainTrial, control: str | None) -> str:
    """What makes two trained models different, apart from the seed: the train trial's identity
    without its seed (and the baseline's id, which carries the seed), plus the control."""
    identity = {
        k: v
        for k, v in train.identity().items()
        if k not in ("seed", "baseline", "threads", "accelerator", "version")
    }
    return stable_hash({**identity, "control": control})


def named_comparisons(spec: SweepSpec) -> list[tuple[str, str, str]]:
    """The sweep's `compare:` as (dataset, variant id of A, variant id of B): every variant of
    each entry it names (each point of its axes) against every variant of each entry it is
    compared with, per dataset; empty without `compare:`. The variants are those the grid
    trains (resolved_models, train_trial)."""
    cfg = spec.config
    out: list[tuple[str, str, str]] = []
    for dataset in cfg.datasets:
        by_name: dict[str, list[str]] = {}
        for (model, train_cfg), name in zip(resolved_models(spec, dataset), spec.names):
            if name is not None:
                trial = train_trial(cfg, dataset, model, train_cfg, seed=0)  # the variant leaves out the seed
                by_name.setdefault(name, []).append(variant_id(trial, None))
        for pair in cfg.compare:
            for a in (v for n in pair.models for v in by_name[n]):
                out += [(dataset, a, b) for n in pair.against for b in by_name[n] if b != a]
    return out


def resolved_models(spec: SweepSpec, dataset: str) -> list[tuple[ModelSpec, TrainConfig]]:
    """Each model of the sweep, in its order, resolved for `dataset`, with its resolved training."""
    info = DATASETS[dataset]
    return [
        (raw.resolved(info.classes), spec.train_of(i).resolved(info.paper_eps))
        for i, raw in enumerate(spec.models)
    ]


def train_trial(
    cfg: SweepConfig,
    dataset: str,
    model: ModelSpec,
    train_cfg: TrainConfig,
    seed: int,
    baseline_id: str | None = None,
) -> TrainTrial:
    """The train trial of a resolved model: the sweep's data sizes, and its train stage's
    threads and accelerator (auto resolved from what the stage reserves)."""
    res = cfg.resources.train
    return TrainTrial(
        dataset,
        model,
        train_cfg,
        seed,
        cfg.data.train_size,
        cfg.data.test_size,
        baseline_id,
        threads=res.resolved_threads,
        accelerator=res.resolved_accelerator,
    )


@dataclass
class Grid:
    train: list[TrainTrial]
    attack: list[AttackTrial]
    diagnostic: list[DiagnosticTrial] = field(default_factory=list)
    # The sweep's compare: as (dataset, variant id of A, of B) (named_comparisons); empty without one.
    comparisons: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def trials(self) -> list[Trial]:
        return [*self.train, *self.attack, *self.diagnostic]


def build_grid(spec: SweepSpec) -> Grid:
    """Expand a validated sweep into trials (config.validate has done every check)."""
    with many_objects():
        grid = _expand(spec)
    grid.comparisons = named_comparisons(spec)
    return grid


def _expand(spec: SweepSpec) -> Grid:
    cfg = spec.config
    train: dict[str, TrainTrial] = {}
    attack: dict[str, AttackTrial] = {}
    own_attacks: dict[str, list[str]] = {}  # train id -> its uncontrolled attack trials (diagnostics)
    # Every train trial shares the sweep's sizes and threads: a backbone or surrogate trained
    # alone is determined by (dataset, seed, architecture, train config), and an equal-budget
    # control also by whether the hybrid was pre-trained. Made once each, not once per hybrid.
    alone: dict[tuple[Any, ...], TrainTrial] = {}
    # auto resolves here, from what each stage reserves, and so do threads (its whole cores)
    on_attack = cfg.resources.attack.resolved_accelerator
    attack_threads = cfg.resources.attack.resolved_threads
    on_diagnostic = cfg.resources.of("diagnostic").resolved_accelerator
    diagnostic_threads = cfg.resources.of("diagnostic").resolved_threads

    def add(trial: TrainTrial) -> TrainTrial:
        return train.setdefault(trial.trial_id, trial)

    def trained_alone(dataset: str, seed: int, name: str, train_cfg: TrainConfig) -> TrainTrial:
        """A classical model trained alone: a hybrid's baseline (with the hybrid's training
        method) or a transfer surrogate (with the sweep's)."""
        key = (dataset, seed, name, canonical_json(changed_fields(train_cfg)))
        if key not in alone:
            alone[key] = add(train_trial(cfg, dataset, ModelSpec(model=name), train_cfg, seed))
        return alone[key]

    def equal_budget(hybrid: TrainTrial) -> tuple[TrainTrial, str | None]:
        """The hybrid's equal-budget backbone and its control label. A hybrid trained from
        scratch got no more steps than its backbone alone: that backbone is its own equal-budget
        control, attacked once, as itself (control None)."""
        if hybrid.baseline_id is None:
            return trained_alone(hybrid.dataset, hybrid.seed, hybrid.model.backbone, hybrid.train), None
        key = (
            hybrid.dataset,
            hybrid.seed,
            hybrid.model.backbone,
            canonical_json(changed_fields(hybrid.train)),
            True,
        )
        if key not in alone:
            alone[key] = add(_equal_budget_baseline(hybrid))
        return alone[key], EQUAL_BUDGET

    for dataset in cfg.datasets:
        info = DATASETS[dataset]
        attacks = []
        for a in spec.attacks:
            params = ATTACKS[a.name].params(dataset, a.preset, a.params)
            attacks.append((a, ATTACKS[a.name].needs_twin, params, tuple(sorted(params.items()))))
        models = resolved_models(spec, dataset)
        sweep_train = cfg.train.resolved(info.paper_eps)
        shards, shard_size = cfg.eval.shard_count(dataset), cfg.eval.shard_stride(dataset)
        for seed in cfg.seeds:
            for model, train_cfg in models:
                baseline_id = None
                if model.model == "hqcnn" and model.init == "from_baseline":
                    baseline_id = trained_alone(dataset, seed, model.backbone, train_cfg).trial_id
                trial = add(train_trial(cfg, dataset, model, train_cfg, seed, baseline_id))
                controls = cfg.eval.controls if model.model == "hqcnn" else []
                for spec_a, needs_twin, params, resolved in attacks:
                    if needs_twin and not model.has_twin:
                        # BPDA replaces a detached quantum branch's gradient by its twin's (or a
                        # custom model's by its own twin's); a classical model, a full-gradient
                        # hybrid or a custom model without a twin has nothing to replace
                        continue
                    surrogate = (
                        trained_alone(dataset, seed, params["surrogate"], sweep_train)
                        if spec_a.name == "transfer"
                        else None
                    )
                    for control in [None, *(controls if not needs_twin else [])]:
                        if control == FIXED_RANDOMNESS and not trial.stochastic:
                            continue  # nothing to freeze
                        target = trial
                        if control == EQUAL_BUDGET:
                            target, control = equal_budget(trial)
                        for shard in range(shards):
                            a = AttackTrial(
                                target,
                                spec_a.name,
                                spec_a.preset,
                                resolved,
                                cfg.eval,
                                control,
                                surrogate,
                                attack_threads,
                                on_attack,
                                shard,
                                shard_size,
                            )
                            if a.trial_id not in attack:
                                attack[a.trial_id] = a
                                if control is None:
                                    own_attacks.setdefault(target.trial_id, []).append(a.trial_id)
    diagnostic = []
    names = cfg.eval.diagnostic_names
    on_model = tuple(c for c in DIAGNOSTICS if c in names and c not in CHECKS_ON_ATTACK_ROWS)
    on_rows = tuple(c for c in DIAGNOSTICS if c in names and c in CHECKS_ON_ATTACK_ROWS)
    for train_id, attack_ids in own_attacks.items():
        for checks, inputs in ((on_model, ()), (on_rows, tuple(attack_ids))):
            if checks:  # the model's own checks wait for no attack: they read none of their rows
                diagnostic.append(
                    DiagnosticTrial(
                        train[train_id], inputs, cfg.eval, diagnostic_threads, on_diagnostic, checks
                    )
                )
    return Grid(list(train.values()), list(attack.values()), diagnostic)


def equal_budget_train(train: TrainConfig) -> TrainConfig:
    """The train settings of a from-baseline hybrid's equal-budget backbone: as many optimizer
    steps as the hybrid got in total, the baseline's pre-training plus the hybrid's own run (same
    data, same batch, same method), so twice the epochs (and step cap)."""
    max_steps = train.max_steps * 2 if train.max_steps else None
    return train.model_copy(update={"epochs": train.epochs * 2, "max_steps": max_steps})


def equal_budget_train_config(train_config: str | None) -> str | None:
    """A from-baseline hybrid's `train_config` column (canonical JSON of its changed train fields,
    as trial rows carry it) -> the one its equal-budget backbone's rows carry: what the summary
    pairs them by. None (rows written before the column existed) stays None."""
    if train_config is None:
        return None
    train = TrainConfig.model_validate(json.loads(train_config))
    return canonical_json(changed_fields(equal_budget_train(train)))


def _equal_budget_baseline(hybrid: TrainTrial) -> TrainTrial:
    """The backbone architecture of a hybrid started from its baseline, trained alone for as many
    optimizer steps as the hybrid got in total (equal_budget_train)."""
    train = equal_budget_train(hybrid.train)
    return replace(hybrid, model=ModelSpec(model=hybrid.model.backbone), train=train, baseline_id=None)
