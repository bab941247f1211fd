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


# ---------------------------------------------------------------- evaluate: the user's own module
USER_NET = """
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.body(x)
"""
EVAL_DATA = {"dataset": "digits", "train_size": 120, "test_size": 40}
EVAL_TRAIN = {"epochs": 1, "batch_size": 32, "max_steps": 3}  # the baseline CNN's
EVAL_ATTACKS = [{"name": "fgsm"}, {"name": "pgd", "preset": "standard", "params": {"steps": 2}}]
EVAL_POINTS = 16
CATEGORIES = {"more robust", "less robust", "equal", "undecided"}


def _import(path: Path, name: str) -> Any:
    """The module at `path`, imported as a user's script imports it (its folder on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _state_file(net: Any, path: Path) -> Path:
    """The state_dict as evaluate saves it (torch.save into a buffer): the same bytes, the same ids."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buffer)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def own_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A model class in a .py file outside the package, imported, and trained a little in memory."""
    import torch
    import torch.nn.functional as F

    from qshield_dist.data import load

    root = tmp_path_factory.mktemp("own")
    (root / "user").mkdir()
    source = root / "user" / "usernet.py"
    source.write_text(USER_NET)
    torch.manual_seed(0)
    net = _import(source, "usernet").TinyNet(width=16)
    train = load("digits", train_size=120, test_size=40)[0]
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(net(train.x), train.y).backward()
        opt.step()
    return root, net


