"""The results store at scale: trials' files fan out into folders, `launch --compact` merges
them into parts without losing or duplicating a row even when killed at any step, and a
compacted store or one of the flat layout resumes, reports its status and summarizes as before."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from qshield_dist import launch
from qshield_dist.lease import ResultsLease
from qshield_dist.results.compact import compact
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.summary.load import load_results
from qshield_dist.summary.report import Options, summarize

REPO = Path(__file__).resolve().parents[1]


def test_no_folder_holds_more_than_about_ten_thousand_files() -> None:
    """2 x 10^4 random trial ids of one stage and dataset: under 200 result files (and logs)
    per folder, 50 times fewer than 10,000; 10^6 make about 3,900 per folder (256 folders)."""
    store = ResultStore("/results")
    rng = random.Random(0)
    keys = [TrialKey("attack", "mnist", "A" + f"{rng.getrandbits(64):016x}") for _ in range(20_000)]
    per_folder = Counter(store.trial_path(k).parent for k in keys)
    assert len(per_folder) == 256 and max(per_folder.values()) < 200
    assert {store.log_path(k).parent.name for k in keys} == {p.name for p in per_folder}
    assert all(p.parent == store.root / "stage=attack" / "dataset=mnist" for p in per_folder)


# -- compaction on the report's fixture (rows written by the store, with per-point outcomes) ---


def _fixture(root: Path) -> ResultStore:
    from report_fixture import build

    build(root)
    return ResultStore(root)


def _view(root: Path) -> dict[str, Any]:
    """What readers see of a store: each trial's rows (the file that counts), what counts as
    done, and the summary's rows (which must hold each trial once)."""
    store = ResultStore(root, root.parent / "checkpoints")  # none: train rows are not done, alike
    _, expected = store.read_manifest()
    res = load_results(root)
    attack_ids = res.attack.select("trial_id").collect()["trial_id"].to_list()
    assert len(attack_ids) == len(set(attack_ids)), "a trial's rows are summarized twice"
    return {
        "rows": store.comparable_rows(),
        "done": store.done(expected).status,
        "summary": (sorted(attack_ids), sorted(res.train["trial_id"]), sorted(res.failed["trial_id"])),
    }


def _files(root: Path) -> set[str]:
    return {f.rel for f in ResultStore(root).files()}


def _per_trial_files(root: Path) -> list[str]:
    return [f.rel for f in ResultStore(root).files() if f.trial_id is not None]


