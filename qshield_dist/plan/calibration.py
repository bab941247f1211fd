"""The calibration runs behind `--plan` (plan/__init__.py): the real `run_trial` on scaled-down copies.

Runs in a worker process (or in the caller's, for tests), in a temporary directory that is
removed afterwards; never under a sweep's results or checkpoint directories. Data comes from
`_loader`, put in the place of trial.py's `load` for the duration: the dataset's real files when
they are present (loaded in full, as a trial loads them), else synthetic tensors of its shape.
The test labels are the calibration model's own predictions, so every point is clean-correct
and is attacked, as most points of a trained model are.
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator

from qshield_dist.code_snapshot import take_snapshot
from qshield_dist.datasets import DATASETS
from qshield_dist.grid import AttackTrial, DiagnosticTrial, TrainTrial, Trial
from qshield_dist.peak_memory import peak_bytes, reset_peak
from qshield_dist.vocabulary import BACKBONE_ONLY

FIRST_UNITS = {"train": 1, "attack": 2, "diagnostic": 2}  # steps / points of the first run
MAX_UNITS = {"train": 12, "attack": 96, "diagnostic": 8}
TARGET_S = 1.0  # a second run is sized to take about this long; a first run as long is enough
TRAIN_TEST_POINTS = 32  # test points of a train calibration (its clean evaluation)
EVAL_POINTS = 512  # the most points a clean evaluation's cost per point is measured on
# Iteration counts capped for calibration and scaled back linearly (the cost per iteration is
# constant); AutoAttack runs its fixed suite, uncapped.
ITERATION_CAPS = {"steps": 2, "n_queries": 20, "binary_search_steps": 1}
REAL_PARAMS = ("autoattack", "bpda_autoattack")
EARLY_STOP = ("square",)  # calibrated at an eps too small to succeed: every query runs
SHRINK_EPS = 1e-3
TARGET_BATCH = 2  # a checkpoint an attack or a hybrid's training starts from: one step of 2 samples


def calibration_params(attack: str, params: dict[str, Any], caps: int = 1) -> dict[str, Any]:
    """`params` with iteration counts capped at `caps` x ITERATION_CAPS."""
    if attack in REAL_PARAMS:
        return dict(params)
    p = {
        k: min(v, ITERATION_CAPS[k] * caps) if k in ITERATION_CAPS and isinstance(v, int) else v
        for k, v in params.items()
    }
    if attack in EARLY_STOP and "eps" in p:
        p["eps"] = p["eps"] * SHRINK_EPS
    return p


def scaled_train(t: TrainTrial, steps: int, trains: dict[str, TrainTrial]) -> TrainTrial:
    """`t` trained for `steps` optimizer steps of its own batch size (one step per epoch)."""
    baseline = target(trains[t.baseline_id], trains).trial_id if t.baseline_id else None
    cfg = t.train.model_copy(update={"epochs": steps, "max_steps": steps})
    return replace(t, train=cfg, train_size=t.train.batch_size, test_size=None, baseline_id=baseline)


def target(t: TrainTrial, trains: dict[str, TrainTrial]) -> TrainTrial:
    """The cheap checkpoint a calibration attacks (its labels are its own predictions anyway)."""
    baseline = target(trains[t.baseline_id], trains).trial_id if t.baseline_id else None
    cfg = t.train.model_copy(update={"epochs": 1, "max_steps": 1, "batch_size": TARGET_BATCH})
    return replace(t, train=cfg, train_size=TARGET_BATCH, test_size=None, baseline_id=baseline)


def scaled_attack(a: AttackTrial, points: int, trains: dict[str, TrainTrial], caps: int = 1) -> AttackTrial:
    surrogate = target(a.surrogate, trains) if a.surrogate else None
    params = tuple(sorted(calibration_params(a.attack, a.params_dict, caps).items()))
    return replace(
        a,
        train=target(a.train, trains),
        surrogate=surrogate,
        params=params,
        eval=a.eval.model_copy(update={"attack_size": points, "shard_size": None}),
        shard=0,
        shard_size=points,
    )


def scaled_diagnostic(d: DiagnosticTrial, points: int, trains: dict[str, TrainTrial]) -> DiagnosticTrial:
    return replace(
        d,
        train=target(d.train, trains),
        attack_ids=(),
        eval=d.eval.model_copy(update={"diagnostic_size": points}),
    )


class _Data:
    """What `_loader` returns for the next run (set by the calibration before each)."""

    real: dict[str, bool] = {}
    n_train = n_test = 0
    labels: Any = None


def _loader(
    name: str,
    root: Any,
    train_size: Any = None,
    test_size: Any = None,
    download: bool = False,
    subset_seed: int = 0,
) -> tuple[Any, Any]:
    import torch

    from qshield_dist.data import Split, load

    if _Data.real.get(name):
        train, test = load(name, root)  # the full load: its time is part of every trial's
    else:
        info = DATASETS[name]
        gen = torch.Generator().manual_seed(0)

        def fake(n: int) -> Split:
            x = torch.rand(n, info.channels, info.size, info.size, generator=gen)
            return Split(x, torch.arange(n) % info.classes)

        train, test = fake(_Data.n_train), fake(_Data.n_test)
    train = Split(train.x[: _Data.n_train], train.y[: _Data.n_train])
    test = Split(test.x[: _Data.n_test], test.y[: _Data.n_test])
    if _Data.labels is not None:
        test = Split(test.x, _Data.labels[: len(test.y)])
    return train, test


class _Work:
    """The seconds of a run's scaled work (the training, the attack loop, the eps sweep), timed
    where it runs: in CPU time for a single-threaded trial, so that other processes' load, which
    varies within a run, is not in it (a run's average slowdown is not its attack loop's); in wall
    time with more threads."""

    def __init__(self) -> None:
        self.spans: list[float] = []
        self.clock: Callable[[], float] = time.perf_counter

    def start(self, threads: int) -> None:
        self.spans.clear()
        self.clock = time.process_time if threads == 1 else time.perf_counter

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.spans.append(self.clock() - start)


@contextmanager
def _patched(real: dict[str, bool], work: _Work) -> Iterator[float]:
    """trial.py's data loading -> `_loader`; its training and attack loop timed into `work`; the
    diagnostics' eps sweep at one eps and capped steps, timed (yields the factor back to the real
    sweep's work)."""
    from qshield_dist import diagnostics
    from qshield_dist import trial as trial_mod

    hooks = [hasattr(trial_mod, name) for name in ("load", "train_model", "PointStreams")]
    if not all(hooks) or not hasattr(diagnostics, "eps_sweep"):
        raise RuntimeError(
            "plan: trial.load, trial.train_model, trial.PointStreams or diagnostics.eps_sweep moved;"
            " update plan.calibration._patched"
        )
    real_sweep, real_train, real_streams = (
        diagnostics.eps_sweep,
        trial_mod.train_model,
        trial_mod.PointStreams,
    )
    defaults = inspect.signature(real_sweep).parameters
    eps_values, steps = defaults["eps_values"].default, defaults["steps"].default

    def scaled_sweep(*args: Any, **kwargs: Any) -> Any:
        with work.timed():
            return real_sweep(
                *args, **{**kwargs, "eps_values": eps_values[-1:], "steps": ITERATION_CAPS["steps"]}
            )

    def timed_train(*args: Any, **kwargs: Any) -> Any:
        with work.timed():
            return real_train(*args, **kwargs)

    @contextmanager
    def timed_streams(*args: Any, **kwargs: Any) -> Iterator[Any]:  # run_attack's attack loop
        with work.timed(), real_streams(*args, **kwargs) as streams:
            yield streams

    saved = trial_mod.load
    trial_mod.load, diagnostics.eps_sweep, _Data.real = _loader, scaled_sweep, real
    trial_mod.train_model, trial_mod.PointStreams = timed_train, timed_streams
    try:
        yield len(eps_values) * steps / ITERATION_CAPS["steps"]
    finally:
        trial_mod.load, diagnostics.eps_sweep, _Data.labels = saved, real_sweep, None
        trial_mod.train_model, trial_mod.PointStreams = real_train, real_streams


