"""A sequential launch (decide.py): looks that only add shards, decisions recorded per look,
and the same decisions as summary/sequential.decide on the prefixes of the final outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qshield_dist import launch
from qshield_dist.config import ConfigError, SweepConfig, validate
from qshield_dist.decide import run_until_decided
from qshield_dist.executors.local import LocalExecutor
from qshield_dist.results.store import ResultStore
from qshield_dist.summary.load import load_results
from qshield_dist.summary.sequential import CONTINUE, DECISIONS_FILE, decide, planned_looks
from qshield_dist.summary.tables import build_tables
from qshield_dist.summary.verdicts import in_holm_family

SWEEP = {
    "name": "until",
    "data": {"dataset": "digits", "train_size": 200, "test_size": 60},
    "train": {"epochs": 1, "batch_size": 32},
    "eval": {"attack_size": 32, "shard_size": 32, "until_decided": {"max_points": 128}},
    "models": [{"model": "cnn_small"}, {"model": "hqcnn", "backbone": "cnn_small"}],
    "attacks": [{"name": "fgsm"}],
}


def _config(tmp_path: Path, **eval_update: object) -> SweepConfig:
    sweep = {**SWEEP, "eval": {**SWEEP["eval"], **eval_update}}
    return SweepConfig(**sweep, results_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ckpt"))


def test_looks_double_in_whole_shards_within_the_pool(tmp_path: Path) -> None:
    assert planned_looks(_config(tmp_path)) == [32, 64, 128]
    # 300 is not a whole number of shards, and digits' pool has 360 points: the last look is 288
    assert planned_looks(_config(tmp_path, until_decided={"max_points": 300})) == [32, 64, 128, 256, 288]
    assert planned_looks(_config(tmp_path, until_decided={"max_points": 10_000, "ratio": 4})) == [
        32,
        128,
        352,
    ]


@pytest.mark.parametrize(
    "eval_update, key",
    [
        ({"shard_size": None}, "eval.until_decided"),
        ({"until_decided": {"max_points": 16}}, "eval.until_decided.max_points"),
    ],
)
def test_a_sequential_launch_needs_shards_and_room(tmp_path: Path, eval_update: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_config(tmp_path, **eval_update))


def test_looks_add_shards_and_their_decisions_are_the_rule_on_prefixes(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    done = run_until_decided(cfg, LocalExecutor(in_process=True))
    planned = planned_looks(cfg)
    assert [look.points for look in done] == planned[: len(done)]
    record = json.loads((cfg.results_path / DECISIONS_FILE).read_text())
    assert record["planned_looks"] == planned and "Lan-DeMets" in record["method"]
    assert [look["points"] for look in record["looks"]] == [look.points for look in done]
    # it stopped because nothing was left to continue, or at the last look
    last = record["looks"][-1]["decisions"]
    assert last and (all(d["decision"] != CONTINUE for d in last) or done[-1].points == planned[-1])
    # the report names the method, the looks and where each decision was taken
    from qshield_dist.summary.report import Options, summarize

    report = summarize(
        cfg.results_path, tmp_path / "report", Options(plots=False, formats=("md",), proxies={})
    )
    text = (tmp_path / "report" / "report.md").read_text()
    (section,) = [s for s in report.sections if s.title == "Sequential decisions"]
    assert (
        "Lan-DeMets" in text
        and f"{', '.join(str(x['points']) for x in record['looks'])} points per seed run" in text
    )
    (table,) = section.tables
    assert [row[3] for row in table.rows] == [d["decision"] for d in last]
    # each look only added shards: 2 models x (points / 32) attack trials, one file each
    store = ResultStore(cfg.results_path)
    attack_files = [f for f in store.files() if f.stage == "attack"]
    assert len(attack_files) == 2 * done[-1].points // 32
    # the decisions recorded at each look are the rule's on the first points of the final outcomes
    tables = build_tables(load_results(cfg.results_path), margin=0.02)
    (outcomes,) = tables.outcomes.values()
    # decisions.json's Holm family is the report's (verdicts.in_holm_family), at every look
    family = sum(in_holm_family(tables.paired["kind"].to_list(), tables.verdict_kind))
    assert family == 1 and all(look["holm_family"] == family for look in record["looks"])
    for k, look in enumerate(record["looks"]):
        (again,) = decide(
            [[(a[: look["points"]], b[: look["points"]]) for a, b in outcomes]], planned[: k + 1], 128, 0.02
        )
        (recorded,) = look["decisions"]
        assert (recorded["decision"], recorded["points"]) == (again.decision, again.points)
        assert recorded["low"] == pytest.approx(again.low) and recorded["high"] == pytest.approx(again.high)


def test_the_cli_flag_sets_max_points_and_bad_values_exit_2(tmp_path: Path) -> None:
    import yaml

    sweep = {**SWEEP, "eval": {"attack_size": 32, "shard_size": 32}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    args = [str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c")]
    assert launch.main([*args, "--until-decided", "0"]) == 2
    assert launch.main([*args, "--until-decided", "16"]) == 2  # fewer than attack_size
    assert launch.main([*args, "--looks", "1"]) == 2  # not a sequential launch
    assert launch.main([*args, "--until-decided", "64", "--looks", "0"]) == 2
    assert not (tmp_path / "r").exists()


def test_looks_stops_after_n_looks_and_the_next_launch_resumes(tmp_path: Path) -> None:
    import yaml

    # a margin of 0.1 pp: no interval at the first look (32 of 128 points) is that narrow
    sweep = {**SWEEP, "eval": {**SWEEP["eval"], "until_decided": {"max_points": 128, "margin": 0.001}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    args = [str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c")]
    assert launch.main([*args, "--looks", "1"]) == 0
    record = json.loads((tmp_path / "r" / DECISIONS_FILE).read_text())
    assert record["planned_looks"] == [32, 64, 128]
    assert [look["points"] for look in record["looks"]] == [32]
    assert [d["decision"] for d in record["looks"][0]["decisions"]] == [CONTINUE]
    first = {f.path: f.path.read_bytes() for f in ResultStore(tmp_path / "r").files() if f.stage == "attack"}
    assert len(first) == 2  # one shard per model
    assert launch.main([*args, "--looks", "2"]) == 0
    record = json.loads((tmp_path / "r" / DECISIONS_FILE).read_text())
    assert [look["points"] for look in record["looks"]] == [32, 64]
    attack = [f for f in ResultStore(tmp_path / "r").files() if f.stage == "attack"]
    assert len(attack) == 4 and all(first[p] == p.read_bytes() for p in first)


# ------------------------------------------------- over seeds: the training procedure's question
SEEDS_SWEEP = {
    "name": "until_seeds",
    "data": {"dataset": "digits", "train_size": 120, "test_size": 40},
    "train": {"epochs": 1, "batch_size": 32, "max_steps": 3},
    "eval": {"attack_size": 16, "until_decided": {"max_seeds": 4}},
    "seeds": [0, 1],
    "models": [{"model": "cnn_small", "name": "cnn"}, {"model": "dnn", "name": "dnn"}],
    "attacks": [{"name": "fgsm"}],
    "compare": [{"models": "dnn", "against": "cnn"}],
}


@pytest.mark.parametrize(
    "plan, key",
    [
        ({"max_seeds": 4, "max_points": 64}, "eval.until_decided: got max_points 64 and max_seeds 4"),
        ({}, "eval.until_decided: got max_points None and max_seeds None"),
        ({"max_seeds": 1}, "max_seeds"),  # fewer than 2: pydantic's own message names the key
    ],
)
def test_a_launch_over_seeds_takes_max_seeds_or_max_points_not_both(
    tmp_path: Path, plan: dict, key: str
) -> None:
    sweep = {**SEEDS_SWEEP, "eval": {"attack_size": 16, "until_decided": plan}}
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        validate(SweepConfig(**sweep, results_dir=str(tmp_path / "r")))


def test_looks_over_seeds_add_seeds_and_decide_by_the_procedure_rule(tmp_path: Path) -> None:
    """max_seeds: looks of 2 then 4 seeds at 16 points each; the second look only adds the new
    seeds' trials; the recorded decisions are decide_seeds' on the first seeds of the final
    outcomes; the report says the seeds grew."""
    from qshield_dist.summary.sequential import decide_seeds, planned_seed_looks

    cfg = SweepConfig(
        **SEEDS_SWEEP, results_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ckpt")
    )
    assert planned_seed_looks(cfg) == [2, 4]
    done = run_until_decided(cfg, LocalExecutor(in_process=True))
    record = json.loads((cfg.results_path / DECISIONS_FILE).read_text())
    assert record["unit"] == "seeds" and record["max_seeds"] == 4 and "over seeds" in record["method"]
    assert [look["seeds"] for look in record["looks"]] == [look.seeds for look in done] == [2, 4][: len(done)]
    assert all(look["points"] == 16 for look in record["looks"])
    # With 2 seeds the t interval has 1 df at a sliver of alpha: nothing is decided at look 1.
    assert record["looks"][0]["decisions"][0]["decision"] == CONTINUE and len(done) == 2
    # the second look ran only the new seeds: 2 models x 2 seeds x (train + attack)
    assert len(done[1].run.ran) == 8 and all(done[1].run.statuses[t] == "ok" for t in done[1].run.ran)
    tables = build_tables(load_results(cfg.results_path), margin=0.02)
    (outcomes,) = tables.outcomes.values()
    assert len(outcomes) == 4
    for k, look in enumerate(record["looks"]):
        (again,) = decide_seeds([outcomes[: look["seeds"]]], [2, 4][: k + 1], 4, 0.02)
        (recorded,) = look["decisions"]
        assert (recorded["decision"], recorded["points"]) == (again.decision, again.points)
        assert recorded["low"] == pytest.approx(again.low) and recorded["high"] == pytest.approx(again.high)
    from qshield_dist.summary.report import Options, summarize

    summarize(cfg.results_path, tmp_path / "report", Options(plots=False, formats=("md",), proxies={}))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "The seeds grew in looks: 2, 4 seeds run (at 16 points per seed)" in text
