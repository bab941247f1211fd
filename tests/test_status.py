"""launch --status: per stage done, running, queued, failed and missing, failures grouped by
error, on a real small sweep; what SLURM says of recorded arrays; and without squeue."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qshield_dist import launch
from qshield_dist.executors.squeue import parse_task_states, task_indices
from qshield_dist.lease import RecordedArray, ResultsLease
from qshield_dist.results.ledger import Ledger
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.status import NO_SQUEUE, SQUEUE_FAILED, slurm_queue
from qshield_dist.sweep import BarProgress, StartedRecord


def _organamnist_without_test_split(path: Path) -> None:
    """A truncated download: the file is there, its test split is not, so its trials fail."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 110), ("val", 22)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 11).reshape(-1, 1)
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sweep run once: digits' 1 train and 2 attack trials ok, organamnist's 3 failed."""
    root = tmp_path_factory.mktemp("status")
    (root / "data").mkdir()
    _organamnist_without_test_split(root / "data" / "organamnist.npz")
    sweep = {
        "name": "status",
        "results_dir": str(root / "results"),
        "checkpoint_dir": str(root / "ckpt"),
        "data": {"dataset": ["digits", "organamnist"], "data_root": str(root / "data"), "train_size": 120},
        "train": {"epochs": 1},
        "eval": {"attack_size": 8},
        "models": [{"model": "dnn"}],
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 2}}],
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert launch.main([str(root / "sweep.yaml")]) == 1  # failures
    return root


@pytest.fixture()
def results(ran: Path, tmp_path: Path) -> Path:
    """A copy of the run's results and checkpoints for one test to change."""
    for name in ("results", "ckpt", "data"):
        shutil.copytree(ran / name, tmp_path / name)
    sweep = yaml.safe_load((ran / "sweep.yaml").read_text())
    sweep.update(results_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ckpt"))
    sweep["data"]["data_root"] = str(tmp_path / "data")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path


def _status(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()
    assert launch.main([str(root / "sweep.yaml"), "--status", *extra]) == 0
    return capsys.readouterr().out


def _table(text: str) -> dict[str, list[str]]:
    """The text table's rows: stage -> total, done, running, queued, [in_flight,] failed, missing
    (in_flight only where a Ray launcher has trials in flight)."""
    header, *rows = [line.split() for line in text.splitlines()[1:5]]
    columns = ["stage", "total", "done", "running", "queued", "in_flight", "failed", "missing"]
    assert header in (columns, columns[:5] + columns[6:]), header
    return {row[0]: row[1:] for row in rows}


def _attack_files(root: Path, dataset: str) -> list[Path]:
    return sorted((root / "results" / "stage=attack" / f"dataset={dataset}").glob("*/*.parquet"))


def _no_squeue_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if not (Path(d) / "squeue").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(dirs))
    assert shutil.which("squeue") is None


def test_status_counts_done_failed_and_missing_and_groups_the_errors(
    results: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_squeue_on_path(monkeypatch)
    deleted = _attack_files(results, "digits")[0]
    deleted.unlink()  # a lost result: that trial is missing
    before = sorted(p.relative_to(results) for p in results.rglob("*"))

    report = json.loads(_status(results, capsys, "--json"))
    assert report["stages"] == {
        "train": {
            "total": 2,
            "done": 1,
            "running": 0,
            "queued": 0,
            "in_flight": 0,
            "failed": 1,
            "missing": 0,
            "unknown": 0,
        },
        "attack": {
            "total": 4,
            "done": 1,
            "running": 0,
            "queued": 0,
            "in_flight": 0,
            "failed": 2,
            "missing": 1,
            "unknown": 0,
        },
        "diagnostic": {
            "total": 0,
            "done": 0,
            "running": 0,
            "queued": 0,
            "in_flight": 0,
            "failed": 0,
            "missing": 0,
            "unknown": 0,
        },
    }
    failures = report["failures"]
    assert [(f["stage"], f["count"]) for f in failures] == [("attack", 2), ("train", 1)], failures
    train_failure = failures[1]
    assert "test_images" in train_failure["error"] and "\n" not in train_failure["error"]
    key = TrialKey("train", "organamnist", train_failure["example"])
    assert ResultStore(results / "results").trial_path(key, failed=True).exists()
    attack_examples = {p.name.split(".")[0] for p in _attack_files(results, "organamnist")}
    assert failures[0]["example"] in attack_examples
    assert report["queue"] == {
        "source": "no SLURM array recorded",
        "arrays": 0,
        "unknown": 0,
        "launcher": None,
    }
    assert report["launcher"] is None

    text = _status(results, capsys)
    assert _table(text)["attack"] == ["4", "1", "0", "0", "2", "1"]
    assert f"(e.g. {train_failure['example']})" in text
    # --status writes nothing: no ledger, no lease, nothing moved
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before

    # A train trial whose checkpoint is gone is not done (resume trains it again).
    (checkpoint,) = (results / "ckpt").glob("*.pt")
    checkpoint.unlink()
    train = json.loads(_status(results, capsys, "--json"))["stages"]["train"]
    assert (train["done"], train["failed"], train["missing"]) == (0, 1, 1)


def test_status_without_squeue_says_queued_is_unknown(
    results: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials of a recorded SLURM array (a launcher submitted it) without a row: squeue is not
    there to say whether they run, wait or were lost, so they are not counted as any of those."""
    _no_squeue_on_path(monkeypatch)
    lost = _attack_files(results, "digits")[0]
    lost.unlink()
    failed_attack = _attack_files(results, "organamnist")[0].name.split(".")[0]
    done_attack = _attack_files(results, "digits")[0].stem
    lease = ResultsLease(results / "results")
    lease.record_array("4242", [[lost.stem, done_attack], [failed_attack]])

    report = json.loads(_status(results, capsys, "--json"))
    attack = report["stages"]["attack"]
    assert (attack["done"], attack["failed"], attack["missing"], attack["unknown"]) == (1, 1, 0, 2)
    assert attack["running"] is None and attack["queued"] is None
    assert report["queue"] == {"source": NO_SQUEUE, "arrays": 1, "unknown": 3, "launcher": None}
    text = _status(results, capsys)
    assert "queued: unknown (no squeue): 3 trials of 1 recorded SLURM arrays" in text
    assert _table(text)["attack"] == ["4", "1", "?", "?", "1", "0"]


def test_a_live_local_or_ray_launchers_started_trials_show_as_running_or_in_flight(
    results: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local launcher holding the directory records what its workers run; a Ray one what it
    submitted (running or waiting: Ray does not say). Believed only while the holder is live:
    once its lease is released, or left by a process that is gone, the trials are missing."""
    _no_squeue_on_path(monkeypatch)
    lost = _attack_files(results, "digits")[0]
    lost.unlink()
    failed_attack = _attack_files(results, "organamnist")[0].name.split(".")[0]
    lease = ResultsLease(results / "results")
    lease.acquire()
    try:
        lease.record_started("local", [lost.stem, failed_attack])  # a failed trial re-run
        report = json.loads(_status(results, capsys, "--json"))
        attack = report["stages"]["attack"]
        assert (attack["running"], attack["failed"], attack["missing"], attack["in_flight"]) == (2, 1, 0, 0)
        assert report["queue"]["launcher"] == "local"
        assert "running: in the local launcher's workers" in _status(results, capsys)

        lease.record_started("ray", [lost.stem])
        attack = json.loads(_status(results, capsys, "--json"))["stages"]["attack"]
        assert (attack["running"], attack["in_flight"], attack["failed"], attack["missing"]) == (0, 1, 2, 0)
        text = _status(results, capsys)
        assert _table(text)["attack"] == ["4", "1", "0", "0", "1", "2", "0"]  # with an in_flight column
        assert "running or waiting for resources" in text
    finally:
        lease.release()
    lease.record_started("local", [lost.stem])  # a record without a live holder: not believed
    attack = json.loads(_status(results, capsys, "--json"))["stages"]["attack"]
    assert (attack["running"], attack["missing"]) == (0, 1)


def test_a_local_launch_records_its_running_trials_and_clears_them(tmp_path: Path) -> None:
    """launch's StartedRecord: the lease's record follows the executor's started / finished
    calls, a burst of starts included (the ones within WRITE_EVERY_S of a write are written
    when it runs out), and is gone when the launch ends."""
    lease = ResultsLease(tmp_path)
    lease.acquire()

    def record_becomes(expected: tuple[str, list[str]]) -> bool:
        deadline = time.monotonic() + 30
        while lease.holders_started() != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return lease.holders_started() == expected

    try:
        record = StartedRecord(BarProgress(3, io.StringIO()), lease, "local")
        record.WRITE_EVERY_S = 0.2
        for key in ("a", "b", "c"):  # a burst: "a" is written at once, "b" and "c" by the timer
            record.started(key)
        assert record_becomes(("local", ["a", "b", "c"]))
        record.finished("b", "ok")
        assert record_becomes(("local", ["a", "c"]))
        record.close()
        assert lease.holders_started() is None
        time.sleep(2 * record.WRITE_EVERY_S)  # no timer writes after the close
        assert lease.holders_started() is None
    finally:
        lease.release()


def test_closing_the_record_after_an_interrupt_inside_its_lock_does_not_hang(tmp_path: Path) -> None:
    """A SIGINT/SIGTERM becomes a KeyboardInterrupt in the main thread, and CPython can raise it
    after a `with` block acquired its lock and before the block's release is armed. The launch's
    `finally` then calls close() in that same thread: it must return, not wait for itself."""
    lease = ResultsLease(tmp_path)
    lease.acquire()

    def give_up(signum: int, frame: object) -> None:
        raise TimeoutError("close() waited for a lock its own thread holds")

    previous = signal.signal(signal.SIGALRM, give_up)
    try:
        record = StartedRecord(BarProgress(1, io.StringIO()), lease, "local")
        record.started("a")
        record._lock.acquire()  # the lock an interrupted started() or finished() left held
        signal.alarm(10)
        record.close()
        signal.alarm(0)
        assert lease.holders_started() is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        lease.release()


def test_running_and_queued_follow_each_task_of_a_recorded_array(tmp_path: Path) -> None:
    """squeue's answer (its `-r -o '%i %T'` lines, a pending range among them) -> the trials of
    the running task count as running, those of waiting tasks as queued; an array that left
    the queue counts for nothing; one recorded without its tasks waits as a whole."""
    arrays = {
        "12": RecordedArray(tmp_path / "12.json", ["a", "b", "c", "d", "e"], [["a", "b"], ["c"], ["d", "e"]]),
        "13": RecordedArray(tmp_path / "13.json", ["f"], None),
        "14": RecordedArray(tmp_path / "14.json", ["g"], [["g"]]),
    }
    answers = {
        "12": parse_task_states("12_0 RUNNING\n12_[1-2%4] PENDING\n"),
        "13": parse_task_states("13_0 PENDING\n"),
        "14": {},
    }
    queue = slurm_queue(arrays, answers.get)
    assert (queue.source, queue.arrays) == ("squeue", 2)
    assert queue.running == ["a", "b"] and sorted(queue.queued) == ["c", "d", "e", "f"] and not queue.unknown

    queue = slurm_queue(arrays, {"12": None, "13": {}, "14": {}}.get)
    assert (queue.source, queue.unknown, queue.arrays) == (SQUEUE_FAILED, ["a", "b", "c", "d", "e"], 1)
    assert task_indices("12_[0-6:3,9]", "12") == [0, 3, 6, 9] and task_indices("13_1", "12") == []


def test_a_plain_job_counts_as_its_one_task(tmp_path: Path) -> None:
    """The SLURM executor submits an array of one pack as a plain job (a model's attacks in one
    task): squeue names it '15', not '15_0'; its trials run or wait all the same."""
    arrays = {
        "15": RecordedArray(tmp_path / "15.json", ["h", "i"], [["h", "i"]]),
        "16": RecordedArray(tmp_path / "16.json", ["j"], [["j"]]),
    }
    answers = {"15": parse_task_states("15 RUNNING\n"), "16": parse_task_states("16 PENDING\n")}
    queue = slurm_queue(arrays, answers.get)
    assert queue.running == ["h", "i"] and queue.queued == ["j"]
    assert task_indices("15", "15") == [0] and task_indices("15", "151") == []


def _rows(ledger: Ledger) -> list[dict]:
    return sorted(ledger.table().to_pylist(), key=lambda r: (r["rel"], r["trial_id"]))


def _entries(ledger: Ledger) -> list[dict]:
    return sorted(
        (e._asdict() for _, _, es in ledger.files.values() for e in es),
        key=lambda r: (r["rel"], r["trial_id"]),
    )


def test_the_ledger_table_is_its_entries_after_any_change(results: Path) -> None:
    """--status counts from the ledger as a table, which reuses the rows it loaded for files
    unchanged since: after a file is added, rewritten or removed and an entry updated, the
    table is still exactly the entries."""
    root = results / "results"
    ResultStore(root, results / "ckpt").refresh(repair=True)  # saves the ledger
    store = ResultStore(root, results / "ckpt")
    store.refresh()
    assert _rows(store.ledger) == _entries(store.ledger) and len(_entries(store.ledger)) == 6

    digits = _attack_files(results, "digits")
    digits[0].unlink()  # removed
    shutil.copy(digits[1], digits[1].with_name("A0000000000000000.parquet"))  # added
    failed = _attack_files(results, "organamnist")[0]
    failed.write_bytes(_attack_files(results, "organamnist")[1].read_bytes())  # rewritten
    store = ResultStore(root, results / "ckpt")
    assert store.refresh().read == 2
    (entry,) = [
        e for _, _, es in store.ledger.files.values() for e in es if e.stage == "train" and e.status == "ok"
    ]
    store.ledger.update(entry._replace(checkpoint_size=1))
    assert _rows(store.ledger) == _entries(store.ledger) and len(_entries(store.ledger)) == 6
    assert ledger_rows_for(store.ledger, entry.trial_id)["checkpoint_size"] == 1


def ledger_rows_for(ledger: Ledger, trial_id: str) -> dict:
    (row,) = [r for r in ledger.table().to_pylist() if r["trial_id"] == trial_id]
    return row