class CalibrationFailed(RuntimeError):
    pass


def _device_of(model: Any) -> Any:
    """The device a calibration model was loaded on (its trial's accelerator)."""
    return next(model.parameters()).device


def _run(t: Trial, ctx: Any, work: _Work, n_train: int, n_test: int, labels: Any = None) -> dict[str, Any]:
    """One timed run_trial, and how much of it was the scaled work (inner). Times are an idle
    machine's: at one thread the run's CPU time (other processes' load is not in it), with more
    the wall time as measured."""
    from qshield_dist.trial import run_trial

    _Data.n_train, _Data.n_test, _Data.labels = n_train, n_test, labels
    work.start(t.threads)
    reset = reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    status = run_trial(t, ctx)
    wall = time.perf_counter() - start
    total = min(wall, time.process_time() - cpu) if t.threads == 1 else wall
    rows = ctx.store.read(t, failed=status != "ok")
    row = rows[0]
    if status != "ok":
        raise CalibrationFailed(str(row.get("error", "")).splitlines()[0])
    r = int(row["eval_repeats"])
    if t.stage == "train":
        units, flight, evals = row["train_steps"], t.train.batch_size, row["n_test"] * r
    elif t.stage == "attack":
        units = row["n_attacked"]
        flight, evals = min(units, t.eval.batch_size), (row["n_test"] + units) * r
    else:
        units = flight = t.eval.diagnostic_size
        evals = row["n_test"] * r
    return {
        "total": total,
        "wall": wall,
        "inner": sum(work.spans),
        "units": int(units),
        "eval_pts": int(evals),
        "in_flight": int(flight),
        "peak_mb": peak_bytes() / 2**20,
        "peak_own": reset,
        "stochastic": bool(row["stochastic"]),
        "eval_repeats": r,
        # samples through the model (and a twin), forward and backward: what an attack's work is
        "samples": int(row["forward_samples"] or 0) + int(row["backward_samples"] or 0),
    }


