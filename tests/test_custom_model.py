"""A user's own model (`model: custom`) through a sweep: trained and attacked through the logits
adapter, identified by its code's digest, run from the launcher's snapshot of that code, and
refused before any compute when its factory breaks the contract. The user's code lives in a
folder of the test's own, outside the package, with a helper module it imports."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from qshield_dist import launch
from qshield_dist.code_snapshot import snapshot_root
from qshield_dist.config import read_config
from qshield_dist.executors.local import LocalExecutor
from qshield_dist.grid import Grid
from qshield_dist.sweep import prepare, run_sweep
from qshield_dist.trial import RunContext, run_trial

NET = """
import torch
import torch.nn as nn

import helper


def make(width=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(helper.PIXELS, width), nn.ReLU(), nn.Linear(width, helper.CLASSES))


class Noisy(nn.Module):
    def __init__(self, net, scale):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net(x + self.scale * torch.randn_like(x))


def make_noisy(width=32, scale=0.05):
    return Noisy(make(width), scale)


def twin(model):  # the noisy model without its noise: the gradient BPDA follows
    return model.net
"""
HELPER = "PIXELS = 784\nCLASSES = 10\n"
OTHER = """
import torch.nn as nn


def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
"""


def _sweep(root: Path) -> dict:
    net = root / "mymodels" / "net.py"
    return {
        "name": "custom",
        "data": {"dataset": "digits", "train_size": 300, "test_size": 100},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01},
        "eval": {"attack_size": 24, "eval_repeats": 3},
        "models": [
            {"model": "dnn"},
            {"model": "custom", "factory": f"{net}:make", "kwargs": {"width": 32}},
            {
                "model": "custom",
                "factory": f"{net}:make_noisy",
                "stochastic": True,
                "differentiable_twin": f"{net}:twin",
            },
            {
                "model": "custom",
                "factory": f"{root / 'other' / 'net2.py'}:make",
                "weights": str(root / "w.pt"),
            },
        ],
        "attacks": [{"name": "fgsm"}, {"name": "bpda_pgd", "params": {"steps": 2}}],
    }


def _write_models(root: Path) -> None:
    (root / "mymodels").mkdir(parents=True)
    (root / "mymodels" / "net.py").write_text(NET)
    (root / "mymodels" / "helper.py").write_text(HELPER)
    (root / "other").mkdir()
    (root / "other" / "net2.py").write_text(OTHER)
    torch.manual_seed(1)
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).state_dict(), root / "w.pt")


def _args(root: Path) -> list[str]:
    return [str(root / "sweep.yaml"), "--results", str(root / "results"), "--checkpoints", str(root / "ckpt")]


def _grid(root: Path) -> Grid:
    return prepare(read_config(root / "sweep.yaml", {"results_dir": str(root / "results")}))


def _rows(results: Path) -> list[dict]:
    return [row for path in sorted(results.rglob("*.parquet")) for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Grid]:
    root = tmp_path_factory.mktemp("custom")
    _write_models(root)
    (root / "sweep.yaml").write_text(yaml.safe_dump(_sweep(root)))
    grid = _grid(root)
    assert launch.main(_args(root)) == 0
    return root, grid


def test_a_custom_model_trains_and_is_attacked_through_yaml(launched: tuple[Path, Grid]) -> None:
    root, grid = launched
    rows = _rows(root / "results")
    assert {r["trial_id"] for r in rows} == {t.trial_id for t in grid.trials}
    assert all(r["status"] == "ok" for r in rows)
    by_variant = {(r["variant"], r["stage"], r["attack"]): r for r in rows}
    net = f"custom[{root / 'mymodels' / 'net.py'}:make](width=32)"
    trained = by_variant[(net, "train", None)]
    assert trained["clean_acc"] > 0.3 and trained["train_steps"] == 19  # 300 / 16, last batch kept
    fgsm = by_variant[(net, "attack", "fgsm")]
    assert fgsm["n_attacked"] > 0 and fgsm["robust_acc"] < trained["clean_acc"]
    assert not fgsm["stochastic"] and fgsm["eval_repeats"] == 1
    # BPDA only where a twin is named; the stochastic model is judged by the majority of 3 draws
    bpda = [r for r in rows if r["attack"] == "bpda_pgd"]
    noisy = f"custom[{root / 'mymodels' / 'net.py'}:make_noisy] stochastic twin={root / 'mymodels' / 'net.py'}:twin"
    assert [r["variant"] for r in bpda] == [noisy]
    assert bpda[0]["stochastic"] and bpda[0]["eval_repeats"] == 3 and bpda[0]["n_attacked"] > 0
    # the weights are loaded, not trained: its accuracy is that of the file's weights
    loaded = next(r for r in rows if r["stage"] == "train" and "net2.py" in r["variant"])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    model.load_state_dict(torch.load(root / "w.pt"))
    from qshield_dist.data import load

    test = load("digits", train_size=300, test_size=100)[1]
    assert loaded["train_steps"] == 0
    assert loaded["clean_acc"] == pytest.approx(float((model(test.x).argmax(1) == test.y).float().mean()))


def test_workers_import_the_snapshot_not_the_live_file(launched: tuple[Path, Grid], tmp_path: Path) -> None:
    """The live factory broken after the launch: a trial of the launch's grid still runs the
    snapshot's code, and gets the same numbers."""
    root, grid = launched
    net = root / "mymodels" / "net.py"
    [trial] = [t for t in grid.train if t.model.custom and t.model.custom.kwargs]
    shutil.copytree(snapshot_root(root / "results"), snapshot_root(tmp_path / "results"))
    original = net.read_text()
    net.write_text("raise ImportError('the live file is not what runs')\n")
    try:
        ctx = RunContext("custom", str(tmp_path / "results"), str(tmp_path / "ckpt"))
        assert run_trial(trial, ctx) == "ok"
    finally:
        net.write_text(original)
    [again] = _rows(tmp_path / "results")
    [before] = [r for r in _rows(root / "results") if r["trial_id"] == trial.trial_id]
    assert again["clean_acc"] == before["clean_acc"]


