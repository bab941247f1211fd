"""Same spec, same numbers: the parity sweep gives identical rows on every executor.

sweeps/parity.yaml takes every random path a trial has (training order and init, the paper's
random projection, trajectories on a state-vector device, input noise, random starts, EOT,
Square's queries). Each run is the real CLI in its own process; rows are compared bit for bit
without results.VOLATILE_COLUMNS (where, when and how fast a trial ran).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import cluster_fixtures as cf
import pytest

from qshield_dist.results.store import ResultStore, differing_trials

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 28  # 4 train + 4 models x 3 attacks x 2 shards


def launch(results: Path, *args: str, env: dict[str, str] | None = None) -> None:
    cmd = [
        sys.executable,
        "-m",
        "qshield_dist.launch",
        "sweeps/parity.yaml",
        "--results",
        str(results),
        "--checkpoints",
        str(results.parent / f"{results.name}-ckpt"),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = {f.trial_id: "failed" if f.failed else "ok" for f in ResultStore(results).files()}
    assert len(done) == N_TRIALS and set(done.values()) == {"ok"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local executor with one worker, the README's way of running a sweep."""
    results = tmp_path_factory.mktemp("parity") / "workers1"
    launch(results, "--workers", "1")
    return results


def _busy_loops(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["workers2_loaded", "ray"])
def test_every_executor_gives_the_reference_rows(how: str, reference: Path, tmp_path: Path) -> None:
    results = tmp_path / how
    if how == "workers2_loaded":
        # another worker count, on a machine whose cores are both busy: timing and scheduling
        # change, the numbers must not
        loops = _busy_loops(2)
        try:
            launch(results, "--workers", "2")
        finally:
            for proc in loops:
                proc.kill()
                proc.wait()
    else:
        pytest.importorskip("ray")
        # a private token-authenticated Ray cluster on loopback, stopped when the launcher exits
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"
        }
        launch(results, "--executor", "ray", "--ray-address", "local", env=env)
    assert differing_trials(reference, results) == {}


def test_differing_trials_names_what_differs(reference: Path, tmp_path: Path) -> None:
    """The comparison can fail: a changed count and a missing trial are both reported."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    files = sorted(copy.rglob("A*.parquet"))
    table = pq.read_table(files[0])
    index = table.schema.get_field_index("n_success")
    pq.write_table(table.set_column(index, "n_success", pc.add(table.column("n_success"), 1)), files[0])
    files[1].unlink()
    diff = differing_trials(reference, copy)
    assert diff == {files[0].stem: ["n_success"], files[1].stem: ["missing"]}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_arrays_give_the_reference_rows(slurm_cluster: None, reference: Path, tmp_path: Path) -> None:
    """python -m qshield_dist.launch --executor slurm: submitit job arrays per stage on the dev
    cluster, afterok between them, packed."""
    import yaml

    sweep = yaml.safe_load((REPO / "sweeps/parity.yaml").read_text())
    sweep["slurm"] = {
        "partition": "debug",
        "time_min": 20,
        "mem_gb": 2,  # CPUs: each stage's own (the attacks' 2 threads need 2)
        "folder": str(tmp_path / "submitit"),
        # Packed tasks of up to 6 trials (each expected at its 10-minute timeout): the trials'
        # numbers must not depend on the company they run in. One trial per task is the SLURM
        # phase's other tests' case; here it would cost each of 28 tasks a Python start.
        "pack_minutes": 60,
    }
    for stage in ("train", "attack"):
        sweep["resources"][stage] = {**sweep["resources"].get(stage, {}), "timeout_min": 10}
    path = tmp_path / "parity.yaml"
    path.write_text(yaml.safe_dump(sweep))
    results = tmp_path / "slurm"
    cmd = [
        sys.executable,
        "-m",
        "qshield_dist.launch",
        str(path),
        "--executor",
        "slurm",
        "--results",
        str(results),
        "--checkpoints",
        str(tmp_path / "ckpt"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(ResultStore(results).files())) == N_TRIALS
    assert differing_trials(reference, results) == {}
    assert stat.S_IMODE((tmp_path / "submitit").stat().st_mode) == 0o700  # pickled jobs: private


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_run_sh_gives_the_reference_rows(slurm_cluster: None, reference: Path, tmp_path: Path) -> None:
    """sbatch slurm/run.sh: a Ray head with token auth inside the allocation, the launcher
    through `python -m qshield_dist.launch --executor ray` against it, the reference rows, and
    everything stopped at the end (the token directory, every process of the job's Ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"QSHIELD_PYTHON": sys.executable, "QSHIELD_RAY_DIR": str(tmp_path / "ray")}
    results, log_file = tmp_path / "runsh", tmp_path / "run-%j.log"
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            f"--output={log_file}",
            "--cpus-per-task=2",
            str(REPO / "slurm/run.sh"),
            "sweeps/parity.yaml",
            "--results",
            str(results),
            "--checkpoints",
            str(tmp_path / "ckpt"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    job_id = proc.stdout.strip().split(";")[0]
    text = Path(str(log_file).replace("%j", job_id)).read_text() if job_id else proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "ray head at 127.0.0.1:" in text and f"{N_TRIALS} ok, 0 failed, 0 lost" in text, text[-3000:]
    assert differing_trials(reference, results) == {}
    assert not (tmp_path / "ray" / job_id).exists()
    cf.ray_processes_gone(f"qshield-ray-{job_id}")
