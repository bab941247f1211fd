"""Sweep YAML -> validated SweepConfig. Every error names the key, the value and what is allowed.

A sweep file looks like sweeps/quick.yaml. Any field of a `models` entry, `data.dataset`,
`seeds` and any attack parameter may be a list: lists are grid axes. Quantum fields belong to
`model: hqcnn` entries only, so they multiply only the hybrid models.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qshield_dist import code_snapshot
from qshield_dist.attack_params import ATTACKS, params_text
from qshield_dist.datasets import DATASETS, check_available
from qshield_dist.quantum.spec import CircuitSpec
from qshield_dist.randomness import hybrid_is_stochastic, samples_trajectories
from qshield_dist.vocabulary import (
    ACCELERATORS,
    ATTACK_PRESETS,
    BACKBONES,
    CONTROLS,
    CPU,
    CUDA,
    DEVICES,
    DIAGNOSTICS,
    ENCODINGS,
    ENTANGLEMENTS,
    EXECUTORS,
    FIXED_RANDOMNESS,
    FUSIONS,
    GRADIENT_MASKING_CHECKS,
    INITS,
    MODELS,
    NOISE_MODELS,
    PGD_AT,
    PROJECTIONS,
    QUANTUM_GRADS,
    SIMULATORS,
    STAGES,
    STANDARD,
    TRADES,
    TRAIN_METHODS,
)
from qshield_dist.yaml_loader import DuplicateKeyError, load_yaml


class ConfigError(ValueError):
    """Bad sweep input: raised before any compute; the launcher exits with code 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The keys of a `model: custom` entry, written in the entry itself (ModelSpec gathers them).
CUSTOM_KEYS = ("factory", "kwargs", "weights", "stochastic", "differentiable_twin")


class CustomSpec(_Strict):
    """The user's own model (`model: custom`; models/custom.py states the contract). `factory`
    and `differentiable_twin` are `package.module:function` or `path/to/file.py:function`, both
    in one source tree (code_snapshot.py: paths are relative to the working directory).
    `code` and `weights_sha256` are filled by `validate`: the ids hash them, never a path.
    Validation only reads the files; the launcher copies them (code_snapshot.take_snapshot)."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None  # a state_dict file, loaded instead of training
    stochastic: bool = False  # evaluated by the majority rule and attacked with EOT, as hybrids are
    differentiable_twin: str | None = None  # called with the trained module: its BPDA twin
    code: str | None = None  # the source tree's digest
    weights_sha256: str | None = None

    @field_validator("factory", "differentiable_twin")
    @classmethod
    def _reference(cls, text: str | None) -> str | None:
        if text is not None:
            code_snapshot.parse_ref(text)  # SourceError is a ValueError: pydantic reports it
        return text

    @field_validator("kwargs")
    @classmethod
    def _plain(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                "must be a mapping of plain values (numbers, strings, booleans, lists, mappings)"
            )
        return kwargs

    def __hash__(self) -> int:  # kwargs is a dict: hash its canonical JSON
        return hash(json.dumps(self.model_dump(), sort_keys=True))


class ModelSpec(_Strict):
    """One model of the grid. Quantum fields are None for the classical models; `custom` is set
    for `model: custom` only."""

    model: Literal[MODELS]
    backbone: Literal[BACKBONES] | None = None
    entanglement: Literal[ENTANGLEMENTS] | None = None
    depth: int | None = Field(None, ge=1)
    encoding: Literal[ENCODINGS] | None = None
    noise_model: Literal[NOISE_MODELS] | None = None
    noise_strength: float | None = Field(None, ge=0.0, le=1.0)
    fusion: Literal[FUSIONS] | None = None
    qubits: int | None = Field(None, ge=1)
    quantum_grad: Literal[QUANTUM_GRADS] | None = None
    projection: Literal[PROJECTIONS] | None = None
    device: Literal[DEVICES] | None = None
    simulator: Literal[SIMULATORS] | None = None
    trajectories: int | None = Field(None, ge=0)
    init: Literal[INITS] | None = None
    input_noise: float | None = Field(None, ge=0.0)
    custom: CustomSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _gather_custom_keys(cls, data: Any) -> Any:
        """A custom entry's keys, written flat in the entry, into `custom` (which a sweep file
        may not set itself: `code` and `weights_sha256` are what validate reads)."""
        if isinstance(data, dict) and isinstance(data.get("custom"), dict):
            raise ValueError(f"'custom' is not a key of a model entry; write {', '.join(CUSTOM_KEYS)} in it")
        if isinstance(data, dict) and any(k in data for k in CUSTOM_KEYS):
            if data.get("model") != "custom":
                key = next(k for k in CUSTOM_KEYS if k in data)
                raise ValueError(f"'{key}' applies only to model 'custom' (model is '{data.get('model')}')")
            data = {k: v for k, v in data.items() if k not in CUSTOM_KEYS} | {
                "custom": {k: data[k] for k in CUSTOM_KEYS if k in data}
            }
        return data

    @model_validator(mode="after")
    def _quantum_fields_only_for_hqcnn(self) -> "ModelSpec":
        if self.model != "hqcnn":
            given = [
                f
                for f in type(self).model_fields
                if f not in ("model", "custom") and getattr(self, f) is not None
            ]
            if given:
                raise ValueError(f"'{given[0]}' applies only to model 'hqcnn' (model is '{self.model}')")
        if self.custom is not None and self.model != "custom":
            raise ValueError(f"'factory' applies only to model 'custom' (model is '{self.model}')")
        if self.model == "custom" and self.custom is None:
            raise ValueError(
                "model 'custom' needs 'factory: package.module:function' or 'path/to/file.py:function'"
            )
        return self

    def resolved_defaults(self, n_classes: int) -> dict[str, Any]:
        """What `resolved` fills in where a field is left out: for a hybrid, the project's sound
        settings (see README: paper vs sound); nothing for a classical model."""
        if self.model != "hqcnn":
            return {}
        return dict(
            backbone="cnn",
            entanglement="full",
            depth=1,
            encoding="enhanced_angle",
            noise_model="mixed",
            noise_strength=0.005,
            fusion="dynamic",
            qubits=max(2, (n_classes - 1).bit_length()),  # max(2, ceil(log2 C))
            quantum_grad="full",
            projection="learned",
            device="default.mixed",
            simulator="compiled",
            trajectories=0,
            init="from_baseline",
            input_noise=0.0,
        )

    def resolved(self, n_classes: int) -> "ModelSpec":
        """Every field a hybrid leaves out filled with its default (resolved_defaults)."""
        if self.model != "hqcnn":
            return self
        defaults = self.resolved_defaults(n_classes)
        values = {k: v if v is not None else defaults.get(k) for k, v in self.model_dump().items()}
        return type(self)(**values)

    def stochastic(self, n_classes: int) -> bool:
        """Does the built model draw fresh randomness on every call (a resolved spec)? A custom
        model is if its entry says so."""
        if self.custom is not None:
            return self.custom.stochastic
        return self.model == "hqcnn" and hybrid_is_stochastic(
            self.circuit(),
            n_classes,
            projection=self.projection,
            input_noise=self.input_noise,
            simulator=self.simulator,
            device=self.device,
            trajectories=self.trajectories,
        )

    def circuit(self) -> CircuitSpec:
        """The hybrid's circuit: the one place a CircuitSpec is made from a model spec."""
        if self.model != "hqcnn" or self.qubits is None:
            raise ValueError(f"only a resolved hqcnn spec has a circuit (model '{self.model}')")
        return CircuitSpec(
            self.qubits, self.depth, self.entanglement, self.encoding, self.noise_model, self.noise_strength
        )

    @property
    def has_twin(self) -> bool:
        """Has the built model a differentiable twin, which BPDA attacks through?"""
        if self.custom is not None:
            return self.custom.differentiable_twin is not None
        return self.model == "hqcnn" and self.quantum_grad == "detached"

    @property
    def label(self) -> str:
        if self.custom is not None:
            c = self.custom
            kwargs = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(c.kwargs.items()))
            parts = [f"custom[{c.factory}]" + (f"({kwargs})" if kwargs else "")]
            parts += ["stochastic"] * c.stochastic + [f"twin={c.differentiable_twin}"] * bool(
                c.differentiable_twin
            )
            parts += [f"weights={c.weights_sha256[:8]}"] if c.weights_sha256 else []
            return " ".join(parts)
        if self.model != "hqcnn":
            return self.model
        parts = [
            f"hqcnn[{self.backbone}]",
            self.entanglement,
            f"d{self.depth}",
            self.encoding,
            f"{self.noise_model}{self.noise_strength:g}",
        ]
        parts += [self.fusion, f"grad={self.quantum_grad}", f"proj={self.projection}"]
        if self.simulator != "compiled":
            parts.append(f"{self.simulator}:{self.device}")
        return " ".join(str(p) for p in parts)