def _custom_ids(grid: Grid, folder: str) -> set[str]:
    """The ids of the trials of the custom models whose code is in `folder`."""
    return {
        t.trial_id
        for t in grid.trials
        if (t if t.stage == "train" else t.train).model.custom is not None
        and f"/{folder}/" in (t if t.stage == "train" else t.train).model.custom.factory
    }


def _changed_ids(root: Path, before: Grid, edited: str) -> tuple[set[str], set[str]]:
    """The ids of `before` that an edit of `edited` changes, and the new ones."""
    old_ids, new_ids = {t.trial_id for t in before.trials}, {t.trial_id for t in _grid(root).trials}
    return old_ids - new_ids, new_ids - old_ids


def test_an_edit_reruns_exactly_the_trials_of_the_edited_code(launched: tuple[Path, Grid]) -> None:
    """Editing a module the factory imports, or the factory's own file, changes the ids of the
    models built from that code (their train trials and attacks), no other; a relaunch runs
    exactly the new ones."""
    root, before = launched
    ours = _custom_ids(before, "mymodels")
    assert len(ours) == 2 + 2 + 1  # two train trials, their fgsm, the noisy one's bpda
    for edited in ("mymodels/net.py", "mymodels/helper.py"):
        path = root / edited
        original = path.read_text()
        path.write_text(original + "# edited\n")
        try:
            gone, new = _changed_ids(root, before, edited)
            assert gone == ours and len(new) == len(ours), edited  # not the dnn, not other/'s model
            if edited.endswith("helper.py"):
                files = {p: p.stat().st_mtime_ns for p in (root / "results").rglob("*.parquet")}
                cfg = read_config(root / "sweep.yaml", {"checkpoint_dir": str(root / "ckpt")})
                cfg = cfg.model_copy(update={"results_dir": str(root / "results")})
                statuses = run_sweep(cfg, LocalExecutor(in_process=True)).statuses
                assert set(statuses.values()) == {"ok"}
                ran = {r["trial_id"] for r in _rows(root / "results")} - {t.trial_id for t in before.trials}
                assert ran == new
                assert all(p.stat().st_mtime_ns == m for p, m in files.items())  # nothing else rewritten
        finally:
            path.write_text(original)