def _next(run: dict[str, Any], stage: str, most: int | None = None) -> int | None:
    """Units of the second run: about TARGET_S of work, at most `most`; none when the first took
    as long. A single run only bounds the cost per unit from above (its fixed work counted per
    unit): when a first run just over half a second went without a second, the extended
    full.yaml's Square and VMI-FGSM hours came out 13-19x apart between two calibrations."""
    if run["inner"] >= TARGET_S or run["units"] < 1:
        return None
    per = max(run["inner"] / run["units"], 1e-6)
    n = min(MAX_UNITS[stage], max(2 * run["units"], math.ceil(TARGET_S / per)), most or MAX_UNITS[stage])
    return n if n > run["units"] else None


def _fit(runs: list[dict[str, Any]], eval_s: float) -> dict[str, Any]:
    """time = fixed + intercept + unit x units (+ eval_s x evaluated points), where intercept +
    unit x units is the scaled work (training, the attack, the checks) and fixed the rest of the
    trial; peak = mem + mem_unit x in flight. An attack's intercept is work per batch that grows
    with its iterations (each query or step's call overhead), so the estimate scales it with them."""
    last = runs[-1]
    slope = 0.0
    if len(runs) == 2 and last["units"] > runs[0]["units"]:
        slope = (last["inner"] - runs[0]["inner"]) / (last["units"] - runs[0]["units"])
    if slope <= 0:  # one run, or noise: all of the work per unit (an upper bound)
        slope, w0 = last["inner"] / max(last["units"], 1), 0.0
    else:
        w0 = max(0.0, last["inner"] - slope * last["units"])
    outer = [max(0.0, r["total"] - r["inner"] - eval_s * r["eval_pts"]) for r in runs]
    mem_unit = 0.0
    if len(runs) == 2 and last["in_flight"] > runs[0]["in_flight"]:
        mem_unit = max(
            0.0, (last["peak_mb"] - runs[0]["peak_mb"]) / (last["in_flight"] - runs[0]["in_flight"])
        )
    # The least overhead: a process's first run also pays its one-time warm-up, which a sweep's
    # worker pays once, not per trial.
    return {
        "fixed_s": min(outer),
        "intercept_s": w0,
        "unit_s": slope,
        "eval_s": eval_s,
        "mem_mb": max(r["peak_mb"] for r in runs) - mem_unit * last["in_flight"],
        "mem_unit_mb": mem_unit,
        "in_flight": last["in_flight"],
        "stochastic": last["stochastic"],
        "eval_repeats": last["eval_repeats"],
        "peak_own": all(r["peak_own"] for r in runs),
        "runs": runs,
    }