class AttackSpec(_Strict):
    name: str
    preset: Literal[ATTACK_PRESETS] = "paper"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack; allowed: {', '.join(ATTACKS)}")
        return name


class DataConfig(_Strict):
    dataset: str | list[str] = "digits"
    data_root: str = "data"
    train_size: int | None = Field(None, ge=10)
    test_size: int | None = Field(None, ge=10)
    download: bool = False


# What each training method reads besides the loop's settings (TrainConfig).
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    STANDARD: (),
    PGD_AT: ("eps", "steps", "step_size"),
    TRADES: ("eps", "steps", "step_size", "beta"),
}


class TrainConfig(_Strict):
    """How a model is trained: the sweep's `train:`, which a model entry's own `train:`
    overrides key by key. The method's parameters are left out of a standard run's id (at
    their defaults), so adding them changed no id of a standard model."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)  # BatchNorm cannot train on one sample
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_steps: int | None = Field(None, ge=1)  # caps optimizer steps (equal-budget controls)
    method: Literal[TRAIN_METHODS] = STANDARD
    # The training examples' L-inf budget, in pixel units; left out: the dataset's paper eps
    # (resolved by the grid, so both spellings are one id).
    eps: float | None = Field(None, gt=0, le=1)
    steps: int = Field(10, ge=1)  # inner maximisation steps
    # Left out: 2.5 * eps / steps (Madry et al. 2018, appendix: PGD's step rule of thumb).
    step_size: float | None = Field(None, gt=0, le=1)
    # TRADES' weight of the robust (KL) term, 1/lambda in Zhang et al. 2019 (their CIFAR-10 value).
    beta: float = Field(6.0, ge=0)

    @model_validator(mode="after")
    def _params_of_its_method(self) -> "TrainConfig":
        allowed = METHOD_PARAMS[self.method]
        for key in sorted({p for params in METHOD_PARAMS.values() for p in params} - set(allowed)):
            # a value other than its default: one a model_dump round trip also carries
            if getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(
                    f"'{key}' applies only to method {' or '.join(m for m, p in METHOD_PARAMS.items() if key in p)}"
                    f" (method is '{self.method}'); allowed with {self.method}: {', '.join(allowed) or 'none'}"
                )
        return self

    def resolved(self, paper_eps: float) -> "TrainConfig":
        """The method's budget filled in: eps (the dataset's `paper_eps`) and step_size."""
        if self.method == STANDARD:
            return self
        eps = self.eps if self.eps is not None else paper_eps
        step_size = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        return self.model_copy(update={"eps": eps, "step_size": step_size})

    @property
    def label(self) -> str:
        """The method and its budget, for a variant's label ('' for standard training)."""
        if self.method == STANDARD:
            return ""
        params = {key: getattr(self, key) for key in METHOD_PARAMS[self.method] if key != "step_size"}
        return f"[{self.method} {params_text(json.dumps(params))}]"

    def for_entry(self, own: dict[str, Any]) -> dict[str, Any]:
        """The values of a model entry's train settings: the sweep's, overridden by the entry's
        own keys; an entry that names another method inherits none of the sweep's method parameters."""
        values = self.model_dump(exclude_unset=True)
        if own.get("method", self.method) != self.method:
            values = {k: v for k, v in values.items() if k not in METHOD_PARAMS[self.method]}
        return {**values, **own}


