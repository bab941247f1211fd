"""--plan: a calibrated estimate that writes no result, warns, caches, and runs without data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qshield_dist import executors, launch
from qshield_dist import plan as plan_mod
from qshield_dist.config import read_config
from qshield_dist.plan import calibration
from qshield_dist.plan.schedule import Estimate, Slots, schedule
from qshield_dist.sweep import prepare

TINY = {
    "name": "tiny-plan",
    "data": {"dataset": "digits", "train_size": 60, "test_size": 30},
    "train": {"epochs": 1, "batch_size": 16},
    "eval": {"attack_size": 8, "batch_size": 8},
    "models": [{"model": "dnn"}],
    "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 2}}],
}


@pytest.fixture(autouse=True)
def _plan_env(tmp_path, monkeypatch):
    monkeypatch.setenv("QSHIELD_PLAN_CACHE", str(tmp_path / "plan-cache"))
    monkeypatch.setenv("QSHIELD_PLAN_WORKERS", "0")  # calibrate in this process: no worker start-up


def _sweep(tmp_path: Path, **changes) -> Path:
    spec = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        spec[key] = value if not isinstance(value, dict) else {**spec.get(key, {}), **value}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _plan(tmp_path: Path, sweep: Path, *extra: str) -> int:
    dirs = ["--results", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c")]
    return launch.main([str(sweep), "--plan", *dirs, *extra])


def _cache_files(tmp_path: Path) -> list[str]:
    files = (tmp_path / "plan-cache").glob("*.json")
    return sorted(p.name for p in files if not p.name.startswith("startup-"))


def test_plan_prints_stage_rows_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def no_executor(*args, **kwargs):
        raise AssertionError("--plan must not start an executor")

    monkeypatch.setattr(executors, "make", no_executor)
    assert _plan(tmp_path, _sweep(tmp_path)) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("stage"))
    for column in ("trials", "CPU-h", "GPU-h", "longest trial", "peak mem", "wall"):
        assert column in header
    cells = [line.split() for line in out.splitlines()]
    rows = {c[0]: c for c in cells if c[:1] in (["train"], ["attack"], ["total"])}
    assert rows["train"][1] == "1" and rows["attack"][1] == "2" and rows["total"][1] == "3"
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()

    assert _plan(tmp_path, _sweep(tmp_path), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    stages = {r["stage"]: r for r in report["stages"]}
    assert [stages[s]["trials"] for s in ("train", "attack", "diagnostic")] == [1, 2, 0]
    for row in (*report["stages"][:2], report["total"]):
        assert row["estimated"] == row["trials"]
        assert row["cpu_hours"] > 0 and row["wall_s"] > 0 and row["longest_s"] > 0
    # one worker: the attacks run after their train trial, one after the other
    assert report["total"]["wall_s"] >= stages["train"]["longest_s"] + stages["attack"]["longest_s"]
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_warns_when_a_trial_will_exceed_its_timeout(tmp_path, caplog):
    sweep = _sweep(
        tmp_path,
        attacks=[{"name": "pgd", "params": {"steps": 1_000_000}}],
        resources={"attack": {"timeout_min": 1}},
    )
    assert _plan(tmp_path, sweep) == 0
    messages = [r.getMessage() for r in caplog.records]
    warned = [m for m in messages if "will exceed the attack timeout_min 1" in m]
    assert len(warned) == 1 and "dnn on digits / pgd" in warned[0]
    assert not any("train timeout_min" in m for m in messages)


def test_second_plan_reads_the_cache(tmp_path, capsys, monkeypatch):
    calls = []
    real = calibration.calibrate_group

    def counting(items, *args):
        calls.append(len(items))
        return real(items, *args)

    monkeypatch.setattr(calibration, "calibrate_group", counting)
    sweep = _sweep(tmp_path)
    assert _plan(tmp_path, sweep, "--json") == 0
    first = json.loads(capsys.readouterr().out)
    assert sum(calls) == 3 and first["calibration"]["cached"] == 0
    cached = _cache_files(tmp_path)
    assert len(cached) == 3

    calls.clear()
    assert _plan(tmp_path, sweep, "--json") == 0
    second = json.loads(capsys.readouterr().out)
    assert calls == [] and second["calibration"]["cached"] == 3
    assert _cache_files(tmp_path) == cached
    assert second["total"]["cpu_hours"] == first["total"]["cpu_hours"]

    # Another step count of the same attack is the same calibration (capped and scaled back).
    assert _plan(tmp_path, _sweep(tmp_path, attacks=[{"name": "pgd", "params": {"steps": 7}}]), "--json") == 0
    assert calls == []


def test_missing_data_is_a_warning_and_calibrates_on_synthetic_tensors(tmp_path, capsys, caplog):
    empty = tmp_path / "no-data"
    empty.mkdir()
    data = {"dataset": "mnist", "data_root": str(empty), "train_size": None, "test_size": None}
    sweep = _sweep(tmp_path, data=data, attacks=[{"name": "fgsm"}])
    assert _plan(tmp_path, sweep) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("dataset 'mnist'" in m and "synthetic tensors" in m for m in messages)
    assert any("not available on this machine" in m for m in messages)
    out = capsys.readouterr().out
    assert "total" in out and "have no estimate" not in out
    assert list(empty.iterdir()) == []  # nothing downloaded or written there


def test_schedule_waits_for_dependencies_and_uses_the_parallelism(tmp_path):
    cfg = read_config(_sweep(tmp_path))
    grid = prepare(cfg)
    seconds = {"train": 10.0, "attack": 5.0}
    estimates = {t.trial_id: Estimate(seconds[t.stage], 100.0, t.stage) for t in grid.trials}
    warnings: list[str] = []
    one = schedule(cfg, grid, estimates, Slots(1, float("inf"), False), 0.0, warnings.append)
    two = schedule(cfg, grid, estimates, Slots(2, float("inf"), False), 0.0, warnings.append)
    assert one["total"]["wall_s"] == 20.0  # train, then two attacks in turn
    assert two["total"]["wall_s"] == 15.0  # train, then both attacks at once
    assert two["critical_path_s"] == 15.0 and warnings == []
    assert two["stages"][1]["cpu_hours"] == pytest.approx(10 / 3600)


def test_model_kinds_share_calibrations_across_entanglement_and_noise():
    from qshield_dist.config import ModelSpec

    a = ModelSpec(model="hqcnn", backbone="cnn_small", entanglement="full", noise_model="mixed").resolved(10)
    b = ModelSpec(model="hqcnn", backbone="cnn_small", entanglement="none", noise_model="amplitude_damping")
    b = b.resolved(10)
    c = ModelSpec(model="hqcnn", backbone="cnn_small", projection="paper").resolved(10)
    kind = plan_mod.model_kind
    assert kind(a, "digits") == kind(b, "digits") == kind(b, "mnist")
    assert plan_mod.model_kind(a, "digits") != plan_mod.model_kind(c, "digits")
    assert plan_mod.model_kind(a, "digits") != plan_mod.model_kind(a, "cifar10")


def test_every_kind_quicker_than_the_target_is_calibrated_at_two_sizes():
    """One run only bounds the cost per point from above; a kind whose first run took over
    half a second once got none, and its estimate jumped by 13-19x between calibrations."""

    def first(inner: float, total: float) -> dict:
        return {"inner": inner, "total": total, "units": 2}

    slow_setup = calibration._next(first(inner=0.3, total=0.7), "attack")  # Square on a CNN
    assert slow_setup is not None and slow_setup > 2
    expensive = calibration._next(first(inner=0.6, total=0.8), "attack")  # DeepFool: 0.3 s a point
    assert expensive is not None and 2 < expensive <= calibration.MAX_UNITS["attack"]
    assert calibration._next(first(inner=calibration.TARGET_S, total=1.2), "attack") is None
    runs = [
        {**first(0.3, 0.7), "eval_pts": 0, "in_flight": 2, "peak_mb": 100.0, "peak_own": True},
        {
            "inner": 0.35,
            "total": 0.75,
            "units": 6,
            "eval_pts": 0,
            "in_flight": 6,
            "peak_mb": 100.0,
            "peak_own": True,
        },
    ]
    for run in runs:
        run.update(stochastic=False, eval_repeats=1)
    fit = calibration._fit(runs, eval_s=0.0)
    assert fit["unit_s"] == pytest.approx(0.0125)  # the slope, not 0.3 / 2 per point


def test_an_attacks_per_batch_work_scales_with_its_iterations_and_batches(tmp_path):
    """The calibration's intercept is each query or step's call overhead on a batch: an attack of
    25x the calibrated queries on two batches costs 25 x 2 of it. Square counts at its whole
    budget (on a stochastic model it never stops a point early: it scores every query on the
    draws; the old plan took 0.35 of it)."""
    sweep = _sweep(
        tmp_path,
        eval={"attack_size": 16, "batch_size": 8, "eval_repeats": 3},
        attacks=[{"name": "square", "params": {"n_queries": 500}}],
    )
    grid = prepare(read_config(sweep))
    (square,) = grid.attack
    runs = [
        {"inner": 0.3, "total": 0.5, "units": 2, "eval_pts": 12, "in_flight": 2, "peak_mb": 100.0},
        {"inner": 0.7, "total": 0.9, "units": 6, "eval_pts": 36, "in_flight": 6, "peak_mb": 100.0},
    ]
    for run in runs:
        run.update(peak_own=True, stochastic=True, eval_repeats=3)
    record = {
        **calibration._fit(runs, eval_s=0.001),
        "cal_params": calibration.calibration_params("square", square.params_dict),
    }
    assert record["unit_s"] == pytest.approx(0.1) and record["intercept_s"] == pytest.approx(0.1)
    seconds, _ = plan_mod.estimate(square, record, synthetic=False)
    queries = 500 / calibration.ITERATION_CAPS["n_queries"]
    work = queries * (0.1 * 2 + 0.1 * 16)  # two batches of 8, 16 points
    clean = 0.001 * (16 + 16) * 3  # the shard's points clean, then attacked, 3 draws each
    assert seconds == pytest.approx(record["fixed_s"] + work + clean)


def test_a_clean_evaluation_is_timed_on_a_batch_of_the_trials_size(tmp_path, monkeypatch):
    """Its cost per point depends on the batch (1.5x as much at 16 points as at 128 on MNIST)."""
    from qshield_dist import trial

    cfg = read_config(_sweep(tmp_path, eval={"batch_size": 64}))
    grid = prepare(cfg)
    (train,) = grid.train
    sizes = []
    real = trial.predictions

    def recorded(model, x, repeats, batch_size):
        sizes.append((len(x), batch_size))
        return real(model, x, repeats, batch_size)

    work = calibration._Work()
    with calibration._patched({}, work):
        ctx = trial.RunContext(sweep="t", results_dir=str(tmp_path / "r"), checkpoint_dir=str(tmp_path / "c"))
        group = calibration._Group(ctx, work, {train.trial_id: train})
        target = group.ensure(train)
        model = group.model(target, None)
        monkeypatch.setattr(trial, "predictions", recorded)
        for batch in (64, 2048):
            assert group.forward_cost(model, target, batch, "model") > 0
    assert sizes == [(64, 64)] * 2 + [(calibration.EVAL_POINTS, 2048)] * 2


def test_the_scaled_work_is_timed_without_other_processes_load(tmp_path, monkeypatch):
    """The attack loop's own CPU time, not its wall time scaled by the whole run's average
    slowdown, which other processes' load makes differ from the loop's. Here the process is held
    off the CPU (as a loaded machine's scheduler would; a 0.3 s sleep) while loading and in the
    loop, whose own work is 0.2 s of CPU: the old code counted 0.14 s for it in its first run."""
    import time

    from qshield_dist import trial

    cfg = read_config(_sweep(tmp_path, attacks=[{"name": "fgsm"}]))
    grid = prepare(cfg)
    (train,), (fgsm,) = grid.train, grid.attack
    real_attack, real_loader = trial.build_attack, calibration._loader

    class HeldOff:
        def __init__(self, attack):
            self.attack = attack

        def __call__(self, x, y):
            time.sleep(0.3)
            start = time.process_time()
            while time.process_time() - start < 0.2:
                pass
            return self.attack(x, y)

        def __getattr__(self, name):
            return getattr(self.attack, name)

    def held_off_loader(*args, **kwargs):
        time.sleep(0.3)
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(trial, "build_attack", lambda *a, **k: HeldOff(real_attack(*a, **k)))
    monkeypatch.setattr(calibration, "_loader", held_off_loader)
    work = calibration._Work()
    with calibration._patched({}, work):
        ctx = trial.RunContext(sweep="t", results_dir=str(tmp_path / "r"), checkpoint_dir=str(tmp_path / "c"))
        record = calibration._Group(ctx, work, {train.trial_id: train}).attack(fgsm)
    assert record["runs"] and all(run["wall"] > 0.8 for run in record["runs"])
    assert all(0.2 <= run["inner"] < 0.5 for run in record["runs"])


def test_an_attacks_work_is_extrapolated_from_its_counted_model_samples(tmp_path):
    """APGD evaluates once before its steps: calibrated at 2 steps (3 evaluations), 20 steps are
    21 evaluations, 7x the work, not 10x. The plan's extrapolation of the calibration's counts
    matches the real trial's count."""
    from qshield_dist.trial import RunContext, run_trial

    attack = {"name": "apgd", "preset": "standard", "params": {"steps": 20}}
    grid = prepare(read_config(_sweep(tmp_path, attacks=[attack])))
    (train,), (apgd,) = grid.train, grid.attack
    work = calibration._Work()
    with calibration._patched({}, work):
        ctx = RunContext(sweep="t", results_dir=str(tmp_path / "cr"), checkpoint_dir=str(tmp_path / "cc"))
        record = calibration._Group(ctx, work, {train.trial_id: train}).attack(apgd)
    ctx = RunContext(sweep="t", results_dir=str(tmp_path / "r"), checkpoint_dir=str(tmp_path / "c"))
    assert run_trial(train, ctx) == run_trial(apgd, ctx) == "ok"
    (row,) = ctx.store.read(apgd)
    real = (row["forward_samples"] + row["backward_samples"]) / row["n_attacked"]
    calibrated = record["iteration_samples"][0] / calibration.FIRST_UNITS["attack"]
    assert plan_mod._scale(apgd, record) * calibrated == pytest.approx(real)
    assert real / calibrated < 0.8 * 20 / calibration.ITERATION_CAPS["steps"]


def test_autoattack_estimates_are_called_an_upper_bound(tmp_path, capsys):
    """The calibration model breaks at no component, so AutoAttack's estimate is its whole
    sequence on every point: --plan says so, with those trials' share of the hours."""
    sweep = _sweep(
        tmp_path, attacks=[{"name": "fgsm"}, {"name": "autoattack", "params": {"version": "fast"}}]
    )
    assert _plan(tmp_path, sweep, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    (warning,) = [w for w in report["warnings"] if "AutoAttack" in w]
    assert warning.startswith("1 AutoAttack trial (") and "upper bound" in warning
    assert _plan(tmp_path, _sweep(tmp_path), "--json") == 0  # no AutoAttack, no such warning
    assert not [w for w in json.loads(capsys.readouterr().out)["warnings"] if "AutoAttack" in w]


def test_plan_prices_a_sequential_decision(tmp_path, capsys):
    """eval.until_decided: the looks, the comparisons, and the attack stage's cost at the expected
    and the maximum points per seed, scaled from the first look's estimate by the points."""
    sweep = _sweep(
        tmp_path,
        models=[{"model": "dnn"}, {"model": "hqcnn", "backbone": "dnn"}],
        attacks=[{"name": "fgsm"}],
        eval={"attack_size": 8, "shard_size": 8, "until_decided": {"max_points": 64}},
    )
    assert _plan(tmp_path, sweep, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    decision = report["decision"]
    assert decision["looks"] == [8, 16, 32, 64] and decision["comparisons"] == 1 and decision["seeds"] == 1
    attack = next(r for r in report["stages"] if r["stage"] == "attack")
    top, expected = decision["maximum"], decision["expected"]
    assert (top["points_per_seed"], top["shards_per_seed"], top["trials"], top["seeds"]) == (64, 8, 16, 1)
    assert decision["stages"] == ["attack"] and top["cpu_hours"] == pytest.approx(attack["cpu_hours"] * 8)
    assert 8 <= expected["points_per_seed"] <= 64 and 0 <= decision["power"] <= 1
    assert _plan(tmp_path, sweep) == 0
    assert "deciding 1 comparison(s) at 1 seed(s) x 8 points, looks at 8, 16, 32, 64 points/seed" in (
        capsys.readouterr().out
    )


def test_plan_prices_a_sequential_decision_over_seeds(tmp_path, capsys):
    """eval.until_decided.max_seeds: the seeds a decision takes (decide_seeds' rule simulated), and
    every stage's cost scaled by the seeds from the first look's, since each seed trains anew."""
    sweep = _sweep(
        tmp_path,
        seeds=[0, 1, 2],
        models=[{"model": "dnn"}, {"model": "hqcnn", "backbone": "dnn"}],
        attacks=[{"name": "fgsm"}],
        eval={"attack_size": 8, "until_decided": {"max_seeds": 12}},
    )
    assert _plan(tmp_path, sweep, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    decision = report["decision"]
    assert decision["unit"] == "seeds" and decision["looks"] == [3, 6, 12] and decision["assumed_seed_sd"] > 0
    stages = {r["stage"]: r for r in report["stages"]}
    assert decision["stages"] == [s for s in ("train", "attack", "diagnostic") if s in stages]
    first_hours = sum(stages[s]["cpu_hours"] for s in decision["stages"])
    top, expected = decision["maximum"], decision["expected"]
    grid_trials = sum(r["trials"] for r in report["stages"])
    assert (top["seeds"], top["points_per_seed"], top["trials"]) == (12, 8, grid_trials * 4)
    assert top["shards_per_seed"] == 1  # no shards: the attack set is one
    assert top["cpu_hours"] == pytest.approx(first_hours * 4)
    # 8 points per seed: a true 2 pp difference is lost in the noise, so it runs nearly to the end
    assert 3 <= expected["seeds"] <= 12 and decision["power"] < 0.5
    assert _plan(tmp_path, sweep) == 0
    out = capsys.readouterr().out
    assert "looks at 3, 6, 12 seeds" in out and "a seed effect of sd 3.0 pp" in out
