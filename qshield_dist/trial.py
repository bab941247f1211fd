"""run_trial: train-or-load, evaluate, attack, measure -> rows -> one Parquet file.

A trial never raises for a failure of its own: the error is recorded as a row with
status='failed' (file `<id>.failed.parquet`), and the sweep goes on. An exception that
escapes (killed process, broken disk) means the trial was lost; executors retry those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qshield_dist import diagnostics
from qshield_dist.attack_params import ATTACKS, budget_reachable
from qshield_dist.attacks import AutoAttack, CallCounter, build_attack
from qshield_dist.attacks.autoattack import sanity_checks
from qshield_dist.attacks.base import strict_majority
from qshield_dist.attacks.streams import PointStreams
from qshield_dist.code_snapshot import snapshot_root, weights_path
from qshield_dist.config import ALL
from qshield_dist.data import Split, fixed_permutation, load, pool_subset, shard_positions
from qshield_dist.datasets import DATASETS
from qshield_dist.grid import (
    AttackTrial,
    DiagnosticTrial,
    TrainTrial,
    Trial,
    canonical_json,
    changed_fields,
    custom_identity,
    variant_id,
)
from qshield_dist.models import build_model
from qshield_dist.models.classic import Classifier
from qshield_dist.models.custom import load_weights
from qshield_dist.peak_memory import max_rss_bytes
from qshield_dist.results.schema import MODEL_COLUMNS, package_versions
from qshield_dist.results.store import ResultStore
from qshield_dist.train import TrainStats, load_checkpoint, predict, save_checkpoint, train_model
from qshield_dist.trial_env import fixed_numerics, gpu_model, seed_everything, torch_device, trial_log
from qshield_dist.vocabulary import BACKBONE_ONLY, FIXED_RANDOMNESS

log = logging.getLogger(__name__)

TRAIN_EVAL_REPEATS = (
    5  # clean accuracy of a stochastic model in the train row (attack rows use eval.eval_repeats)
)
SUCCESS_RULE_SINGLE = "misclassified (deterministic model, 1 evaluation)"
SUCCESS_RULE_MAJORITY = "misclassified in a strict majority of {r} evaluations"


@dataclass(frozen=True)
class RunContext:
    """Where a trial reads and writes; the same for every trial of a sweep."""

    sweep: str
    results_dir: str
    checkpoint_dir: str
    data_root: str = "data"
    download: bool = False
    executor: str = "local"
    private: bool = True

    @property
    def file_mode(self) -> int:
        return 0o600 if self.private else 0o644

    @property
    def store(self) -> ResultStore:
        return ResultStore(self.results_dir, self.checkpoint_dir)

    @property
    def code_dir(self) -> Path:
        """Where the launcher put the custom models' code and weights (code_snapshot.py)."""
        return snapshot_root(self.results_dir)


def _model_columns(trial: TrainTrial) -> dict[str, Any]:
    spec = trial.model
    cols = {k: getattr(spec, k) for k in MODEL_COLUMNS}
    cols.update(
        # its variant key: two custom models of a dataset are two variants
        custom=canonical_json(custom_identity(spec.custom)) if spec.custom is not None else None,
        dataset=trial.dataset,
        variant=f"{spec.label} {trial.train.label}".strip(),
        backbone=spec.backbone or spec.model,
        seed=trial.seed,
        train_method=trial.train.method,
        train_config=canonical_json(changed_fields(trial.train)),
    )
    return cols


def _model_facts(model: nn.Module) -> dict[str, Any]:
    """What the built model says of itself: stochastic outputs, and whether its noise is
    simulated exactly or by Pauli-twirled trajectories."""
    quantum = getattr(model, "quantum", None)
    return {
        "stochastic": bool(getattr(model, "stochastic", False)),
        "noise_approx": getattr(quantum, "noise_approx", None),
    }


def _base_row(trial: Trial, ctx: RunContext) -> dict[str, Any]:
    train = trial if isinstance(trial, TrainTrial) else trial.train
    row = {
        "sweep": ctx.sweep,
        "stage": trial.stage,
        "trial_id": trial.trial_id,
        "train_id": train.trial_id,
        "executor": ctx.executor,
        "host": socket.gethostname(),
        "versions": package_versions(),
        "created_at": dt.datetime.now(dt.timezone.utc),
        "threads": trial.threads,
        "results_version": trial.version,
        "train_version": train.version,
        **_model_columns(train),
    }
    control = getattr(trial, "control", None)
    row["control"] = control  # a control is its own variant in the tables, also when it failed
    row["variant_id"] = variant_id(train, control)
    if control:
        row["variant"] = f"{row['variant']} [{control}]"
    return row


