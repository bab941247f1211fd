"""Bad input stops the launch before any compute: exit code 2, a message naming the key,
the value given and what is allowed, and no result or checkpoint file written."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qshield_dist import launch
from qshield_dist.config import SweepConfig, check_availability, parse_attacks, read_config, validate
from qshield_dist.grid import build_grid

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "name": "bad",
    "data": {"dataset": "digits", "train_size": 100, "test_size": 50},
    "train": {"epochs": 1},
    "models": [{"model": "cnn_small"}, {"model": "hqcnn", "backbone": "cnn_small"}],
    "attacks": [{"name": "fgsm"}],
}


def _with(path: str, value):
    """GOOD with one key (dotted path, list indices as ints) set to `value`."""
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return cfg


BAD = [
    # (config, fragments the message must contain: key, value, allowed)
    (
        _with("data.dataset", "imagenet"),
        ["data.dataset", "imagenet", "digits", "mnist", "cifar10", "organamnist"],
    ),
    (_with("models.0.model", "vit"), ["models[0].model", "vit", "cnn_small", "hqcnn"]),
    (_with("attacks.0.name", "boundary"), ["attacks[0].name", "boundary", "fgsm", "square"]),
    (
        _with("models.1.device", "ibmq.heron"),
        ["models[1].device", "ibmq.heron", "default.mixed", "lightning.qubit"],
    ),
    (_with("models.1.entanglement", "circle"), ["models[1].entanglement", "circle", "ring"]),
    (_with("models.1.noise_strength", 1.5), ["models[1].noise_strength", "1.5", "less than or equal to 1"]),
    (_with("models.1.depth", 0), ["models[1].depth", "0", "greater than or equal to 1"]),
    (_with("models.1.quantum_grad", "partial"), ["models[1].quantum_grad", "partial", "full", "detached"]),
    (_with("models.0.entanglement", "full"), ["models[0]", "entanglement", "only to model 'hqcnn'"]),
    (_with("train.epochs", -3), ["train.epochs", "-3", "greater than or equal to 1"]),
    (_with("executor", "kubernetes"), ["executor", "kubernetes", "local", "ray", "slurm"]),
    (_with("attacks.0.params", {"epsilon": 0.1}), ["attacks[0].params.epsilon", "0.1", "allowed: eps"]),
    (_with("attacks.0.params", {"eps": 3}), ["attacks[0].params.eps", "3", "(0, 1]"]),
    (_with("train.learning_rate", 0.1), ["train.learning_rate", "0.1", "allowed keys", "lr"]),
    (_with("models.1.simulator", "qiskit"), ["models[1].simulator", "qiskit", "compiled", "qnode"]),
    (
        _with("data.dataset", "mnist"),
        ["data.data_root", "MNIST/raw/train-images-idx3-ubyte", "python -m qshield_dist.data fetch mnist"],
    ),
    (_with("models.1.qubits", 40), ["models[1].qubits", "40"]),
    (
        _with(
            "models.1",
            {"model": "hqcnn", "backbone": "cnn_small", "simulator": "qnode", "device": "default.qubit"},
        ),
        ["models[1].trajectories", "default.qubit", "trajectories >= 1"],
    ),
    (
        _with("models.1.trajectories", 16),
        ["models[1].trajectories", "16", "simulator: qnode", "default.qubit"],
    ),
    (
        _with("resources", {"train": {"accelerator": "tpu"}}),
        ["resources.train.accelerator", "tpu", "'auto', 'cpu' or 'cuda'"],
    ),
    (
        _with("resources", {"attack": {"accelerator": "cuda"}}),
        ["resources.attack.accelerator", "'cuda'", "gpus is 0", "allowed: auto, cpu, cuda"],
    ),
    # a trial runs at most the cores its stage reserves: raise cpus, never the threads alone
    (
        _with("resources", {"attack": {"cpus": 2, "threads": 3}}),
        ["resources.attack.threads", "got 3", "cpus is 2", "allowed: 1 to 2", "raise cpus"],
    ),
    (_with("threads", 2), ["threads: got 2", "not a sweep-wide key", "resources.<stage>.threads"]),
    (
        {**_with("resources", {"attack": {"cpus": 2}}), "executor": "slurm", "slurm": {"cpus_per_task": 1}},
        ["slurm.cpus_per_task", "got 1", "2 threads each attack trial", "allowed: an integer >= 2"],
    ),
    # SLURM settings go into the job script: one sbatch word each, setup as lines of shell
    (
        _with("slurm", {"account": "my project"}),
        ["slurm.account", "'my project'", "letters, digits", "no spaces"],
    ),
    (_with("slurm", {"qos": "high\n#SBATCH --exclusive"}), ["slurm.qos", "line breaks"]),
    (_with("slurm", {"constraint": "a100 && ib"}), ["slurm.constraint", "'a100 && ib'", "& | * ! ( ) [ ]"]),
    (
        _with("slurm", {"setup": "module load cuda"}),
        ["slurm.setup", "'module load cuda'", "list of shell lines"],
    ),
    (
        _with("slurm", {"setup": ["module load cuda", ""]}),
        ["slurm.setup", "one non-empty line of shell", "''"],
    ),
    (
        _with("slurm", {"train": {"partition": "gpu;rm"}}),
        ["slurm.train.partition", "'gpu;rm'", "letters, digits"],
    ),
    (
        _with("slurm", {"attack": {"time_min": 0}}),
        ["slurm.attack.time_min", "0", "greater than or equal to 1"],
    ),
    (
        _with("slurm", {"diagnostic": {"qos": "x"}}),
        ["slurm.diagnostic.qos", "unknown key", "partition, time_min"],
    ),
]


@pytest.mark.parametrize("cfg,fragments", BAD, ids=[f[0] for _, f in BAD])
def test_bad_input_exits_2_before_writing_anything(tmp_path, monkeypatch, caplog, cfg, fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # an empty data root: MNIST files are missing
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.ERROR):
        code = launch.main(
            [str(sweep), "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ckpt")]
        )
    assert code == 2
    message = caplog.text
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "ckpt").exists()


DUPLICATED = """\
name: twice
data: {dataset: digits, train_size: 100, test_size: 50}
seeds: [0]
models:
  - model: hqcnn
    backbone: cnn_small
    entanglement: full
    backbone: dnn
