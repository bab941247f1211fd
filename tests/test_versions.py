"""Versioned results: a stage's version bump re-runs that stage and what follows, never what
comes before; rows of another version are set aside by the summary and moved by --prune; the
launcher's own manifest gives the missing-trials table its stage and dataset."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from qshield_dist import launch
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.store import ResultStore
from qshield_dist.summary.report import Options, summarize

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


def _run(sweep: Path, tmp_path: Path, *extra: str) -> int:
    return launch.main(
        [str(sweep), "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ckpt"), *extra]
    )


def _ids(results: Path, stage: str) -> set[str]:
    return {f.trial_id for f in ResultStore(results).files() if f.stage == stage}


def _checkpoint_times(ckpt: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in ckpt.glob("*.pt")}


def test_attack_version_bump_reruns_attacks_only_train_bump_reruns_both(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, ckpt = tmp_path / "results", tmp_path / "ckpt"
    assert _run(tiny, tmp_path) == 0
    train0, attack0, ckpt0 = _ids(results, "train"), _ids(results, "attack"), _checkpoint_times(ckpt)
    assert (len(train0), len(attack0), len(ckpt0)) == (3, 6, 3)

    monkeypatch.setitem(STAGE_VERSIONS, "attack", STAGE_VERSIONS["attack"] + 1)
    assert _run(tiny, tmp_path) == 0
    train1, attack1 = _ids(results, "train"), _ids(results, "attack")
    assert train1 == train0, "an attack-version bump must not re-run a train trial"
    assert _checkpoint_times(ckpt) == ckpt0, "nor retrain a model"
    assert len(attack1 - attack0) == 6, "every attack trial runs again under its new id"

    # The summary uses the current version's rows only and says why it set the others aside.
    summary = summarize(results, tmp_path / "report", Options(plots=False, proxies={}))
    old = STAGE_VERSIONS["attack"] - 1
    assert summary.results.set_aside == {f"attack version {old} (current {old + 1})": 6}
    used = set(summary.results.attack.select("trial_id").collect()["trial_id"])
    skipped = set(
        summary.results.skipped.filter(pl.col("stage") == "attack")["trial_id"]
    )  # e.g. nothing attacked
    assert used | skipped == attack1 - attack0

    monkeypatch.setitem(STAGE_VERSIONS, "train", STAGE_VERSIONS["train"] + 1)
    assert _run(tiny, tmp_path) == 0
    assert len(_ids(results, "train") - train1) == 3 and len(_ids(results, "attack") - attack1) == 6
    assert len(_checkpoint_times(ckpt)) == 6, (
        "new train ids train new checkpoints; the old ones are left alone"
    )

    # --prune moves every file of the older versions aside, lists them, deletes nothing.
    before = {p.name for p in results.rglob("*.parquet")}
    assert _run(tiny, tmp_path, "--prune") == 0
    kept = {p.name for p in results.rglob("*.parquet")}
    store = ResultStore(results, tmp_path / "ckpt")
    assert len(kept) == 9 and set(store.done(store.read_manifest()[1]).status) == set(
        store.read_manifest()[1]
    )
    (pruned,) = tmp_path.glob("results.pruned-*")
    moved = {p.name for p in pruned.rglob("*.parquet")}
    assert moved | kept == before and not moved & kept
    listing = (pruned / "moved.tsv").read_text().splitlines()
    assert len(listing) == 1 + len(moved)
    reasons = [line.split("\t")[1] for line in listing[1:]]
    old_train = STAGE_VERSIONS["train"] - 1
    assert sorted(set(reasons)) == [
        f"attack version {old} (current {old + 1})",
        f"built on a model of train version {old_train} (current {old_train + 1})",
        f"train version {old_train} (current {old_train + 1})",
    ]
    assert (reasons.count(f"train version {old_train} (current {old_train + 1})"), len(reasons)) == (3, 15)
    assert (
        _run(tiny, tmp_path, "--prune") == 0 and len(list(tmp_path.glob("results.pruned-*"))) == 1
    )  # nothing left to move


def test_missing_trials_table_has_stage_and_dataset_from_the_launchers_manifest(
    tiny: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    assert _run(tiny, tmp_path) == 0
    _, trials = ResultStore(results).read_manifest()
    assert len(trials) == 9 and {t["stage"] for t in trials.values()} == {"train", "attack"}
    removed = next(f.path for f in ResultStore(results).files() if f.stage == "attack")
    removed.unlink()
    missing = summarize(results, tmp_path / "report", Options(plots=False, proxies={})).tables.missing
    assert missing.to_dicts() == [
        {"trial_id": removed.name.removesuffix(".parquet"), "stage": "attack", "dataset": "digits"}
    ]