class _Group:
    """One model kind's calibrations: a temporary run context and what they share."""

    def __init__(self, ctx: Any, work: _Work, trains: dict[str, TrainTrial]):
        self.ctx, self.work, self.trains = ctx, work, trains
        self.eval_cost: dict[tuple[str, int], float] = {}
        self.models: dict[tuple[str, str | None], Any] = {}

    def ensure(self, t: TrainTrial) -> TrainTrial:
        """`t`'s calibration target, trained (untimed) unless its checkpoint exists."""
        s = target(t, self.trains)
        if t.baseline_id:
            self.ensure(self.trains[t.baseline_id])
        if not self.ctx.store.checkpoint_path(s.trial_id).exists():
            _run(s, self.ctx, self.work, TARGET_BATCH, TARGET_BATCH)
        return s

    def model(self, s: TrainTrial, control: str | None) -> Any:
        from qshield_dist.models.classic import Classifier
        from qshield_dist.trial import train_or_load
        from qshield_dist.trial_env import torch_device

        if (s.trial_id, control) not in self.models:
            model, _ = train_or_load(s, self.ctx, torch_device(s.accelerator), allow_train=False)
            alone = control == BACKBONE_ONLY
            self.models[(s.trial_id, control)] = Classifier(model.backbone).eval() if alone else model
        return self.models[(s.trial_id, control)]

    def labels(self, model: Any, s: TrainTrial, n_test: int, repeats: int) -> Any:
        """The model's own (majority) predictions on the first n_test points."""
        import torch

        from qshield_dist.trial import fixed_numerics, predictions, seed_everything

        _Data.n_train, _Data.n_test, _Data.labels = s.train.batch_size, n_test, None
        _, test = _loader(s.dataset, self.ctx.data_root)
        device = _device_of(model)
        with fixed_numerics(s.threads, device):
            seed_everything(s.seed)
            return torch.mode(predictions(model, test.x.to(device), repeats, 128), dim=0).values.cpu()

    def forward_cost(self, model: Any, s: TrainTrial, batch: int, key: str) -> float:
        """Seconds per point of a clean evaluation (trial.predictions), measured directly on one
        full batch of the trial's size (up to EVAL_POINTS): the cost per point depends on it,
        not monotonically (MNIST, cnn_small and the paper-mode HQCNN, CPU seconds per point on a
        loaded machine: about 1.5x as much at 16 as at 128, and 512 about as dear as 16)."""
        import torch

        from qshield_dist.trial import fixed_numerics, predictions

        if (key, batch) not in self.eval_cost:
            info = DATASETS[s.dataset]
            n = min(batch, EVAL_POINTS)
            device = _device_of(model)
            x = torch.rand(n, info.channels, info.size, info.size, device=device)
            best = math.inf
            clock = time.process_time if s.threads == 1 else time.perf_counter  # as _run's
            with fixed_numerics(s.threads, device):
                for _ in range(2):
                    start = clock()
                    predictions(model, x, 1, batch)
                    best = min(best, clock() - start)
            self.eval_cost[(key, batch)] = best / n
        return self.eval_cost[(key, batch)]

    def train(self, t: TrainTrial) -> dict[str, Any]:
        if t.baseline_id:
            self.ensure(self.trains[t.baseline_id])
        runs, steps = [], FIRST_UNITS["train"]
        while steps:
            s = scaled_train(t, steps, self.trains)
            runs.append(_run(s, self.ctx, self.work, s.train.batch_size, TRAIN_TEST_POINTS))
            steps = _next(runs[-1], "train") if len(runs) == 1 else None
        s = scaled_train(t, FIRST_UNITS["train"], self.trains)
        return _fit(runs, self.forward_cost(self.model(s, None), s, 512, "model"))

    def attack(self, a: AttackTrial) -> dict[str, Any]:
        base = self.ensure(a.train)
        if a.surrogate:
            self.ensure(a.surrogate)
        model = self.model(base, a.control)
        repeats = a.eval.eval_repeats if getattr(model, "stochastic", False) else 1
        runs, n = [], FIRST_UNITS["attack"]
        while n:
            s = scaled_attack(a, n, self.trains)
            labels = self.labels(model, base, n, repeats)
            runs.append(_run(s, self.ctx, self.work, base.train.batch_size, n, labels))
            # both runs in one batch: the fit's intercept is then one batch's work
            n = _next(runs[-1], "attack", a.eval.batch_size) if len(runs) == 1 else None
        key = "backbone" if a.control == BACKBONE_ONLY else "model"
        record = {
            **_fit(runs, self.forward_cost(model, base, a.eval.batch_size, key)),
            "cal_params": calibration_params(a.attack, a.params_dict),
        }
        doubled = calibration_params(a.attack, a.params_dict, caps=2)
        if doubled != record["cal_params"]:
            # An iteration count was capped: how the model's samples grow with it, counted (not
            # timed) at twice the caps on the first run's points. APGD evaluates once before its
            # steps, so 2 capped steps are 3 of its 21 at 20 steps, not 2 of 20.
            n = FIRST_UNITS["attack"]
            s = scaled_attack(a, n, self.trains, caps=2)
            labels = self.labels(model, base, n, repeats)
            extra = _run(s, self.ctx, self.work, base.train.batch_size, n, labels)
            record.update(doubled_params=doubled, iteration_samples=[runs[0]["samples"], extra["samples"]])
        return record

    def diagnostic(self, d: DiagnosticTrial, sweep_scale: float) -> dict[str, Any]:
        base = self.ensure(d.train)
        model = self.model(base, None)
        repeats = d.eval.eval_repeats if getattr(model, "stochastic", False) else 1
        runs, n = [], FIRST_UNITS["diagnostic"]
        while n:
            s = scaled_diagnostic(d, n, self.trains)
            labels = self.labels(model, base, 2 * n, repeats)  # the batch-dependence check takes 2 x size
            runs.append(_run(s, self.ctx, self.work, base.train.batch_size, 2 * n, labels))
            n = _next(runs[-1], "diagnostic") if len(runs) == 1 else None
        eval_s = self.forward_cost(model, base, d.eval.batch_size, "model")
        return {**_fit(runs, eval_s), "inner_scale": sweep_scale}


