"""Validating and expanding a sweep, a dry run, --status and a summary (by the CLI's modules and by the
public API) load neither torch nor PennyLane:
they run on a login node or a laptop. Each path runs in a fresh interpreter, and sys.modules is
checked after it ran, not only after the imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pennylane", "torchattacks", "ray", "submitit")

EXPAND = """
from qshield_dist.config import read_config, validate
from qshield_dist.grid import build_grid
for path in ("sweeps/quick.yaml", "sweeps/full.yaml", "sweeps/adaptive.yaml", "sweeps/parity.yaml"):
    grid = build_grid(validate(read_config(path)))
    assert grid.attack, path
"""

DRY_RUN = """
from qshield_dist import launch
assert launch.main(["sweeps/full.yaml", "--dry-run", "--results", {results!r}]) == 0
"""

STATUS = """
from qshield_dist import launch
assert launch.main(["sweeps/full.yaml", "--status", "--results", {results!r}]) == 0
"""

SUMMARY = """
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.summary.report import Options, summarize
root = {results!r}
rows = [
    {{"sweep": "s", "stage": "train", "status": "ok", "trial_id": "T1", "dataset": "digits", "model": "cnn_small",
      "variant": "cnn_small", "seed": 0, "clean_acc": 0.9, "train_seconds": 1.0, "train_steps": 10}},
    {{"sweep": "s", "stage": "attack", "status": "ok", "trial_id": "A1", "train_id": "T1", "dataset": "digits",
      "model": "cnn_small", "variant": "cnn_small", "seed": 0, "attack": "fgsm", "attack_preset": "paper",
      "attack_params": "{{}}", "threat_model": "linf", "eps": 0.1, "eval_repeats": 1, "clean_acc": 0.9, "n_points": 4,
      "n_attacked": 4, "n_success": 1, "asr": 0.25, "asr_worst": 0.25, "robust_acc": 0.75, "attack_seconds": 1.0,
      "forward_calls": 1, "backward_calls": 1, "forward_samples": 4, "backward_samples": 4, "budget_ok": True,
      "point_index": [0, 1, 2, 3], "point_correct": [True] * 4, "point_broken": [True, False, False, False]}},
]
for row in rows:
    row.update(results_version=STAGE_VERSIONS[row["stage"]], train_version=STAGE_VERSIONS["train"])
    ResultStore(root).write(TrialKey(row["stage"], row["dataset"], row["trial_id"]), [row])
ResultStore(root).write_manifest({{"sweep": "s"}}, {{r["trial_id"]: {{"stage": r["stage"], "dataset": "digits"}} for r in rows}})
summarize(root, root + "-report", Options(plots=True, svg=False, proxies={{}}))
import qshield_dist  # the public API: a config, and a summary as frames
assert qshield_dist.load_config("sweeps/full.yaml").models
assert qshield_dist.summarize(root).robustness.height == 1
"""

CHECK = """
import sys
loaded = [m for m in {heavy!r} if m in sys.modules]
assert not loaded, f"loaded: {{loaded}}"
print("clean")
"""


@pytest.mark.parametrize("path", ["expand", "dry_run", "status", "summary"])
def test_path_loads_neither_torch_nor_pennylane(path: str, tmp_path: Path) -> None:
    body = {"expand": EXPAND, "dry_run": DRY_RUN, "status": STATUS, "summary": SUMMARY}[path].format(
        results=str(tmp_path / "results")
    )
    code = body + CHECK.format(heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("clean"), proc.stderr[-3000:]


def test_the_check_can_fail() -> None:
    """The same check trips on a path that does load torch."""
    code = "import qshield_dist.trial\n" + CHECK.format(heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "loaded: ['torch'" in proc.stderr