ALL = "all"
# restart_sensitivity runs K full APGD starts (diagnostics.py): on the first shard of the shared
# attack set, capped at this many points of the permutation. Uncapped, `attack_size: all`
# without shards would run it on the whole pool (10,000 MNIST images: K x the cost of the
# suite's APGD); 256 points (the default attack set) resolve a lottery rate of a few percent.
RESTART_POINTS = 256


class UntilDecided(_Strict):
    """A sequential launch (decide.py), one of two kinds:
    - `max_points` (these trained models): the attack set grows from `attack_size` in looks of
      `ratio` times more points per seed, whole shards each, until every comparison of the
      report is decided or `max_points` per seed are run;
    - `max_seeds` (the training procedure: seeds are the unit): the seeds grow from the sweep's
      in looks of `ratio` times more (new seeds numbered on from the largest), the points per
      seed fixed at `attack_size`, until every comparison is decided or `max_seeds` are run.
    `margin`: the +- band of 'equal'."""

    max_points: int | None = Field(None, ge=1)
    max_seeds: int | None = Field(None, ge=2)
    ratio: float = Field(2.0, gt=1)
    margin: float = Field(0.02, gt=0, lt=1)

    @property
    def over_seeds(self) -> bool:
        return self.max_seeds is not None


class EvalConfig(_Strict):
    """What the attacks are run on, and how.

    - `pool`: the test points the evaluation draws from, apart from any training subset
      (`data.test_size` only sizes the train row's own clean accuracy): `all`, the dataset's
      whole test split, or N, a fixed class-stratified subset of N test images.
    - The shared attack set of a seed is the first `attack_size` points of that seed's fixed
      permutation of the pool: the same points for every model of a dataset and seed, so that
      two models are compared point by point. A point a model gets wrong clean is not robust.
    - Shards: an attack trial covers one shard, a consecutive slice of `shard_size` points of
      that permutation, in permutation order. `attack_size` is a whole number of shards, or
      `all` (every point of the pool; the last shard holds what is left, possibly fewer). A
      shard's id hashes its index and `shard_size`, never `attack_size`: raising `attack_size`
      only adds shards, and the shards already run keep their ids and files. Left out,
      `shard_size` is `attack_size` (one shard: raising `attack_size` then recomputes it).
    - Each seed has its own permutation of the pool (README, Definitions: why not disjoint slices).
    - Each attack shard evaluates its own points clean, never the whole pool (README, Definitions).
    - Diagnostics: the gradient checks take the first `diagnostic_size` clean-correct points of
      the permutation; restart_sensitivity the first shard, at most RESTART_POINTS points.
    """

    attack_size: int | Literal["all"] = 256
    shard_size: int | None = Field(None, ge=1)
    pool: int | Literal["all"] = ALL
    batch_size: int = Field(128, ge=1)
    eval_repeats: int = Field(5, ge=1)  # evaluations per sample for stochastic models
    controls: tuple[Literal[CONTROLS], ...] = ()
    # true: the gradient-masking checks; or a list of check names (restart_sensitivity, which
    # costs K full APGD runs, runs only when listed)
    diagnostics: bool | tuple[Literal[DIAGNOSTICS], ...] = False
    diagnostic_size: int = Field(64, ge=2)  # correctly classified samples the gradient checks use
    until_decided: UntilDecided | None = None  # a sequential launch (decide.py); None: one look

    @field_validator("attack_size", "pool")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise ValueError("must be an integer >= 1 or 'all'")
        return value

    def pool_size(self, dataset: str) -> int:
        """Points in the pool of `dataset` (its test split, or the `pool` subset of it)."""
        full = DATASETS[dataset].test_size
        return full if self.pool == ALL else min(self.pool, full)

    def shard_stride(self, dataset: str) -> int:
        """Points per shard (the last shard of `attack_size: all` may hold fewer)."""
        if self.shard_size is not None:
            return self.shard_size
        return self.pool_size(dataset) if self.attack_size == ALL else self.attack_size

    def shard_count(self, dataset: str) -> int:
        """The shards of the shared attack set of `dataset`."""
        points = self.pool_size(dataset) if self.attack_size == ALL else self.attack_size
        return -(-points // self.shard_stride(dataset))

    def restart_points(self, dataset: str) -> int:
        """The points restart_sensitivity attacks (those of them the model gets right clean):
        the first shard of the shared attack set, at most RESTART_POINTS of it."""
        return min(RESTART_POINTS, self.shard_stride(dataset))

    @property
    def diagnostic_names(self) -> tuple[str, ...]:
        if self.diagnostics is True:
            return GRADIENT_MASKING_CHECKS
        return self.diagnostics or ()


class Resources(_Strict):
    """What one trial of a stage asks of the machine that runs it (`resources.train`,
    `resources.attack`); the launcher hands these values to the executor."""

    cpus: float = Field(1.0, gt=0)
    # Intra-op threads each trial of the stage fixes for itself; left out: the whole cores it
    # reserves (resolved_threads). Part of every trial's id, because float reductions depend on
    # the thread count (`cpus` itself is not hashed: only what the trial runs with).
    threads: int | None = Field(None, ge=1)
    gpus: float = Field(0.0, ge=0)  # fractions allowed on Ray (0.25 -> four trials share one GPU)
    mem_gb: float = Field(4.0, gt=0)
    timeout_min: int = Field(240, ge=1)
    # What the stage's models, batches and attacks run on: auto is cuda when the stage reserves
    # a GPU (gpus > 0), cpu otherwise (resolved_accelerator; the grid puts it in the trial).
    accelerator: Literal[ACCELERATORS] = "auto"

    @field_validator("accelerator")
    @classmethod
    def _cuda_reserves_a_gpu(cls, accelerator: str, info: ValidationInfo) -> str:
        gpus = info.data.get("gpus")
        if accelerator == CUDA and gpus is not None and gpus <= 0:
            raise ValueError(
                f"a CUDA trial must reserve a GPU, and this stage's gpus is {gpus:g}: set gpus > 0 (a"
                f" fraction shares one GPU on Ray) or accelerator: cpu; allowed: {', '.join(ACCELERATORS)}"
            )
        return accelerator

    @field_validator("threads")
    @classmethod
    def _threads_within_cpus(cls, threads: int | None, info: ValidationInfo) -> int | None:
        cpus = info.data.get("cpus")
        if threads is not None and cpus is not None and threads > _whole_cores(cpus):
            cores = _whole_cores(cpus)
            raise ValueError(
                f"a trial runs at most the cores its stage reserves, and this stage's cpus is {cpus:g};"
                f" allowed: {'1' if cores == 1 else f'1 to {cores}'}, or leave threads out to run cpus"
                " threads (raise cpus to run more)"
            )
        return threads

    @property
    def resolved_accelerator(self) -> str:
        """cpu or cuda: `auto` is cuda when the stage reserves a GPU."""
        if self.accelerator == "auto":
            return CUDA if self.gpus > 0 else CPU
        return self.accelerator

    @property
    def resolved_threads(self) -> int:
        """The threads each trial of the stage runs: `threads`, else every whole core it reserves."""
        return self.threads if self.threads is not None else _whole_cores(self.cpus)

    @property
    def reserved_cpus(self) -> float:
        """What a trial of the stage asks the executor for: its cpus, raised to its threads
        where a fraction below one core is asked for (a trial runs at least one thread)."""
        return max(self.cpus, self.resolved_threads)


def _whole_cores(cpus: float) -> int:
    """The whole cores among `cpus` reserved, at least one."""
    return max(1, int(cpus))


class StageResources(_Strict):
    train: Resources = Resources()
    attack: Resources = Resources()

    def of(self, stage: str) -> Resources:
        """A stage's resources: diagnostics run with the attack stage's."""
        return self.train if stage == "train" else self.attack


class RayConfig(_Strict):
    address: str = "auto"
    max_retries: int = Field(3, ge=0)


# What an sbatch option's value may hold: it is written into the job script as `#SBATCH
# --account=VALUE`, so no space, quote, '#', '$' or line break. A constraint may also hold
# SLURM's operators (`intel&gpu`, `[rack1|rack2]`, `knl*2`).
_SBATCH_WORD = re.compile(r"[A-Za-z0-9_.,:+@-]+")
_SBATCH_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,:+@&|*!()\[\]-]+")
_WORD_CHARS = "letters, digits and _ . , : + @ -"


