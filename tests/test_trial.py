"""run_trial end to end: deterministic rows, failures as rows, checkpoint cache safety."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch
import yaml

from qshield_dist.attacks import ATTACKS
from qshield_dist.config import read_config, validate
from qshield_dist.grid import AttackTrial, build_grid
from qshield_dist.results.store import ResultStore
from qshield_dist.trial import RunContext, read_trial, run_trial

METRICS = [
    "clean_acc",
    "n_attacked",
    "n_success",
    "asr",
    "robust_acc",
    "forward_calls",
    "backward_calls",
    "linf_max",
    "l2_mean",
    "train_steps",
]


def _grid(tmp_path, models, attacks, **extra):
    spec = {
        "name": "t",
        "data": {"dataset": "digits", "train_size": 300, "test_size": 100},
        "train": {"epochs": 2},
        "eval": {"attack_size": 24},
        "models": models,
        "attacks": attacks,
        **extra,
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    return build_grid(validate(read_config(path)))


def _run_all(grid, ctx):
    return {t.trial_id: run_trial(t, ctx) for t in grid.trials}


def test_same_seed_gives_the_same_row(tmp_path):
    grid = _grid(tmp_path, [{"model": "cnn_small"}], [{"name": "pgd", "params": {"steps": 3}}])
    rows = []
    for run in ("a", "b"):
        ctx = RunContext("t", str(tmp_path / run / "results"), str(tmp_path / run / "ckpt"))
        assert set(_run_all(grid, ctx).values()) == {"ok"}
        rows.append(read_trial(ctx, grid.attack[0])[0])
    assert {k: rows[0][k] for k in METRICS} == {k: rows[1][k] for k in METRICS}
    assert rows[0]["n_points"] == 24 and 0 < rows[0]["n_attacked"] <= 24 and 0 <= rows[0]["asr"] <= 1


def test_models_of_different_clean_accuracy_answer_on_the_same_points(tmp_path):
    """The shared attack set: the same test indices for every model of a dataset and seed; a
    point a model gets wrong clean is not robust and not attacked; ASR stays the paper's."""
    grid = _grid(
        tmp_path, [{"model": "cnn_small"}, {"model": "dnn"}], [{"name": "fgsm"}], train={"epochs": 1}
    )
    ctx = RunContext("t", str(tmp_path / "results"), str(tmp_path / "ckpt"))
    assert set(_run_all(grid, ctx).values()) == {"ok"}
    rows = {r["model"]: r for t in grid.attack for r in read_trial(ctx, t)}
    small, dnn = rows["cnn_small"], rows["dnn"]
    assert small["clean_acc"] != dnn["clean_acc"]
    assert small["point_correct"] != dnn["point_correct"]  # they get different points right...
    assert (
        small["point_index"] == dnn["point_index"] and len(small["point_index"]) == 24
    )  # ...on the same points
    # the pool is the whole test split (eval.pool: all), whatever data.test_size is
    assert len(set(small["point_index"])) == 24 and all(0 <= i < 360 for i in small["point_index"])
    assert max(small["point_index"]) >= 100
    for r in (small, dnn):
        correct, broken = r["point_correct"], r["point_broken"]
        assert r["n_attacked"] == sum(correct) and r["n_success"] == sum(broken)
        assert not any(b and not c for c, b in zip(correct, broken))  # a clean-wrong point is never "broken"
        assert r["asr"] == sum(broken) / sum(correct)
        assert r["robust_acc"] == sum(c and not b for c, b in zip(correct, broken)) / 24
        assert r["point_eval_wrong"] is None  # deterministic: one evaluation


