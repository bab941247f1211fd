"""SlurmExecutor and slurm/run.sh against a real one-node SLURM cluster (slurm/dev-cluster.sh,
started by conftest's slurm_cluster fixture) and a two-node one in network namespaces
(dev-cluster.sh start-netns), and the clusters' daemons on loopback or inside their namespaces.
What every executor must do (statuses, the lost rule, each job once) is
test_executors.test_executor_contract; here: packing, arrays, afterok, scancel, requeue, sacct."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

submitit = pytest.importorskip("submitit")
import cloudpickle  # noqa: E402  (submitit pickles with the standalone cloudpickle)
import cluster_fixtures as cf  # noqa: E402

from qshield_dist.executors.base import Job  # noqa: E402
from qshield_dist.executors.slurm import SlurmExecutor, max_array_tasks  # noqa: E402
from qshield_dist.executors.slurm_packing import pack_jobs  # noqa: E402
from qshield_dist.results.store import ResultStore, differing_trials  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO / "slurm" / "dev-cluster.sh"
# The SLURM job runs a fresh python that does not have tests/ on sys.path.
cloudpickle.register_pickle_by_value(cf)


# The cluster's daemons, and the ports of the SLURM ones (whoever holds them).
DAEMONS = {"slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd"}
SLURM_PORTS = {6817, 6818, 6819}
TEN_MINUTES = cf.TOY  # Job resources: 10 minutes


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


def job(out: Path, key: str, deps: tuple[str, ...] = (), fn=cf.record, stage: str = "train") -> Job:
    return Job(key, functools.partial(fn, str(out), key), deps, stage=stage, **TEN_MINUTES)


def executor(tmp_path: Path, **kw: float) -> SlurmExecutor:
    return SlurmExecutor(
        folder=tmp_path / "submitit", partition="debug", poll_s=1.0, cpus_per_task=1, mem_gb=0.5, **kw
    )


def wait_file(path: Path, timeout: float = 90) -> str:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)
    return path.read_text()


def run_in_thread(ex: SlurmExecutor, jobs: list[Job]) -> tuple[threading.Thread, dict[str, str]]:
    result: dict[str, str] = {}
    runner = threading.Thread(target=lambda: result.update(ex.run(jobs)))
    runner.start()
    return runner, result


def sacct_states(*array_ids: str, want: int, timeout: float = 30) -> list[str]:
    """'JOBID|STATE' of every task of the arrays, once sacct has `want` in a final state
    (slurmctld sends the records to slurmdbd asynchronously; a task may still be exiting when
    its result is in)."""
    deadline = time.time() + timeout
    while True:
        acct = sorted(
            subprocess.run(
                ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(array_ids)],
                capture_output=True,
                text=True,
            ).stdout.split()
        )
        final = [a for a in acct if a.split("|")[1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")]
        if len(final) >= want or time.time() > deadline:
            return acct
        time.sleep(1)


# -- two nodes in network namespaces ----------------------------------------------------------


@dataclass
class TwoNodes:
    """A cluster `dev-cluster.sh start-netns` started: its slurm.conf and namespaces."""

    dir: Path
    conf: str
    ctl_netns: str
    node_netns: list[str]
    subnet: ipaddress.IPv4Network
    pids: list[int]

    def client(self, *cmd: str) -> list[str]:
        """A client command for this cluster: in the controller's namespace, with its conf."""
        return ["nsenter", f"--net=/run/netns/{self.ctl_netns}", "env", f"SLURM_CONF={self.conf}", *cmd]


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _stop_recorded(state: Path) -> None:
    """dev-cluster.sh stop --state: then nothing it recorded is left (processes, namespaces, dir)."""
    lines = (
        [line.split() for line in state.read_text().splitlines() if line.strip()] if state.exists() else []
    )
    proc = subprocess.run(
        [str(DEV_CLUSTER), "stop", "--state", str(state)], capture_output=True, text=True, timeout=300
    )
    alive = [f"{f[0]} ({f[1]})" for f in lines if f[0] in DAEMONS and _start_time(int(f[1])) == f[2]]
    netns = [f[1] for f in lines if f[0] == "netns" and Path("/run/netns", f[1]).exists()]
    dirs = [f[1] for f in lines if f[0] == "dir" and Path(f[1]).exists()]
    assert proc.returncode == 0 and not alive and not netns and not dirs, (
        f"stop --state {state} left {alive} {netns} {dirs}:\n{proc.stdout}{proc.stderr}"
    )