def _sbatch_value(value: str | None, pattern: re.Pattern[str], allowed: str) -> str | None:
    if value is not None and not pattern.fullmatch(value):
        raise ValueError(f"must be a non-empty sbatch value of {allowed} (no spaces, quotes or line breaks)")
    return value


class SlurmStage(_Strict):
    """One stage's own SLURM settings (`slurm.train`, `slurm.attack`, `slurm.diagnostic`);
    what it leaves out is the sweep-wide `slurm.partition` / `slurm.time_min`."""

    partition: str | None = None
    time_min: int | None = Field(None, ge=1)

    @field_validator("partition")
    @classmethod
    def _partition(cls, value: str | None) -> str | None:
        return _sbatch_value(value, _SBATCH_WORD, _WORD_CHARS)


class SlurmConfig(_Strict):
    partition: str | None = None
    # Left out: taken per array from the stage's `resources:` (the largest request in the array).
    time_min: int | None = Field(None, ge=1)
    gpus_per_task: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    array_parallelism: int = Field(64, ge=1)
    folder: str | None = None  # submitit logs; default RESULTS/.submitit
    # Trials of one stage that wait for the same tasks are packed into array tasks of about this
    # many minutes of expected work (each trial's: measured on finished trials of its kind, else
    # --plan's cached calibration, else its resources timeout_min); 0: one trial per task.
    pack_minutes: float = Field(30.0, ge=0)
    # Requeues after a time-out (checkpoint on USR2) before a task's unfinished trials are lost.
    max_num_timeout: int = Field(3, ge=0)
    account: str | None = None  # sbatch --account: the allocation the jobs are charged to
    qos: str | None = None  # sbatch --qos
    constraint: str | None = None  # sbatch --constraint: node features (`a100`, `intel&ib`)
    # Shell lines each job runs before its trials, e.g. ["module load cuda/12.4", "source venv/bin/activate"].
    setup: tuple[str, ...] = ()
    train: SlurmStage = SlurmStage()
    attack: SlurmStage = SlurmStage()
    diagnostic: SlurmStage = SlurmStage()

    @field_validator("partition", "account", "qos")
    @classmethod
    def _word(cls, value: str | None) -> str | None:
        return _sbatch_value(value, _SBATCH_WORD, _WORD_CHARS)

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value: str | None) -> str | None:
        return _sbatch_value(value, _SBATCH_CONSTRAINT, f"{_WORD_CHARS} and & | * ! ( ) [ ]")

    @field_validator("setup", mode="before")
    @classmethod
    def _setup(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list of shell lines, e.g. ['module load cuda']")
        for line in value:
            if not isinstance(line, str) or not line.strip() or "\n" in line or "\r" in line:
                raise ValueError(f"each entry must be one non-empty line of shell; got {line!r}")
        return value

    def stage_settings(self) -> dict[str, dict[str, Any]]:
        """Each stage's own partition and time limit, as the SLURM executor takes them."""
        return {stage: getattr(self, stage).model_dump() for stage in STAGES}


class CompareSpec(_Strict):
    """One line of `compare:`: each variant of the entries named in `models` against each of
    those named in `against` (model entries' `name:`), paired on the shared attack set."""

    models: tuple[str, ...] = Field(min_length=1)
    against: tuple[str, ...] = Field(min_length=1)

    @field_validator("models", "against", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class SweepConfig(_Strict):
    name: str
    results_dir: str | None = None
    checkpoint_dir: str = "checkpoints"
    executor: Literal[EXECUTORS] = "local"
    workers: int = Field(1, ge=1)
    private: bool = True  # results, checkpoints and logs readable only by the user
    data: DataConfig = DataConfig()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    models: list[dict[str, Any]] = Field(min_length=1)
    attacks: list[dict[str, Any]] = Field(default_factory=list)
    # Which variants the verdicts compare; left out: every hybrid against its dataset's CNN.
    compare: tuple[CompareSpec, ...] = ()
    resources: StageResources = StageResources()
    ray: RayConfig = RayConfig()
    slurm: SlurmConfig = SlurmConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError("must be letters, digits, '_', '.' or '-' (it names the results directory)")
        return name

    @property
    def datasets(self) -> list[str]:
        return self.data.dataset if isinstance(self.data.dataset, list) else [self.data.dataset]

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir or f"results/{self.name}")

    @property
    def file_mode(self) -> int:
        """The mode of the files a sweep writes under its results directory (`private`)."""
        return 0o600 if self.private else 0o644


def expand_axes(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """{'a': [1, 2], 'b': 3} -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}] (lists are axes)."""
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _format(err: dict[str, Any], prefix: str, model_cls: type[BaseModel] | None = None) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    where = f"{prefix}.{loc}" if prefix and loc else prefix or loc
    if err["type"] == "extra_forbidden" and model_cls is not None:
        owner: Any = model_cls
        for part in err["loc"][:-1]:
            owner = (
                owner.model_fields[part].annotation if part in getattr(owner, "model_fields", {}) else owner
            )
        allowed = ", ".join(getattr(owner, "model_fields", {}))
        return f"{where}: unknown key (value {err['input']!r}); allowed keys: {allowed}"
    if err["type"] == "missing":  # its input is the whole mapping around the key: not worth printing
        return f"{where}: missing; it is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: got {err['input']!r}: {msg}"


def _validate(model_cls: type[BaseModel], values: dict[str, Any], prefix: str) -> Any:
    try:
        return model_cls(**values)
    except ValidationError as exc:
        raise ConfigError("\n".join(_format(e, prefix, model_cls) for e in exc.errors())) from None


# Keys of a model entry that are not the model's spec: the entry's name (for `compare:`) and
# its own training settings over the sweep's `train:`.
ENTRY_KEYS = ("name", "train")


@dataclass(frozen=True)
class ModelEntry:
    """One point of a model entry's axes: its spec, how it is trained, and the entry's name."""

    index: int  # in `models:`
    model: ModelSpec
    train: TrainConfig
    name: str | None


def parse_models(cfg: SweepConfig) -> list[ModelEntry]:
    """Model entries -> one ModelEntry per point of their axes."""
    entries: list[ModelEntry] = []
    names: dict[str, int] = {}
    for i, entry in enumerate(cfg.models):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"models[{i}]: got {entry!r}: each model entry must be a mapping with a 'model' key"
            )
        name, own = entry.get("name"), entry.get("train", {})
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name)):
            raise ConfigError(f"models[{i}].name: got {name!r}: must be letters, digits, '_', '.' or '-'")
        if name in names:
            raise ConfigError(
                f"models[{i}].name: got '{name}': models[{names[name]}] has that name; each name names one entry"
            )
        if name is not None:
            names[name] = i
        if not isinstance(own, dict):
            raise ConfigError(
                f"models[{i}].train: got {own!r}: must be a mapping of training settings over the sweep's train:"
            )
        train = _validate(TrainConfig, cfg.train.for_entry(own), f"models[{i}].train")
        spec = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        for point in expand_axes(spec):
            entries.append(ModelEntry(i, _validate(ModelSpec, point, f"models[{i}]"), train, name))
    return entries


