"""The public API, as `import qshield_dist` gives it: load_config from a dict, run_sweep's frames
and statuses, a second call that resumes, summarize's frames against the report it writes, and
no file written without `out`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import qshield_dist
from qshield_dist.executors.local import LocalExecutor

sys.path.insert(0, str(Path(__file__).parent))
from report_fixture import build  # noqa: E402

SWEEP: dict[str, Any] = {
    "name": "api_tiny",
    "data": {"dataset": "digits", "train_size": 120, "test_size": 60},
    "train": {"epochs": 1},
    "eval": {"attack_size": 8},
    "models": [{"model": "cnn_small"}],
    "attacks": [{"name": "fgsm"}],
}


def _tree(root: Path) -> dict[str, int]:
    """Every file under root -> its modification time (ns)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _run(root: Path) -> qshield_dist.SweepRun:
    config = qshield_dist.load_config(
        SWEEP, results_dir=str(root / "results"), checkpoint_dir=str(root / "ckpt")
    )
    return qshield_dist.run_sweep(config, LocalExecutor(in_process=True))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, qshield_dist.SweepRun]:
    root = tmp_path_factory.mktemp("api")
    return root, _run(root)


def test_run_sweep_returns_statuses_and_the_rows(first: tuple[Path, qshield_dist.SweepRun]) -> None:
    root, run = first
    assert run.results_dir == root / "results"
    trials = run.trials.sort("stage", descending=True)
    assert trials["stage"].to_list() == ["train", "attack"]
    assert trials["status"].to_list() == ["ok", "ok"] and trials["ran"].all()
    train_id, attack_id = trials["trial_id"]
    assert run.statuses == {train_id: "ok", attack_id: "ok"}
    (train,) = run.train.iter_rows(named=True)
    assert train["trial_id"] == train_id and train["model"] == "cnn_small" and 0 < train["clean_acc"] <= 1
    (attack,) = run.attack.iter_rows(named=True)
    assert attack["trial_id"] == attack_id and attack["train_id"] == train_id
    assert attack["attack"] == "fgsm" and attack["n_points"] == 8 and attack["dataset"] == "digits"
    assert run.diagnostic.height == 0 and run.failed.height == 0


def test_a_second_call_resumes(first: tuple[Path, qshield_dist.SweepRun]) -> None:
    """Nothing re-runs and no file changes; with the attack's result file gone, only the attack
    runs again (the train trial is done: its row and checkpoint stand)."""
    root, run = first
    result_files = {k: v for k, v in _tree(root / "results").items() if k.startswith("stage=")}
    again = _run(root)
    assert again.statuses == run.statuses and not again.trials["ran"].any()
    assert {k: v for k, v in _tree(root / "results").items() if k.startswith("stage=")} == result_files
    attack_id = run.trials.filter(pl.col("stage") == "attack")["trial_id"].item()
    (attack_file,) = (root / "results").glob(f"stage=attack/*/*/{attack_id}.parquet")
    attack_file.unlink()
    resumed = _run(root)
    assert resumed.statuses == run.statuses
    assert resumed.trials.filter("ran")["trial_id"].to_list() == [attack_id]


def test_a_fresh_process_resumes_without_torch(first: tuple[Path, qshield_dist.SweepRun]) -> None:
    """A call with nothing left to run, in a new interpreter (as a relaunch is), runs nothing
    and does not import torch: it starts in seconds."""
    root, run = first
    code = f"""
import sys, qshield_dist
config = qshield_dist.load_config({json.dumps(SWEEP)}, results_dir={str(root / "results")!r},
                                  checkpoint_dir={str(root / "ckpt")!r})
run = qshield_dist.run_sweep(config)
assert not run.trials["ran"].any() and set(run.statuses.values()) == {{"ok"}}, run.trials
assert "torch" not in sys.modules
print(len(run.statuses))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == str(len(run.statuses)), proc.stderr[-3000:]


def test_summarize_a_run_writes_nothing(first: tuple[Path, qshield_dist.SweepRun]) -> None:
    root, run = first
    before = _tree(root)
    report = qshield_dist.summarize(run)
    assert report.written == () and _tree(root) == before
    (row,) = report.robustness.iter_rows(named=True)
    assert row["model"] == "cnn_small" and row["attack"] == "fgsm" and row["n_attacked"] >= 1
    assert report.verdicts.height == 0, "one CNN and no hybrid: nothing to compare"


def test_summarize_returns_the_verdicts_the_report_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the report fixture (known verdicts, no compute): the frames without `out` write no
    file, anywhere under the working directory; with `out`, verdicts.csv holds the same rows."""
    results = tmp_path / "results"
    build(results)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    report = qshield_dist.summarize(results)
    assert report.written == () and _tree(tmp_path) == before
    assert report.verdicts.height >= 3 and report.worst_case.height and report.cost.height
    assert "more robust" in report.verdicts["category"].to_list()

    out = tmp_path / "report"
    written = qshield_dist.summarize(str(results), out=out, formats=("csv",), plots=False)
    assert out / "verdicts.csv" in written.written and all(Path(p).parent == out for p in written.written)
    on_disk = pl.read_csv(out / "verdicts.csv", schema=report.verdicts.schema)
    assert on_disk.equals(report.verdicts) and written.verdicts.equals(report.verdicts)


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"models": [{"model": "resnet"}]}, ["models[0].model: got 'resnet'", "'cnn_small'"]),
        ({"modles": []}, ["modles: unknown key", "allowed keys: name,"]),
        ({"name": None}, ["name: missing; it is required"]),
        ({"attacks": [{"name": "fgsm", "params": {"eps": "big"}}]}, ["attacks[0].params.eps", "'big'"]),
    ],
)
def test_bad_config_raises_naming_the_key(change: dict[str, Any], fragments: list[str]) -> None:
    sweep = {k: v for k, v in {**SWEEP, **change}.items() if v is not None}
    copy = {**sweep}
    with pytest.raises(qshield_dist.ConfigError) as err:
        qshield_dist.load_config(sweep, results_dir=os.devnull)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    assert sweep == copy, "the caller's dict is left as it was"