attacks:
  - name: fgsm
"""


@pytest.mark.parametrize(
    "text,fragments",
    [
        (
            DUPLICATED.replace("backbone: dnn", "noise_model: mixed") + "seeds: [0, 1, 2]\n",
            ["'seeds' given twice", "lines 3 and 11", "[0, 1, 2]"],
        ),
        (DUPLICATED, ["'backbone' given twice", "lines 6 and 8", "'dnn'"]),
    ],
    ids=["top level", "inside a models entry"],
)
def test_a_key_given_twice_is_refused_naming_it(tmp_path, monkeypatch, caplog, text, fragments):
    """PyYAML keeps the last of two equal keys without a word; the launcher refuses the file."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    with caplog.at_level(logging.ERROR):
        code = launch.main([str(sweep), "--results", str(tmp_path / "results")])
    assert code == 2
    for fragment in fragments:
        assert fragment in caplog.text, f"{fragment!r} missing from: {caplog.text}"
    assert not (tmp_path / "results").exists()


def test_bad_cli_workers_and_missing_file(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert launch.main([str(tmp_path / "nope.yaml")]) == 2
        assert launch.main(["sweeps/smoke.yaml", "--workers", "0"]) == 2
    assert "nope.yaml" in caplog.text and "--workers: got 0" in caplog.text


# Axes on which the grid multiplies: baselines, four entanglements, both controls, four attacks.
AXES = {
    "name": "axes",
    "data": {"dataset": "digits"},
    "train": {"epochs": 10},
    "eval": {"controls": ["backbone_only", "equal_budget"]},
    "models": [
        {"model": "dnn"},
        {"model": "cnn_small"},
        {
            "model": "hqcnn",
            "backbone": "cnn_small",
            "init": "from_baseline",
            "entanglement": ["none", "linear", "star", "full"],
        },
    ],
    "attacks": [
        {"name": "fgsm"},
        {"name": "pgd"},
        {"name": "square"},
        {"name": "apgd", "preset": "standard"},
    ],
}


def test_grid_axes_multiply_only_hqcnn_and_add_baselines():
    grid = build_grid(validate(SweepConfig(**AXES)))
    models = [t.model for t in grid.train]
    assert sorted(m.model for m in models) == [
        "cnn_small",
        "cnn_small",
        "dnn",
        "hqcnn",
        "hqcnn",
        "hqcnn",
        "hqcnn",
    ]
    assert sorted(m.entanglement for m in models if m.model == "hqcnn") == ["full", "linear", "none", "star"]
    baseline = next(t for t in grid.train if t.model.model == "cnn_small" and t.train.epochs == 10)
    assert all(t.baseline_id == baseline.trial_id for t in grid.train if t.model.model == "hqcnn")
    # 6 models x 4 attacks, + 4 hybrids x 4 backbone-alone controls, + one equal-budget cnn_small x 4
    assert len(grid.attack) == 6 * 4 + 4 * 4 + 4
    twin = next(
        t for t in grid.train if t.model.model == "cnn_small" and t.train.epochs == 20
    )  # equal budget:
    assert twin.trial_id != baseline.trial_id  # 10 epochs of pre-training + 10 as a hybrid
    # ids are stable across parses and independent of paths
    again = build_grid(validate(SweepConfig(**{**AXES, "results_dir": "/elsewhere"})))
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in grid.trials]


