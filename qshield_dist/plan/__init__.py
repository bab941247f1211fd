"""What a sweep will cost, before it runs: python -m qshield_dist.launch SWEEP.yaml --plan [--json]

calibrate -> extrapolate -> schedule -> table. Nothing is written under the sweep's results or
checkpoint directories and no executor is started.

- Calibrate: one representative trial per distinct (model kind, attack, preset) runs through the
  real `run_trial` on a scaled-down copy (plan/calibration.py), at two sizes where the first is
  quick, so that time = the rest of the trial (loading data and checkpoint, writing) + the
  scaled work's intercept + per-unit cost x units + per-point cost of the clean evaluations
  (units: optimizer steps, attacked points, diagnostic points), with each run's peak RSS; an
  attack with capped iterations once more at twice the caps, counting its model samples. A
  model kind (plan/kinds.py) is what makes cost differ: model, backbone, simulator and device,
  qubits, trajectories, projection, input noise, image shape (channels, size); entanglement,
  noise, fusion, encoding and (compiled) depth variants share one calibration.
- Extrapolate each trial from its kind: steps from its train config and split size, attacked
  points from its shard (every point assumed clean-correct: an upper bound); an attack's work,
  per point and per batch (each query or step's call overhead), by its model samples
  extrapolated from the counts to its real iterations, DeepFool at EARLY_STOP_FRACTION of its
  budget, every other attack at its whole budget; the clean evaluations (eval_repeats draws of
  a stochastic model) at the cost per point measured on a batch of the trial's size.
- Schedule the grid at the configured parallelism, each trial after its dependencies.

Times are an idle machine's: a single-threaded run counts its CPU time, so that other processes'
load does not inflate the calibration; the table adds how much slower than that this machine
ran while calibrating, and the wall time at that load.

Absent data files: calibration on synthetic tensors of the dataset's shape (a warning; the data
loading time is then missing). An unusable device (lightning.gpu on a login node): its hybrids
are estimated from their backbone alone, the closest kind that runs here (a warning: a lower bound).
Calibrations are cached in $QSHIELD_PLAN_CACHE, else ~/.cache/qshield/plan: one JSON file per
representative named by a hash of its scaled trial's identity, the calibration sizes, the
machine (hostname, CPU model) and the package versions; a second --plan does not calibrate.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qshield_dist.config import SweepConfig
from qshield_dist.datasets import DATASETS, check_available
from qshield_dist.fileio import atomic_write_bytes
from qshield_dist.grid import AttackTrial, DiagnosticTrial, Grid, TrainTrial, Trial, many_objects, stable_hash
from qshield_dist.plan import calibration as cal
from qshield_dist.plan.decision import decision_price, render_price
from qshield_dist.plan.kinds import Item, _group, _shape, _trains_of, _with_standins, model_kind
from qshield_dist.plan.schedule import Estimate, capacity, render, schedule
from qshield_dist.results.schema import package_versions

log = logging.getLogger("qshield_dist.plan")

CHUNK = 5  # calibrations per worker task
# Bump when what a calibration measures changes: older cache files are then ignored.
# 2: a single-threaded run's time is its CPU time; 3: every kind under TARGET_S runs twice;
# 4: the scaled work timed in CPU where it runs; an attack's per-batch work scaled with its
# iterations, which are extrapolated from counted model samples; clean evaluations timed on a batch
# of the trial's size
PLAN_VERSION = 4
# The share of its budget an attack that stops a point at its first success used, where that
# share is not the robustness the sweep measures. DeepFool, a minimum-norm method, stops on any
# model once a point crosses (a majority of draws of a stochastic one): 0.33 (cnn_small) and
# 0.10 (HQCNN) of its steps on quick.yaml's digits models. Square is taken at its whole budget:
# a point it cannot break (a robust one) spends every query, so its share is at least 1 - ASR,
# which the plan cannot know; it used 0.35 of its queries on digits (quick.yaml's models), 0.76
# to 0.81 on MNIST (cnn_small, the three seeds of sweeps/plan_check_mnist.yaml), and a
# stochastic model never stops it (1.0).
# One-Pixel and every other attack run their whole budget.
EARLY_STOP_FRACTION = {"deepfool": 0.25}


def cache_dir() -> Path:
    env = os.environ.get("QSHIELD_PLAN_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(env) if env else base / "qshield" / "plan"


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": socket.gethostname(), "cpu": cpu, "cpus": str(len(os.sched_getaffinity(0)))}


@dataclass
class Plan:
    cfg: SweepConfig
    warnings: list[str] = field(default_factory=list)
    items: dict[Any, Item] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)


def _cache_key(item: Item) -> str:
    t, trains = item.trial, item.trains
    first = cal.FIRST_UNITS[item.stage]
    if isinstance(t, TrainTrial):
        scaled: Trial = cal.scaled_train(t, first, trains)
    elif isinstance(t, AttackTrial):
        scaled = cal.scaled_attack(t, first, trains)
    else:
        scaled = cal.scaled_diagnostic(t, first, trains)
    policy = (
        "FIRST_UNITS",
        "MAX_UNITS",
        "TARGET_S",
        "TRAIN_TEST_POINTS",
        "EVAL_POINTS",
        "ITERATION_CAPS",
        "SHRINK_EPS",
        "REAL_PARAMS",
        "EARLY_STOP",
    )
    sizes = {k: getattr(cal, k) for k in policy}
    return stable_hash(
        {
            "plan": PLAN_VERSION,
            "trial": scaled.trial_id,
            "synthetic": item.synthetic,
            "sizes": sizes,
            "machine": machine(),
            "versions": package_versions(),
        }
    )


def collect_items(plan: Plan, grid: Grid, usable: dict[str, bool], real: dict[str, bool]) -> dict[str, Any]:
    """One pass over the grid: each trial's group, and the group's representative (the first
    trial of it, preferring one that is not a control)."""
    by_id = {t.trial_id: t for t in grid.train}
    group_of: dict[str, Any] = {}
    kinds: dict[Any, tuple[Any, ...]] = {}
    for t in grid.trials:
        g = group_of[t.trial_id] = _group(t, usable, kinds)
        held = plan.items.get(g)
        if held is None or (getattr(held.trial, "control", None) and not getattr(t, "control", None)):
            rep = _with_standins(t, usable)
            plan.items[g] = Item(t.stage, rep, _trains_of(rep, by_id), not real[t.dataset])
    for item in plan.items.values():
        item.key = _cache_key(item)
    return group_of


def _load_cache(item: Item, root: Path) -> bool:
    try:
        item.record = json.loads((root / f"{item.key}.json").read_text())["record"]
        item.cached = True
    except (OSError, ValueError, KeyError):
        return False
    return True


def _store(root: Path, name: str, doc: dict[str, Any]) -> None:
    atomic_write_bytes(root / f"{name}.json", json.dumps(doc, sort_keys=True, default=str).encode())


def _workers(cfg: SweepConfig, n_groups: int) -> int:
    """Calibrations run as many at once as the sweep's trials will on one machine (local: its
    workers; a cluster node: its CPUs, up to 4), so that they measure the same contention."""
    env = os.environ.get("QSHIELD_PLAN_WORKERS")
    at_once = cfg.workers if cfg.executor == "local" else len(os.sched_getaffinity(0))
    return int(env) if env else max(1, min(n_groups, at_once, 4))


def calibrate(plan: Plan, todo: list[Item], workers: int | None = None) -> float | None:
    """Run the calibrations not in the cache, one task per model kind; returns the process
    start-up time the workers measured (None when they ran in this process)."""
    groups: dict[Any, list[Item]] = {}
    for item in todo:
        t = item.trial
        spec = (t if isinstance(t, TrainTrial) else t.train).model
        groups.setdefault(model_kind(spec, t.dataset), []).append(item)
    # Chunks of a few items, so that the workers stay busy until the end; each chunk makes its
    # own (cheap) checkpoints.
    ordered = sorted(groups.items(), key=lambda kv: "cnn" not in kv[0])  # ResNet-18 kinds first: the longest
    tasks = [
        [{"key": i.key, "trial": i.trial, "trains": i.trains} for i in g[k : k + CHUNK]]
        for _, g in ordered
        for k in range(0, len(g), CHUNK)
    ]
    by_key = {i.key: i for i in todo}
    real = {name: not any(i.synthetic for i in todo if i.trial.dataset == name) for name in DATASETS}
    workers = _workers(plan.cfg, len(tasks)) if workers is None else workers
    startup: float | None = None
    if workers == 0:
        results = [cal.calibrate_group(task, plan.cfg.data.data_root, real) for task in tasks]
    else:
        with cf.ProcessPoolExecutor(workers, mp.get_context("spawn"), initializer=cal.warm_up) as pool:
            root = plan.cfg.data.data_root
            done = list(pool.map(cal.calibrate_in_worker, tasks, [root] * len(tasks), [real] * len(tasks)))
        startup = max(s for s, _ in done)
        results = [records for _, records in done]
    for record in (r for records in results for r in records):
        item = by_key[record["key"]]
        item.record = record
        if "error" not in record:
            _store(cache_dir(), item.key, {"item": item.label, "record": record})
    return startup


def _work(attack: str, params: dict[str, Any], stochastic: bool) -> float:
    """Iterations an attack runs per point, up to a constant (what calibration scales)."""
    if attack in cal.REAL_PARAMS:
        return 1.0
    work = 1.0
    for key in (*cal.ITERATION_CAPS, "n_restarts") + (("eot_iter",) if stochastic else ()):
        if isinstance(params.get(key), int) and not isinstance(params.get(key), bool):
            work *= params[key]
    return work


def _scale(t: AttackTrial, r: dict[str, Any]) -> float:
    """How much more work per point the trial's attack does than its calibration did: its
    samples through the model, extrapolated in the iterations from the calibration's counts at
    the caps and at twice the caps (linear in them, with the attack's own evaluations outside
    its loop); in proportion to the iterations where the counts did not grow (the work is not
    the target model's, as a transfer attack's) or stop early by design (EARLY_STOP_FRACTION)."""
    real, calibrated = (_work(t.attack, p, r["stochastic"]) for p in (t.params_dict, r["cal_params"]))
    counts = r.get("iteration_samples")
    if not counts or counts[1] <= counts[0] or t.attack in EARLY_STOP_FRACTION:
        return real / calibrated
    doubled = _work(t.attack, r["doubled_params"], r["stochastic"])
    per_work = (counts[1] - counts[0]) / (doubled - calibrated)
    return (counts[0] + per_work * (real - calibrated)) / counts[0]


def split_sizes(t: Trial) -> tuple[int, int]:
    train = t if isinstance(t, TrainTrial) else t.train
    info = DATASETS[t.dataset]
    full_train, full_test = info.train_size, info.test_size
    return min(train.train_size or full_train, full_train), min(train.test_size or full_test, full_test)


def estimate(t: Trial, r: dict[str, Any], synthetic: bool) -> tuple[float, float]:
    """(seconds, peak MB) of one trial from its group's calibration record (its `mem_mb` is the
    intercept of peak RSS against the points in flight)."""
    n_train, n_test = split_sizes(t)
    mem = r["mem_mb"]
    if synthetic:  # the real splits will be in memory too (float32, plus a copy while loading)
        info = DATASETS[t.dataset]
        mem += 2 * 4 * (n_train + n_test) * info.channels * info.size**2 / 2**20
    if isinstance(t, TrainTrial):
        per_epoch = n_train // t.train.batch_size + (n_train % t.train.batch_size >= 2)
        steps = t.train.epochs * per_epoch
        steps = steps if t.train.max_steps is None else min(t.train.max_steps, steps)
        work = r["intercept_s"] + r["unit_s"] * steps
        seconds = r["fixed_s"] + work + r["eval_s"] * n_test * r["eval_repeats"]
        return seconds, mem + r["mem_unit_mb"] * t.train.batch_size
    repeats = t.eval.eval_repeats if r["stochastic"] else 1
    if isinstance(t, DiagnosticTrial):
        work = r["intercept_s"] + r["unit_s"] * r["inner_scale"] * t.eval.diagnostic_size
        seconds = r["fixed_s"] + work + r["eval_s"] * t.eval.pool_size(t.dataset) * repeats
        return seconds, mem + r["mem_unit_mb"] * t.eval.diagnostic_size
    points = t.points
    scale = _scale(t, r) * EARLY_STOP_FRACTION.get(t.attack, 1.0)
    batches = math.ceil(points / t.eval.batch_size)
    work = scale * (r["intercept_s"] * batches + r["unit_s"] * points)
    seconds = r["fixed_s"] + work + r["eval_s"] * (points + points) * repeats  # clean, then adversarial
    return seconds, mem + r["mem_unit_mb"] * min(points, t.eval.batch_size)


def _estimates(plan: Plan, grid: Grid, group_of: dict[str, Any]) -> dict[str, Estimate]:
    """Each trial's estimate from its group's calibration (none where that failed)."""
    estimates: dict[str, Estimate] = {}
    memo: dict[Any, Estimate] = {}  # trials that differ only in what costs nothing share one
    for t in grid.trials:
        group = group_of[t.trial_id]
        item = plan.items[group]
        if item.record and "error" not in item.record:
            key = (group, t.dataset, _shape(t))
            if key not in memo:
                memo[key] = Estimate(*estimate(t, item.record, item.synthetic), item.label)
            estimates[t.trial_id] = memo[key]
    return estimates


def _warn_sequence_upper_bound(plan: Plan, grid: Grid, estimates: dict[str, Estimate]) -> None:
    """AutoAttack runs each component only on the points the ones before left unbroken, and the
    calibration model (a step of training, its own labels) is broken by none: its estimate is
    the whole sequence on every point. On an undefended model most points fall to the first
    component, so the sweep can take several times less (the main job: 31 min planned, 7.6 min
    measured)."""
    ids = [t.trial_id for t in grid.attack if t.attack in cal.REAL_PARAMS and t.trial_id in estimates]
    if not ids:
        return
    seconds = sum(estimates[i].seconds for i in ids)
    total = sum(e.seconds for e in estimates.values())
    trials, are = ("trials", "are") if len(ids) > 1 else ("trial", "is")
    plan.warn(
        f"{len(ids)} AutoAttack {trials} ({seconds / 3600:.2f} h, {seconds / total:.0%} of the trial hours)"
        f" {are} estimated with every point surviving to the last component: an upper bound. AutoAttack"
        " attacks with each component only the points the earlier ones left unbroken, so on a weakly"
        " robust model it takes several times less"
    )


def run_plan(
    cfg: SweepConfig,
    grid: Grid,
    *,
    workers: int | None = None,
    out: Callable[[str], Any] = print,
    as_json: bool = False,
) -> dict[str, Any]:
    """Calibrate (or read the cache), extrapolate every trial, schedule, print the table."""
    start = time.perf_counter()
    plan = Plan(cfg)
    real = {name: _has_data(cfg, name) for name in cfg.datasets}
    for name in (name for name, present in real.items() if not present):
        plan.warn(
            f"dataset '{name}' is not in {cfg.data.data_root}: calibrated on synthetic tensors of its"
            " shape; the time to load it is not in the estimate"
        )
    usable = _usable_devices(plan, grid)
    with many_objects():
        group_of = collect_items(plan, grid, usable, real)
    root = cache_dir()
    todo = [i for i in plan.items.values() if not _load_cache(i, root)]
    cal_start = time.perf_counter()
    startup = calibrate(plan, todo, workers) if todo else None
    cal_seconds = time.perf_counter() - cal_start
    startup = _startup(root, startup)
    for item in plan.items.values():
        if item.record and "error" in item.record:
            plan.warn(
                f"calibration of {item.label} failed ({item.record['error']}): its trials are not in the"
                " totals"
            )
    with many_objects():
        estimates = _estimates(plan, grid, group_of)
        _warn_sequence_upper_bound(plan, grid, estimates)
        plan.report = schedule(cfg, grid, estimates, capacity(cfg, plan.warn), startup, plan.warn)
    runs = [run for i in plan.items.values() if i.record for run in i.record.get("runs", ())]
    idle = sum(run["total"] for run in runs)
    plan.report["calibration"] = {
        "items": len(plan.items),
        "cached": sum(i.cached for i in plan.items.values()),
        "seconds": round(cal_seconds, 1),
        "cache": str(root),
        "machine": machine(),
        # Estimates are for an idle machine; how much slower the calibration ran here, and when
        "slowdown": sum(run.get("wall", run["total"]) for run in runs) / idle if idle else 1.0,
        "load_average": os.getloadavg()[0],
        "plan_seconds": round(time.perf_counter() - start, 1),
    }
    plan.report["warnings"] = plan.warnings
    decision = decision_price(cfg, grid, plan.report)
    if decision is not None:
        plan.report["decision"] = decision
    text = render(plan.report) + ("\n" + "\n".join(render_price(decision)) if decision else "")
    out(json.dumps(plan.report, indent=2, default=str) if as_json else text)
    return plan.report


def cached_estimates(cfg: SweepConfig, grid: Grid) -> dict[str, float]:
    """Seconds per trial from the calibrations a --plan of this grid cached on this machine;
    nothing is calibrated, and a trial whose kind is not in the cache has none."""
    root = cache_dir()
    if not root.is_dir() or not any(root.glob("*.json")):
        return {}
    plan = Plan(cfg)
    real = {name: _has_data(cfg, name) for name in cfg.datasets}
    with many_objects():
        group_of = collect_items(plan, grid, {}, real)  # every device usable: a launch checked them
        for item in plan.items.values():
            _load_cache(item, root)
        return {trial_id: e.seconds for trial_id, e in _estimates(plan, grid, group_of).items()}


def _has_data(cfg: SweepConfig, name: str) -> bool:
    try:
        check_available(name, cfg.data.data_root, download=False)  # a plan never downloads
    except FileNotFoundError:
        return False
    return True


def _usable_devices(plan: Plan, grid: Grid) -> dict[str, bool]:
    names = sorted({t.model.device for t in grid.train if t.model.simulator == "qnode"})
    usable = {}
    if names:
        import pennylane as qml

        for name in names:
            try:
                qml.device(name, wires=1)
                usable[name] = True
            except Exception:  # the plugin raises its own error types
                usable[name] = False
                n = sum(t.model.device == name for t in grid.train)
                plan.warn(
                    f"device '{name}' is not usable here: its {n} hybrids' trials are estimated from"
                    " their backbone alone (the closest kind that runs here): a lower bound, without the"
                    f" circuit and a stochastic model's repeated draws; run --plan where {name} works"
                )
    return usable


def _startup(root: Path, measured: float | None) -> float:
    """Seconds a fresh trial process spends on its imports (cached per machine and versions)."""
    name = "startup-" + stable_hash(
        {"plan": PLAN_VERSION, "machine": machine(), "versions": package_versions()}
    )
    if measured is not None:
        _store(root, name, {"seconds": measured})
        return measured
    try:
        return float(json.loads((root / f"{name}.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return 0.0
