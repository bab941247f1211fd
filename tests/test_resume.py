"""Resume trusts artifacts, not names: rows of the current schema, train rows whose checkpoint
is there and matches, result files that decode; diagnostics only on attacks that are all ok;
one launcher per results directory; the summary keeps a renamed sweep's rows."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from qshield_dist import launch
from qshield_dist.config import read_config
from qshield_dist.executors.local import LocalExecutor
from qshield_dist.results.schema import VOLATILE_COLUMNS
from qshield_dist.summary.report import Options, summarize
from qshield_dist.sweep import prepare, run_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """The smoke sweep, smaller: 3 train and 6 attack trials in a few seconds each."""
    sweep = yaml.safe_load((REPO / "sweeps/smoke.yaml").read_text())
    sweep["data"].update(train_size=120, test_size=40)
    sweep["train"]["epochs"] = 1
    sweep["eval"]["attack_size"] = 8
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _launch(sweep: Path, tmp_path: Path, *extra: str) -> int:
    return launch.main(
        [str(sweep), "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ckpt"), *extra]
    )


def _files(results: Path, stage: str = "*") -> dict[str, Path]:
    """trial id -> its ok result file (names only: what the test itself looks at)."""
    return {
        p.stem: p for p in results.glob(f"stage={stage}/dataset=*/*/*.parquet") if ".failed" not in p.name
    }


def _comparable(path: Path) -> list[dict[str, Any]]:
    """A file's rows without the volatile columns; NaN (an ASR over no attacked point) as a
    marker, since NaN != NaN would make two identical rows differ."""
    return [
        {
            k: "NaN" if isinstance(v, float) and math.isnan(v) else v
            for k, v in row.items()
            if k not in VOLATILE_COLUMNS
        }
        for row in pq.read_table(path).to_pylist()
    ]


def _set_aside(tmp_path: Path) -> list[Path]:
    return sorted(p for d in tmp_path.glob("results.pruned-*") for p in d.rglob("*.parquet"))


def test_an_older_schema_file_in_the_grid_is_run_again_and_kept_aside(tiny: Path, tmp_path: Path) -> None:
    assert _launch(tiny, tmp_path) == 0
    results = tmp_path / "results"
    trial_id, path = sorted(_files(results, "attack").items())[0]
    before = _comparable(path)
    table = pq.read_table(path)
    current = table.column("schema_version")[0].as_py()
    index = table.schema.get_field_index("schema_version")
    older = table.set_column(index, "schema_version", pa.array([current - 1] * table.num_rows, pa.int32()))
    pq.write_table(older, path)

    assert _launch(tiny, tmp_path) == 0
    assert pq.read_table(path).column("schema_version").to_pylist() == [current], "the trial ran again"
    assert _comparable(path) == before
    (kept,) = _set_aside(tmp_path)
    assert (
        kept.name == f"{trial_id}.parquet"
        and pq.read_table(kept).column("schema_version")[0].as_py() == current - 1
    )
    moved = next(tmp_path.glob("results.pruned-*/moved.tsv")).read_text()
    assert f"schema version {current - 1} (current {current})" in moved


def test_a_deleted_checkpoint_is_retrained_and_its_attacks_run(tiny: Path, tmp_path: Path) -> None:
    """After a scratch purge: the train trial whose checkpoint is gone runs again (same id, an
    equal state_dict, equal rows apart from the volatile columns), and an attack trial of that
    model that must run works, where it used to fail on every --retry-failed."""
    assert _launch(tiny, tmp_path) == 0
    results, ckpt = tmp_path / "results", tmp_path / "ckpt"
    train = _files(results, "train")
    attacks = _files(results, "attack")
    baseline_id = next(
        t for t, p in train.items() if pq.read_table(p).column("model")[0].as_py() == "cnn_small"
    )
    own = {a: p for a, p in attacks.items() if pq.read_table(p).column("train_id")[0].as_py() == baseline_id}
    attack_id, attack_path = sorted(own.items())[0]
    rows = {t: _comparable(p) for t, p in [*train.items(), *own.items()]}
    weights = torch.load(ckpt / f"{baseline_id}.pt", weights_only=True)["state_dict"]

    (ckpt / f"{baseline_id}.pt").unlink()
    attack_path.unlink()  # an attack of that model must run again too
    assert _launch(tiny, tmp_path) == 0

    again = torch.load(ckpt / f"{baseline_id}.pt", weights_only=True)["state_dict"]
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert {t: _comparable(p) for t, p in _files(results).items() if t in rows} == rows
    assert not list(results.rglob("*.failed.parquet"))
    assert _launch(tiny, tmp_path) == 0 and len(_files(results)) == 9


def test_a_truncated_result_file_is_run_again_and_kept_aside(tiny: Path, tmp_path: Path) -> None:
    assert _launch(tiny, tmp_path) == 0
    results = tmp_path / "results"
    trial_id, path = sorted(_files(results, "attack").items())[-1]
    before, data = _comparable(path), path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    assert _launch(tiny, tmp_path) == 0
    assert _comparable(path) == before
    (kept,) = _set_aside(tmp_path)
    assert kept.name == f"{trial_id}.parquet" and kept.read_bytes() == data[: len(data) // 2], (
        "kept, not deleted"
    )
    assert "corrupt Parquet" in next(tmp_path.glob("results.pruned-*/moved.tsv")).read_text()


def test_a_diagnostic_waits_for_its_attacks_and_runs_once_they_are_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PGD fails (a monkeypatch, in this process): the model's diagnostic is not run and says
    it waits; without --retry-failed it still waits; once --retry-failed makes PGD ok, it runs,
    on both attacks' rows."""
    sweep = {
        "name": "held",
        "data": {"dataset": "digits", "train_size": 120, "test_size": 60},
        "train": {"epochs": 2},
        "eval": {"attack_size": 8, "diagnostics": True, "diagnostic_size": 8},
        "models": [{"model": "cnn_small"}],
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 3}}],
        "results_dir": str(tmp_path / "results"),
        "checkpoint_dir": str(tmp_path / "ckpt"),
    }
    path = tmp_path / "held.yaml"
    path.write_text(yaml.safe_dump(sweep))
    cfg = read_config(path)
    grid = prepare(cfg)
    pgd = next(t.trial_id for t in grid.attack if t.attack == "pgd")
    # the checks on the attack rows wait for them; those that attack the model do not
    (diagnostic,) = [t.trial_id for t in grid.diagnostic if t.attack_ids]
    (on_model,) = [t.trial_id for t in grid.diagnostic if not t.attack_ids]

    from qshield_dist import trial

    real = trial.build_attack

    def pgd_fails(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pgd":
            raise RuntimeError("pgd broke (test)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(trial, "build_attack", pgd_fails)
    statuses = run_sweep(cfg, LocalExecutor(in_process=True)).statuses
    assert statuses[pgd] == "failed" and statuses[diagnostic] == "waiting" and statuses[on_model] == "ok"
    assert not list((tmp_path / "results").glob(f"stage=diagnostic/**/{diagnostic}*.parquet")), (
        "a diagnostic on incomplete inputs"
    )

    monkeypatch.setattr(trial, "build_attack", real)
    statuses = run_sweep(cfg, LocalExecutor(in_process=True)).statuses
    assert statuses[pgd] == "failed" and statuses[diagnostic] == "waiting"

    statuses = run_sweep(cfg, LocalExecutor(in_process=True), retry_failed=True).statuses
    assert statuses[pgd] == "ok" and statuses[diagnostic] == "ok"
    (diag_file,) = (tmp_path / "results").glob(f"stage=diagnostic/*/*/{diagnostic}.parquet")
    rows = pq.read_table(diag_file).to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert all(json.loads(r["inputs"]) == {t.trial_id: "ok" for t in grid.attack} for r in rows)


def test_a_second_launcher_exits_2_naming_the_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A launcher is running (a subprocess, inside a long first trial): a second one on the same
    results directory exits 2 and names the first one's host, pid and start time; --take-over
    is refused while its heartbeat is fresh."""
    sweep = yaml.safe_load((REPO / "sweeps/smoke.yaml").read_text())
    sweep["train"]["epochs"] = 400  # a first trial of a minute or more
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(sweep))
    args = [str(path), "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ckpt")]
    first = subprocess.Popen(
        [sys.executable, "-m", "qshield_dist.launch", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while "to run on local" not in (line := first.stderr.readline()):
            assert line and time.time() < deadline, "the first launcher never started its trials"
        for extra in ([], ["--take-over"]):
            caplog.clear()
            assert launch.main([*args, *extra]) == 2
            assert f"host {socket.gethostname()}, pid {first.pid}, started " in caplog.text
            assert json.loads((tmp_path / "results" / "lease.json").read_text())["started_at"] in caplog.text
            assert "--take-over is refused while its heartbeat is fresh" in caplog.text
        assert first.poll() is None, "the first launcher is untouched"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 130
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # never leave a worker behind, pass or fail
        except ProcessLookupError:
            pass
        first.wait()
    assert not (tmp_path / "results" / "lease.json").exists(), "an interrupted launcher releases its lease"


def test_a_stale_lease_is_taken_over_only_when_asked(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease left by a launcher on another host, not touched for longer than STALE_S: a
    relaunch says so and how to take over; --take-over takes it and runs."""
    from qshield_dist.lease import LEASE, STALE_S

    results = tmp_path / "results"
    results.mkdir()
    lease = results / LEASE
    lease.write_text('{"host": "login-7", "pid": 4242, "started_at": "2026-01-02T03:04:05Z", "token": "x"}')
    old = time.time() - STALE_S - 60
    os.utime(lease, (old, old))
    assert _launch(tiny, tmp_path) == 2
    assert "host login-7, pid 4242, started 2026-01-02T03:04:05Z" in caplog.text
    assert "run again with --take-over" in caplog.text
    assert not (results / "stage=train").exists(), "nothing ran"
    assert _launch(tiny, tmp_path, "--take-over") == 0
    assert len(_files(results)) == 9 and not lease.exists()
    assert list(results.glob(f"{LEASE}.taken-*")), "the old lease is kept beside, for the record"


def test_renaming_the_sweep_keeps_its_rows_in_the_report(tiny: Path, tmp_path: Path) -> None:
    """The summary selects rows by the manifest's trial ids, not by the (volatile) sweep name:
    after a rename, nothing runs again, a trial that does run carries the new name, and the
    verdicts are the same rows."""
    results = tmp_path / "results"
    assert _launch(tiny, tmp_path) == 0
    before = summarize(results, tmp_path / "report0", Options(plots=False, proxies={}))

    sweep = yaml.safe_load(tiny.read_text())
    sweep["name"] = "renamed"
    tiny.write_text(yaml.safe_dump(sweep))
    assert _launch(tiny, tmp_path) == 0
    assert len(_files(results)) == 9
    next(iter(_files(results, "attack").values())).unlink()  # one trial runs under the new name
    assert _launch(tiny, tmp_path) == 0
    names = {pq.read_table(p).column("sweep")[0].as_py() for p in _files(results).values()}
    assert names == {"smoke", "renamed"}

    after = summarize(results, tmp_path / "report1", Options(plots=False, proxies={}))
    assert after.results.sweep == "renamed"
    assert after.tables.verdicts.height > 0 and after.tables.verdicts.equals(before.tables.verdicts)
    assert after.tables.missing.height == 0
    assert not [n for n in after.tables.notes if "belongs to sweep" in n]


def test_dry_run_needs_no_lease(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qshield_dist.lease import ResultsLease

    assert _launch(tiny, tmp_path) == 0
    with ResultsLease(tmp_path / "results") as held:
        held.acquire()
        assert _launch(tiny, tmp_path, "--dry-run") == 0
        assert "9 already done" in capsys.readouterr().out
        assert _launch(tiny, tmp_path, "--prune") == 2, "--prune moves files: it needs the lease"


def test_a_transient_error_reading_a_result_file_is_no_corruption(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """An OSError that outlives the retries leaves the file where it is (its trial runs again)."""
    from qshield_dist import fileio

    assert _launch(tiny, tmp_path) == 0
    results = tmp_path / "results"
    path = sorted(_files(results, "attack").values())[0]
    (results / "ledger.arrow").unlink()  # every file is read again
    real_open = open
    monkeypatch.setattr(fileio, "READ_BACKOFF_S", 0.0)

    def flaky(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise OSError(5, "Input/output error (test)")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", flaky)
    assert _launch(tiny, tmp_path) == 0
    monkeypatch.setattr("builtins.open", real_open)
    assert not _set_aside(tmp_path) and path.exists()