def _load_data(trial: TrainTrial, ctx: RunContext) -> tuple[Split, Split]:
    """The trial's splits, on the host (loaders read files into host memory)."""
    return load(trial.dataset, ctx.data_root, trial.train_size, trial.test_size, ctx.download)


def _to(split: Split, device: torch.device) -> Split:
    """A split moved to the trial's device once, so that no batch crosses the bus again."""
    return Split(split.x.to(device), split.y.to(device))


def predictions(model: nn.Module, x: torch.Tensor, repeats: int, batch_size: int) -> torch.Tensor:
    """(repeats, N) predicted labels; repeats > 1 only makes sense for a stochastic model."""
    return torch.stack([predict(model, x, batch_size) for _ in range(repeats)])


def train_or_load(
    trial: TrainTrial,
    ctx: RunContext,
    device: torch.device,
    train: Split | None = None,
    allow_train: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of `trial` on `device`, from the checkpoint cache when it is valid.
    Only the train stage trains: later stages fail clearly rather than train a model out of
    place. `train`: the training split, already on `device`."""
    seed_everything(trial.seed)
    with torch.device("cpu"):  # initialised on the host (the same draws whatever the device)
        model = build_model(trial.model, DATASETS[trial.dataset], ctx.code_dir)
    model = model.to(device)
    store = ctx.store
    path = store.checkpoint_path(trial.trial_id)
    loaded = load_checkpoint(path, model)
    if loaded is not None:
        return model, {**loaded[0], "checkpoint_sha256": loaded[1]}
    if not allow_train:
        raise FileNotFoundError(
            f"no usable checkpoint {path}: train trial {trial.trial_id} failed or has not run"
        )
    if train is None:
        train = _to(_load_data(trial, ctx)[0], device)
    init_steps = 0
    if trial.baseline_id:
        # The baseline is a Classifier around the same backbone module: loading it fills ours.
        baseline = store.checkpoint_path(trial.baseline_id)
        baseline_loaded = load_checkpoint(baseline, Classifier(model.backbone))
        if baseline_loaded is None:
            raise FileNotFoundError(
                f"baseline checkpoint {baseline} is missing or unusable: its train trial must run (again) first"
            )
        init_steps = int(baseline_loaded[0]["train_steps"])
    custom = trial.model.custom
    if custom is not None and custom.weights_sha256 is not None:  # the user's weights: no training
        load_weights(model, weights_path(ctx.results_dir, custom.weights_sha256))
        stats = TrainStats(0.0, 0, 0)
    else:
        stats = train_model(model, train.x, train.y, trial.train, trial.seed)
    meta = {
        "train_seconds": stats.seconds,
        "train_epochs": stats.epochs,
        "train_steps": stats.steps,
        "init_steps": init_steps,
    }
    Path(ctx.checkpoint_dir).mkdir(parents=True, exist_ok=True, mode=0o700 if ctx.private else 0o755)
    sha256 = save_checkpoint(path, model, meta, ctx.file_mode)
    return model, {**meta, "checkpoint_sha256": sha256}


def _train_columns(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "train_seconds": meta["train_seconds"],
        "train_epochs": meta["train_epochs"],
        "train_steps": meta["train_steps"],
    }


def _clean_eval(
    model: nn.Module, test: Split, repeats: int, batch_size: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each evaluation's correctness per sample, (repeats, N) on the host (it indexes the row's
    per-point columns), and the clean-accuracy columns."""
    preds = predictions(model, test.x, repeats, batch_size)
    correct = (preds == test.y).cpu()
    per_repeat = correct.float().mean(1)
    return correct, {
        "n_test": len(test.y),
        "clean_acc": float(per_repeat.mean()),
        "clean_acc_worst": float(per_repeat.min()),
        "eval_repeats": repeats,
    }


def run_train(trial: TrainTrial, ctx: RunContext, device: torch.device) -> list[dict[str, Any]]:
    train, test = _load_data(trial, ctx)
    model, meta = train_or_load(trial, ctx, device, _to(train, device))
    repeats = TRAIN_EVAL_REPEATS if getattr(model, "stochastic", False) else 1
    seed_everything(trial.seed)  # the same draws whether the model was trained now or loaded
    _, clean = _clean_eval(model, _to(test, device), repeats, 512)
    details = {
        "init_steps": meta.get("init_steps", 0),
        "total_train_steps": meta["train_steps"] + meta.get("init_steps", 0),
    }
    return [
        {
            **_base_row(trial, ctx),
            **clean,
            **_train_columns(meta),
            "status": "ok",
            **_model_facts(model),
            "details": json.dumps(details),
            "checkpoint_sha256": meta["checkpoint_sha256"],
        }
    ]


def _attack_target(
    trial: AttackTrial, ctx: RunContext, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    model, meta = train_or_load(trial.train, ctx, device, allow_train=False)
    if trial.control == BACKBONE_ONLY:
        model = Classifier(model.backbone).eval()  # the hybrid's own trained backbone, branch removed
    elif trial.control == FIXED_RANDOMNESS:
        model.fix_randomness(trial.train.seed)  # one draw, the same on every call
    return model, meta


def _load_pool(trial: AttackTrial | DiagnosticTrial, ctx: RunContext) -> tuple[Split, torch.Tensor]:
    """The evaluation pool (eval.pool) on the host, and its points' test-split indices."""
    pool = trial.eval.pool
    test = load(trial.dataset, ctx.data_root, download=ctx.download)[1]
    return pool_subset(test, None if pool == ALL else pool)


def shard_seed(seed: int, shard: int, attack_seed: int = 0) -> int:
    """The seed of what a shard draws from the global generators (a stochastic model's own
    noise; the attack's `seed`, which torchattacks' APGD, Square and AutoAttack set globally):
    a function of the trial's seed, the attack's seed and the shard's index, never of how many
    shards there are. Per-point random starts do not use it (attacks/streams.py)."""
    digest = hashlib.blake2b(f"{seed},{attack_seed},{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 33  # below 2**31: every generator takes it


def run_attack(trial: AttackTrial, ctx: RunContext, device: torch.device) -> list[dict[str, Any]]:
    definition = ATTACKS[trial.attack]
    params = trial.params_dict
    pool, pool_index = _load_pool(trial, ctx)
    pool = _to(pool, device)
    model, meta = _attack_target(trial, ctx, device)
    stochastic = bool(getattr(model, "stochastic", False))
    points = shard_positions(len(pool.y), trial.train.seed, trial.shard, trial.shard_size)
    counter = CallCounter(model)
    # Clean, on this shard's points only (never the whole pool), seeded by (seed, shard): every
    # attack of the model finds the same clean outcome on a point. Its calls are counted apart.
    repeats = trial.eval.eval_repeats if stochastic else 1
    seed_everything(shard_seed(trial.train.seed, trial.shard))
    clean_correct, clean = _clean_eval(
        counter, Split(pool.x[points], pool.y[points]), repeats, trial.eval.batch_size
    )
    clean_calls = {
        "clean_forward_calls": counter.forward_calls,
        "clean_forward_samples": counter.forward_samples,
    }
    counter.reset()
    correct = strict_majority(clean_correct)
    # A point the model gets wrong clean is not robust and is not attacked (RobustBench).
    x, y = pool.x[points[correct]], pool.y[points[correct]]
    # The global draws of this shard (the model's noise, the attack's own seed): its own.
    seed = shard_seed(trial.train.seed, trial.shard, params.get("seed", 0))
    run_params = {**params, "seed": seed} if "seed" in params else params

    twin = (
        CallCounter(model.differentiable_twin())
        if definition.needs_twin and hasattr(model, "differentiable_twin")
        else None
    )
    if definition.needs_twin and twin is None:
        raise ValueError(
            f"{trial.attack} applies to hqcnn models (it needs a differentiable twin of the quantum branch)"
        )
    surrogate = None
    if trial.surrogate is not None:
        surrogate, _ = train_or_load(trial.surrogate, ctx, device, allow_train=False)
        surrogate = CallCounter(surrogate)
    attack = build_attack(
        trial.attack,
        counter,
        run_params,
        DATASETS[trial.train.dataset].classes,
        stochastic=stochastic,
        eval_repeats=trial.eval.eval_repeats,
        twin=twin,
        surrogate=surrogate,
    )

    checks = sanity_checks(counter.model, x, y) if isinstance(attack, AutoAttack) and len(y) else None
    seed_everything(seed)
    start = time.perf_counter()
    batch = trial.eval.batch_size
    pieces, sources = [], []
    # Every point draws its random starts from its own stream (attacks/streams.py): its outcome
    # does not depend on the batch size or on its batch-mates.
    with PointStreams(trial.train.seed, params.get("seed", 0)):
        for i in range(0, len(y), batch):
            pieces.append(attack(x[i : i + batch], y[i : i + batch]).detach())
            if isinstance(attack, AutoAttack):
                sources += attack.sources()
    adv = torch.cat(pieces) if pieces else x.clone()
    if adv.is_cuda:  # kernels run asynchronously: the attack's time includes its queue
        torch.cuda.synchronize(adv.device)
    seconds = time.perf_counter() - start

    delta = (adv - x).flatten(1)
    linf = float(delta.abs().max()) if len(y) else 0.0
    eps = params.get("eps")
    in_range = bool(((adv >= -1e-6) & (adv <= 1 + 1e-6)).all())
    budget_ok = in_range and (definition.threat_model != "linf" or eps is None or linf <= eps + 1e-5)

    # Per-point outcomes go to the host once: they become the row's lists.
    wrong = (
        (predictions(model, adv, repeats, batch) != y).cpu()
        if len(y)
        else torch.zeros(repeats, 0, dtype=torch.bool, device="cpu")
    )
    success = strict_majority(wrong)  # the project's success rule
    n_points, n_attacked, n_success = len(points), len(y), int(success.sum())
    asr = n_success / n_attacked if n_attacked else float("nan")
    broken = torch.zeros(n_points, dtype=torch.bool, device="cpu")
    broken[correct] = success
    eval_wrong: list[list[bool]] = [[] for _ in range(n_points)]
    broken_by: list[str | None] = [None] * n_points
    for j, (i, w) in enumerate(zip(torch.nonzero(correct).flatten().tolist(), wrong.T.tolist())):
        eval_wrong[i] = w
        if sources and success[j]:
            broken_by[i] = sources[j]
    calls = [c for c in (counter, twin) if c is not None]
    row = {
        **_base_row(trial, ctx),
        **clean,
        **_train_columns(meta),
        "status": "ok",
        **_model_facts(model),
        "attack": trial.attack,
        "attack_preset": trial.preset,
        "attack_params": json.dumps(params, sort_keys=True),
        "attack_config": json.dumps(
            attack.attack_config, sort_keys=True
        ),  # what ran (EOT, version, majority)
        "threat_model": definition.threat_model,
        "eps": eps,
        "success_rule": SUCCESS_RULE_MAJORITY.format(r=repeats) if repeats > 1 else SUCCESS_RULE_SINGLE,
        "n_points": n_points,
        "n_attacked": n_attacked,
        "n_success": n_success,
        "asr": asr,  # the paper's metric: broken among the clean-correct points
        "asr_worst": float(wrong.float().mean(1).max()) if n_attacked else float("nan"),
        # RobustBench's: correct clean and not broken, over the whole shared attack set
        "robust_acc": (n_attacked - n_success) / n_points if n_points else float("nan"),
        "attack_seconds": seconds,
        "forward_calls": sum(c.forward_calls for c in calls),
        "backward_calls": sum(c.backward_calls for c in calls),
        "forward_samples": sum(c.forward_samples for c in calls),
        "backward_samples": sum(c.backward_samples for c in calls),
        "linf_max": linf,
        "l2_mean": float(delta.norm(dim=1).mean()) if n_attacked else 0.0,
        "budget_ok": budget_ok,
        "shard": trial.shard,
        "point_index": pool_index[points].tolist(),
        "point_correct": correct.tolist(),
        "point_broken": broken.tolist(),
        "point_eval_wrong": eval_wrong if repeats > 1 else None,
        "point_clean_eval_wrong": (~clean_correct).T.tolist() if repeats > 1 else None,
        "point_broken_by": broken_by if isinstance(attack, AutoAttack) else None,
        "details": json.dumps(
            {
                "control": trial.control,
                "surrogate_id": trial.surrogate.trial_id if trial.surrogate else None,
                "surrogate_forward_samples": surrogate.forward_samples if surrogate else 0,
                "init_steps": meta.get("init_steps", 0),
                "budget_reachable": budget_reachable(params),
                "autoattack_checks": checks,
                **clean_calls,
            }
        ),
    }
    return [row]


def _clean(model: nn.Module, test: Split, trial: DiagnosticTrial) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-sample (majority-)correctness on the whole pool, seeded by the trial."""
    repeats = trial.eval.eval_repeats if getattr(model, "stochastic", False) else 1
    seed_everything(trial.train.seed)
    correct, clean = _clean_eval(model, test, repeats, trial.eval.batch_size)
    return strict_majority(correct), clean


def run_diagnostic(trial: DiagnosticTrial, ctx: RunContext, device: torch.device) -> list[dict[str, Any]]:
    wanted = trial.checks
    size = trial.eval.diagnostic_size
    test = _to(_load_pool(trial, ctx)[0], device)
    model, meta = train_or_load(trial.train, ctx, device, allow_train=False)
    stochastic = bool(getattr(model, "stochastic", False))
    majority, clean = _clean(model, test, trial)
    repeats = clean["eval_repeats"]
    classes = DATASETS[trial.dataset].classes
    # The first correctly classified points in the shared attack set's order: the attacked points.
    order = fixed_permutation(len(test.y), trial.train.seed)
    idx = order[majority[order]][:size].sort().values
    x, y = test.x[idx], test.y[idx]
    checks = []
    if trial.attack_ids:
        attack_rows = diagnostics.read_attack_rows(ctx.results_dir, trial.dataset, trial.attack_ids)
        checks += diagnostics.compare_attacks(attack_rows)
    if "eps_sweep_reaches_1" in wanted:
        checks.append(diagnostics.eps_sweep(model, x, y, classes, stochastic, repeats))
    if {"gradient_nonzero_and_stable", "gradient_matches_differentiable_twin"} & set(wanted):
        checks += diagnostics.gradient_checks(model, x, y)
    if "batch_independent" in wanted:
        checks.append(diagnostics.batch_dependence(model, test.x[: 2 * size]))
    if "restart_sensitivity" in wanted:
        # the first points of the shared attack set (EvalConfig.restart_points)
        points = shard_positions(len(test.y), trial.train.seed, 0, trial.eval.restart_points(trial.dataset))
        attacked = points[majority[points]]
        checks.append(
            diagnostics.restart_sensitivity(
                model,
                test.x[attacked],
                test.y[attacked],
                classes,
                DATASETS[trial.dataset].paper_eps,
                stochastic,
                repeats,
                trial.train.seed,
                trial.eval.batch_size,
            )
        )
    base = {**_base_row(trial, ctx), **clean, **_train_columns(meta), "status": "ok", **_model_facts(model)}
    return [{**base, **check} for check in checks if check["diagnostic"] in wanted]


def run_trial(trial: Trial, ctx: RunContext, device: torch.device | None = None) -> str:
    """Run one trial and write its result file; returns 'ok' or 'failed'. It runs on `device`,
    by default the one its accelerator names (a process without it records the failure). A
    diagnostic runs only on attack rows that are all ok (the launcher holds it back until
    then); its rows record the attack statuses it found (`inputs`), and resume runs again one
    whose were not."""
    store = ctx.store
    inputs = None
    if isinstance(trial, DiagnosticTrial):
        inputs = store.statuses("attack", trial.dataset, trial.attack_ids)
    determinism = None
    with trial_log(store.log_path(trial), ctx.file_mode):
        log.info(
            "trial %s (%s, %s) on %s: start", trial.trial_id, trial.stage, trial.dataset, socket.gethostname()
        )
        start = time.perf_counter()
        try:
            device = device if device is not None else torch_device(trial.accelerator)
            with fixed_numerics(trial.threads, device) as determinism:
                if isinstance(trial, TrainTrial):
                    rows = run_train(trial, ctx, device)
                elif isinstance(trial, AttackTrial):
                    rows = run_attack(trial, ctx, device)
                elif inputs and set(inputs.values()) != {"ok"}:
                    raise RuntimeError(f"not run: its attack trials are not all ok: {inputs}")
                else:
                    rows = run_diagnostic(trial, ctx, device)
            status = "ok"
        except Exception as exc:  # recorded as a row: the sweep goes on
            log.exception("trial %s failed: %s: %s", trial.trial_id, type(exc).__name__, exc)
            rows = [
                {
                    **_base_row(trial, ctx),
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}",
                }
            ]
            if isinstance(trial, AttackTrial):
                rows[0].update(
                    shard=trial.shard,
                    attack=trial.attack,
                    attack_preset=trial.preset,
                    attack_params=json.dumps(trial.params_dict, sort_keys=True),
                )
            status = "failed"
        seconds = time.perf_counter() - start
        log.info("trial %s: %s in %.1f s", trial.trial_id, status, seconds)
    for row in rows:
        row["trial_seconds"] = seconds
        row["peak_rss_mb"] = max_rss_bytes() / 2**20
        row["determinism"] = determinism
        row["gpu_model"] = gpu_model(device) if device is not None else None
        if inputs is not None:
            row["inputs"] = json.dumps(inputs, sort_keys=True)
    store.write(trial, rows, ctx.file_mode)
    return status


def read_trial(ctx: RunContext, trial: Trial) -> list[dict[str, Any]]:
    return ctx.store.read(trial)