def test_a_failing_trial_is_recorded_and_others_complete(tmp_path):
    # bpda_pgd needs a hybrid model (the grid never pairs it with a CNN): forced onto one, the
    # trial fails, and that is a row, not a crash.
    grid = _grid(tmp_path, [{"model": "cnn_small"}], [{"name": "fgsm"}])
    fgsm = grid.attack[0]
    failing = AttackTrial(
        fgsm.train,
        "bpda_pgd",
        "paper",
        tuple(sorted(ATTACKS["bpda_pgd"].params("digits").items())),
        fgsm.eval,
    )
    ctx = RunContext("t", str(tmp_path / "results"), str(tmp_path / "ckpt"))
    statuses = {t.trial_id: run_trial(t, ctx) for t in [*grid.train, failing, fgsm]}
    assert statuses == {grid.train[0].trial_id: "ok", failing.trial_id: "failed", fgsm.trial_id: "ok"}
    assert ResultStore(ctx.results_dir, ctx.checkpoint_dir).done([failing.trial_id]).status == {
        failing.trial_id: "failed"
    }
    path = next((tmp_path / "results").rglob(f"{failing.trial_id}.failed.parquet"))
    row = pq.read_table(path).to_pylist()[0]
    assert (
        row["status"] == "failed"
        and "bpda_pgd applies to hqcnn" in row["error"]
        and row["attack"] == "bpda_pgd"
    )
    # every trial has its own log; the failed one holds the traceback, and a rerun appends
    failed_log = ctx.store.log_path(failing)
    text = failed_log.read_text()
    assert f"trial {failing.trial_id}" in text and "Traceback" in text and "bpda_pgd applies to hqcnn" in text
    assert f"trial {fgsm.trial_id}: ok" in ctx.store.log_path(fgsm).read_text()
    run_trial(failing, ctx)
    assert failed_log.read_text().count(": start") == 2


def test_corrupt_checkpoint_is_retrained_not_fatal(tmp_path):
    grid = _grid(tmp_path, [{"model": "cnn_small"}], [])
    ckpt = tmp_path / "ckpt"
    ctx = RunContext("t", str(tmp_path / "results"), str(ckpt))
    trial = grid.train[0]
    assert run_trial(trial, ctx) == "ok"
    path = ckpt / f"{trial.trial_id}.pt"
    good = read_trial(ctx, trial)[0]
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert run_trial(trial, ctx) == "ok"
    assert read_trial(ctx, trial)[0]["clean_acc"] == good["clean_acc"]
    assert list(ckpt.glob("*.corrupt-*")), "the unusable file is kept aside for inspection"


def test_a_transient_error_reading_a_checkpoint_is_retried_not_moved_aside(tmp_path, monkeypatch):
    """An NFS hiccup (EIO on open) is retried: the checkpoint is neither moved aside nor
    retrained, by its train trial or by an attack that loads it. An error that outlives the
    retries fails the trial, and the file stays where it is."""
    import builtins

    grid = _grid(tmp_path, [{"model": "cnn_small"}], [{"name": "fgsm"}])
    ckpt = tmp_path / "ckpt"
    ctx = RunContext("t", str(tmp_path / "results"), str(ckpt))
    trial, attack = grid.train[0], grid.attack[0]
    assert run_trial(trial, ctx) == "ok"
    path = ckpt / f"{trial.trial_id}.pt"
    before = path.stat().st_mtime_ns
    real_open, failures = builtins.open, {"left": 0}

    def flaky(file, *args, **kwargs):
        if str(file) == str(path) and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(5, "Input/output error (a transient NFS error, simulated)")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky)
    for t in (trial, attack):
        failures["left"] = 1
        assert run_trial(t, ctx) == "ok" and failures["left"] == 0, t.stage
        assert path.stat().st_mtime_ns == before and not list(ckpt.glob("*.corrupt-*")), t.stage

    from qshield_dist import fileio

    failures["left"] = 100
    monkeypatch.setattr(fileio, "READ_BACKOFF_S", 0.0)
    assert run_trial(attack, ctx) == "failed"
    assert "Input/output error" in ctx.store.read(attack, failed=True)[0]["error"]
    assert path.stat().st_mtime_ns == before and not list(ckpt.glob("*.corrupt-*"))


def test_valid_checkpoint_is_never_retrained(tmp_path):
    grid = _grid(tmp_path, [{"model": "cnn_small"}], [])
    ctx = RunContext("t", str(tmp_path / "results"), str(tmp_path / "ckpt"))
    trial = grid.train[0]
    run_trial(trial, ctx)
    path = tmp_path / "ckpt" / f"{trial.trial_id}.pt"
    before = path.stat().st_mtime_ns
    run_trial(trial, ctx)
    assert path.stat().st_mtime_ns == before


