"""Trial ids: a pure function of what determines a trial's result, in one spelling.

- pinned: a handful of ids as literal strings (tests/test_golden.py pins rows; this pins ids);
- adding a config field at its default (a model, train or eval field, an attack parameter)
  leaves every pinned id unchanged;
- `1`, `1.0` and `1e0` are one value, a boolean is never a number, and an id never depends on
  what the process expanded before;
- only what an attack reads: not eval.diagnostic_size, and eval_repeats only on a stochastic model.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qshield_dist import attack_params
from qshield_dist.config import EvalConfig, ModelSpec, SweepConfig, TrainConfig, read_config, validate
from qshield_dist.grid import AttackTrial, DiagnosticTrial, Grid, TrainTrial, build_grid, canonical_json

REPO = Path(__file__).resolve().parents[1]

SWEEP: dict[str, Any] = {
    "name": "pinned",
    "data": {"dataset": "digits", "train_size": 300, "test_size": 60},
    "train": {"epochs": 3, "batch_size": 32},
    "eval": {
        "attack_size": 10,
        "eval_repeats": 3,
        "controls": ["backbone_only"],
        "diagnostics": True,
        "diagnostic_size": 8,
    },
    "models": [
        {"model": "cnn_small"},
        {"model": "hqcnn", "backbone": "cnn_small"},  # the sound hybrid: deterministic
        # the paper's hybrid: a random projection on every call (stochastic)
        {"model": "hqcnn", "backbone": "cnn_small", "projection": "paper", "quantum_grad": "detached"},
    ],
    "attacks": [
        {"name": "fgsm"},
        {"name": "pgd", "params": {"steps": 3}},
        {"name": "apgd", "preset": "standard"},
    ],
}
SOUND = "hqcnn[cnn_small] full d1 enhanced_angle mixed0.005 dynamic grad=full proj=learned"
PAPER = "hqcnn[cnn_small] full d1 enhanced_angle mixed0.005 dynamic grad=detached proj=paper"
# Changing one of these changes what an id means: bump that stage's version (results.py).
# (Train version 3, attack version 8, diagnostic version 9.)
PINNED = {
    "train | cnn_small": "T70b2f137eb1da9be",
    f"train | {SOUND}": "T71ce6ece46921fed",
    f"train | {PAPER}": "Te42c823e2ec7a541",
    "attack | cnn_small | fgsm | paper": "Ae077bf46720eca55",
    f"attack | {SOUND} | apgd | standard": "Aa6aadd709d77b1be",
    f"attack | {PAPER} | pgd | paper": "A73e543f185098c99",
    f"attack | {PAPER} | fgsm | paper | backbone_only": "A957764677595ddce",
    "diagnostic | cnn_small | model": "Dce82e4bf742949d9",
    "diagnostic | cnn_small | rows": "D1c107b6b83d8ab0a",
    f"diagnostic | {PAPER} | model": "D5d34d948dc9dbf21",
}


def _label(t: TrainTrial | AttackTrial | DiagnosticTrial) -> str:
    train = t if isinstance(t, TrainTrial) else t.train
    parts = [t.stage, train.model.label]
    if isinstance(t, AttackTrial):
        parts += (
            [t.attack, t.preset] + ([t.control] if t.control else []) + [f"shard {t.shard}"] * bool(t.shard)
        )
    if isinstance(t, DiagnosticTrial):  # its checks on the attack rows, or on the model itself
        parts.append("rows" if t.attack_ids else "model")
    return " | ".join(parts)


def ids_by_label(trials: list[Any]) -> dict[str, str]:
    out = {_label(t): t.trial_id for t in trials}
    assert len(out) == len(trials), "labels must name each trial once"
    return out


def _grid(sweep: dict[str, Any]) -> Grid:
    return build_grid(validate(SweepConfig(**sweep)))


def test_pinned_ids() -> None:
    got = ids_by_label(_grid(SWEEP).trials)
    assert {label: got[label] for label in PINNED} == PINNED


# --- a field added at its default changes no id ----------------------------------------------


class NewModelSpec(ModelSpec):
    new_knob: float | None = None  # a hybrid setting, which `resolved` fills in

    def resolved_defaults(self, n_classes: int) -> dict[str, Any]:
        defaults = super().resolved_defaults(n_classes)
        return {**defaults, "new_knob": 0.25} if defaults else defaults


class NewTrainConfig(TrainConfig):
    warmup_steps: int = 0


class NewEvalConfig(EvalConfig):
    clean_batches: int = 4


def _with_new_fields(grid: Grid, knob: float | None = None) -> list[Any]:
    """The grid's trials as if every config model had gained a field (at its default; the
    hybrids' new_knob at `knob` when given) and pgd a parameter, resolved as always."""
    by_id = {t.trial_id: t for t in grid.train}
    trains: dict[str, TrainTrial] = {}

    def train(t: TrainTrial) -> TrainTrial:
        if t.trial_id not in trains:
            spec = NewModelSpec(**t.model.model_dump()).resolved(10)
            if knob is not None and spec.model == "hqcnn":
                spec = spec.model_copy(update={"new_knob": knob})
            baseline = train(by_id[t.baseline_id]).trial_id if t.baseline_id else None
            new_train = NewTrainConfig(**t.train.model_dump())
            trains[t.trial_id] = dataclasses.replace(t, model=spec, train=new_train, baseline_id=baseline)
        return trains[t.trial_id]

    new_eval = NewEvalConfig(**grid.attack[0].eval.model_dump())
    attacks = []
    for a in grid.attack:
        params = a.params + ((("new_param", 7),) if a.attack == "pgd" else ())
        attacks.append(
            dataclasses.replace(a, train=train(a.train), params=tuple(sorted(params)), eval=new_eval)
        )
    diagnostics = []
    for d in grid.diagnostic:
        own = tuple(a.trial_id for a in attacks if a.train is train(d.train) and a.control is None)
        own = own if d.attack_ids else ()  # the checks on the model itself read no attack row
        diagnostics.append(dataclasses.replace(d, train=train(d.train), attack_ids=own, eval=new_eval))
    return [*(train(t) for t in grid.train), *attacks, *diagnostics]


