"""The SLURM settings users need reach the job script: account, QoS, constraint, setup lines,
and each stage's own partition and time limit (the sweep-wide ones where it sets none). The
script is the one submitit writes for an array (its `_make_sbatch_string`, which
`SlurmExecutor._make_submission_file_text` calls with the parameters `update_parameters` took):
made here without SLURM, nothing is submitted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qshield_dist.config import read_config
from qshield_dist.executors.base import Job
from qshield_dist.sweep import make_executor

submitit = pytest.importorskip("submitit")
from submitit.slurm.slurm import _make_sbatch_string  # noqa: E402

SLURM = {
    "partition": "cpu",
    "time_min": 60,
    "account": "proj-042",
    "qos": "high",
    "constraint": "[a100|h100]&ib",
    "setup": ["module load cuda/12.4", "source /opt/venvs/qshield/bin/activate"],
    "train": {"partition": "gpu", "time_min": 600},
    "diagnostic": {"time_min": 30},
}


def _script(tmp_path: Path, slurm: dict, stage: str, n_tasks: int = 3) -> str:
    """The job script of an array of `n_tasks` one-trial tasks of `stage`."""
    cfg = read_config(
        "sweeps/smoke.yaml", {"executor": "slurm", "results_dir": str(tmp_path), "slurm": slurm}
    )
    ex = make_executor(cfg)
    jobs = [
        Job(f"{stage}{i}", print, (), stage=stage, cpus=2, gpus=0, mem_gb=4, timeout_min=45)
        for i in range(n_tasks)
    ]
    params = ex.sbatch_parameters(jobs, after="1234")
    assert set(params) <= submitit.SlurmExecutor._valid_parameters()  # what update_parameters takes
    return _make_sbatch_string(
        command="python -u -m submitit.core._submit FOLDER",
        folder=tmp_path / "%j",
        map_count=n_tasks,
        **params,
    )


def _sbatch(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))


@pytest.mark.parametrize(
    "stage,partition,time",
    [("train", "gpu", "600"), ("attack", "cpu", "60"), ("diagnostic", "cpu", "30")],
)
def test_the_job_script_holds_the_slurm_settings_of_each_stage(
    tmp_path: Path, stage: str, partition: str, time: str
) -> None:
    script = _script(tmp_path, SLURM, stage)
    options = _sbatch(script)
    assert options["account"] == "proj-042" and options["qos"] == "high"
    assert options["constraint"] == "'[a100|h100]&ib'"  # shell-quoted by submitit; sbatch reads it whole
    assert (options["partition"], options["time"]) == (partition, time)
    assert options["array"] == "0-2%3" and options["dependency"] == "afterok:1234"
    lines = script.splitlines()
    setup = lines.index("# setup")
    assert lines[setup + 1 : setup + 3] == SLURM["setup"]
    assert setup < next(i for i, line in enumerate(lines) if line.startswith("srun "))


def test_without_them_the_script_has_none_and_the_time_comes_from_the_packs(tmp_path: Path) -> None:
    options = _sbatch(_script(tmp_path, {}, "attack"))
    assert not {"account", "qos", "constraint", "partition"} & set(options)
    assert options["time"] == "45"  # one 45-minute trial per task: its own limit
    assert "# setup" not in _script(tmp_path, {}, "attack")


def test_an_array_holds_one_stage(tmp_path: Path) -> None:
    """A wave holding trains and attacks (a hybrid trains after its baseline while the
    baseline's attacks run) becomes one array per stage, so each takes its stage's settings."""
    cfg = read_config(
        "sweeps/smoke.yaml", {"executor": "slurm", "results_dir": str(tmp_path), "slurm": SLURM}
    )
    ex = make_executor(cfg)
    toy = {"cpus": 1, "gpus": 0, "mem_gb": 1, "timeout_min": 10}
    jobs = [
        Job("base", print, (), **toy),
        Job("hybrid", print, ("base",), **toy),
        Job("attack-base", print, ("base",), stage="attack", **toy),
        Job("attack-base-2", print, ("base",), stage="attack", **toy),
    ]
    arrays = ex.plan(jobs, max_tasks=1000)
    assert [(a.stage, [[j.key for j in p] for p in a.packs]) for a in arrays] == [
        ("train", [["base"]]),
        ("train", [["hybrid"]]),
        ("attack", [["attack-base", "attack-base-2"]]),
    ]
    assert ex.sbatch_parameters(arrays[1].packs)["partition"] == "gpu"
    assert ex.sbatch_parameters(arrays[2].packs)["partition"] == "cpu"
    with pytest.raises(ValueError, match="one stage"):
        ex.sbatch_parameters(jobs[1:3])