def test_a_hybrid_from_scratch_has_its_backbone_as_equal_budget_control_attacked_once(tmp_path):
    """init: scratch gives the hybrid no more training than its backbone alone: that backbone is
    its equal-budget control. main 49c6f05 attacked the same trained model a second time under
    control 'equal_budget' (same train id, other attack ids)."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\neval: {controls: [equal_budget]}\n"
        "models: [{model: cnn_small}, {model: hqcnn, backbone: cnn_small, init: [scratch, from_baseline]}]\n"
        "attacks: [{name: fgsm}]\n"
    )
    grid = build_grid(validate(read_config(path)))
    backbone = [t for t in grid.train if t.model.model == "cnn_small"]
    assert sorted(t.train.epochs for t in backbone) == [10, 20]  # the plain one; the from_baseline's control
    attacked = [(a.train.trial_id, a.control) for a in grid.attack]
    assert len(attacked) == len(set(t for t, _ in attacked)) == 4  # every trained model attacked once
    (control,) = [a for a in grid.attack if a.control == "equal_budget"]
    assert control.train.train.epochs == 20


def test_an_unknown_autoattack_version_is_refused_before_compute(tmp_path, caplog):
    sweep = yaml.safe_load(open("sweeps/smoke.yaml"))
    sweep["attacks"] = [{"name": "autoattack", "params": {"version": "plus"}}]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with caplog.at_level(logging.ERROR):
        assert (
            launch.main([str(path), "--results", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c")])
            == 2
        )
    assert (
        "attacks[0].params.version: got 'plus'" in caplog.text and "auto, standard, rand, fast" in caplog.text
    )
    assert not (tmp_path / "r").exists()


def test_attack_ids_from_the_cached_template_equal_the_plain_hash():
    """Attack ids serialize their configuration once per attack (a template with the model's id
    spliced in); the result must be the hash of the full identity, as computed without it."""
    from qshield_dist.grid import stable_hash

    for cfg in (SweepConfig(**AXES), read_config("sweeps/adaptive.yaml")):
        attacks = build_grid(validate(cfg)).attack
        fast = [t.trial_id for t in attacks]
        plain = ["A" + stable_hash(t.identity(t.train.trial_id)) for t in attacks]
        assert len(set(fast)) == len(fast) > 40
        assert fast == plain


TYPED = """\
name: typed
data: {{dataset: digits, train_size: 100, test_size: 50}}
models: [{{model: cnn_small}}, {{model: hqcnn, backbone: cnn_small}}]
attacks:
  - name: {attack}
    params: {params}