@pytest.fixture(scope="module")
def half_compacted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report fixture compacted into parts of 8 rows, then a failed trial retried with
    success (a per-trial file over a failure row in a part) and a new trial: a store with
    small parts, per-trial files and a trial in two files."""
    root = tmp_path_factory.mktemp("half") / "results"
    store = _fixture(root)
    _, expected = store.read_manifest()
    compact(store, expected, part_rows=8)
    retried = next(r for r in store.read(TrialKey("attack", "digits", "Adigits-cnn_small---0-fgsm")))
    store.write(TrialKey("attack", "digits", "Afailed-square"), [{**retried, "trial_id": "Afailed-square"}])
    store.write(TrialKey("attack", "digits", "Anew"), [{**retried, "trial_id": "Anew"}])
    store.write_manifest({"sweep": "fixture"}, {**expected, "Anew": {"stage": "attack", "dataset": "digits"}})
    return root


def test_readers_see_the_same_rows_before_and_after_compaction(tmp_path: Path) -> None:
    """statuses (a worker's view), read, done, and the summary's rows: the same on the
    per-trial files and on the parts; a retry written after the compaction wins over the
    failure row its part keeps, and the next compaction takes it."""
    root = tmp_path / "results"
    store = _fixture(root)
    _, expected = store.read_manifest()
    keys = [f for f in store.files()]
    statuses = {k.trial_id: store.statuses(k.stage, k.dataset, [k.trial_id]) for k in keys}
    rows = {k.trial_id: store.read(k, k.failed) for k in keys}
    before = _view(root)

    done = compact(store, expected, part_rows=1000)
    assert done.merged == 38 and done.removed == 38 and not _per_trial_files(root)
    assert sorted(done.parts) == [
        "stage=attack/dataset=digits/part-000001.parquet",
        "stage=attack/dataset=digits/part-000002.failed.parquet",
        "stage=attack/dataset=mnist/part-000001.parquet",
        "stage=diagnostic/dataset=digits/part-000001.parquet",
        "stage=train/dataset=digits/part-000001.parquet",
        "stage=train/dataset=mnist/part-000001.parquet",
    ]
    fresh = ResultStore(root)  # the ledger as saved: the index of the parts
    assert {k.trial_id: fresh.statuses(k.stage, k.dataset, [k.trial_id]) for k in keys} == statuses
    assert {k.trial_id: fresh.read(k, k.failed) for k in keys} == rows
    assert _view(root) == before
    assert compact(fresh, expected).parts == [], "nothing more to merge"

    failed = TrialKey("attack", "digits", "Afailed-square")
    assert fresh.statuses("attack", "digits", [failed.trial_id]) == {failed.trial_id: "failed"}
    fresh.write(failed, [{**rows["Adigits-cnn_small---0-fgsm"][0], "trial_id": failed.trial_id}])
    assert fresh.statuses("attack", "digits", [failed.trial_id]) == {failed.trial_id: "ok"}
    assert fresh.read(failed)[0]["status"] == "ok"
    assert fresh.superseded(list(fresh.files())) == {
        "stage=attack/dataset=digits/part-000002.failed.parquet": {failed.trial_id}
    }
    res = load_results(root)
    assert failed.trial_id not in res.failed["trial_id"].to_list()
    assert failed.trial_id in res.attack.select("trial_id").collect()["trial_id"].to_list()
    assert [n for n in res.notes if "another file holds the same trial" in n]
    again = compact(fresh, expected)  # the retry and the part of 19 ok rows, into one of 20
    assert (again.merged, again.rows, again.removed) == (2, 20, 2) and not _per_trial_files(root)
    assert fresh.read(failed)[0]["status"] == "ok" and fresh.done([failed.trial_id]).status == {
        failed.trial_id: "ok"
    }


KILL = """
import os, signal, sys
from qshield_dist.results.compact import compact
from qshield_dist.results.store import ResultStore

def step(name):
    if name == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)