def test_checkpoint_with_non_finite_weights_is_retrained(tmp_path):
    import torch

    grid = _grid(tmp_path, [{"model": "cnn_small"}], [])
    ctx = RunContext("t", str(tmp_path / "results"), str(tmp_path / "ckpt"))
    trial = grid.train[0]
    assert run_trial(trial, ctx) == "ok"
    path = tmp_path / "ckpt" / f"{trial.trial_id}.pt"
    blob = torch.load(path, weights_only=True)
    next(v for v in blob["state_dict"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(blob, path)
    assert run_trial(trial, ctx) == "ok"
    reloaded = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in reloaded.values() if v.is_floating_point())


def test_training_counts_only_the_batches_it_runs():
    """129 samples in batches of 128: the last batch (one sample) is skipped, so an epoch is
    one step and three epochs are three, not six epochs of one step each."""
    from qshield_dist.config import TrainConfig
    from qshield_dist.train import train_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.LogSoftmax(dim=1))
    x, y = torch.randn(129, 4), torch.randint(0, 3, (129,))
    stats = train_model(model, x, y, TrainConfig(epochs=3, batch_size=128), seed=0)
    assert (stats.epochs, stats.steps) == (3, 3)
    stats = train_model(model, x[:7], y[:7], TrainConfig(epochs=2, batch_size=3), seed=0)  # 3 + 3 + 1
    assert (stats.epochs, stats.steps) == (2, 4)


def test_a_points_outcome_does_not_depend_on_the_batch_size(tmp_path):
    """Per-point random streams (attacks/streams.py): the same sweep with an attack batch of 64
    and of 5 breaks the same points, with the same AutoAttack components, and crafts the same
    adversarial images (same linf/l2). On main 49c6f05 a point's random start came from its
    batch, so APGD and Square moved with the batch size."""
    models = [{"model": "cnn_small"}, {"model": "hqcnn", "backbone": "cnn_small", "entanglement": "star"}]
    attacks = [
        {"name": "pgd", "preset": "standard", "params": {"steps": 5}},
        {"name": "apgd", "preset": "standard", "params": {"steps": 10, "n_restarts": 3}},
        {"name": "square", "params": {"n_queries": 30}},
        {"name": "autoattack", "params": {"version": "fast"}},
    ]
    outcomes = []
    for batch in (64, 5):
        (tmp_path / str(batch)).mkdir()
        grid = _grid(tmp_path / str(batch), models, attacks, eval={"attack_size": 40, "batch_size": batch})
        ctx = RunContext("t", str(tmp_path / str(batch) / "results"), str(tmp_path / "ckpt"))
        assert set(_run_all(grid, ctx).values()) == {"ok"}
        rows = [read_trial(ctx, t)[0] for t in grid.attack]
        outcomes.append(
            {
                (r["variant"], r["attack"]): (
                    r["point_broken"],
                    r["point_broken_by"],
                    r["linf_max"],
                    r["l2_mean"],
                )
                for r in rows
            }
        )
    assert outcomes[0] == outcomes[1]
    # the sweep exercises what it claims: random attacks that break some points and miss others
    broken = [sum(v[0]) for v in outcomes[0].values()]
    assert any(0 < b < 40 for b in broken)
    assert any(v[1] and any(v[1]) for v in outcomes[0].values())


def test_the_majority_rule_decides_point_broken_from_each_evaluation(tmp_path):
    """A stochastic model (Gaussian input noise) through run_attack: every point's
    `point_broken` is the strict majority of its `point_eval_wrong`, n_success counts them, and
    the rule is what decides (some points are wrong on some draws and right on others)."""
    model = {"model": "hqcnn", "backbone": "cnn_small", "input_noise": 0.4, "entanglement": "full"}
    grid = _grid(tmp_path, [model], [{"name": "fgsm", "params": {"eps": 0.06}}], eval={"attack_size": 100})
    ctx = RunContext("t", str(tmp_path / "results"), str(tmp_path / "ckpt"))
    assert set(_run_all(grid, ctx).values()) == {"ok"}
    (row,) = read_trial(ctx, grid.attack[0])
    assert row["stochastic"] and row["eval_repeats"] == 5
    split = 0
    for correct, broken, evals in zip(row["point_correct"], row["point_broken"], row["point_eval_wrong"]):
        if not correct:
            assert not broken and evals == []
            continue
        assert len(evals) == 5 and broken == (2 * sum(evals) > 5)
        split += 0 < sum(evals) < 5
    assert split > 0  # draws disagree on some points: the rule, not one draw, decides them
    assert row["n_success"] == sum(row["point_broken"])