def _typed_param(value: Any, default: Any, choices: tuple[str, ...] | None) -> tuple[Any, str | None]:
    """An attack parameter's value in its default's type, or None and what is allowed: a bool
    where the default is one, an integer where it is an int (an integral float such as 5e1
    counts as that integer), a finite number (as a float) where it is a float, a string from
    `choices` where there are any."""
    if isinstance(default, bool):
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return None, "must be an integer" + (", not a string" if isinstance(value, str) else "")
    if isinstance(default, float):
        if is_number and math.isfinite(value):
            return float(value), None
        return None, "must be a finite number" + (", not a string" if isinstance(value, str) else "")
    if not isinstance(value, str):
        return None, "must be a string" + (f"; allowed: {', '.join(choices)}" if choices else "")
    if choices and value not in choices:
        return None, f"allowed: {', '.join(choices)}"
    return value, None


def parse_attacks(cfg: SweepConfig) -> list[AttackSpec]:
    """Attack entries -> one AttackSpec per point of their parameter axes. Each parameter is
    typed by the attack's own default for it (attack_params), before any compute."""
    specs: list[AttackSpec] = []
    for i, entry in enumerate(cfg.attacks):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"attacks[{i}]: got {entry!r}: each attack entry must be a mapping with a 'name' key"
            )
        base = _validate(AttackSpec, {**entry, "params": {}}, f"attacks[{i}]")
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"attacks[{i}].params: got {params!r}: must be a mapping of parameter -> value")
        definition = ATTACKS[base.name]
        defaults = definition.defaults(next(iter(DATASETS)))  # the keys and types of every dataset's
        typed: dict[str, Any] = {}
        for key, value in params.items():
            if key not in defaults:
                raise ConfigError(
                    f"attacks[{i}].params.{key}: got {value!r}: unknown parameter for '{base.name}'; allowed: {', '.join(defaults)}"
                )
            values = []
            for raw in value if isinstance(value, list) else [value]:
                v, problem = _typed_param(raw, defaults[key], definition.choices.get(key))
                if problem is None and key == "eps" and not 0 < v <= 1:
                    problem = "must be a number in (0, 1] (pixel units)"
                if problem is None and key in ("steps", "n_queries", "eot_iter") and v < 1:
                    problem = "must be an integer >= 1"
                if problem is not None:
                    raise ConfigError(f"attacks[{i}].params.{key}: got {raw!r}: {problem}")
                values.append(v)
            typed[key] = values if isinstance(value, list) else values[0]
        for point in expand_axes(typed) if typed else [{}]:
            specs.append(AttackSpec(name=base.name, preset=base.preset, params=point))
    return specs


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: its config and the points of its model and attack axes."""

    config: SweepConfig
    models: tuple[ModelSpec, ...]  # as written; the grid resolves them per dataset
    attacks: tuple[AttackSpec, ...]
    # One per model, in its order: how it is trained (the grid resolves it per dataset) and
    # its entry's name. Left out: the sweep's train config, no names.
    trains: tuple[TrainConfig, ...] = ()
    names: tuple[str | None, ...] = ()
    indices: tuple[int, ...] = ()  # each model's entry in `models:` (what errors name)

    def train_of(self, i: int) -> TrainConfig:
        return self.trains[i] if self.trains else self.config.train


def validate(cfg: SweepConfig) -> SweepSpec:
    """Every check of a sweep that needs neither its data nor its devices; ConfigError names
    the key, the value and what is allowed. Cheap: no torch, no PennyLane."""
    for name in cfg.datasets:
        if name not in DATASETS:
            raise ConfigError(f"data.dataset: got '{name}': unknown dataset; allowed: {', '.join(DATASETS)}")
    _check_slurm_cpus(cfg)
    _check_shards(cfg)
    entries = [replace(e, model=_with_code(e.model, e.index)) for e in parse_models(cfg)]
    _check_compare(cfg, {e.name for e in entries if e.name is not None})
    for name in cfg.datasets:
        for e in entries:
            resolved = e.model.resolved(DATASETS[name].classes)
            _check_quantum(resolved, e.index, cfg, e.train)
            _check_fixed_randomness(resolved, e.index, cfg)
    return SweepSpec(
        cfg,
        tuple(e.model for e in entries),
        tuple(parse_attacks(cfg)),
        tuple(e.train for e in entries),
        tuple(e.name for e in entries),
        tuple(e.index for e in entries),
    )


def _check_compare(cfg: SweepConfig, names: set[str]) -> None:
    """Every name `compare:` uses names a model entry."""
    for i, pair in enumerate(cfg.compare):
        for key in ("models", "against"):
            for name in getattr(pair, key):
                if name not in names:
                    raise ConfigError(
                        f"compare[{i}].{key}: got '{name}': no model entry has that name;"
                        f" allowed: {', '.join(sorted(names)) or 'none (give model entries a name:)'}"
                    )


def _with_code(model: ModelSpec, index: int) -> ModelSpec:
    """A custom model with the digest of its source tree and its weights' sha256 (what its ids
    hash); ConfigError naming the entry if they cannot be read. Other models as they are."""
    custom = model.custom
    if custom is None:
        return model
    where = f"models[{index}]"
    try:
        tree, twin = code_snapshot.source_trees(custom.factory, custom.differentiable_twin)
    except code_snapshot.SourceError as exc:
        raise ConfigError(f"{where}.factory: got '{custom.factory}': {exc}") from None
    if twin is not None and (twin.root != tree.root or not twin.top_names <= tree.top_names):
        raise ConfigError(
            f"{where}.differentiable_twin: got '{custom.differentiable_twin}': must be in the factory's own"
            f" package or folder ({tree.root})"
        )
    update: dict[str, Any] = {"code": tree.digest}
    if custom.weights is not None:
        path = Path(custom.weights)
        if not path.is_file():
            raise ConfigError(f"{where}.weights: got '{custom.weights}': no such file")
        update["weights_sha256"] = code_snapshot.file_sha256(path)
    return model.model_copy(update={"custom": custom.model_copy(update=update)})


def _check_shards(cfg: SweepConfig) -> None:
    """The shared attack set in whole shards, within each dataset's pool (see EvalConfig)."""
    ev = cfg.eval
    size, shard = ev.attack_size, ev.shard_size
    if isinstance(size, int) and shard is not None and size % shard:
        below, above = size // shard * shard, (size // shard + 1) * shard
        examples = f"{below} or {above}" if below else str(above)
        raise ConfigError(
            f"eval.attack_size: got {size}: not a whole number of shards of eval.shard_size {shard};"
            f" allowed: a multiple of {shard} (e.g. {examples}), or all (the whole pool)"
        )
    plan = ev.until_decided
    if plan is not None:
        if (plan.max_points is None) == (plan.max_seeds is None):
            raise ConfigError(
                f"eval.until_decided: got max_points {plan.max_points} and max_seeds {plan.max_seeds}; allowed:"
                " exactly one of them (max_points grows the points per seed, max_seeds the seeds)"
            )
        if plan.max_points is not None and (shard is None or size == ALL):
            raise ConfigError(
                f"eval.until_decided: needs eval.shard_size and a number for eval.attack_size (got shard_size"
                f" {shard}, attack_size {size}): the looks add whole shards to the first attack_size points"
            )
        if plan.max_seeds is not None and plan.max_seeds < max(2, len(cfg.seeds)):
            raise ConfigError(
                f"eval.until_decided.max_seeds: got {plan.max_seeds}: fewer than the sweep's {len(cfg.seeds)}"
                f" seed(s) or than 2; allowed: {max(2, len(cfg.seeds))} or more"
            )
        if plan.max_points is not None and plan.max_points < size:
            raise ConfigError(
                f"eval.until_decided.max_points: got {plan.max_points}: fewer than eval.attack_size ({size});"
                f" allowed: {size} or more"
            )
    for name in cfg.datasets:
        full = DATASETS[name].test_size
        if isinstance(ev.pool, int) and ev.pool > full:
            raise ConfigError(
                f"eval.pool: got {ev.pool}: dataset '{name}' has {full} test images; allowed: 1 to {full}, or all"
            )
        pool = ev.pool_size(name)
        if isinstance(size, int) and size > pool:
            raise ConfigError(
                f"eval.attack_size: got {size}: more points than the pool of dataset '{name}' ({pool});"
                f" allowed: up to {pool}, or all"
            )
        if shard is not None and shard > pool:
            raise ConfigError(
                f"eval.shard_size: got {shard}: more points than the pool of dataset '{name}' ({pool});"
                f" allowed: 1 to {pool}"
            )