store = ResultStore(sys.argv[1])
_, expected = store.read_manifest()
compact(store, expected, part_rows=8, on_step=step)
"""


@pytest.mark.parametrize("step", ["written", "synced", "indexed", "removing"])
def test_a_kill_at_each_step_of_compaction_loses_and_duplicates_nothing(
    half_compacted: Path, tmp_path: Path, step: str
) -> None:
    """SIGKILL (a real one, of a subprocess) after the merged file is written, after it is
    fsynced and renamed, after the index is committed, midway through the removals: every
    reader sees each trial's rows once and as before; the next --compact finishes the job."""
    root = tmp_path / "results"
    shutil.copytree(half_compacted, root)
    before = _view(root)
    files = _files(root)
    proc = subprocess.run(
        [sys.executable, "-c", KILL, str(root), step],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    now = _files(root)
    new, gone = now - files, files - now
    temporary = list(root.glob("stage=*/dataset=*/.part-*.tmp"))
    ledger = ResultStore(root).ledger
    ledger.load()
    expect = {
        # the merged file, not yet named: unnamed (O_TMPFILE) it dies with the process
        "written": (False, False, not hasattr(os, "O_TMPFILE"), False),
        "synced": (True, False, False, False),
        "indexed": (True, False, False, True),  # the saved ledger knows the new part
        "removing": (True, True, False, True),
    }[step]
    assert (bool(new), bool(gone), bool(temporary), bool(new & ledger.files.keys())) == expect
    assert _view(root) == before

    store = ResultStore(root)
    _, expected = store.read_manifest()
    compact(store, expected, part_rows=8)
    assert _view(root) == before
    assert not _per_trial_files(root), "every file merged is removed"
    assert not list(root.rglob(".*")), "no temporary file left"
    parts = sorted(str(p.relative_to(root)) for p in root.rglob("part-*"))
    rows = {p: pq.read_metadata(root / p).num_rows for p in parts}
    assert sum(rows.values()) == 40 and all(n <= 8 for n in rows.values())  # 38 + the new trial + the retry
    assert compact(ResultStore(root), expected, part_rows=8).parts == [], "a rerun finds nothing to do"


# -- a launched sweep: resume, --status and the summary on a compacted or flat store ----------


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke sweep, smaller (3 train and 6 attack trials), run once."""
    root = tmp_path_factory.mktemp("launched")
    sweep = yaml.safe_load((REPO / "sweeps/smoke.yaml").read_text())
    sweep["data"].update(train_size=120, test_size=40)
    sweep["train"]["epochs"] = 1
    sweep["eval"]["attack_size"] = 8
    (root / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    assert launch.main([*_args(root), "--workers", "1"]) == 0
    return root


def _args(root: Path) -> list[str]:
    return [str(root / "tiny.yaml"), "--results", str(root / "results"), "--checkpoints", str(root / "ckpt")]


def _copy(launched: Path, tmp_path: Path) -> Path:
    for name in ("results", "ckpt"):
        shutil.copytree(launched / name, tmp_path / name)
    shutil.copy(launched / "tiny.yaml", tmp_path / "tiny.yaml")
    return tmp_path / "results"


def _status(root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert launch.main([*_args(root), "--status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    report.pop("files_read")
    return report


def _tables(summary_dir: Path) -> dict[str, list[str]]:
    """Each CSV table's lines, sorted (the row order of a few tables varies from run to run)."""
    return {p.name: sorted(p.read_text().splitlines()) for p in sorted(summary_dir.glob("*.csv"))}


def test_compact_refuses_while_another_launcher_holds_the_directory(
    launched: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    results = _copy(launched, tmp_path)
    files = sorted(p.relative_to(results) for p in results.rglob("*.parquet"))
    with ResultsLease(results) as held:
        held.acquire()
        assert launch.main([*_args(tmp_path), "--compact"]) == 2
    assert "is in use by the launcher on host" in caplog.text
    assert sorted(p.relative_to(results) for p in results.rglob("*.parquet")) == files


def test_a_compacted_sweep_resumes_reports_and_summarizes_as_before(
    launched: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    results = _copy(launched, tmp_path)
    status = _status(tmp_path, capsys)
    summary = summarize(results, tmp_path / "before", Options(formats=("csv",), plots=False))
    assert summary.tables.verdicts.height > 0

    assert launch.main([*_args(tmp_path), "--compact"]) == 0
    assert not _per_trial_files(results)
    assert sorted(p.name for p in results.rglob("*.parquet")) == ["part-000001.parquet"] * 2
    with caplog.at_level(logging.INFO, logger="qshield_dist.sweep"):
        assert launch.main(_args(tmp_path)) == 0
    assert "9 already done, 0 to run" in caplog.text and not _per_trial_files(results), "nothing ran"
    assert _status(tmp_path, capsys) == status
    after = summarize(results, tmp_path / "after", Options(formats=("csv",), plots=False))
    assert after.tables.verdicts.equals(summary.tables.verdicts)
    assert _tables(tmp_path / "after") == _tables(tmp_path / "before")


def test_a_flat_layout_keeps_working_and_compact_migrates_it(
    launched: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A results directory written before the fan-out (every trial's file right under
    stage=/dataset=, every log under logs/) resumes as it is; --compact merges its files, moves
    the rest (a file outside the grid, the logs) into their folders and lists every move."""
    results = _copy(launched, tmp_path)
    store = ResultStore(results)
    keys = {}
    for file in list(store.files()):
        key = TrialKey(file.stage, file.dataset, file.trial_id or "")
        keys[key.trial_id] = key
        file.path.rename(store.flat_path(key, file.failed))
        store.log_path(key).rename(store.flat_log_path(key.trial_id))
    for folder in [*results.glob("stage=*/dataset=*/*"), *results.glob("logs/stage=*")]:
        if folder.is_dir():
            shutil.rmtree(folder)
    foreign = TrialKey("attack", "digits", "A00ff000000000000")  # of another sweep: not merged
    row = pq.read_table(next(store.flat_path(k) for k in keys.values() if k.stage == "attack")).to_pylist()[0]
    store.write(foreign, [{**row, "trial_id": foreign.trial_id}])
    store.trial_path(foreign).rename(store.flat_path(foreign))

    with caplog.at_level(logging.INFO, logger="qshield_dist.sweep"):
        assert launch.main(_args(tmp_path)) == 0
    assert "9 already done, 0 to run" in caplog.text
    assert all(f.rel.count("/") == 2 for f in store.files()), "nothing ran: every file is of the flat layout"
    status = _status(tmp_path, capsys)
    assert status["stages"]["attack"]["done"] == 6 and status["stages"]["train"]["done"] == 3

    with caplog.at_level(logging.INFO):
        assert launch.main([*_args(tmp_path), "--compact"]) == 0
    assert "moved 10 files of the flat layout into their folders" in caplog.text
    moved = (results / "migrated.tsv").read_text().splitlines()
    assert moved[0] == "from\tto" and len(moved) == 11
    assert (
        f"{store.flat_path(foreign).relative_to(results)}\t{store.trial_path(foreign).relative_to(results)}"
        in moved
    )
    assert all(store.log_path(k).exists() for k in keys.values()) and not list(
        (results / "logs").glob("*.log")
    )
    assert _per_trial_files(results) == [str(store.trial_path(foreign).relative_to(results))]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qshield_dist.sweep"):
        assert launch.main(_args(tmp_path)) == 0
    assert "9 already done, 0 to run" in caplog.text
    assert _status(tmp_path, capsys) == status


def test_a_superseded_flat_file_is_not_migrated_over_the_newer_rows(tmp_path: Path) -> None:
    """A failure in the flat layout, then a newer failure of the same trial in the fan-out (a
    retry that failed again): compaction merges the newer one into a part, which precedence
    ranks below the flat layout, so the old file is moved aside first (kept, never deleted)."""
    root = tmp_path / "results"
    store = _fixture(root)
    _, expected = store.read_manifest()
    (failed,) = [f for f in store.files() if f.failed]
    key = TrialKey(failed.stage, failed.dataset, failed.trial_id or "")
    row = store.read(key, failed=True)[0]
    store.write(key, [{**row, "error": "OLD failure"}])
    store.trial_path(key, failed=True).rename(store.flat_path(key, failed=True))
    store.write(key, [{**row, "error": "NEW failure"}])
    store.refresh(repair=True)
    assert store.read(key, failed=True)[0]["error"] == "NEW failure"

    done = compact(store, expected, part_rows=1000)
    assert done.set_aside == 1 and not store.flat_path(key, failed=True).exists()
    (aside,) = tmp_path.glob("results.pruned-*")
    assert aside.joinpath(store.flat_path(key, failed=True).relative_to(root)).exists(), "set aside, not lost"
    assert not store.trial_path(key, failed=True).exists(), "the newer file went into a part"
    assert ResultStore(root).read(key, failed=True)[0]["error"] == "NEW failure"
    assert store.statuses(key.stage, key.dataset, [key.trial_id]) == {key.trial_id: "failed"}


def test_a_summary_that_loses_files_to_a_compaction_says_so(tmp_path: Path) -> None:
    """Files listed, then removed before the scan (a --compact between the two): the error
    says the directory changed and to run again, not that the schema is wrong."""
    from qshield_dist.summary.load import SummaryError, collect, scan

    store = _fixture(tmp_path / "results")
    files = sorted(str(f.path) for f in store.files() if f.stage == "attack")
    query = scan(files, None, hive=True)
    os.unlink(files[0])
    with pytest.raises(SummaryError, match="disappeared while the summary read them.*run the summary again"):
        collect([query], files)