@pytest.fixture(scope="module")
def two_node_cluster(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """Two slurmd (node1, node2) and a slurmctld, each in its own network and UTS namespace,
    joined by a bridge in the controller's namespace; munged is slurm_cluster's. Stops exactly
    what it started and deletes its namespaces (and with them the bridge and veth pairs)."""
    missing = [c for c in ("ip", "nsenter", "unshare", "mount") if not shutil.which(c)]
    if missing:
        pytest.skip(
            f"a two-node cluster in network namespaces needs {' '.join(missing)} (iproute2, util-linux)"
        )
    state = tmp_path_factory.mktemp("two_nodes") / "started"
    proc = subprocess.run(
        [str(DEV_CLUSTER), "start-netns", "--state", str(state)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        _stop_recorded(state)
        if proc.returncode == 77:
            pytest.skip(f"no two-node cluster: {proc.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"dev-cluster.sh start-netns failed:\n{proc.stdout}{proc.stderr[-3000:]}")
    try:
        root = Path(proc.stdout.split()[-1])
        env = dict(
            line.split("=", 1) for line in (root / "cluster.env").read_text().splitlines() if "=" in line
        )
        env = {k: v.strip('"') for k, v in env.items()}
        pids = [int(f.split()[1]) for f in state.read_text().splitlines() if f.split()[0] in DAEMONS]
        yield TwoNodes(
            root,
            env["SLURM_CONF"],
            env["DEV_SLURM_CTL_NETNS"],
            env["DEV_SLURM_NODE_NETNS"].split(),
            ipaddress.ip_network(env["DEV_SLURM_SUBNET"]),
            pids,
        )
    finally:
        _stop_recorded(state)


# -- daemons ----------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.parametrize("cluster", ["one-node", pytest.param("two-node", marks=pytest.mark.netns)])
def test_daemons_listen_on_loopback_only(cluster: str, request: pytest.FixtureRequest) -> None:
    """One node: slurmctld, slurmd and slurmdbd on 127.0.0.1 (not 0.0.0.0, not the hostname's
    address); munged and mariadbd on unix sockets, or on loopback if on TCP at all.
    Two nodes: nothing in this machine's network namespace; in each of theirs, every listening
    socket on loopback or on the namespaces' private subnet, which has no route out."""
    request.getfixturevalue("slurm_cluster")
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    if cluster == "one-node":
        ours = [
            (names, addr, port)
            for names, addr, port in listening_sockets(out)
            if names & DAEMONS or port in SLURM_PORTS
        ]
        assert {"slurmctld", "slurmd", "slurmdbd"} <= set().union(*(n for n, _, _ in ours)), out
        beyond = [(sorted(names), addr, port) for names, addr, port in ours if not on_loopback(addr)]
        assert not beyond, f"listening beyond loopback: {beyond}\n{out}"
        return
    two: TwoNodes = request.getfixturevalue("two_node_cluster")
    assert not [line for line in out.splitlines() if any(f"pid={p}," in line for p in two.pids)], out
    for ns, daemon in [(two.ctl_netns, "slurmctld"), *((n, "slurmd") for n in two.node_netns)]:
        inside = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", "ss", "-ltnpH"], capture_output=True, text=True, check=True
        ).stdout
        sockets = listening_sockets(inside)
        assert daemon in set().union(*(n for n, _, _ in sockets)), inside
        beyond = [
            (sorted(names), addr, port)
            for names, addr, port in sockets
            if not (on_loopback(addr) or _in_subnet(addr, two.subnet))
        ]
        assert not beyond, f"{ns}: listening beyond loopback and {two.subnet}: {beyond}\n{inside}"
        routes = subprocess.run(["ip", "-n", ns, "-4", "route"], capture_output=True, text=True).stdout
        assert routes.strip() and all(line.startswith(str(two.subnet)) for line in routes.splitlines()), (
            routes
        )


def _in_subnet(addr: str, subnet: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_address(addr) in subnet
    except ValueError:
        return False


# -- packing, arrays, afterok -----------------------------------------------------------------


def test_packing_fills_packs_to_the_target_and_keeps_levels_apart() -> None:
    """Needs no cluster: best-fit decreasing into packs of the target; a pack never holds a
    trial and its dependency (one level at a time); the arrays split at the task limit."""
    jobs = [
        Job(f"k{i}", print, (), **{**TEN_MINUTES, "timeout_min": t})
        for i, t in enumerate([100, 10, 10, 25, 5, 5, 20])
    ]
    ex = SlurmExecutor("unused")
    assert [[j.key for j in p] for p in pack_jobs(jobs, ex.minutes, 30)] == [
        ["k0"],
        ["k1", "k6"],
        ["k2", "k5"],
        ["k3", "k4"],
    ]
    assert [ex.pack_time(p) for p in pack_jobs(jobs, ex.minutes, 30)] == [100, 30, 15, 30]
    # a plan's durations: 1-minute trials, limits of 10 minutes each
    ex = SlurmExecutor("unused", pack_minutes=30, durations={f"t{i}": 1.0 for i in range(70)})
    train = [Job(f"t{i}", print, (), **TEN_MINUTES) for i in range(70)]
    attack = [Job(f"a{i}", print, (f"t{i}",), **TEN_MINUTES) for i in range(5)]  # no plan: 10 min each
    arrays = ex.plan(train + attack, max_tasks=2)
    assert [(a.level, [len(p) for p in a.packs], a.after) for a in arrays] == [
        (0, [30, 30], frozenset()),
        (0, [10], frozenset()),
        (1, [3, 2], {(0, 0)}),  # a0..a4 wait for t0..t4: task 0 of the plan's first array
    ]
    assert ex.pack_time(arrays[0].packs[0]) == 60  # twice the 30 expected minutes, under the 300 of limits
    assert ex.pack_time(arrays[2].packs[0]) == 30  # no plan for these: the sum of their limits
    assert max_array_tasks("MaxArraySize            = 1001\nSchedulerParameters     = (null)\n") == 1001
    assert (
        max_array_tasks("MaxArraySize = 100001\nSchedulerParameters = bf_interval=5,max_array_tasks=500\n")
        == 500
    )
    assert max_array_tasks("MaxArraySize = 0\n") == 1  # arrays disabled: one plain job per pack


@pytest.fixture
def max_array_11(slurm_cluster: None) -> Iterator[int]:
    """The running cluster with MaxArraySize=11 (array indices 0..10), set back afterwards
    (each a restart of slurmctld: dev-cluster.sh max-array)."""
    proc = subprocess.run([str(DEV_CLUSTER), "max-array", "11"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        yield 11
    finally:
        back = subprocess.run(
            [str(DEV_CLUSTER), "max-array", proc.stdout.strip()], capture_output=True, text=True, timeout=120
        )
        assert back.returncode == 0, back.stderr


@pytest.mark.slurm
def test_packed_sweep_splits_levels_into_arrays_of_max_array_size(max_array_11: int, tmp_path: Path) -> None:
    """60 no-op trials, two per task (10-minute limits, 20-minute packs): the 22 packs of the
    training need two arrays of 11 (SLURM refuses a 12th index), each indexed from 0; the
    attacks, which need t0 and t22 only, wait for the two tasks that ran those
    (afterok:A_0:B_0), not for both arrays. Every trial ran exactly once, the trials of a
    pack in one process: 0 lost, 0 duplicated."""
    out = tmp_path / "out"
    out.mkdir()
    train = [job(out, f"t{i}") for i in range(44)]
    attack = [job(out, f"a{i}", ("t0", "t22"), stage="attack") for i in range(16)]
    assert max_array_tasks() == max_array_11
    ex = executor(tmp_path, pack_minutes=20)
    result = ex.run(train + attack)
    assert result == {j.key: "ok" for j in train + attack}
    times = {j.key: cf.start_end(out, j.key) for j in train + attack}  # each exactly once
    assert [len(s.packs) for s in ex.submitted] == [11, 11, 8]
    first, second, third = ex.submitted
    assert first.packs[0] == ["t0", "t1"] and second.packs[0] == ["t22", "t23"]
    assert first.after == second.after == [] and third.after == [
        f"{first.array_id}_0",
        f"{second.array_id}_0",
    ]
    assert sorted(k for s in ex.submitted for p in s.packs for k in p) == sorted(result)
    assert min(times[a.key][0] for a in attack) >= max(times[t][1] for t in ("t0", "t1", "t22", "t23"))
    for sub in ex.submitted:
        for pack in sub.packs:
            assert len(pack) == 2 and len({cf.runs(out, k)[0][2] for k in pack}) == 1, pack  # one task
    scripts = "\n".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_submission.sh"))
    assert len(re.findall(r"--array=0-10%\d+", scripts)) == 2 and re.search(r"--array=0-7%\d+", scripts)
    assert f"--dependency=afterok:{first.array_id}_0:{second.array_id}_0" in scripts
    # SLURM's own rule: indices 0..MaxArraySize-1, so 11 tasks is the most one array holds here.
    refused = subprocess.run(
        ["sbatch", "--parsable", "--hold", "--array=0-11", "-o", "/dev/null", "--wrap=true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if refused.returncode == 0:  # do not leave a held job in the cluster's saved state
        subprocess.run(["scancel", refused.stdout.strip().split(";")[0]], check=False)
    assert refused.returncode != 0 and "Invalid job array specification" in refused.stderr
    acct = sacct_states(first.array_id, second.array_id, third.array_id, want=30)
    assert len(acct) == 30 and {a.split("|")[1] for a in acct} == {"COMPLETED"}, acct


def test_each_array_waits_for_the_tasks_of_its_dependencies() -> None:
    """Needs no cluster: the trials of one level and stage that wait for the same tasks share
    an array; a model's attacks wait for the task that trained it. Packed together, two models'
    trainings are one task: their attacks one array. Dependencies still running outside the
    plan (`placed`) are named by their task ids."""
    jobs = [
        Job("slow", print, (), **TEN_MINUTES),
        Job("fast", print, (), **TEN_MINUTES),
        *(Job(f"fast-{i}", print, ("fast",), stage="attack", **TEN_MINUTES) for i in range(3)),
        *(Job(f"slow-{i}", print, ("slow",), stage="attack", **TEN_MINUTES) for i in range(2)),
        Job("both", print, ("slow", "fast"), stage="attack", **TEN_MINUTES),
    ]

    def plan(pack_minutes: float, todo: list[Job], placed: dict[str, str] | None = None) -> list[tuple]:
        arrays = SlurmExecutor("unused", pack_minutes=pack_minutes).plan(todo, 1000, placed)
        return [(a.stage, [[j.key for j in p] for p in a.packs], a.after) for a in arrays]

    assert plan(0, jobs) == [
        ("train", [["slow"], ["fast"]], frozenset()),
        ("attack", [["fast-0"], ["fast-1"], ["fast-2"]], {(0, 1)}),
        ("attack", [["slow-0"], ["slow-1"]], {(0, 0)}),
        ("attack", [["both"]], {(0, 0), (0, 1)}),
    ]
    assert plan(30, jobs) == [
        ("train", [["slow", "fast"]], frozenset()),
        ("attack", [["fast-0", "fast-1", "fast-2"], ["slow-0", "slow-1", "both"]], {(0, 0)}),
    ]
    assert plan(30, jobs[2:], {"slow": "12_0", "fast": "12_1"}) == [
        ("attack", [["fast-0", "fast-1", "fast-2"]], {"12_1"}),
        ("attack", [["slow-0", "slow-1"]], {"12_0"}),
        ("attack", [["both"]], {"12_0", "12_1"}),
    ]


def _dependencies(*job_ids: str) -> dict[str, str]:
    """squeue's dependency column (%E) of these jobs' queued tasks: task id -> dependency."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %E"], capture_output=True, text=True
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.mark.slurm
def test_a_models_attacks_start_when_its_training_is_done(slurm_cluster: None, tmp_path: Path) -> None:
    """Per-model dependencies: each attack array waits for the task that trained its model
    (afterok:A_1), not for the whole training array, so the fast model's attacks run, and
    finish, while the slow model still trains (before, they waited for it: afterok:A). An
    attack that needs both models waits for the whole array (afterok:A). One trial per task
    (pack_minutes 0); squeue shows each dependency while it is pending."""
    out = tmp_path / "out"
    out.mkdir()
    jobs = [
        job(out, "slow", fn=cf.slurm_wait_for_release),
        job(out, "fast"),
        *(job(out, f"fast-{i}", ("fast",), stage="attack") for i in range(3)),
        *(job(out, f"slow-{i}", ("slow",), stage="attack") for i in range(2)),
        job(out, "both", ("slow", "fast"), stage="attack"),
    ]
    ex = executor(tmp_path, pack_minutes=0)
    runner, result = run_in_thread(ex, jobs)
    try:
        for i in range(3):
            wait_file(out / f"fast-{i}.out", timeout=100)
        assert not (out / "slow.out").exists()  # the slow model still trains
        train, fast, slow, both = ex.submitted
        pending = _dependencies(slow.array_id, both.array_id)
    finally:
        (out / "release").touch()
        runner.join(timeout=180)
    assert not runner.is_alive()
    assert result == {j.key: "ok" for j in jobs}
    assert [s.packs for s in ex.submitted] == [
        [["slow"], ["fast"]],
        [["fast-0"], ["fast-1"], ["fast-2"]],
        [["slow-0"], ["slow-1"]],
        [["both"]],
    ]
    a = train.array_id
    assert (fast.after, slow.after, both.after) == ([f"{a}_1"], [f"{a}_0"], [a])
    assert pending == {
        f"{slow.array_id}_0": f"afterok:{a}_0(unfulfilled)",
        f"{slow.array_id}_1": f"afterok:{a}_0(unfulfilled)",
        both.array_id: f"afterok:{a}_*(unfulfilled)",
    }, pending
    times = {j.key: cf.start_end(out, j.key) for j in jobs}  # each exactly once
    assert max(times[f"fast-{i}"][1] for i in range(3)) < times["slow"][1]
    assert min(times[k][0] for k in ("slow-0", "slow-1", "both")) >= times["slow"][1]
    scripts = "\n".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_submission.sh"))
    assert f"--dependency=afterok:{a}_1" in scripts and "--time=10" in scripts  # one 10-minute trial per task
    assert stat.S_IMODE((tmp_path / "submitit").stat().st_mode) == 0o700  # the log folder is private
    # Files fan out per array: submitit's folder of each array (4 files per task and its
    # script) and one status file per task, under the run's folder.
    (run_dir,) = (tmp_path / "submitit").iterdir()
    arrays = {s.array_id: len(s.packs) for s in ex.submitted}
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {*arrays, "status"}
    assert {a: len(list((run_dir / a).iterdir())) for a in arrays} == {
        a: 4 * n + 1 for a, n in arrays.items()
    }
    assert sorted(len(list(p.iterdir())) for p in (run_dir / "status").iterdir()) == sorted(arrays.values())
    tasks = [
        f"{s.array_id}_{i}" if len(s.packs) > 1 else s.array_id
        for s in ex.submitted
        for i in range(len(s.packs))
    ]
    assert sacct_states(*(s.array_id for s in ex.submitted), want=8) == sorted(
        f"{t}|COMPLETED" for t in tasks
    )


@pytest.mark.slurm
def test_cancelled_pack_keeps_its_finished_trials(slurm_cluster: None, tmp_path: Path) -> None:
    """Design: scancel of a pack's task keeps the statuses its finished trials wrote; the
    trials it had not finished are 'lost', their dependents 'lost' without running; the other
    pack completes, the array waiting for it alone runs on, and the array waiting for the
    cancelled task, whose afterok can no longer hold, is resubmitted without the lost ones."""
    out = tmp_path / "out"
    out.mkdir()
    jobs = [
        job(out, "r0"),
        job(out, "w", fn=cf.slurm_wait_for_release),
        job(out, "r2"),
        job(out, "r3"),
        job(out, "after-r0", ("r0",), stage="attack"),
        job(out, "after-r2", ("r2",), stage="attack"),
        job(out, "after-r3", ("r3",), stage="attack"),
    ]
    ex = executor(tmp_path, pack_minutes=30)  # training: [r0, w, r2] and [r3]
    runner, result = run_in_thread(ex, jobs)
    task = wait_file(out / "w.slurm").split()[0]
    subprocess.run(["scancel", task], check=True)
    runner.join(timeout=180)
    assert not runner.is_alive()
    assert ex.submitted[0].packs == [["r0", "w", "r2"], ["r3"]]
    assert result == {
        "r0": "ok",
        "w": "lost",
        "r2": "lost",
        "r3": "ok",
        "after-r0": "ok",
        "after-r2": "lost",
        "after-r3": "ok",
    }
    assert len(cf.runs(out, "r0")) == 1 and not (out / "w.out").exists()
    assert cf.runs(out, "r2") == [] and cf.runs(out, "after-r2") == []
    assert len(cf.runs(out, "after-r0")) == 1 and len(cf.runs(out, "after-r3")) == 1
    # the training array; after-r0 and after-r2, which wait for the cancelled task (and are
    # cancelled: afterok broken); after-r3, which waits for the other task and runs on; after-r0 again
    assert [s.packs for s in ex.submitted] == [
        [["r0", "w", "r2"], ["r3"]],
        [["after-r0", "after-r2"]],
        [["after-r3"]],
        [["after-r0"]],
    ]
    assert [s.dropped for s in ex.submitted] == [False, True, False, False]


@pytest.mark.slurm
def test_requeued_pack_reruns_only_its_unfinished_trials(slurm_cluster: None, tmp_path: Path) -> None:
    """SIGUSR2 is what SLURM sends before a time-out or preemption: submitit checkpoints the
    pack (a FunctionSequence holding the results of the trials done) and requeues the task,
    which skips r0 and r1, runs p again from the start, then r3 and r4."""
    out = tmp_path / "out"
    out.mkdir()
    keys = ["r0", "r1", "p", "r3", "r4"]
    jobs = [job(out, k, fn=cf.slurm_wait_for_release if k == "p" else cf.record) for k in keys]
    ex = executor(tmp_path, pack_minutes=60)  # one pack of five 10-minute trials
    runner, result = run_in_thread(ex, jobs)
    task = wait_file(out / "p.slurm").split()[0]
    assert [len(cf.runs(out, k)) for k in keys] == [1, 1, 0, 0, 0]
    subprocess.run(["scancel", "--signal=USR2", task], check=True)
    deadline = time.time() + 150
    while len((out / "p.slurm").read_text().split()) < 2:  # the requeued run started
        assert time.time() < deadline and runner.is_alive(), "task was not requeued"
        # slurmctld holds a requeued job ~2 minutes (BeginTime); let it start now.
        state = subprocess.run(
            ["squeue", "-h", "-j", task, "-o", "%T %r"], capture_output=True, text=True
        ).stdout
        if state.startswith("PENDING") and "BeginTime" in state:
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=False)
        time.sleep(0.5)
    (out / "release").touch()
    runner.join(timeout=120)
    assert result == {k: "ok" for k in keys}
    assert [s.packs for s in ex.submitted] == [[keys]]
    assert (out / "p.slurm").read_text().split() == [task, task]  # same task, run twice
    assert len((out / "p.pids").read_text().split()) == 2  # p started twice
    pid = {k: cf.runs(out, k)[0][2] for k in keys}  # and every trial completed exactly once:
    assert pid["r0"] == pid["r1"] != pid["p"] == pid["r3"] == pid["r4"]  # r0, r1 in the first run only


# -- the launcher and slurm/run.sh --------------------------------------------------------------


@pytest.fixture(scope="module")
def local_smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke sweep's results through the local executor: the reference the clusters match."""
    from qshield_dist import launch

    root = tmp_path_factory.mktemp("local_smoke")
    code = launch.main(
        [
            str(REPO / "sweeps/smoke.yaml"),
            "--results",
            str(root / "results"),
            "--checkpoints",
            str(root / "ckpt"),
        ]
    )
    assert code == 0
    return root / "results"


@pytest.mark.slurm
def test_a_custom_model_runs_on_slurm_from_its_snapshot(
    slurm_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's own model, defined outside the package, through `launch --executor slurm`: the
    array tasks import the launcher's snapshot of its code from the shared results directory
    (never the live file, which is broken here once the launcher has taken the snapshot), and
    give the rows of the local executor."""
    import yaml

    from qshield_dist import launch
    from qshield_dist import sweep as sweep_module

    sweep = cf.custom_model_sweep(tmp_path / "user", "custom-on-slurm")
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert (
        launch.main([str(path), "--results", str(local), "--checkpoints", str(tmp_path / "ckpt-local")]) == 0
    )
    sweep["slurm"] = {
        "partition": "debug",
        "time_min": 10,
        "cpus_per_task": 1,
        "mem_gb": 1,
        "folder": str(tmp_path / "submitit"),
    }
    path.write_text(yaml.safe_dump(sweep))
    live = tmp_path / "user" / "mymodels" / "net.py"
    snapshot = sweep_module.snapshot_custom_code

    def snapshot_then_break(*args: object) -> None:
        snapshot(*args)  # type: ignore[arg-type]
        live.write_text("raise ImportError('the live file is not what the tasks run')\n")

    monkeypatch.setattr(sweep_module, "snapshot_custom_code", snapshot_then_break)
    code = launch.main(
        [str(path), "--executor", "slurm", "--results", str(cluster), "--checkpoints", str(tmp_path / "ckpt")]
    )
    assert code == 0
    assert {r["executor"] for r in _all_rows(cluster)} == {"slurm"}
    assert differing_trials(local, cluster) == {}
    assert cf.custom_model_verdict(cluster) == cf.custom_model_verdict(local)


def _all_rows(results: Path) -> list[dict[str, object]]:
    store = ResultStore(results)
    return [row for f in store.files() for row in store.read(f)]


def _records(results: Path) -> dict[str, Path]:
    """The arrays a launcher recorded in `results` (lease.record_array): array id -> its record."""
    return {p.stem: p for p in sorted((results / "slurm-arrays").glob("*.json"))}


def _recorded(results: Path) -> dict[str, list[str]]:
    """The arrays a launcher recorded in `results`: array id -> its trials."""
    return {a: json.loads(p.read_text())["trials"] for a, p in _records(results).items()}


def _queued_arrays() -> set[str]:
    """Ids of the arrays (and plain jobs) named qshield in the queue."""
    out = subprocess.run(
        ["squeue", "-h", "-n", "qshield", "-o", "%F"], capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


@pytest.mark.slurm
def test_a_relaunch_does_not_resubmit_queued_arrays(
    slurm_cluster: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The launcher submits the smoke sweep's four arrays and is stopped (SIGTERM) while they
    are still queued: the partition is down, so none can start. A relaunch submits nothing
    (their trials are in flight, and it says so), and a stale lease of a launcher that is gone
    is not taken over while those arrays are queued."""
    import signal
    import socket

    import yaml

    sweep = yaml.safe_load((REPO / "sweeps/smoke.yaml").read_text())
    sweep["slurm"] = {"partition": "debug", "time_min": 10, "cpus_per_task": 1, "mem_gb": 1}
    sweep["slurm"]["folder"] = str(tmp_path / "submitit")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(sweep))
    results = tmp_path / "results"
    args = [
        str(path),
        "--executor",
        "slurm",
        "--results",
        str(results),
        "--checkpoints",
        str(tmp_path / "ckpt"),
    ]
    command = [sys.executable, "-m", "qshield_dist.launch", *args]
    before = _queued_arrays()
    arrays: set[str] = set()
    subprocess.run(["scontrol", "update", "PartitionName=debug", "State=DOWN"], check=True)
    try:
        first = subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 120
            # the baseline's training; after it the hybrids' training and the baseline's attacks
            # (an array per stage); then the hybrids' attacks (an array per training task): all
            # 9 trials recorded (lease.record_array) and queued
            while True:
                recorded = _recorded(results)
                arrays = _queued_arrays() - before
                if sum(map(len, recorded.values())) == 9 and arrays == set(recorded):
                    break
                assert first.poll() is None and time.time() < deadline, (
                    "the launcher did not submit every trial"
                )
                time.sleep(0.5)
            assert len(arrays) >= 4
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=60) == 130
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()

        relaunch = subprocess.Popen(
            command, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            _, err = relaunch.communicate(timeout=90)
        except subprocess.TimeoutExpired:  # it waits for arrays it submitted again
            os.killpg(relaunch.pid, signal.SIGKILL)
            _, err = relaunch.communicate()
        finally:
            arrays |= _queued_arrays() - before
        assert arrays == set(_recorded(results)), f"the relaunch submitted arrays again: {sorted(arrays)}"
        assert relaunch.returncode == 1, err[-2000:]
        assert "0 to run" in err and "in SLURM array" in err and all(a in err for a in arrays)

        # A launcher that is gone (its pid no longer runs) left its lease: not taken over while
        # its arrays are queued, not even with --take-over.
        (results / "lease.json").write_text(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": first.pid,
                    "proc_start": "1",
                    "started_at": "x",
                    "token": "t",
                }
            )
        )
        from qshield_dist import launch

        caplog.clear()
        assert launch.main([*args, "--take-over"]) == 2
        assert "are still queued" in caplog.text and all(a in caplog.text for a in arrays)
    finally:
        if arrays:
            subprocess.run(["scancel", *arrays], check=False)
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], check=True)


def _run_sh_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, QSHIELD_PYTHON=sys.executable, QSHIELD_RAY_DIR=str(tmp_path / "ray"), **extra)
    return {k: v for k, v in env.items() if not k.startswith("RAY_")}


def _job_state(two: TwoNodes, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        two.client("scontrol", "-o", "show", "job", job_id), capture_output=True, text=True
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


@pytest.mark.slurm
@pytest.mark.netns
@pytest.mark.slow
def test_run_sh_on_two_nodes(two_node_cluster: TwoNodes, local_smoke: Path, tmp_path: Path) -> None:
    """sbatch --nodes=2 slurm/run.sh on the two-node cluster: the Ray head on node1, a worker on
    node2 started by srun, both token-authenticated; trials on both nodes (the rows' host, which a
    trial takes from its UTS namespace); rows identical to the local run's."""
    two = two_node_cluster
    results, log_file = tmp_path / "results", tmp_path / "run-%j.log"
    proc = subprocess.run(
        two.client(
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--cpus-per-task=1",
            f"--output={log_file}",
            str(REPO / "slurm/run.sh"),
            "sweeps/smoke.yaml",
            "--results",
            str(results),
            "--checkpoints",
            str(tmp_path / "ckpt"),
        ),
        cwd=REPO,
        env=_run_sh_env(tmp_path, SLURM_CONF=two.conf),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    head_ip = str(two.subnet.network_address + 2)  # node1
    deadline, state, modes, token = time.time() + 600, {}, {}, ""
    while time.time() < deadline:
        state = _job_state(two, job_id)
        if state.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            break
        # While it runs: every Ray process of the job in token mode, the token on no command line.
        modes.update(
            {
                f"{name}:{pid}": env.get("RAY_AUTH_MODE", "")
                for pid, (name, env) in cf.processes_with(head_ip).items()
            }
        )
        for path in (tmp_path / "ray").glob("*/auth/ray_auth_token"):
            token = token or path.read_text()
        if token:
            cf.ray_processes_gone(token)
        time.sleep(1)
    text = Path(str(log_file).replace("%j", job_id)).read_text()
    assert (state.get("JobState"), state.get("ExitCode")) == ("COMPLETED", "0:0"), text[-3000:]
    assert "nodes node1 node2; head node1" in text and f"ray head at {head_ip}:" in text, text[-3000:]
    assert "2/2 ray nodes up" in text and "9 ok, 0 failed, 0 lost" in text, text[-3000:]
    assert token and modes and set(modes.values()) == {"token"}, modes
    assert any(m.startswith("gcs_server") for m in modes) and any(m.startswith("raylet") for m in modes), (
        modes
    )
    import polars as pl

    rows = pl.read_parquet(str(results / "stage=*" / "*" / "*" / "*.parquet"), hive_partitioning=False)
    assert set(rows["host"]) == {"node1", "node2"}, rows.group_by("host").len()
    assert differing_trials(local_smoke, results) == {}
    assert not (tmp_path / "ray" / job_id).exists()
    cf.ray_processes_gone(f"qshield-ray-{job_id}", f"{head_ip}:")


# -- 300 trials from the CLI ----------------------------------------------------------------------

# Two tiny models (cnn_small, and a 2-qubit hybrid trained from it) under 150 FGSM budgets each:
# 300 attack trials of about 0.1 s, 302 trials in all.
FGSM_BUDGETS = 150
# Time budget of the test (`--plan` and the launch, on the 2-core CI machine): 150 s. Measured
# on 2026-12-04 on that machine while other work loaded it (load average ~4, the tests at nice
# 19): 98 s in the whole SLURM phase, 130 s alone (--plan 29 s, launch 100 s). A benchmark
# figure, not asserted; the timeouts below only stop a hung run.
BUDGET_S = 150


def _many_trials_sweep(tmp_path: Path) -> Path:
    import yaml

    sweep = {
        "name": "many",
        "executor": "slurm",
        "data": {"dataset": "digits", "train_size": 200, "test_size": 50},
        "train": {"epochs": 1, "batch_size": 64},
        "eval": {"attack_size": 8, "batch_size": 8},
        "resources": {
            "train": {"cpus": 1, "mem_gb": 1, "timeout_min": 10},
            "attack": {"cpus": 1, "mem_gb": 1, "timeout_min": 10},
        },
        # Packs of up to 3 minutes of expected work (--plan's estimates); the packing counts a
        # trial as at least a second, so a pack holds up to 180 trials: one per model here.
        "slurm": {"partition": "debug", "pack_minutes": 3},
        "models": [{"model": "cnn_small"}, {"model": "hqcnn", "backbone": "cnn_small", "qubits": 2}],
        "attacks": [{"name": "fgsm", "params": {"eps": (1 + i) / 1000}} for i in range(FGSM_BUDGETS)],
    }
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slurm
def test_cli_runs_300_trials_as_a_handful_of_tasks_with_per_model_dependencies(
    slurm_cluster: None, tmp_path: Path
) -> None:
    """`launch --plan`, then `launch`, executor slurm, nothing else: the 302 trials run as a
    handful of packed tasks (packed by --plan's cached estimates), each exactly once (one
    result file per expected trial id, one run in each trial's log), 0 lost; each model's
    attacks wait for its own training task only: the hybrid's attacks for the hybrid's
    training, not for the baseline's attacks, which run meanwhile; squeue shows it."""
    from qshield_dist.config import read_config
    from qshield_dist.sweep import prepare

    path = _many_trials_sweep(tmp_path)
    results = tmp_path / "results"
    args = [str(path), "--results", str(results), "--checkpoints", str(tmp_path / "ckpt")]
    env = dict(os.environ, QSHIELD_PLAN_CACHE=str(tmp_path / "plan-cache"))
    started = time.perf_counter()
    plan = subprocess.run(
        [sys.executable, "-m", "qshield_dist.launch", *args, "--plan"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    planned_s = time.perf_counter() - started
    log_file = tmp_path / "launch.log"
    seen: set[str] = set()  # squeue lines: task id and what it waits for
    with log_file.open("w") as err:
        run = subprocess.Popen(
            [sys.executable, "-m", "qshield_dist.launch", *args], cwd=REPO, env=env, stderr=err
        )
        try:
            while run.poll() is None:
                out = subprocess.run(
                    ["squeue", "-h", "-r", "-n", "qshield", "-t", "PD", "-o", "%i %E"],
                    capture_output=True,
                    text=True,
                ).stdout
                seen.update(line.strip() for line in out.splitlines())
                time.sleep(0.5)
            run.wait(timeout=600)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    launched_s = time.perf_counter() - started - planned_s
    text = log_file.read_text()
    assert run.returncode == 0, text[-3000:]
    print(f"--plan {planned_s:.1f} s, launch {launched_s:.1f} s (budget {BUDGET_S} s)")
    assert "302 from --plan's cached calibration, 0 with neither" in text, text[-3000:]
    assert "302 ok, 0 failed, 0 lost" in text, text[-3000:]

    # every expected trial once: one result file each, one run in each trial's log
    grid = prepare(read_config(path, {"results_dir": str(results)}))
    expected = {t.trial_id for t in grid.trials}
    assert len(expected) == 2 + 2 * FGSM_BUDGETS
    store = ResultStore(results)
    files = [f.trial_id for f in store.files()]
    assert len(files) == len(expected) and set(files) == expected and not any(f.failed for f in store.files())
    for trial in grid.trials:
        lines = store.log_path(trial).read_text().splitlines()
        assert sum(line.endswith(": start") for line in lines) == 1, lines
        assert sum(f"trial {trial.trial_id}: ok in " in line for line in lines) == 1, lines

    # a handful of tasks: each training alone (two levels), each model's attacks in few packs
    recorded = {a: json.loads(p.read_text()) for a, p in _records(results).items()}
    tasks = [pack for record in recorded.values() for pack in record["packs"]]
    assert sorted(k for pack in tasks for k in pack) == sorted(expected)
    assert len(tasks) <= 6, [len(p) for p in tasks]
    print(f"{len(tasks)} tasks of {[len(p) for p in tasks]} trials; squeue saw: {sorted(seen)}")
    job_of = {k: a for a, record in recorded.items() for k in record["trials"]}
    model_of = {a.trial_id: a.train.trial_id for a in grid.attack}
    (hybrid,) = (t.trial_id for t in grid.train if t.deps)  # trained from the baseline
    (baseline,) = (t.trial_id for t in grid.train if not t.deps)
    attack_jobs = {m: {job_of[a] for a, t in model_of.items() if t == m} for m in (baseline, hybrid)}
    scripts = {a: next(results.rglob(f"{a}_submission.sh")).read_text() for a in recorded}
    for model, jobs in attack_jobs.items():
        for job_id in jobs:
            # waits for its model's training task, and for nothing else
            assert f"--dependency=afterok:{job_of[model]}\n" in scripts[job_id], scripts[job_id]
    assert f"--dependency=afterok:{job_of[baseline]}\n" in scripts[job_of[hybrid]]
    # squeue showed the hybrid's attacks pending on the hybrid's training alone (their
    # dependency before: the hybrid's training and the baseline's attacks, a whole wave)
    waits = {
        dep
        for task, dep in (line.split(" ", 1) for line in seen)
        if task.split("_")[0] in attack_jobs[hybrid]
    }
    assert waits - {"(null)"} == {f"afterok:{job_of[hybrid]}(unfulfilled)"}, sorted(seen)
