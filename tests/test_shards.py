"""Shards of the shared attack set (issue 26): an attack trial covers one slice of a seed's
fixed permutation of the pool; a larger attack set only adds shards, whose ids and files never
depend on how many there are; bad sizes exit 2 before any compute; the summary joins shards by
point and calls a comparison with a missing shard incomplete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from qshield_dist import launch
from qshield_dist.config import SweepConfig, validate
from qshield_dist.grid import build_grid
from qshield_dist.results.store import ResultStore
from qshield_dist.summary.load import load_results
from qshield_dist.summary.tables import build_tables


def _sweep(
    attack_size: Any, shard_size: Any = 32, models: list | None = None, **eval_: Any
) -> dict[str, Any]:
    return {
        "name": "shards",
        "data": {"dataset": "digits", "train_size": 120},
        "train": {"epochs": 1},
        "eval": {"attack_size": attack_size, "shard_size": shard_size, **eval_},
        "models": models or [{"model": "cnn_small"}, {"model": "dnn"}],
        "attacks": [{"name": "fgsm"}],
    }


def _attack_ids(sweep: dict[str, Any]) -> list[str]:
    return [t.trial_id for t in build_grid(validate(SweepConfig(**sweep))).attack]


def test_a_larger_attack_set_only_adds_shards() -> None:
    three, five = _attack_ids(_sweep(96)), _attack_ids(_sweep(160))
    assert len(three) == 2 * 3 and len(five) == 2 * 5  # 2 models x 1 attack x shards
    assert set(three) < set(five)
    # `all`: the whole pool of 360 digits, the last shard short; its first shards are the same
    every = build_grid(validate(SweepConfig(**_sweep("all")))).attack
    assert len(every) == 2 * 12 and set(five) < {t.trial_id for t in every}
    assert sorted({t.points for t in every}) == [8, 32]
    # without shard_size, one shard of attack_size points: today's sweeps keep one trial each
    assert len(_attack_ids(_sweep(96, None))) == 2


@pytest.mark.parametrize(
    ("eval_", "message"),
    [
        (
            {"attack_size": 100},
            "eval.attack_size: got 100: not a whole number of shards of eval.shard_size 32;"
            " allowed: a multiple of 32 (e.g. 96 or 128), or all",
        ),
        ({"attack_size": 400, "shard_size": 40}, "eval.attack_size: got 400: more points than the pool"),
        ({"attack_size": "all", "shard_size": 500}, "eval.shard_size: got 500: more points than the pool"),
        (
            {"attack_size": 64, "pool": 400},
            "eval.pool: got 400: dataset 'digits' has 360 test images; allowed: 1 to 360, or all",
        ),
        ({"attack_size": 0}, "eval.attack_size: got 0: must be an integer >= 1 or 'all'"),
        ({"attack_size": 64, "shard_size": 0}, "eval.shard_size: got 0"),
    ],
)
def test_bad_sizes_exit_2_naming_the_key(
    eval_: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(yaml.safe_dump(_sweep(**eval_)))
    assert launch.main(["s.yaml"]) == 2
    assert message in caplog.text
    assert not Path("results").exists() and not Path("checkpoints").exists()


def _bytes(results: Path) -> dict[str, bytes]:
    return {f.trial_id: f.path.read_bytes() for f in ResultStore(results).files() if f.stage == "attack"}


# the CNN, and the paper-mode hybrid: a fresh random projection per call (stochastic)
HYBRID = [
    {"model": "cnn_small"},
    {"model": "hqcnn", "backbone": "cnn_small", "projection": "paper", "quantum_grad": "detached"},
]


def test_raising_attack_size_runs_only_the_new_shards_and_keeps_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(yaml.safe_dump(_sweep(96, models=HYBRID, eval_repeats=3)))
    assert launch.main(["s.yaml"]) == 0
    before = _bytes(Path("results/shards"))
    assert len(before) == 2 * 3
    Path("s.yaml").write_text(yaml.safe_dump(_sweep(160, models=HYBRID, eval_repeats=3)))
    assert launch.main(["s.yaml"]) == 0
    after = _bytes(Path("results/shards"))
    assert len(after) == 2 * 5 and {k: after[k] for k in before} == before

    # Clean evaluation: each shard evaluates its own 32 points (3 draws on the stochastic model),
    # never the pool of 360, and apart from the attack's call counts.
    for f in ResultStore("results/shards").files():
        if f.stage == "attack":
            row = _row(f.path)
            repeats = 3 if row["stochastic"] else 1
            details = json.loads(row["details"])
            assert row["n_test"] == row["n_points"] == len(row["point_index"]) == 32
            assert details["clean_forward_samples"] == 32 * repeats
            assert row["forward_samples"] == row["n_attacked"]  # FGSM: one gradient step, nothing else
            if row["stochastic"]:
                draws = row["point_clean_eval_wrong"]
                assert len(draws) == 32 and {len(d) for d in draws} == {3}
                assert row["point_correct"] == [sum(d) < 2 for d in draws]  # the strict majority

    # The summary joins a seed's shards by point: 160 points per model, one row per cell.
    tables = build_tables(load_results("results/shards"))
    assert tables.robustness["n_shards"].to_list() == [5, 5]
    assert tables.robustness["n_seeds"].to_list() == [1, 1]
    assert not tables.duplicates.height
    worst = tables.worst_case.filter(tables.worst_case["attack_label"] == "worst case")
    assert worst["n_points"].to_list() == [160, 160]
    (verdict,) = tables.paired.filter(tables.paired["kind"] == "vs CNN").iter_rows(named=True)
    assert verdict["n_points"] == 160 and verdict["verdict"] != "incomplete"

    # A shard lost on one side: the comparison is incomplete, never silently smaller.
    lost = next(
        f.path
        for f in ResultStore("results/shards").files()
        if f.stage == "attack" and _row(f.path)["model"] == "hqcnn" and _row(f.path)["shard"] == 4
    )
    lost.unlink()
    tables = build_tables(load_results("results/shards"))
    (verdict,) = tables.paired.filter(tables.paired["kind"] == "vs CNN").iter_rows(named=True)
    assert verdict["verdict"] == "incomplete" and "fgsm (seed 0: shard 4)" in verdict["missing_a"]


def _row(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()[0]


def test_diagnostics_compare_attacks_over_all_their_shards() -> None:
    from qshield_dist.diagnostics import join_shards

    def row(attack: str, shard: int, attacked: int, success: int) -> dict[str, Any]:
        return {
            "attack": attack,
            "attack_preset": "paper",
            "attack_params": "{}",
            "shard": shard,
            "n_points": 32,
            "n_attacked": attacked,
            "n_success": success,
            "asr": success / attacked,
        }

    fgsm, pgd = join_shards([row("fgsm", 1, 10, 10), row("fgsm", 0, 30, 0), row("pgd", 0, 30, 3)])
    assert (fgsm["n_points"], fgsm["n_attacked"], fgsm["n_success"], fgsm["asr"]) == (64, 40, 10, 0.25)
    assert pgd["asr"] == 0.1