def test_ids_do_not_depend_on_where_the_code_lives(launched: tuple[Path, Grid], tmp_path: Path) -> None:
    root, before = launched
    for folder in ("mymodels", "other"):
        shutil.copytree(root / folder, tmp_path / folder)
    shutil.copy(root / "w.pt", tmp_path / "w.pt")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(_sweep(tmp_path)))
    assert {t.trial_id for t in _grid(tmp_path).trials} == {t.trial_id for t in before.trials}


BROKEN = {
    "import": ("import no_such_module_here\n\ndef make():\n    pass\n", "make", "does not import"),
    "missing": ("def other():\n    pass\n", "make", "has no attribute 'make'"),
    "not callable": ("make = 3\n", "make", "int, not callable"),
    "not a module": ("def make():\n    return 3\n", "make", "returned a int, not a torch.nn.Module"),
    "wrong shape": (
        "import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))\n",
        "make",
        "returned (2, 5); expected logits of shape (2, 10)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_factory_exits_2_before_compute_naming_the_entry(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source, function, problem = BROKEN[case]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.py").write_text(source)
    sweep = {
        "name": "broken",
        "data": {"dataset": "digits"},
        "models": [{"model": "dnn"}, {"model": "custom", "factory": f"models/broken.py:{function}"}],
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    monkeypatch.chdir(tmp_path)  # the factory's path is relative to the working directory
    with caplog.at_level(logging.ERROR):
        assert launch.main(["sweep.yaml"]) == 2
    assert f"models[1].factory: got 'models/broken.py:{function}'" in caplog.text
    assert problem in caplog.text
    assert not (tmp_path / "results").exists() and not (tmp_path / "checkpoints").exists()


ENTRY_ERRORS = {
    "factory on a built-in": (
        {"model": "dnn", "factory": "m/net.py:make"},
        "'factory' applies only to model 'custom'",
    ),
    "no factory": ({"model": "custom"}, "model 'custom' needs 'factory: package.module:function'"),
    "no function": ({"model": "custom", "factory": "m/net.py"}, "must be 'package.module:function'"),
    "no such file": ({"model": "custom", "factory": "m/none.py:make"}, "no such file"),
    "no such module": ({"model": "custom", "factory": "no_such_pkg_here.net:make"}, "no module named"),
    "installed": ({"model": "custom", "factory": "torchvision.models:resnet18"}, "an installed package"),
    "raw custom key": ({"model": "custom", "custom": {"factory": "m/net.py:make"}}, "'custom' is not a key"),
    "weights missing": ({"model": "custom", "factory": "m/net.py:make", "weights": "w.pt"}, "no such file"),
    "twin copies": (
        {"model": "custom", "factory": "m/net.py:make", "differentiable_twin": "m/twins.py:twin"},
        "differentiable_twin: got 'm/twins.py:twin': its parameters must be the trained module's own (shared",
    ),
    "twin elsewhere": (
        {"model": "custom", "factory": "m/net.py:make", "differentiable_twin": "n/twin.py:twin"},
        "must be in the factory's own package or folder",
    ),
}


@pytest.mark.parametrize("case", list(ENTRY_ERRORS))
def test_a_bad_custom_entry_is_refused_naming_it(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    entry, problem = ENTRY_ERRORS[case]
    for folder in ("m", "n"):
        (tmp_path / folder).mkdir()
    (tmp_path / "m" / "net.py").write_text(OTHER)
    (tmp_path / "n" / "twin.py").write_text("def twin(model):\n    return model\n")
    (tmp_path / "m" / "twins.py").write_text(
        "import copy\n\n\ndef twin(model):\n    return copy.deepcopy(model)\n"
    )
    sweep = {"name": "bad", "data": {"dataset": "digits"}, "models": [{"model": "dnn"}, entry]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert launch.main(["sweep.yaml", "--dry-run"]) == 2
    assert "models[1]" in caplog.text and problem in caplog.text, caplog.text


def test_each_custom_model_is_its_own_variant_in_the_summary(
    launched: tuple[Path, Grid], tmp_path: Path
) -> None:
    """The rows' `custom` column (the model's identity) keys its variant: three custom models of
    one dataset are three variants beside the dnn, never one 'custom' with several rows a seed."""
    from qshield_dist.summary.report import Options, summarize

    root, _ = launched
    s = summarize(root / "results", tmp_path / "report", Options(plots=False, formats=("md",), proxies={}))
    models = s.tables.variants["model"].to_list()
    assert sorted(models) == ["custom", "custom", "custom", "dnn"]
    assert s.tables.variants.filter(pl.col("model") == "custom")["custom"].n_unique() == 3
    assert not s.tables.duplicates.height


def test_a_snapshot_under_the_codes_own_folder_is_not_part_of_its_tree(tmp_path: Path) -> None:
    """Results kept under the factory's folder (`python net.py` writing ./results): the snapshot
    a launch writes there does not enter the next digest, so a relaunch keeps its ids."""
    from qshield_dist.code_snapshot import parse_ref, source_tree, write_snapshot

    (tmp_path / "net.py").write_text(OTHER)
    ref = parse_ref(f"{tmp_path / 'net.py'}:make")
    before = source_tree(ref)
    folder = write_snapshot(before, tmp_path / "results", 0o600)
    assert (folder / "net.py").read_text() == OTHER
    after = source_tree(ref)
    assert after.files == before.files == (("net.py", OTHER.encode()),) and after.digest == before.digest


# The pre-flight check imports the snapshot the trials import, never the live tree: a module
# the snapshot holds (the factory's package or folder) is found, one beside it is not.
SIBLINGS = {
    "a file's sibling": ({"m/net.py": "from helper import make\n", "m/helper.py": OTHER}, "m/net.py:make"),
    "a package's module": (
        {"pkg/__init__.py": "", "pkg/net.py": "from pkg.helper import make\n", "pkg/helper.py": OTHER},
        "pkg.net:make",
    ),
    # live, `outside` is importable (the package's parent is on sys.path), but the snapshot
    # holds the package's files only: its trials could not import it
    "beside the package": (
        {"pkg/__init__.py": "", "pkg/net.py": "from outside import make\n", "outside.py": OTHER},
        "pkg.net:make",
    ),
}


@pytest.mark.parametrize("case", list(SIBLINGS))
def test_the_check_imports_what_the_trials_import(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files, factory = SIBLINGS[case]
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    sweep = {
        "name": "siblings",
        "data": {"dataset": "digits"},
        "models": [{"model": "custom", "factory": factory}],
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    monkeypatch.chdir(tmp_path)
    if case == "beside the package":
        with caplog.at_level(logging.ERROR):
            assert launch.main(["sweep.yaml"]) == 2
        assert f"models[0].factory: got '{factory}'" in caplog.text
        assert "does not import: ModuleNotFoundError: No module named 'outside'" in caplog.text
        assert not (tmp_path / "results").exists() and not (tmp_path / "checkpoints").exists()
    else:
        (custom,) = [t.model.custom for t in prepare(read_config(tmp_path / "sweep.yaml")).train]
        assert custom is not None and custom.code is not None
