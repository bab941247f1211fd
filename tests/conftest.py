"""Shared fixtures: a digits subset, a trained cnn_small, hybrids started from it, and a
one-node SLURM cluster (slurm_cluster) for the tests marked slurm."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from qshield_dist.config import ModelSpec, TrainConfig
from qshield_dist.data import DATASETS, load
from qshield_dist.models import build_model
from qshield_dist.train import train_model

DIGITS = DATASETS["digits"]
REPO = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO / "slurm" / "dev-cluster.sh"
# What slurm/dev-cluster.sh and the tests run (its have_binaries, and the client commands).
SLURM_COMMANDS = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "munged",
    "mariadbd",
    "sbatch",
    "srun",
    "squeue",
    "sacct",
    "scancel",
    "scontrol",
    "sinfo",
)

log = logging.getLogger(__name__)
_cluster_lines: list[str] = []  # what slurm_cluster started and stopped, for the summary


@pytest.fixture(scope="session")
def digits():
    return load("digits", train_size=600, test_size=150)


@pytest.fixture(scope="session")
def baseline(digits):
    """A trained cnn_small: hybrids start from it (init: from_baseline), as in the sweeps."""
    train, _ = digits
    torch.manual_seed(0)
    model = build_model(ModelSpec(model="cnn_small"), DIGITS)
    train_model(model, train.x, train.y, TrainConfig(epochs=6), seed=0)
    return model


@pytest.fixture(scope="session")
def trained_hqcnn(digits, baseline):
    """hqcnn(**fields) with the baseline's backbone, then trained as a hybrid."""

    def make(**fields):
        train, _ = digits
        torch.manual_seed(0)
        model = build_model(
            ModelSpec(model="hqcnn", backbone="cnn_small", **fields).resolved(DIGITS.classes), DIGITS
        )
        model.backbone.load_state_dict(baseline.backbone.state_dict())
        # The fusion MLP's BatchNorm needs ~20 steps before its running statistics are usable.
        train_model(model, train.x, train.y, TrainConfig(epochs=5), seed=0)
        return model

    return make


def _missing_commands() -> list[str]:
    return [c for c in SLURM_COMMANDS if not shutil.which(c)]


def _slurm_installed() -> bool:
    """Debian's SLURM packages are installed, whether or not their commands are on PATH."""
    if not shutil.which("dpkg-query"):
        return False
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}\\n", "slurmctld", "slurmd", "slurm-client"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return sum(line.endswith(" installed") for line in out) == 3


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the pid, names one process (dev-cluster.sh records it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(") ", 1)[1].split()[19]


def _stop_started(state: Path) -> None:
    """Stop the daemons `dev-cluster.sh start --state` recorded in state, and only those."""
    recorded = (
        [line.split() for line in state.read_text().splitlines() if line.strip()] if state.exists() else []
    )
    if not recorded:
        _cluster_lines.append("slurm_cluster: started no daemon (the cluster was running): stopped none")
        log.info(_cluster_lines[-1])
        return
    proc = subprocess.run(
        [str(DEV_CLUSTER), "stop", "--state", str(state)], capture_output=True, text=True, timeout=300
    )
    for line in proc.stderr.splitlines():
        _cluster_lines.append(f"slurm_cluster teardown: {line}")
        log.info(_cluster_lines[-1])
    left = [f"{name} ({pid})" for name, pid, start in recorded if _start_time(int(pid)) == start]
    if proc.returncode != 0 or left:
        raise RuntimeError(
            f"slurm/dev-cluster.sh stop --state {state} left running: {left or 'see below'}\n"
            f"{proc.stdout}{proc.stderr}"
        )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running one-node SLURM cluster (slurm/dev-cluster.sh start: installs it if need be),
    or a skip naming what is missing. At the end of the session it stops exactly the daemons
    it started, by pid and start time; a cluster that was running already is left running."""
    if os.geteuid() != 0:
        pytest.skip("the dev SLURM cluster needs root (it installs packages and starts daemons)")
    missing = _missing_commands()
    if missing and _slurm_installed():
        pytest.skip(f"SLURM is installed but not on PATH: {' '.join(missing)} (under slurm/without-slurm?)")
    if missing and not shutil.which("apt-get"):
        pytest.skip(
            f"SLURM is not installed ({' '.join(missing)} not on PATH) and there is no apt-get to install it"
        )
    state = tmp_path_factory.mktemp("slurm_cluster") / "started"
    try:
        proc = subprocess.run(
            [str(DEV_CLUSTER), "start", "--state", str(state)], capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        _stop_started(state)
        pytest.fail("slurm/dev-cluster.sh start did not finish in 15 minutes")
    _cluster_lines.extend(f"slurm_cluster: {line}" for line in proc.stderr.splitlines() if "started" in line)
    if proc.returncode != 0:
        _stop_started(state)
        tail = (proc.stdout + proc.stderr)[-2000:]
        if missing:
            pytest.skip(
                f"could not install/start SLURM ({' '.join(missing)} not on PATH; no package mirror?):\n{tail}"
            )
        pytest.fail(f"slurm/dev-cluster.sh start failed:\n{tail}")
    missing = _missing_commands()
    if missing:  # installed, yet not on this PATH
        _stop_started(state)
        pytest.skip(f"SLURM was installed but is not on PATH: {' '.join(missing)}")
    try:
        yield
    finally:
        _stop_started(state)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the slurm_cluster fixture started and stopped (pids), so a run shows it."""
    if _cluster_lines:
        terminalreporter.section("slurm_cluster")
        for line in _cluster_lines:
            terminalreporter.write_line(line)