def _points(results: Path) -> dict[str, tuple[Any, ...]]:
    """Each attack trial's numbers, point by point, as its Parquet file holds them."""
    import pyarrow.parquet as pq

    keys = ("robust_acc", "n_success", "point_index", "point_correct", "point_broken")
    rows = [
        r for f in sorted(results.glob("stage=attack/*/*/*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    return {r["trial_id"]: tuple(r[k] for k in keys) for r in rows}


def _verdict(report: qshield_dist.Report) -> dict[str, Any]:
    """The one verdict row, with the attacks, points and seeds of its paired comparison."""
    (verdict,) = report.verdicts.iter_rows(named=True)
    paired = report.tables.paired.filter(
        (pl.col("a") == verdict["vkey"])
        & (pl.col("b") == verdict["vkey_b"])
        & (pl.col("eps") == verdict["eps"])
    )
    (pair,) = paired.iter_rows(named=True)
    return {**verdict, **{k: pair[k] for k in ("attacks", "n_points", "n_seeds", "robust_a", "robust_b")}}


def test_a_model_of_the_users_file_gets_a_verdict_by_yaml_and_by_evaluate(own_net: tuple[Path, Any]) -> None:
    """(a) The class's file as `model: custom` with its saved state_dict in a sweep YAML, compared
    with the CNN by `compare:`; (b) the module in memory through evaluate(). Both give a verdict
    row over both attacks, 16 points and 1 seed; they are the same trials (ids), computed apart
    (their own results and checkpoints), with the same numbers."""
    import torch
    import yaml

    from qshield_dist.data import load

    root, net = own_net
    source = root / "user" / "usernet.py"
    weights = _state_file(net, root / "tinynet.pt")
    sweep = {
        "name": "own_yaml",
        "data": EVAL_DATA,
        "train": EVAL_TRAIN,
        "eval": {"attack_size": EVAL_POINTS},
        "seeds": [0],
        "models": [
            {
                "name": "mine",
                "model": "custom",
                "factory": f"{source}:TinyNet",
                "kwargs": {"width": 16},
                "weights": str(weights),
            },
            {"name": "cnn", "model": "cnn"},
        ],
        "attacks": EVAL_ATTACKS,
        "compare": [{"models": "mine", "against": "cnn"}],
    }
    (root / "own.yaml").write_text(yaml.safe_dump(sweep))
    config = qshield_dist.load_config(
        root / "own.yaml", results_dir=str(root / "yaml"), checkpoint_dir=str(root / "ckpt_yaml")
    )
    by_yaml = qshield_dist.run_sweep(config, LocalExecutor(in_process=True))
    yaml_report = qshield_dist.summarize(by_yaml)

    torch.manual_seed(12345)  # not the state the trials above left behind
    rng = torch.get_rng_state()
    report = qshield_dist.evaluate(
        net,
        dataset="digits",
        attacks=["fgsm", EVAL_ATTACKS[1]],
        points=EVAL_POINTS,
        seeds=0,
        baseline="cnn",
        kwargs={"width": 16},
        results_dir=root / "evaluate",
        executor=LocalExecutor(in_process=True),
        sweep={
            "data": {"train_size": 120, "test_size": 40},
            "train": EVAL_TRAIN,
            "checkpoint_dir": str(root / "ckpt_eval"),
        },
    )
    assert torch.equal(torch.get_rng_state(), rng), "the caller's random stream is left as it was"
    by_evaluate = report.run
    assert by_evaluate is not None and by_evaluate.results_dir == root / "evaluate"
    assert set(by_yaml.statuses.values()) == set(by_evaluate.statuses.values()) == {"ok"}
    assert (
        by_evaluate.statuses.keys() == by_yaml.statuses.keys()
        and len(by_yaml.ran) == len(by_evaluate.ran) == 6
    )

    for r in (yaml_report, report):
        row = _verdict(r)
        assert row["category"] in CATEGORIES and row["baseline"] == "cnn" and row["dataset"] == "digits"
        assert "fgsm" in row["attacks"] and "pgd" in row["attacks"]
        assert row["n_points"] == EVAL_POINTS and row["n_seeds"] == 1
    numbers = ("category", "eps", "diff", "low", "high", "attacks", "n_points", "robust_a", "robust_b")
    assert {k: _verdict(report)[k] for k in numbers} == {k: _verdict(yaml_report)[k] for k in numbers}
    assert _points(root / "evaluate") == _points(root / "yaml") and len(_points(root / "yaml")) == 4

    # the model was loaded, not trained: its clean accuracy is the module's own on the test split
    mine = by_evaluate.train.filter(pl.col("model") == "custom").row(0, named=True)
    test = load("digits", train_size=120, test_size=40)[1]
    with torch.no_grad():
        accuracy = float((net(test.x).argmax(1) == test.y).float().mean())
    assert mine["train_steps"] == 0 and mine["clean_acc"] == pytest.approx(accuracy)

    again = qshield_dist.evaluate(
        net,
        attacks=["fgsm", EVAL_ATTACKS[1]],
        points=EVAL_POINTS,
        kwargs={"width": 16},
        results_dir=root / "evaluate",
        executor=LocalExecutor(in_process=True),
        sweep={
            "data": {"train_size": 120, "test_size": 40},
            "train": EVAL_TRAIN,
            "checkpoint_dir": str(root / "ckpt_eval"),
        },
    )
    assert again.run is not None and not again.run.ran and again.verdicts.equals(report.verdicts)

    # The model's folder changes after the run (a module added beside it): summarizing the run's
    # directory again keeps its compare: verdict, which the manifest holds as launched.
    extra = source.parent / "notes.py"
    extra.write_text("NOTE = 1\n")
    try:
        later = qshield_dist.summarize(root / "yaml")
    finally:
        extra.unlink()
    assert later.verdicts.equals(yaml_report.verdicts) and later.verdicts.height == 1


SCALED_NET = """
import torch.nn as nn


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.scale = 1.0  # a plain attribute: not in the state_dict

    def forward(self, x):
        return self.scale * self.body(x)
"""
SELF_CALLING_NET = """
import torch.nn as nn

import qshield_dist


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x):
        return self.body(x)


if __name__ == "selfcall":  # as a script without `if __name__ == "__main__":` would, once imported by its name
    qshield_dist.evaluate(Net())
"""


def _no_source_file() -> Any:
    """A class as a REPL defines it: its module has no file."""
    import types

    repl = types.ModuleType("repl_session")
    sys.modules["repl_session"] = repl
    exec(USER_NET, repl.__dict__)
    return repl.TinyNet(width=4)


def _in_a_function() -> Any:
    import torch.nn as nn

    class Local(nn.Module):
        def forward(self, x: Any) -> Any:
            return x

    return Local()


def _torchs_own() -> Any:
    import torch.nn as nn

    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


@pytest.mark.parametrize(
    "make, kwargs, fragments",
    [
        (_no_source_file, {"width": 4}, ["model: repl_session.TinyNet has no source file", "REPL"]),
        (_in_a_function, {}, ["_in_a_function.<locals>.Local is defined inside a function"]),
        (_torchs_own, {}, ["torch.nn.modules.container.Sequential", "installed package"]),
        (lambda: "a module", {}, ["model: got a str: must be a torch.nn.Module"]),
    ],
)
def test_evaluate_refuses_a_model_it_cannot_rebuild(
    make: Any, kwargs: dict[str, Any], fragments: list[str], tmp_path: Path
) -> None:
    with pytest.raises(ValueError) as err:
        qshield_dist.evaluate(make(), kwargs=kwargs, results_dir=tmp_path / "results")
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    assert not (tmp_path / "results").exists()


def test_evaluate_refuses_wrong_kwargs_and_state_outside_the_state_dict(
    own_net: tuple[Path, Any], tmp_path: Path
) -> None:
    """TinyNet needs `width`; a module whose forward reads an attribute set after construction is
    not what a trial rebuilds from its class and state_dict: both refused before any trial."""
    _, net = own_net
    with pytest.raises(ValueError, match=r"kwargs: got \{\}: TinyNet\(width\) cannot be called with them"):
        qshield_dist.evaluate(net, results_dir=tmp_path / "results")
    (tmp_path / "scaled").mkdir()
    (tmp_path / "scaled" / "scaled.py").write_text(SCALED_NET)
    scaled = _import(tmp_path / "scaled" / "scaled.py", "scaled").Scaled()
    scaled.scale = 3.0
    with pytest.raises(ValueError, match="computes other logits than the module passed") as err:
        qshield_dist.evaluate(
            scaled, results_dir=tmp_path / "results", sweep={"checkpoint_dir": str(tmp_path / "c")}
        )
    assert "outside its state_dict" in str(err.value)
    assert not list((tmp_path / "results").glob("stage=*")) and not (tmp_path / "c").exists()


def test_a_file_that_calls_evaluate_when_imported_is_refused_before_compute(tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "selfcall.py").write_text(SELF_CALLING_NET)
    net = _import(tmp_path / "user" / "selfcall.py", "user_selfcall").Net()
    with pytest.raises(qshield_dist.ConfigError) as err:
        qshield_dist.evaluate(
            net, results_dir=tmp_path / "results", sweep={"checkpoint_dir": str(tmp_path / "c")}
        )
    message = str(err.value)
    assert "models[0].factory" in message and "evaluate() was called while evaluate() runs" in message
    assert "if __name__ == '__main__':" in message and "model -> models[0]" in message
    assert not list((tmp_path / "results").glob("stage=*"))
    assert "QSHIELD_DIST_EVALUATING" not in os.environ


def test_evaluates_results_directory_is_named_by_what_it_computes() -> None:
    """Workers, executor, file modes and checkpoints change no number: the same directory; the
    points, attacks or model do: another one."""
    from qshield_dist.evaluation import results_name

    sweep = {"data": {"dataset": "digits"}, "eval": {"attack_size": 64}, "models": [{"model": "custom"}]}
    name = results_name(sweep)
    assert name.startswith("evaluate-")
    where = {"workers": 4, "executor": "ray", "private": False, "checkpoint_dir": "/scratch/c"}
    assert results_name({**sweep, **where}) == name
    assert results_name({**sweep, "eval": {"attack_size": 32}}) != name
    assert results_name({**sweep, "models": [{"model": "custom", "weights": "ab"}]}) != name