def _check_slurm_cpus(cfg: SweepConfig) -> None:
    """slurm.cpus_per_task replaces every stage's reservation on SLURM: it may not leave a
    trial fewer cores than the threads it runs (those follow resources, whatever the executor,
    so that an id never depends on where it runs)."""
    given = cfg.slurm.cpus_per_task
    if cfg.executor != "slurm" or given is None:
        return
    for stage in ("train", "attack"):
        threads = cfg.resources.of(stage).resolved_threads
        if given < threads:
            raise ConfigError(
                f"slurm.cpus_per_task: got {given}: below the {threads} threads each {stage} trial runs"
                f" (resources.{stage}.threads, by default its cpus); allowed: an integer >= {threads},"
                " or leave it out (each stage's resources.cpus)"
            )


def check_availability(spec: SweepSpec) -> list[str]:
    """What this machine lacks to run the sweep: data files, PennyLane devices, and with the
    local executor, which runs trials here, CUDA for a stage on it. The launcher stops on them
    before any compute; a plan only warns (a login node may lack all three). Ray and SLURM
    trials run on workers: a worker without CUDA records the failure in the trial's row."""
    cfg = spec.config
    problems = []
    if cfg.executor == "local":
        problems += _cuda_problems(spec)
    for name in cfg.datasets:
        try:
            check_available(name, cfg.data.data_root, cfg.data.download)
        except FileNotFoundError as exc:
            problems.append(f"data.data_root: got '{cfg.data.data_root}': {exc}")
    # Only PennyLane QNodes run on a device; the compiled simulator is its own engine.
    devices = sorted(
        {m.device for m in spec.models if m.model == "hqcnn" and m.simulator == "qnode" and m.device}
    )
    if devices:
        import pennylane as qml

        for name in devices:
            try:
                qml.device(name, wires=1)
            except Exception as exc:  # the plugin raises its own error types
                extra = " (pip install 'qshield-dist[gpu]' on a CUDA node)" if name == "lightning.gpu" else ""
                problems.append(
                    f"models.device: got '{name}': not usable here{extra}: {exc}; allowed: {', '.join(DEVICES)}"
                )
    return problems


