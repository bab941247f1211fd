"""SLURM packing from the CLI by expected time: each trial's minutes from finished trials of its
kind in the results store (their whole-trial seconds, diagnostics included), else from --plan's
cached calibration, else its time limit; the launcher hands them to the SLURM executor, whose
packing then holds several trials per task. Needs no cluster: the executor's packing is
computed, nothing is submitted."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from qshield_dist import executors, launch
from qshield_dist.config import read_config
from qshield_dist.plan.durations import expected_minutes
from qshield_dist.results.store import ResultStore
from qshield_dist.sweep import make_executor, make_jobs, prepare, run_sweep
from qshield_dist.trial import RunContext

SWEEP: dict[str, Any] = {
    "name": "packing",
    "data": {"dataset": "digits", "train_size": 120, "test_size": 40},
    "train": {"epochs": 1},
    "eval": {"attack_size": 8, "diagnostics": ["batch_independent"]},
    "models": [{"model": "dnn"}],
    "seeds": [0],
    "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 2}}],
}
# The same study, grown: a second seed (trials of kinds already measured), an attack that a
# --plan calibrated (vmifgsm) and one that nothing knows yet (square).
GROWN_ATTACKS = [*SWEEP["attacks"], {"name": "vmifgsm", "params": {"steps": 2}}, {"name": "square"}]


def _write(root: Path, name: str, **changes: Any) -> Path:
    spec = copy.deepcopy(SWEEP)
    spec.update(results_dir=str(root / "results"), checkpoint_dir=str(root / "ckpt"), **changes)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed 0's train and two attacks run; a --plan of the grown study without square cached."""
    root = tmp_path_factory.mktemp("packing")
    assert launch.main([str(_write(root, "ran"))]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSHIELD_PLAN_CACHE", str(root / "plan-cache"))
        mp.setenv("QSHIELD_PLAN_WORKERS", "0")
        planned = _write(root, "planned", seeds=[0, 1], attacks=GROWN_ATTACKS[:3])
        assert launch.main([str(planned), "--plan"]) == 0
    return root


@pytest.fixture()
def grown(study: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QSHIELD_PLAN_CACHE", str(study / "plan-cache"))
    return _write(
        study, "grown", seeds=[0, 1], attacks=GROWN_ATTACKS, executor="slurm", slurm={"pack_minutes": 5}
    )


def _todo(cfg: Any) -> tuple[Any, list[Any], Any]:
    grid = prepare(cfg)
    done = ResultStore(cfg.results_path, cfg.checkpoint_dir).done(t.trial_id for t in grid.trials)
    return grid, [t for t in grid.trials if t.trial_id not in done.status], done


def _name(t: Any) -> str:
    train = t if t.stage == "train" else t.train
    return f"{t.stage}:{getattr(t, 'attack', t.stage)}:s{train.seed}"


def test_expected_minutes_come_from_finished_trials_then_the_plan_cache_then_none(grown: Path) -> None:
    cfg = read_config(grown)
    grid, todo, done = _todo(cfg)
    assert sorted(map(_name, todo)) == [
        "attack:fgsm:s1",
        "attack:pgd:s1",
        "attack:square:s0",
        "attack:square:s1",
        "attack:vmifgsm:s0",
        "attack:vmifgsm:s1",
        "diagnostic:diagnostic:s1",
        "train:train:s1",
    ]
    expected = expected_minutes(cfg, grid, todo, done.seconds)
    assert (expected.measured, expected.planned, expected.fallback) == (4, 2, 2)
    by_name = {_name(t): expected.minutes.get(t.trial_id) for t in todo}
    assert by_name["attack:square:s0"] is None and by_name["attack:square:s1"] is None

    # Seed 1's trials take what seed 0's rows of the same kind measured: the whole trial
    # (loading, clean evaluation, ...), longer than its training or attack alone; a diagnostic too.
    measured = {}
    for path in cfg.results_path.glob("stage=*/dataset=*/*/*.parquet"):
        (row,) = pq.read_table(path).to_pylist()
        name = f"{row['stage']}:{row['attack'] or row['stage']}:s1"
        measured[name] = row["trial_seconds"]
        part = {"train": row["train_seconds"], "attack": row["attack_seconds"]}.get(row["stage"], 0.0)
        assert row["trial_seconds"] > part >= 0
    assert sorted(measured) == [
        "attack:fgsm:s1",
        "attack:pgd:s1",
        "diagnostic:diagnostic:s1",
        "train:train:s1",
    ]
    assert set(done.seconds) == {t.trial_id for t in grid.trials if t.trial_id in done.status}
    for name, seconds in measured.items():
        assert by_name[name] == pytest.approx(seconds / 60)
    # vmifgsm: the plan's estimate, a few seconds for 8 points of a small model
    assert (
        0 < by_name["attack:vmifgsm:s0"] < 5 and by_name["attack:vmifgsm:s1"] == by_name["attack:vmifgsm:s0"]
    )


def test_the_slurm_packing_receives_the_durations(grown: Path) -> None:
    """With the durations, the trials of seconds share array tasks; square, with none, runs
    alone (its 240-minute limit stands in); without them, every trial is a task of its own."""
    cfg = read_config(grown)
    grid, todo, done = _todo(cfg)
    expected = expected_minutes(cfg, grid, todo, done.seconds)
    ctx = RunContext(sweep=cfg.name, results_dir=str(cfg.results_path), checkpoint_dir=cfg.checkpoint_dir)
    jobs = make_jobs(todo, cfg, ctx)
    names = {t.trial_id: _name(t) for t in todo}

    packed = make_executor(cfg, expected.minutes)
    assert {names[j.key]: packed.minutes(j) for j in jobs} == {
        names[j.key]: expected.minutes.get(j.key, 240) for j in jobs
    }
    arrays = [[sorted(names[j.key] for j in pack) for pack in a.packs] for a in packed.plan(jobs, 1000)]
    assert arrays == [
        [["train:train:s1"]],
        [["attack:vmifgsm:s0"], ["attack:square:s0"]],
        [["attack:fgsm:s1", "attack:pgd:s1", "attack:vmifgsm:s1"], ["attack:square:s1"]],
        [["diagnostic:diagnostic:s1"]],  # an array per stage and dependency set
    ]
    alone = make_executor(cfg)
    assert all(len(pack) == 1 for a in alone.plan(jobs, 1000) for pack in a.packs)


class _Stop(Exception):
    pass


def test_the_launcher_passes_durations_and_logs_their_sources(
    grown: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The launcher builds the SLURM executor with the durations; stopped there, nothing runs."""
    made: dict[str, Any] = {}

    def capture(name: str, **params: Any) -> None:
        made.update(params, name=name)
        raise _Stop

    monkeypatch.setattr(executors, "make", capture)
    cfg = read_config(grown)
    grid, todo, done = _todo(cfg)
    caplog.set_level(logging.INFO, logger="qshield_dist.sweep")
    with pytest.raises(_Stop):
        run_sweep(cfg, grid=grid)
    assert made["name"] == "slurm"
    assert made["durations"] == expected_minutes(cfg, grid, todo, done.seconds).minutes
    assert len(made["durations"]) == 6
    assert (
        "slurm packing by expected time: 4 trials from finished trials of their kind, 2 from --plan's cached"
        " calibration, 2 with neither take their time limit (timeout_min)" in caplog.text
    )