def calibrate_group(
    items: list[dict[str, Any]], data_root: str, real: dict[str, bool]
) -> list[dict[str, Any]]:
    """Calibrate `items` (one model kind: {'key', 'trial', 'trains'}) -> one record per item,
    {'error': ...} where a calibration failed."""
    from qshield_dist.trial import RunContext

    work = _Work()
    out = []
    with tempfile.TemporaryDirectory(prefix="qshield-plan-") as tmp, _patched(real, work) as sweep_scale:
        ctx = RunContext(
            sweep="plan",
            results_dir=f"{tmp}/results",
            checkpoint_dir=f"{tmp}/checkpoints",
            data_root=data_root,
            executor="plan",
        )
        trains: dict[str, TrainTrial] = {}
        for item in items:
            trains.update(item["trains"])
        for custom in {t.model.custom for t in trains.values() if t.model.custom is not None}:
            take_snapshot(custom, ctx.results_dir, ctx.file_mode)  # what its trials import
        group = _Group(ctx, work, trains)
        how: dict[str, Callable[[Any], dict[str, Any]]] = {
            "train": group.train,
            "attack": group.attack,
            "diagnostic": lambda d: group.diagnostic(d, sweep_scale),
        }
        for item in items:
            start = time.perf_counter()
            try:
                record = how[item["trial"].stage](item["trial"])
            except Exception as exc:  # a kind that cannot run here is a warning of the plan
                record = {"error": f"{type(exc).__name__}: {exc}"}
            out.append({**record, "key": item["key"], "calibration_s": time.perf_counter() - start})
    return out


def warm_up() -> float:
    """Worker initializer: the imports every trial's process pays once; returns their (CPU) time."""
    start = time.process_time()
    import qshield_dist.attacks  # noqa: F401
    import qshield_dist.trial  # noqa: F401

    warm_up.seconds = time.process_time() - start  # type: ignore[attr-defined]
    return warm_up.seconds  # type: ignore[attr-defined]


def calibrate_in_worker(
    items: list[dict[str, Any]], data_root: str, real: dict[str, bool]
) -> tuple[float, list[dict[str, Any]]]:
    return getattr(warm_up, "seconds", 0.0), calibrate_group(items, data_root, real)