def _cuda_problems(spec: SweepSpec) -> list[str]:
    """The stages that would run on CUDA, where this process has none (torch is imported
    only when a stage asks for CUDA)."""
    stages = {"train": spec.config.resources.train}
    if spec.attacks:  # attack and diagnostic trials run with the attack stage's resources
        stages["attack"] = spec.config.resources.attack
    cuda = {stage: res for stage, res in stages.items() if res.resolved_accelerator == CUDA}
    if not cuda:
        return []
    from qshield_dist.trial_env import cuda_missing

    missing = cuda_missing()
    if missing is None:
        return []
    return [
        f"resources.{stage}.accelerator: got '{res.accelerator}'"
        + (f" (with gpus {res.gpus:g}: cuda)" if res.accelerator == "auto" else "")
        + f": the local executor runs trials on this machine, and there is {missing};"
        f" allowed: {', '.join(ACCELERATORS)} (set accelerator: cpu, or run it with executor ray or slurm"
        " on nodes with GPUs)"
        for stage, res in cuda.items()
    ]


def _check_fixed_randomness(spec: ModelSpec, index: int, cfg: SweepConfig) -> None:
    """`eval.controls: [fixed_randomness]` freezes a hybrid's own draws (its random projection
    and input noise, models/hybrid.py: HQCNN.fix_randomness); a model whose randomness it cannot
    freeze is refused here, not left to fail in each of its control trials."""
    if FIXED_RANDOMNESS not in cfg.eval.controls:
        return
    if spec.custom is not None and spec.custom.stochastic:
        raise ConfigError(
            f"models[{index}].stochastic: got true: eval.controls has '{FIXED_RANDOMNESS}', which cannot"
            " freeze a custom model's own randomness (it has no generator the project owns); allowed:"
            f" remove '{FIXED_RANDOMNESS}' from eval.controls, or run this model in a sweep without it"
        )
    if spec.model == "hqcnn" and samples_trajectories(
        spec.circuit(), spec.simulator, spec.device, spec.trajectories
    ):
        raise ConfigError(
            f"models[{index}].trajectories: got {spec.trajectories}: eval.controls has '{FIXED_RANDOMNESS}',"
            " which freezes a hybrid's projection and input noise but not the Monte-Carlo trajectories"
            f" its quantum layer samples (simulator qnode on '{spec.device}'); allowed: trajectories: 0"
            " with an exact simulator (simulator: compiled, or device: default.mixed), or remove"
            f" '{FIXED_RANDOMNESS}' from eval.controls"
        )


