"""What a trial reserves is what it uses: each stage's trials run `resources.<stage>.cpus`
threads unless the stage names fewer; more than it reserves is refused (test_config.py has the
exit-2 cases), and local workers that would run more threads than there are cores are reported."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from qshield_dist.config import SweepConfig, read_config, validate
from qshield_dist.executors.local import LocalExecutor, available_cpus
from qshield_dist.grid import Grid, build_grid
from qshield_dist.sweep import make_jobs, run_sweep, warn_oversubscribed

SWEEP: dict[str, Any] = {
    "name": "threads",
    "data": {"dataset": "digits", "train_size": 100, "test_size": 40},
    "train": {"epochs": 1},
    "eval": {"attack_size": 8, "diagnostics": ["attack_budget_reachable"], "diagnostic_size": 4},
    "models": [{"model": "cnn_small"}],
    "attacks": [{"name": "fgsm"}],
}


def _config(resources: dict[str, Any]) -> SweepConfig:
    return SweepConfig(**{**SWEEP, "resources": resources})


def _grid(resources: dict[str, Any]) -> Grid:
    return build_grid(validate(_config(resources)))


def _threads(grid: Grid) -> dict[str, set[int]]:
    return {stage: {t.threads for t in getattr(grid, stage)} for stage in ("train", "attack", "diagnostic")}


def test_each_stage_runs_the_cores_it_reserves() -> None:
    grid = _grid({"train": {"cpus": 3}, "attack": {"cpus": 2}})
    # diagnostics run with the attack stage's resources, their threads too
    assert _threads(grid) == {"train": {3}, "attack": {2}, "diagnostic": {2}}
    assert _threads(_grid({})) == {"train": {1}, "attack": {1}, "diagnostic": {1}}
    # fewer, when named; whole cores of a fraction, at least one (and the job reserves that one)
    assert _threads(_grid({"attack": {"cpus": 2, "threads": 1}}))["attack"] == {1}
    assert _threads(_grid({"train": {"cpus": 2.5}}))["train"] == {2}
    cfg = _config({"train": {"cpus": 0.5}, "attack": {"cpus": 4, "threads": 2}})
    grid = build_grid(validate(cfg))
    assert _threads(grid) == {"train": {1}, "attack": {2}, "diagnostic": {2}}
    jobs = make_jobs(grid.trials, cfg, None)
    assert {(j.stage, j.cpus) for j in jobs} == {("train", 1), ("attack", 4), ("diagnostic", 4)}


def test_threads_are_in_the_id_and_one_cpu_keeps_the_ids_of_before() -> None:
    one = _grid({})
    assert [t.trial_id for t in _grid({"train": {"cpus": 1, "threads": 1}}).trials] == [
        t.trial_id for t in one.trials
    ]
    two = _grid({"attack": {"cpus": 2}})
    assert [t.trial_id for t in two.train] == [t.trial_id for t in one.train]
    assert not {t.trial_id for t in [*two.attack, *two.diagnostic]} & {t.trial_id for t in one.trials}
    # every id built on a train trial changes with its threads
    assert not {t.trial_id for t in _grid({"train": {"cpus": 2}}).trials} & {t.trial_id for t in one.trials}


def test_a_run_records_the_threads_its_stage_reserves(tmp_path: Path) -> None:
    sweep = {**SWEEP, "resources": {"attack": {"cpus": 2}}}
    path = tmp_path / "threads.yaml"
    path.write_text(yaml.safe_dump(sweep))
    cfg = read_config(
        path, {"results_dir": str(tmp_path / "results"), "checkpoint_dir": str(tmp_path / "ckpt")}
    )
    statuses = run_sweep(cfg, LocalExecutor(in_process=True)).statuses
    assert set(statuses.values()) == {"ok"} and len(statuses) == 3
    recorded = {}
    for file in (tmp_path / "results").glob("stage=*/dataset=*/*/*.parquet"):  # fanned out by id prefix
        rows = pq.read_table(file, columns=["stage", "threads", "determinism"]).to_pylist()
        for row in rows:
            assert f'"threads": {row["threads"]}' in row["determinism"]  # what torch was set to
            recorded.setdefault(row["stage"], set()).add(row["threads"])
    assert recorded == {"train": {1}, "attack": {2}, "diagnostic": {2}}


@pytest.mark.parametrize("workers", [1, 2])
def test_local_workers_past_the_cores_are_reported(workers: int, caplog: pytest.LogCaptureFixture) -> None:
    """Each attack trial runs every core of this machine: a second worker oversubscribes it."""
    cores = available_cpus()
    grid = _grid({"attack": {"cpus": cores}})
    with caplog.at_level(logging.WARNING, logger="qshield_dist.sweep"):
        warn_oversubscribed(LocalExecutor(workers=workers), grid.trials)
    if workers == 1:
        assert caplog.records == []
    else:
        assert len(caplog.records) == 1
        message = caplog.records[0].getMessage()
        expected = f"2 worker(s) x {cores} threads per attack, diagnostic trial = {2 * cores} threads on {cores} cores"
        assert expected in message and "--workers 1 fits" in message and "resources.<stage>.cpus" in message