"""


def _dry_run(tmp_path, attack: str, params: str) -> subprocess.CompletedProcess:
    sweep = tmp_path / "typed.yaml"
    sweep.write_text(TYPED.format(attack=attack, params=params))
    command = [
        sys.executable,
        "-m",
        "qshield_dist.launch",
        str(sweep),
        "--dry-run",
        "--results",
        str(tmp_path / "r"),
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_numbers_are_read_as_yaml_1_2_reads_them(tmp_path):
    """PyYAML (YAML 1.1) read `1e-2` as the string '1e-2'; it is the number 0.01."""
    proc = _dry_run(tmp_path, "pgd", "{alpha: 1e-2, eps: 1.0e-1, steps: 1e1}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (attack,) = parse_attacks(read_config(tmp_path / "typed.yaml"))
    assert attack.params == {"alpha": 0.01, "eps": 0.1, "steps": 10}
    assert isinstance(attack.params["steps"], int) and isinstance(attack.params["alpha"], float)


def test_a_quoted_number_exits_2_before_any_compute(tmp_path):
    proc = _dry_run(tmp_path, "pgd", '{alpha: "1e-2"}')
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "attacks[0].params.alpha: got '1e-2': must be a finite number, not a string" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "attack,params,fragments",
    [
        ("pgd", "{steps: 2.5}", ["attacks[0].params.steps: got 2.5", "must be an integer"]),
        ("pgd", "{steps: [3, '4']}", ["attacks[0].params.steps: got '4'", "must be an integer"]),
        ("pgd", "{random_start: 1}", ["attacks[0].params.random_start: got 1", "true or false"]),
        ("fgsm", "{eps: true}", ["attacks[0].params.eps: got True", "must be a finite number"]),
        ("fgsm", "{eps: .nan}", ["attacks[0].params.eps: got nan", "must be a finite number"]),
        ("square", "{loss: hinge}", ["attacks[0].params.loss: got 'hinge'", "allowed: margin, ce"]),
        ("apgd", "{loss: 3}", ["attacks[0].params.loss: got 3", "must be a string; allowed: ce, dlr"]),
        (
            "transfer",
            "{surrogate: vit}",
            ["attacks[0].params.surrogate: got 'vit'", "allowed: cnn, cnn_small, dnn"],
        ),
    ],
)
def test_attack_parameters_take_their_defaults_type(tmp_path, caplog, attack, params, fragments):
    sweep = tmp_path / "typed.yaml"
    sweep.write_text(TYPED.format(attack=attack, params=params))
    with caplog.at_level(logging.ERROR):
        assert launch.main([str(sweep), "--dry-run", "--results", str(tmp_path / "r")]) == 2
    for fragment in fragments:
        assert fragment in caplog.text, f"{fragment!r} missing from: {caplog.text}"


NO_CUDA = [
    # (resources, fragments): auto with a GPU reserved resolves to cuda; cuda named outright
    ({"train": {"gpus": 1}}, ["resources.train.accelerator", "'auto' (with gpus 1: cuda)"]),
    ({"attack": {"accelerator": "cuda", "gpus": 0.25}}, ["resources.attack.accelerator", "'cuda'"]),
]


@pytest.mark.parametrize("resources,fragments", NO_CUDA, ids=["auto-gpus1", "cuda"])
def test_a_cuda_stage_on_the_local_executor_without_cuda_exits_2_before_any_compute(
    tmp_path, monkeypatch, caplog, resources, fragments
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(_with("resources", resources)))
    with caplog.at_level(logging.ERROR):
        code = launch.main(
            [str(sweep), "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ckpt")]
        )
    assert code == 2
    for fragment in [*fragments, "no CUDA device", "allowed: auto, cpu, cuda", "executor ray or slurm"]:
        assert fragment in caplog.text, f"{fragment!r} missing from: {caplog.text}"
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("executor", ["ray", "slurm"])
def test_a_cuda_stage_is_not_refused_on_a_login_node(executor):
    """Ray and SLURM trials run on workers: the launching machine's lack of CUDA is no error
    there (a worker without CUDA records a failed row: test_device, test_ray_cluster)."""
    cfg = SweepConfig(**{**GOOD, "executor": executor, "resources": {"train": {"gpus": 1}}})
    assert check_availability(validate(cfg)) == []
    assert {t.accelerator for t in build_grid(validate(cfg)).train} == {"cuda"}


def test_named_comparisons_name_the_variants_the_grid_trains():
    """compare: and the grid resolve each entry one way (grid.resolved_models, train_trial):
    every variant a comparison names is one the grid trains, under any resources; two entries
    with equal training share the classical baseline trained alone (keyed by the train config's
    value, not by the object)."""
    from qshield_dist.grid import named_comparisons, variant_id

    pgd = {"method": "pgd_at", "steps": 2}
    sweep = {
        "name": "named",
        "data": {"dataset": "digits"},
        "resources": {"train": {"cpus": 2, "gpus": 1}},
        "models": [
            {"model": "cnn_small", "name": "plain"},
            {"model": "cnn_small", "name": "pgd", "train": pgd},
            {"model": "hqcnn", "backbone": "cnn_small", "name": "hybrid", "entanglement": ["full", "star"]},
            {"model": "hqcnn", "backbone": "cnn_small", "name": "hybrid_pgd", "train": dict(pgd)},
        ],
        "attacks": [{"name": "fgsm"}],
        "compare": [{"models": ["hybrid", "hybrid_pgd"], "against": ["plain", "pgd"]}],
    }
    spec = validate(SweepConfig(**sweep))
    grid = build_grid(spec)
    trained = {variant_id(t, None) for t in grid.train}
    pairs = named_comparisons(spec)
    assert len(pairs) == 3 * 2 and all(a in trained and b in trained for _, a, b in pairs)
    # the pgd entry, the pgd hybrid's baseline: one trial
    pgd_cnns = [t for t in grid.train if t.model.model == "cnn_small" and t.train.method == "pgd_at"]
    assert len(pgd_cnns) == 1
