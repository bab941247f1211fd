"""A real Ray cluster on loopback with token auth; RayExecutor against it (the executor
contract itself, shared with local and SLURM, is test_executors.test_executor_contract).

One head per module (starting one costs ~5 s). Clients that must be refused run in
subprocesses (a process connects to Ray once), in parallel: each refusal takes Ray ~20 s
of retries before it gives up.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

ray = pytest.importorskip("ray")
import cluster_fixtures as cf  # noqa: E402
from ray import cloudpickle  # noqa: E402  (Ray pickles task args with its own copy)

from qshield_dist import cluster  # noqa: E402
from qshield_dist.executors.base import Job  # noqa: E402
from qshield_dist.executors.ray import RayExecutor  # noqa: E402

# Ray workers do not have tests/ on sys.path: ship the toy jobs by value.
cloudpickle.register_pickle_by_value(cf)

CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("RESULT connected", ray.get(ray.remote(lambda: 6 * 7).remote()))
except Exception as exc:
    print("RESULT refused", type(exc).__name__, exc)
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.RayNode]:
    root = tmp_path_factory.mktemp("ray")
    token = cluster.new_token_file(root / "auth")
    node = cluster.start_head(token, num_cpus=2, object_store_mb=100, temp_dir=root / "t")
    try:
        yield node
    finally:
        if ray.is_initialized():
            ray.shutdown()
        node.stop()
        assert not node.alive()


@pytest.fixture(scope="module")
def connected(head: cluster.RayNode) -> Iterator[cluster.RayNode]:
    RayExecutor(address=head.address, token_file=head.token_file).connect()
    yield head


def test_token_file_is_private_and_not_on_command_lines(head: cluster.RayNode) -> None:
    assert head.token_file is not None
    token = head.token_file.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(head.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(head.token_file.parent.stat().st_mode) == 0o700
    # no process's argv holds the token
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert token.encode() not in argv, f"token on the command line of pid {pid}"


def _tree(pid: int) -> set[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo.extend(children.get(p, []))
    return found


def test_head_listens_only_on_loopback(head: cluster.RayNode) -> None:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("ss not available")
    pids = _tree(head.pid)
    ours = [line for line in out.stdout.splitlines() if any(f"pid={p}," in line for p in pids)]
    port = head.address.rsplit(":", 1)[1]
    assert any(f":{port} " in line for line in ours), ours  # the GCS is among them
    local = [line.split()[3] for line in ours]
    assert all(addr.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for addr in local), local


def test_clients_need_the_right_token(head: cluster.RayNode, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    # HOME points at an empty dir: Ray would otherwise also try ~/.ray/auth_token.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    envs = {
        "right": cluster.auth_env(head.token_file, loopback=True, base=base),
        "none": dict(base),
        "none-token-mode": dict(base, RAY_AUTH_MODE="token"),
        "wrong": cluster.auth_env(wrong, loopback=True, base=base),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), head.address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in envs.items()
    }
    outs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        outs[name] = stdout + stderr
    result = {
        name: next(line for line in out.splitlines() if line.startswith("RESULT"))
        for name, out in outs.items()
    }
    assert result["right"] == "RESULT connected 42"
    # No token / wrong token: the GCS rejects the RPCs; ray.init raises ConnectionError.
    assert result["none"].startswith("RESULT refused ConnectionError"), result["none"]
    assert result["wrong"].startswith("RESULT refused ConnectionError"), result["wrong"]
    for name in ("none", "wrong"):
        assert "Authentication token is missing or incorrect" in outs[name]
    # Token mode on but no token anywhere: Ray refuses before connecting.
    assert result["none-token-mode"].startswith("RESULT refused AuthenticationError")


def test_ray_worker_sigkill_is_retried(connected: cluster.RayNode, tmp_path: Path) -> None:
    out = str(tmp_path)
    jobs = [Job("victim", functools.partial(cf.wait_for_release, out, "victim"), **cf.TOY)]
    jobs += [
        Job(f"j{i}", functools.partial(cf.record, out, f"j{i}", 0.05), ("victim",) if i % 2 else (), **cf.TOY)
        for i in range(6)
    ]
    result: dict[str, str] = {}
    runner = threading.Thread(
        target=lambda: result.update(RayExecutor(address=connected.address, max_retries=2).run(jobs))
    )
    runner.start()
    pids = tmp_path / "victim.pids"
    deadline = time.time() + 60
    while not (pids.exists() and pids.read_text().strip()):
        assert time.time() < deadline, "victim never started"
        time.sleep(0.05)
    victim_pid = int(pids.read_text().split()[0])
    assert victim_pid != os.getpid()
    os.kill(victim_pid, signal.SIGKILL)
    while len(pids.read_text().split()) < 2:  # Ray restarts it in a new worker
        assert time.time() < deadline, "victim was not retried"
        time.sleep(0.05)
    (tmp_path / "release").touch()
    runner.join(timeout=90)
    assert not runner.is_alive()
    assert result == {job.key: "ok" for job in jobs}
    second = pids.read_text().split()
    assert len(second) == 2 and second[1] != str(victim_pid)
    # every output present, each job completed exactly once
    for job in jobs:
        assert (tmp_path / f"{job.key}.out").read_text() == f"{job.key}\n"
        assert len(cf.runs(tmp_path, job.key)) == 1


def test_private_local_cluster(tmp_path: Path) -> None:
    """address='local' starts its own token-auth head and stops it after the run."""
    if ray.is_initialized():
        ray.shutdown()
    ex = RayExecutor(address="local", local_cpus=1)
    result = ex.run([Job("x", functools.partial(cf.record, str(tmp_path), "x"), **cf.TOY)])
    assert result == {"x": "ok"}
    assert not ray.is_initialized() and ex._private_head is None


def test_a_custom_model_runs_on_ray_from_its_snapshot(connected: cluster.RayNode, tmp_path: Path) -> None:
    """A user's own model, defined outside the package: Ray workers import the launcher's
    snapshot of its code from the shared results directory, and give the local rows."""
    from qshield_dist.config import SweepConfig
    from qshield_dist.executors.local import LocalExecutor
    from qshield_dist.results.store import ResultStore, differing_trials
    from qshield_dist.sweep import run_sweep

    sweep = cf.custom_model_sweep(tmp_path / "user", "custom-on-ray")
    statuses = {}
    for name, executor in (
        ("ray", RayExecutor(address=connected.address, token_file=connected.token_file)),
        ("local", LocalExecutor(in_process=True)),
    ):
        cfg = SweepConfig(
            **sweep, results_dir=str(tmp_path / name), checkpoint_dir=str(tmp_path / f"ckpt-{name}")
        )
        statuses[name] = run_sweep(cfg, executor).statuses
    assert set(statuses["ray"].values()) == {"ok"} and len(statuses["ray"]) == 4  # 2 x (train + fgsm)
    assert statuses["ray"] == statuses["local"]
    store = ResultStore(tmp_path / "ray")
    rows = [row for f in store.files() for row in store.read(f)]
    assert {r["executor"] for r in rows} == {"ray"}
    assert [r["clean_acc"] > 0.3 for r in rows if r["model"] == "custom"] == [True, True]
    assert differing_trials(tmp_path / "local", tmp_path / "ray") == {}
    assert cf.custom_model_verdict(tmp_path / "ray") == cf.custom_model_verdict(tmp_path / "local")


CUDA_SWEEP = {
    "name": "cuda-on-ray",
    "executor": "ray",
    "data": {"dataset": "digits", "train_size": 60, "test_size": 20},
    "train": {"epochs": 1},
    "models": [{"model": "cnn_small"}],
    "attacks": [{"name": "fgsm"}],
    "resources": {"train": {"cpus": 1, "gpus": 1}},  # accelerator auto: cuda
}


def test_a_cuda_trial_is_sent_to_ray_and_a_worker_without_cuda_records_why(tmp_path: Path) -> None:
    """The launcher (a login node without CUDA) does not refuse a CUDA stage on Ray; the
    cluster says it has a GPU, the trial runs on a worker, and that worker (no CUDA in this
    torch's reach) records a failed row naming the setting and what it found."""
    import torch
    import yaml

    from qshield_dist.results.store import ResultStore

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the trial would run")
    if ray.is_initialized():
        ray.shutdown()
    token = cluster.new_token_file(tmp_path / "auth")
    ray_dir = tempfile.mkdtemp(prefix="qsr-")  # Ray's socket paths must stay under 108 bytes
    node = cluster.start_head(token, num_cpus=2, num_gpus=1, object_store_mb=100, temp_dir=ray_dir)
    try:
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(yaml.safe_dump(CUDA_SWEEP))
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        results = tmp_path / "results"
        proc = subprocess.run(
            [sys.executable, "-m", "qshield_dist.launch", str(sweep), "--results", str(results)]
            + ["--checkpoints", str(tmp_path / "ckpt"), "--ray-address", node.address],
            cwd=Path(__file__).resolve().parents[1],
            env=cluster.auth_env(token, loopback=True, base=base),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        node.stop()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert proc.returncode == 1, proc.stderr[-3000:]  # trials failed; not 2: nothing refused
    store = ResultStore(results)
    [train] = [f for f in store.files() if f.stage == "train"]
    assert train.failed
    [row] = store.read(train, failed=True)
    assert row["executor"] == "ray" and row["status"] == "failed"
    assert "asks for accelerator 'cuda'" in row["error"] and "no CUDA device" in row["error"], row["error"]
    assert "CUDA_VISIBLE_DEVICES" in row["error"], row["error"]  # Ray gave the task its GPU


# -- two nodes: a worker in a network namespace the test creates ----------------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side IP, namespace-side IP) joined by a private veth pair."""
    import random

    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    ns, host_if, ns_if = f"qsh-{tag}", f"qshh{tag}", f"qshn{tag}"
    routes = _ip("-4", "route").stdout
    for _ in range(50):  # a /30 in 10.0.0.0/8 no route of this machine uses
        prefix = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        if prefix + "." not in routes:
            break
    host_ip, ns_ip = f"{prefix}.1", f"{prefix}.2"
    made = _ip("netns", "add", ns)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        for cmd in (
            ["link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["link", "set", ns_if, "netns", ns],
            ["addr", "add", f"{host_ip}/30", "dev", host_if],
            ["link", "set", host_if, "up"],
            ["-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if],
            ["-n", ns, "link", "set", ns_if, "up"],
            ["-n", ns, "link", "set", "lo", "up"],
        ):
            res = _ip(*cmd)
            if res.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (ip {' '.join(cmd)}): {res.stderr.strip()}")
        yield ns, host_ip, ns_ip
    finally:
        _ip("link", "del", host_if)
        _ip("netns", "del", ns)


@pytest.fixture(scope="module")
def two_nodes(
    netns: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[cluster.RayNode, cluster.RayNode]]:
    ns, host_ip, ns_ip = netns
    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("ray2")
    token = cluster.new_token_file(root / "auth")
    head = cluster.start_head(token, node_ip=host_ip, num_cpus=1, object_store_mb=80, temp_dir=root / "h")
    try:
        worker = cluster.start_worker(
            head.address, token, node_ip=ns_ip, num_cpus=1, object_store_mb=80, temp_dir=root / "w", netns=ns
        )
    except Exception:
        head.stop()
        raise
    try:
        yield head, worker
    finally:
        if ray.is_initialized():
            ray.shutdown()
        worker.stop()
        head.stop()


@pytest.mark.netns
def test_two_node_cluster_runs_on_both_nodes(
    two_nodes: tuple[cluster.RayNode, cluster.RayNode], tmp_path: Path
) -> None:
    head, worker = two_nodes
    ex = RayExecutor(address=head.address, token_file=head.token_file)
    ex.connect()
    deadline = time.time() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 2:
        assert time.time() < deadline, "the namespace worker never joined"
        time.sleep(0.5)
    out = str(tmp_path)
    jobs = [Job(f"n{i}", functools.partial(cf.record_node, out, f"n{i}", 1.0), **cf.TOY) for i in range(4)]
    jobs.append(
        Job(
            "after",
            functools.partial(cf.record_node, out, "after"),
            tuple(f"n{i}" for i in range(4)),
            **cf.TOY,
        )
    )
    result = ex.run(jobs)
    assert result == {job.key: "ok" for job in jobs}
    ips = {cf.runs(tmp_path, f"n{i}")[0][3] for i in range(4)}
    assert ips == {head.node_ip, worker.node_ip}  # both nodes ran trials
    assert cf.start_end(tmp_path, "after")[0] >= max(cf.start_end(tmp_path, f"n{i}")[1] for i in range(4))


@pytest.mark.netns
def test_worker_with_wrong_token_cannot_join(
    two_nodes: tuple[cluster.RayNode, cluster.RayNode], netns: tuple[str, str, str], tmp_path: Path
) -> None:
    head, _ = two_nodes
    ns, _, ns_ip = netns
    bad = tmp_path / "bad"
    bad.write_text("f" * 64)
    bad.chmod(0o600)
    with pytest.raises((RuntimeError, TimeoutError)) as err:
        node = cluster.start_worker(
            head.address,
            bad,
            node_ip=ns_ip,
            num_cpus=1,
            object_store_mb=80,
            temp_dir=tmp_path / "w",
            netns=ns,
            timeout=90,
        )
        node.stop()
    assert "uthenticat" in str(err.value) or "token" in str(err.value).lower(), str(err.value)[-2000:]