def _check_quantum(spec: ModelSpec, index: int, cfg: SweepConfig, train: TrainConfig) -> None:
    if spec.model != "hqcnn":
        return
    from qshield_dist.quantum.memory import check_fits

    noisy = spec.noise_model != "none" and spec.noise_strength > 0
    if spec.simulator == "qnode" and spec.device != "default.mixed" and noisy and spec.trajectories < 1:
        raise ConfigError(
            f"models[{index}].trajectories: got {spec.trajectories}: device '{spec.device}' is a state-vector simulator,"
            f" so noise '{spec.noise_model}' needs Monte-Carlo trajectories >= 1 (or device: default.mixed)"
        )
    if spec.trajectories > 0 and (spec.simulator == "compiled" or spec.device == "default.mixed"):
        raise ConfigError(
            f"models[{index}].trajectories: got {spec.trajectories}: trajectories apply to simulator: qnode on a"
            " state-vector device (default.qubit, lightning.qubit, lightning.gpu); the compiled path and default.mixed are exact"
        )
    try:
        check_fits(
            spec.circuit(),
            spec.simulator,
            spec.device,
            max(train.batch_size, cfg.eval.batch_size),
            trajectories=spec.trajectories,
        )
    except ValueError as exc:
        raise ConfigError(f"models[{index}].qubits: got {spec.qubits}: {exc}") from None


def read_config(
    source: str | Path | Mapping[str, Any], overrides: dict[str, Any] | None = None
) -> SweepConfig:
    """Read a sweep into its config: a YAML file, or the mapping its YAML would parse into (its
    shape checked, no compute, nothing written). A file's name defaults to its stem; a mapping
    must name itself. The public load_config (api.py) also validates every entry (validate)."""
    if isinstance(source, Mapping):
        raw: Any = dict(source)  # a copy: the overrides below leave the caller's mapping as it was
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"sweep file: got '{path}': no such file")
        try:
            raw = load_yaml(path.read_text())
        except DuplicateKeyError as exc:
            raise ConfigError(f"sweep file '{path}': {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"sweep file '{path}': not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"sweep file '{path}': got {type(raw).__name__}: the top level must be a mapping"
            )
        raw.setdefault("name", path.stem)
    if "threads" in raw:  # the sweep-wide key of before: threads now follow each stage's reservation
        raise ConfigError(
            f"threads: got {raw['threads']!r}: not a sweep-wide key; each stage's trials run"
            " resources.<stage>.threads (train, attack; diagnostics take the attack's), by default"
            " resources.<stage>.cpus: set it there, or leave it out"
        )
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _validate(SweepConfig, raw, "")
