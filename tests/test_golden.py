"""Golden trials: one small sweep whose rows, per stage, are stored in tests/golden/<stage>.json
with the results version that produced them.

- The version in the file equals the code's: every row must match. Counts, flags and text
  exactly; floats within FLOAT_TOLERANCE (CI machines differ in their SIMD paths, and the
  floats are allowed to move by round-off there, not by more).
- A mismatch while the version is unchanged fails: the change alters what the stage computes,
  so bump its version in qshield_dist/results/current.py in the same commit.
- The code's version differs from the file's: fails until the golden is regenerated with
  `QSHIELD_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py` and committed beside the bump.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from qshield_dist.config import SweepConfig, validate
from qshield_dist.grid import build_grid
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.schema import VOLATILE_COLUMNS
from qshield_dist.trial import RunContext, run_trial

GOLDEN = Path(__file__).parent / "golden"
FLOAT_TOLERANCE = {"rel": 1e-5, "abs": 1e-7}
SWEEP = {
    "name": "golden",
    "data": {"dataset": "digits", "train_size": 300, "test_size": 60},
    "train": {"epochs": 3, "batch_size": 32},
    "eval": {"attack_size": 10, "eval_repeats": 3, "diagnostics": True, "diagnostic_size": 8},
    "models": [
        {"model": "cnn_small"},
        # the paper's code: a random projection on every call, a detached quantum branch
        {"model": "hqcnn", "backbone": "cnn_small", "projection": "paper", "quantum_grad": "detached"},
    ],
    "attacks": [
        {"name": "fgsm"},
        {"name": "pgd", "params": {"steps": 3}},
        {"name": "square", "params": {"n_queries": 20}},
    ],
}


def _label(row: dict[str, Any]) -> str:
    parts = [row["stage"], row["variant"], row.get("attack") or "", row.get("diagnostic") or ""]
    return " | ".join(p for p in parts if p)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, Any]]]:
    """stage -> label -> row (volatile columns dropped), from running every golden trial here."""
    root = tmp_path_factory.mktemp("golden")
    ctx = RunContext(sweep="golden", results_dir=str(root / "results"), checkpoint_dir=str(root / "ckpt"))
    out: dict[str, dict[str, dict[str, Any]]] = {stage: {} for stage in STAGE_VERSIONS}
    for trial in build_grid(
        validate(SweepConfig(**SWEEP))
    ).trials:  # dependency order: train, attack, diagnostic
        assert run_trial(trial, ctx) == "ok", ctx.store.read(trial, failed=True)
        for row in ctx.store.read(trial):
            out[trial.stage][_label(row)] = {k: v for k, v in row.items() if k not in VOLATILE_COLUMNS}
    return out


def _differences(want: Any, got: Any, where: str) -> list[str]:
    """Where two stored values differ beyond the tolerance (JSON strings compared parsed)."""
    if isinstance(want, str) and isinstance(got, str) and want[:1] in "[{" and got[:1] in "[{":
        try:
            want, got = json.loads(want), json.loads(got)
        except json.JSONDecodeError:
            pass
    if isinstance(want, dict) and isinstance(got, dict):
        # a column one side lacks counts as null: adding an empty column changes no result
        return [
            d
            for k in sorted(want.keys() | got.keys())
            for d in _differences(want.get(k), got.get(k), f"{where}.{k}")
        ]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in _differences(a, b, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        if math.isnan(want) and math.isnan(got):
            return []
        return (
            []
            if math.isclose(want, got, rel_tol=FLOAT_TOLERANCE["rel"], abs_tol=FLOAT_TOLERANCE["abs"])
            else [f"{where}: {want!r} -> {got!r}"]
        )
    return [] if want == got else [f"{where}: {want!r} -> {got!r}"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_VERSIONS))
def test_golden_trial(stage: str, rows: dict[str, dict[str, dict[str, Any]]]) -> None:
    path = GOLDEN / f"{stage}.json"
    current = {"version": STAGE_VERSIONS[stage], "rows": rows[stage]}
    if os.environ.get("QSHIELD_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(current, indent=1, sort_keys=True, default=str) + "\n")
        pytest.skip(f"wrote {path}: commit it with the version bump")
    golden = json.loads(path.read_text())
    assert golden["version"] == STAGE_VERSIONS[stage], (
        f"{stage} version is {STAGE_VERSIONS[stage]} but {path.name} holds version {golden['version']}: regenerate it with "
        "QSHIELD_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py and commit it with the bump"
    )
    problems = _differences(golden["rows"], json.loads(json.dumps(current["rows"], default=str)), stage)
    assert not problems, (
        f"the {stage} golden trials changed while the {stage} version stayed {STAGE_VERSIONS[stage]}: if the change is meant, bump "
        f"{stage.upper()}_VERSION in qshield_dist/results/current.py and regenerate the golden; differences:\n  "
        + "\n  ".join(problems[:20])
    )
