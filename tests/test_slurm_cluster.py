"""SlurmExecutor and slurm/run.sh against a real one-node SLURM cluster (slurm/dev-cluster.sh,
started by conftest's slurm_cluster fixture), and the cluster's daemons on loopback only."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")
import cloudpickle  # noqa: E402  (submitit pickles with the standalone cloudpickle)

import cluster_fixtures as cf  # noqa: E402
from qshield_dist.executors.base import Job, Resources  # noqa: E402
from qshield_dist.executors.slurm import SlurmExecutor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm
# The SLURM job runs a fresh python that does not have tests/ on sys.path.
cloudpickle.register_pickle_by_value(cf)


# The cluster's daemons, and the ports of the SLURM ones (whoever holds them).
DAEMONS = {"slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd"}
SLURM_PORTS = {6817, 6818, 6819}


def listening_sockets(ss_output: str) -> list[tuple[set[str], str, int]]:
    """(process names, local address, port) of each socket in `ss -ltnpH` output."""
    out = []
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        addr, _, port = fields[3].rpartition(":")
        out.append((set(re.findall(r'\("([^"]+)",pid=\d+', line)), addr.strip("[]").split("%")[0], int(port)))
    return out


def on_loopback(addr: str) -> bool:
    """127.0.0.0/8 or ::1; '*', 0.0.0.0 and :: (every address) are not."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_daemons_listen_on_loopback_only(slurm_cluster: None) -> None:
    """slurmctld, slurmd and slurmdbd on 127.0.0.1 (not 0.0.0.0, not the hostname's address);
    munged and mariadbd on unix sockets, or on loopback if on TCP at all."""
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [(names, addr, port) for names, addr, port in listening_sockets(out)
            if names & DAEMONS or port in SLURM_PORTS]
    assert {"slurmctld", "slurmd", "slurmdbd"} <= set().union(*(n for n, _, _ in ours)), out
    beyond = [(sorted(names), addr, port) for names, addr, port in ours if not on_loopback(addr)]
    assert not beyond, f"listening beyond loopback: {beyond}\n{out}"


COMPARED = ["trial_id", "stage", "status", "model", "attack", "clean_acc", "n_attacked", "n_success", "train_steps", "linf_max"]


def smoke_rows(results: Path) -> list[dict]:
    """The result rows of a smoke sweep, the columns every executor must agree on."""
    import polars as pl

    df = pl.read_parquet(str(results / "stage=*" / "*" / "*.parquet"), hive_partitioning=False)
    return df.select(COMPARED).sort("trial_id").to_dicts()