def test_a_field_added_at_its_default_changes_no_id(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _grid(SWEEP)
    before = ids_by_label(grid.trials)
    pgd = attack_params.ATTACKS["pgd"]
    monkeypatch.setitem(
        attack_params.ATTACKS,
        "pgd",
        dataclasses.replace(pgd, defaults=lambda d: {**pgd.defaults(d), "new_param": 7}),
    )

    extended = _with_new_fields(grid)
    hybrid = next(t for t in extended if isinstance(t, TrainTrial) and t.model.model == "hqcnn")
    assert isinstance(hybrid.model, NewModelSpec) and hybrid.model.new_knob == 0.25
    assert ids_by_label(extended) == before
    assert {label: before[label] for label in PINNED} == PINNED

    # The same field away from its default is another model: the hybrids' ids change, and so do
    # those of everything built on them; the CNN's do not.
    moved = ids_by_label(_with_new_fields(grid, knob=0.5))
    changed = {label for label in before if moved[label] != before[label]}
    assert changed == {label for label in before if SOUND in label or PAPER in label}


# --- one spelling per value; never by what was expanded before ---------------------------------


def _attack_ids_of(attacks_yaml: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: spelling\nmodels: [{{model: cnn_small}}]\nattacks: [{attacks_yaml}]\n")
    return [t.trial_id for t in build_grid(validate(read_config(path))).attack]


def test_one_number_in_any_spelling_is_one_id(tmp_path: Path) -> None:
    eps = {
        text: _attack_ids_of(f"{{name: pgd, params: {{eps: {text}}}}}", tmp_path)
        for text in ("1", "1.0", "1e0", "1.0e+0")
    }
    assert len({tuple(ids) for ids in eps.values()}) == 1, eps
    # an integer parameter given as an integral float is that integer
    steps = {
        text: _attack_ids_of(f"{{name: pgd, params: {{steps: {text}}}}}", tmp_path)
        for text in ("5", "5.0", "5e0")
    }
    assert len({tuple(ids) for ids in steps.values()}) == 1, steps
    assert steps["5"] != eps["1"]


def test_a_boolean_is_never_a_number() -> None:
    assert canonical_json({"a": 1.0, "b": [2.0, 0.5], "c": True}) == '{"a":1,"b":[2,0.5],"c":true}'
    pgd = _grid({"name": "b", "models": [{"model": "cnn_small"}], "attacks": [{"name": "pgd"}]}).attack[0]
    as_bool, as_int = (
        dataclasses.replace(
            pgd, params=tuple((k, value if k == "random_start" else v) for k, v in pgd.params)
        )
        for value in (True, 1)
    )
    assert as_bool.trial_id == pgd.trial_id != as_int.trial_id


ORDER_SCRIPT = """
import json, sys
from dataclasses import replace
from qshield_dist.config import SweepConfig, validate
from qshield_dist.grid import build_grid

def pgd(eps):
    spec = {"name": "order", "models": [{"model": "cnn_small"}], "attacks": [{"name": "pgd", "params": {"eps": eps}}]}
    return build_grid(validate(SweepConfig(**spec))).attack[0]

def random_start(value):  # a driver can make any value; validation makes it a bool
    t = pgd(0.5)
    return replace(t, params=tuple((k, value if k == "random_start" else v) for k, v in t.params))

make = {"1": lambda: pgd(1), "1.0": lambda: pgd(1.0), "True": lambda: random_start(True), "int1": lambda: random_start(1)}
print(json.dumps({name: make[name]().trial_id for name in sys.argv[1].split(",")}))
"""


def test_ids_do_not_depend_on_what_the_process_expanded_before() -> None:
    """Each order in a fresh interpreter: an id is the same whatever came first (a cache keyed
    by == gave `eps: 1.0` the id of `eps: 1`, or the reverse, by expansion order)."""
    runs = []
    for order in ("1,1.0,True,int1", "int1,True,1.0,1", "1.0,int1,1,True"):
        proc = subprocess.run(
            [sys.executable, "-c", ORDER_SCRIPT, order], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0]["1"] == runs[0]["1.0"] and runs[0]["True"] != runs[0]["int1"]


# --- only what a trial reads -------------------------------------------------------------------


def _with_eval(**changes: Any) -> dict[str, str]:
    sweep = json.loads(json.dumps(SWEEP))
    sweep["eval"].update(changes)
    return ids_by_label(_grid(sweep).trials)


def test_attack_ids_leave_out_the_diagnostics_sample_and_which_trials_exist() -> None:
    ids = ids_by_label(_grid(SWEEP).trials)
    own = {k: v for k, v in ids.items() if k.startswith("attack") and not k.endswith("backbone_only")}
    for changes in ({"diagnostic_size": 32}, {"diagnostics": False}, {"controls": []}):
        other = _with_eval(**changes)
        assert {k: other[k] for k in own} == own, changes
    other = _with_eval(diagnostic_size=32)
    # the checks that attack the model take that sample; those that compare attack rows do not
    assert {k for k in ids if other[k] != ids[k]} == {
        k for k in ids if k.startswith("diagnostic") and k.endswith("model")
    }


def test_a_larger_attack_set_reruns_only_the_diagnostics_that_read_its_rows() -> None:
    """A sequential look raises attack_size by whole shards: the checks that attack the model
    (restart_sensitivity on its first points included) keep their ids; the comparisons of attack
    rows, which read every shard, run again."""
    checks = ["eps_sweep_reaches_1", "restart_sensitivity", "iterative_ge_single_step"]
    sharded = {"shard_size": 5, "diagnostics": checks}
    ids = _with_eval(attack_size=10, **sharded)
    more = _with_eval(attack_size=20, **sharded)
    diagnostics = {k for k in ids if k.startswith("diagnostic")}
    assert {k for k in diagnostics if more[k] != ids[k]} == {k for k in diagnostics if k.endswith("rows")}
    # restart_sensitivity attacks the first shard: its size is in the id, and only with that check
    rows = {k for k in diagnostics if k.endswith("rows")}
    wider = _with_eval(attack_size=10, shard_size=10, diagnostics=checks)
    assert {k for k in diagnostics if wider[k] != ids[k]} == diagnostics
    without = [checks[0], checks[2]]
    narrow, wide = (_with_eval(attack_size=10, shard_size=n, diagnostics=without) for n in (5, 10))
    assert {k for k in diagnostics if wide[k] != narrow[k]} == rows
    # the checks a trial runs are in its id
    assert {k for k in diagnostics if narrow[k] != ids[k]} == diagnostics - rows


def test_eval_repeats_is_in_the_ids_of_stochastic_targets_only() -> None:
    # the paper hybrid's own attacks and diagnostic; its backbone_only control attacks its
    # classical backbone alone
    stochastic = {
        f"attack | {PAPER} | fgsm | paper",
        f"attack | {PAPER} | pgd | paper",
        f"attack | {PAPER} | apgd | standard",
        f"diagnostic | {PAPER} | model",
        f"diagnostic | {PAPER} | rows",
    }
    grid = _grid(SWEEP)
    ids, other = ids_by_label(grid.trials), _with_eval(eval_repeats=7)
    assert {k for k in ids if ids[k] != other[k]} == stochastic
    said = {_label(t) for t in grid.attack if t.target_stochastic}
    assert said | {_label(t) for t in grid.diagnostic if t.train.stochastic} == stochastic


def test_the_variant_id_tells_apart_all_that_makes_two_trained_models_differ_but_the_seed() -> None:
    """Two seeds of one model are one variant; other training settings or another control are not."""
    from qshield_dist.grid import variant_id

    def train_of(sweep: dict[str, Any], seed: int) -> TrainTrial:
        return next(
            t for t in _grid({**sweep, "seeds": [0, 1]}).train if t.model.model == "hqcnn" and t.seed == seed
        )

    base = train_of(SWEEP, 0)
    assert variant_id(base, None) == variant_id(train_of(SWEEP, 1), None)
    longer = train_of({**SWEEP, "train": {**SWEEP["train"], "epochs": 4}}, 0)
    assert variant_id(longer, None) != variant_id(base, None)
    assert variant_id(base, "backbone_only") != variant_id(base, None)


# --- the accelerator: in an id only when it is not cpu --------------------------------------


def _on(resources: dict[str, Any]) -> dict[str, str]:
    return {t.trial_id: t.accelerator for t in _grid({**SWEEP, "resources": resources}).trials}


def test_cpu_trials_keep_their_ids_however_cpu_is_spelled() -> None:
    default = _on({})
    assert set(default.values()) == {"cpu"}
    for resources in (
        {"train": {"accelerator": "cpu"}, "attack": {"accelerator": "cpu"}},
        {"train": {"accelerator": "auto", "gpus": 0}},
        {"train": {"accelerator": "cpu", "gpus": 1}, "attack": {"accelerator": "cpu", "gpus": 0.25}},
    ):
        assert _on(resources) == default, resources


def test_a_cuda_trial_never_shares_an_id_with_a_cpu_one() -> None:
    cpu = _grid(SWEEP)
    cuda_train = _grid({**SWEEP, "resources": {"train": {"gpus": 1}}})  # auto -> cuda
    # train on cuda: every train id changes, and with it every id built on a train id
    assert {t.accelerator for t in cuda_train.train} == {"cuda"}
    assert {t.accelerator for t in [*cuda_train.attack, *cuda_train.diagnostic]} == {"cpu"}
    assert not {t.trial_id for t in cuda_train.trials} & {t.trial_id for t in cpu.trials}
    # attack stage on cuda (diagnostics too: they run with the attack's resources)
    cuda_attack = _grid({**SWEEP, "resources": {"attack": {"gpus": 0.25}}})
    assert [t.trial_id for t in cuda_attack.train] == [t.trial_id for t in cpu.train]
    assert {t.accelerator for t in [*cuda_attack.attack, *cuda_attack.diagnostic]} == {"cuda"}
    assert not {t.trial_id for t in [*cuda_attack.attack, *cuda_attack.diagnostic]} & {
        t.trial_id for t in cpu.trials
    }
    # the resolved kind is hashed, not its spelling
    named = _grid({**SWEEP, "resources": {"attack": {"accelerator": "cuda", "gpus": 1}}})
    assert [t.trial_id for t in named.trials] == [t.trial_id for t in cuda_attack.trials]


def test_full_yaml_runs_every_stage_on_cuda() -> None:
    """It reserves a GPU per train trial and a quarter per attack trial: auto resolves to cuda."""
    grid = build_grid(validate(read_config(REPO / "sweeps" / "full.yaml")))
    assert {t.accelerator for t in grid.trials} == {"cuda"}
