"""Start and stop Ray nodes with token authentication.

Ray (2.60) authenticates every gRPC call when `RAY_AUTH_MODE=token`; the token is read from
the file named by `RAY_AUTH_TOKEN_PATH` (or `RAY_AUTH_TOKEN`, or ~/.ray/auth_token). Every
process of a cluster (head, workers, drivers) needs the same token. Here:

* the token is fresh per cluster (`secrets.token_hex(32)`, what `ray get-auth-token` uses),
  written to a 0600 file in a 0700 directory and handed to Ray only through the environment
  (`RAY_AUTH_TOKEN_PATH`), never on a command line: argv is world-readable in `ps`;
* the dashboard is off (Ray still runs a minimal dashboard process for usage stats: it is
  bound to 127.0.0.1 on a free port);
* nodes run `ray start --block` as our own child in a new session, so stopping a node is
  SIGTERM to that one pid (Ray drains and takes its children down), then SIGKILL of its
  process group if needed. We never run `ray stop`, which kills every Ray on the machine.
* for a loopback-only cluster, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray keep
  127.0.0.1 instead of resolving it to the host's external address (on the head, on the
  drivers and in `ray.init`).

CLI (used by slurm/run.sh):

    python -m qshield_dist.cluster token DIR              -> prints the new token file's path
    python -m qshield_dist.cluster head --token-file F [--ip IP] [--port P] [--num-cpus N]
    python -m qshield_dist.cluster worker --address IP:PORT --token-file F [--ip IP]
    (head and worker block until SIGTERM/SIGINT, then stop their node)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from qshield_dist.cluster_auth import auth_env, is_loopback, new_token_file, use_token_in_this_process

# The token helpers live in cluster_auth.py; they are part of this module's API.
__all__ = [
    "LOOPBACK",
    "RayNode",
    "auth_env",
    "free_port",
    "is_loopback",
    "new_token_file",
    "start_head",
    "start_worker",
    "use_token_in_this_process",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_STARTED_MARK = "Ray runtime started"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ray_cli() -> list[str]:
    # The `ray` entry point next to this interpreter (a venv), else the module.
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


@dataclass
class RayNode:
    """One `ray start --block` process we own."""

    proc: subprocess.Popen[bytes]
    address: str  # GCS address of the cluster (host:port)
    node_ip: str
    token_file: Path | None
    temp_dir: Path
    log_file: Path
    head: bool
    _log_handle: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM the node (Ray drains and stops its children), SIGKILL its group if stuck."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("ray node %s did not stop in %.0fs; killing its process group", self.pid, timeout)
            except ProcessLookupError:
                pass
        # Whatever is left in the node's session (workers of a crashed raylet) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        if self._log_handle is not None:
            self._log_handle.close()  # type: ignore[attr-defined]
            self._log_handle = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "RayNode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start_node(
    args: list[str],
    *,
    address: str,
    node_ip: str,
    token_file: Path | None,
    temp_dir: Path,
    head: bool,
    loopback: bool,
    wrap: Sequence[str] = (),
    timeout: float = 90.0,
) -> RayNode:
    temp_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(temp_dir, 0o700)
    log_file = temp_dir / ("head.log" if head else f"worker-{node_ip}.log")
    handle = open(log_file, "ab")
    cmd = [*wrap, *_ray_cli(), "start", "--block", *args]
    log.info("starting ray %s: %s", "head" if head else "worker", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        env=auth_env(token_file, loopback),
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    node = RayNode(proc, address, node_ip, token_file, temp_dir, log_file, head, handle)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = node.log_tail()
            node.stop()
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{tail}")
        if _STARTED_MARK in log_file.read_text(errors="replace"):
            log.info("ray %s up at %s (pid %s)", "head" if head else "worker", address, proc.pid)
            return node
        time.sleep(0.2)
    tail = node.log_tail()
    node.stop()
    raise TimeoutError(f"ray node did not start within {timeout:.0f}s:\n{tail}")


def _common_args(
    node_ip: str, num_cpus: int | None, num_gpus: int | None, object_store_mb: int | None
) -> list[str]:
    args = [f"--node-ip-address={node_ip}", "--disable-usage-stats"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        args.append(f"--num-gpus={num_gpus}")
    if object_store_mb is not None:
        args.append(f"--object-store-memory={object_store_mb * 1024 * 1024}")
    return args


def start_head(
    token_file: str | os.PathLike[str] | None,
    *,
    node_ip: str = LOOPBACK,
    port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_mb: int | None = 200,
    temp_dir: str | os.PathLike[str] | None = None,
    timeout: float = 90.0,
) -> RayNode:
    """Start a head node bound to `node_ip`; returns once it accepts connections.

    `token_file=None` starts a cluster without authentication (only for tests of that).
    """
    port = port or free_port(node_ip if node_ip != "0.0.0.0" else LOOPBACK)
    temp = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="qshield-ray-"))
    address = f"{node_ip}:{port}"
    args = [
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        "--dashboard-host=127.0.0.1",
        # Free ports so several clusters (tests, other users) can share a machine.
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={temp}",
        *_common_args(node_ip, num_cpus, num_gpus, object_store_mb),
    ]
    return _start_node(
        args,
        address=address,
        node_ip=node_ip,
        token_file=_opt_path(token_file),
        temp_dir=temp,
        head=True,
        loopback=is_loopback(node_ip),
        timeout=timeout,
    )


def start_worker(
    address: str,
    token_file: str | os.PathLike[str] | None,
    *,
    node_ip: str,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_mb: int | None = 200,
    temp_dir: str | os.PathLike[str] | None = None,
    netns: str | None = None,
    timeout: float = 90.0,
) -> RayNode:
    """Start a worker node joining `address`; `netns` runs it inside that network namespace."""
    temp = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="qshield-ray-worker-"))
    args = [
        f"--address={address}",
        # Its own temp dir: several nodes on one machine (tests) must not share socket files.
        f"--temp-dir={temp}",
        f"--dashboard-agent-listen-port={free_port()}",
        *_common_args(node_ip, num_cpus, num_gpus, object_store_mb),
    ]
    wrap = ["ip", "netns", "exec", netns] if netns else []
    return _start_node(
        args,
        address=address,
        node_ip=node_ip,
        token_file=_opt_path(token_file),
        temp_dir=temp,
        head=False,
        loopback=is_loopback(node_ip),
        wrap=wrap,
        timeout=timeout,
    )


def _opt_path(path: str | os.PathLike[str] | None) -> Path | None:
    return None if path is None else Path(path)


def _block_until_signal(node: RayNode, grace_s: float = 40.0) -> int:
    """Wait for the node; on SIGTERM/SIGINT pass SIGTERM on and return once it is down.

    The handler only signals: it runs inside our Popen.wait(), which holds the Popen's
    wait lock, so it must not wait on the process itself.
    """
    stopping = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping ray node %s", signum, node.pid)
        stopping.set()
        try:
            os.kill(node.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        # Ray drains for up to 30 s; after the grace period its whole group goes.
        timer = threading.Timer(grace_s, lambda: _killpg(node.pid))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    rc = node.proc.wait()
    node.stop()  # reaps leftovers of its process group, closes the log
    return 0 if stopping.is_set() else rc


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qshield_dist.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("token", help="write a fresh token file in DIR, print its path")
    t.add_argument("dir")
    lo = sub.add_parser("is-loopback", help="exit 0 if ADDRESS (host or host:port) is on loopback, else 1")
    lo.add_argument("address")
    for name in ("head", "worker"):
        s = sub.add_parser(name)
        s.add_argument("--token-file", required=True)
        s.add_argument("--ip", default=None, help="this node's IP (default: its hostname's address)")
        s.add_argument("--num-cpus", type=int)
        s.add_argument("--num-gpus", type=int)
        s.add_argument("--object-store-mb", type=int, default=None)
        s.add_argument("--temp-dir")
        if name == "head":
            s.add_argument("--port", type=int, default=None)
            s.add_argument("--address-file", help="write HOST:PORT here once the head is up")
        else:
            s.add_argument("--address", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "token":
        print(new_token_file(args.dir))
        return 0
    if args.cmd == "is-loopback":
        return 0 if is_loopback(args.address) else 1
    ip = args.ip or socket.gethostbyname(socket.gethostname())
    if args.cmd == "head":
        node = start_head(
            args.token_file,
            node_ip=ip,
            port=args.port,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            object_store_mb=args.object_store_mb,
            temp_dir=args.temp_dir,
        )
        if args.address_file:
            Path(args.address_file).write_text(node.address + "\n")
        print(node.address, flush=True)
    else:
        node = start_worker(
            args.address,
            args.token_file,
            node_ip=ip,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            object_store_mb=args.object_store_mb,
            temp_dir=args.temp_dir,
        )
    return _block_until_signal(node)


if __name__ == "__main__":
    sys.exit(main())