@pytest.fixture(scope="module")
def local_smoke(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The smoke sweep through the local executor: the reference the cluster runs must match."""
    from qshield_dist import launch

    root = tmp_path_factory.mktemp("local_smoke")
    code = launch.main([str(REPO / "sweeps/smoke.yaml"), "--results", str(root / "results"), "--checkpoints", str(root / "ckpt")])
    assert code == 0
    return smoke_rows(root / "results")


def job(out: Path, key: str, deps: tuple[str, ...] = (), fn=cf.record, stage: str = "train") -> Job:
    return Job(key, functools.partial(fn, str(out), key), deps, Resources(cpus=1, mem_gb=0.5, timeout_min=10),
               stage=stage)


def executor(tmp_path: Path) -> SlurmExecutor:
    return SlurmExecutor(folder=tmp_path / "submitit", partition="debug", poll_s=1.0, time_min=10,
                         cpus_per_task=1, mem_gb=0.5)


def wait_file(path: Path, timeout: float = 90) -> str:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)
    return path.read_text()


def test_two_waves_afterok(slurm_cluster: None, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    jobs = [job(out, "t0"), job(out, "t1"),
            job(out, "a0", ("t0",), stage="attack"), job(out, "a1", ("t1",), stage="attack"),
            job(out, "a2", ("t0", "t1"), stage="attack")]
    ex = executor(tmp_path)
    result = ex.run(jobs)
    assert result == {k.key: "ok" for k in jobs}
    times = {j.key: cf.start_end(out, j.key) for j in jobs}  # each ran exactly once
    assert min(times[a][0] for a in ("a0", "a1", "a2")) >= max(times["t0"][1], times["t1"][1])
    assert len(ex.array_ids) == 2
    first, second = ex.array_ids
    scripts = list((tmp_path / "submitit").rglob("*_submission.sh"))
    text = "\n".join(p.read_text() for p in scripts)
    assert f"--dependency=afterok:{first}" in text and "--array=0-2" in text, scripts
    # the log folder is private
    assert stat.S_IMODE((tmp_path / "submitit").stat().st_mode) == 0o700
    # SLURM saw two arrays, both completed
    want = sorted([f"{first}_0|COMPLETED", f"{first}_1|COMPLETED", f"{second}_0|COMPLETED",
                   f"{second}_1|COMPLETED", f"{second}_2|COMPLETED"])
    deadline = time.time() + 30  # slurmctld sends records to slurmdbd asynchronously
    while True:
        acct = sorted(subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", f"{first},{second}"],
                                     capture_output=True, text=True).stdout.split())
        if acct == want or time.time() > deadline:
            break
        time.sleep(1)
    assert acct == want


def test_scancel_task_is_lost_and_rest_completes(slurm_cluster: None, tmp_path: Path) -> None:
    """Design: a cancelled task is 'lost' (not retried by us); its dependents are 'lost'
    without running; the later wave, whose afterok can no longer hold, is resubmitted
    without them, so every other job still runs."""
    out = tmp_path / "out"
    out.mkdir()
    jobs = [job(out, "t0", fn=cf.slurm_wait_for_release), job(out, "t1"),
            job(out, "a0", ("t0",), stage="attack"), job(out, "a1", ("t1",), stage="attack"),
            job(out, "a01", ("t0", "t1"), stage="attack")]
    ex = executor(tmp_path)
    import threading

    result: dict[str, str] = {}
    runner = threading.Thread(target=lambda: result.update(ex.run(jobs)))
    runner.start()
    task = wait_file(out / "t0.slurm").split()[0]
    subprocess.run(["scancel", task], check=True)
    runner.join(timeout=180)
    assert not runner.is_alive()
    assert result == {"t0": "lost", "t1": "ok", "a0": "lost", "a1": "ok", "a01": "lost"}
    assert not (out / "t0.out").exists()
    assert cf.runs(out, "a0") == [] and cf.runs(out, "a01") == []
    assert len(cf.runs(out, "a1")) == 1
    assert len(ex.array_ids) == 3  # train, attack (cancelled: afterok broken), attack again


def test_preemption_requeues_through_checkpoint(slurm_cluster: None, tmp_path: Path) -> None:
    """SIGUSR2 is what SLURM sends before a time-out or preemption: submitit calls
    TrialRunner.checkpoint and requeues the task, which runs the trial again and succeeds."""
    out = tmp_path / "out"
    out.mkdir()
    jobs = [job(out, "p", fn=cf.slurm_wait_for_release)]
    ex = executor(tmp_path)
    import threading

    result: dict[str, str] = {}
    runner = threading.Thread(target=lambda: result.update(ex.run(jobs)))
    runner.start()
    task = wait_file(out / "p.slurm").split()[0]
    subprocess.run(["scancel", "--signal=USR2", task], check=True)
    deadline = time.time() + 150
    while len((out / "p.slurm").read_text().split()) < 2:  # the requeued run started
        assert time.time() < deadline and runner.is_alive(), "task was not requeued"
        # slurmctld holds a requeued job ~2 minutes (BeginTime); let it start now.
        state = subprocess.run(["squeue", "-h", "-j", task, "-o", "%T %r"], capture_output=True, text=True).stdout
        if state.startswith("PENDING") and "BeginTime" in state:
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=False)
        time.sleep(0.5)
    (out / "release").touch()
    runner.join(timeout=120)
    assert result == {"p": "ok"}
    assert (out / "p.slurm").read_text().split() == [task, task]  # same task id, run twice
    assert len(cf.runs(out, "p")) == 1 and (out / "p.out").exists()


@pytest.mark.slow
def test_submitit_executor_gives_the_local_rows(slurm_cluster: None, local_smoke: list[dict], tmp_path: Path) -> None:
    """python -m qshield_dist.launch --executor slurm: job arrays per stage, afterok between them."""
    import yaml

    from qshield_dist import launch

    sweep = yaml.safe_load((REPO / "sweeps/smoke.yaml").read_text())
    sweep["slurm"] = {"partition": "debug", "time_min": 10, "cpus_per_task": 1, "mem_gb": 1, "folder": str(tmp_path / "submitit")}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code = launch.main([str(path), "--executor", "slurm", "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ckpt")])
    assert code == 0
    assert smoke_rows(tmp_path / "results") == local_smoke
    assert stat.S_IMODE((tmp_path / "submitit").stat().st_mode) == 0o700


def test_run_sh_runs_smoke_sweep_on_ray(slurm_cluster: None, local_smoke: list[dict], tmp_path: Path) -> None:
    """sbatch slurm/run.sh: Ray head with token auth inside the allocation, the real sweep
    through `python -m qshield_dist.launch --executor ray`, everything stopped at the end."""
    if not (REPO / "qshield_dist" / "launch.py").exists() or not (REPO / "sweeps" / "smoke.yaml").exists():
        pytest.skip("qshield_dist/launch.py or sweeps/smoke.yaml not written yet")
    import sys

    from qshield_dist.results import scan_done

    env = dict(os.environ, QSHIELD_PYTHON=sys.executable, QSHIELD_RAY_DIR=str(tmp_path / "ray"))
    env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    results, log_file = tmp_path / "results", tmp_path / "run-%j.log"
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={log_file}", "--cpus-per-task=2",
         str(REPO / "slurm/run.sh"), "sweeps/smoke.yaml", "--results", str(results),
         "--checkpoints", str(tmp_path / "ckpt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    # poll (sbatch --wait backs off to 30 s between checks)
    deadline, state = time.time() + 600, ""
    while time.time() < deadline:
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", job_id],
                               capture_output=True, text=True).stdout.strip()
        if state and not state.startswith(("PENDING", "RUNNING", "COMPLETING")):
            break
        time.sleep(1)
    text = Path(str(log_file).replace("%j", job_id)).read_text()
    assert state == "COMPLETED|0:0", text[-3000:]
    assert "ray head at 127.0.0.1:" in text and "9 ok, 0 failed, 0 lost" in text, text[-3000:]
    done = scan_done(results)
    assert len(done) == 9 and set(done.values()) == {"ok"}
    assert smoke_rows(results) == local_smoke
    # the token directory is gone, and so is every process of the job's Ray cluster
    assert not (tmp_path / "ray" / job_id).exists()
    marker = f"qshield-ray-{job_id}".encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                assert marker not in Path(f"/proc/{pid}/cmdline").read_bytes(), f"ray process {pid} left behind"
            except OSError:
                pass
