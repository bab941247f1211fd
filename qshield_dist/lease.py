"""One launcher per results directory, across hosts and on NFS: the results lease.

`RESULTS/lease.json` is created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+)
and names its holder: host, pid, the process's start time, when it started, and a random
token. A thread of the holder touches it every HEARTBEAT_S seconds, after checking that the
token in it is still its own (if not, the lease was taken over: the holder interrupts itself);
a lease not touched for STALE_S seconds is stale. The holder removes it when it is done.

The SLURM arrays the holder submits are recorded beside it, `RESULTS/slurm-arrays/<id>.json`
with the keys of their trials, task by task. They outlive the lease: a later launcher asks
`squeue` about them, counts the trials of arrays still queued or running as in flight (it does
not submit them again), and removes the records of arrays that have left the queue;
`launch --status` asks which of their tasks run and which wait.

A second launcher gets LeaseHeld (the CLI exits 2), naming the holder and how to take over:
a holder that is provably gone (this host, its pid no longer that process) is taken over at
once; a stale one on another host with --take-over. Never while the heartbeat is fresh, and
never while the holder's arrays are queued (squeue is asked first).
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, NamedTuple

from qshield_dist.executors.squeue import UNKNOWN, queued_tasks
from qshield_dist.fileio import atomic_write_bytes, read_bytes

log = logging.getLogger(__name__)

LEASE = "lease.json"
ARRAYS = "slurm-arrays"
IN_FLIGHT = "in-flight.json"  # what a local or Ray holder's executor has started, for --status
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: an NFS server failing over takes less


class RecordedArray(NamedTuple):
    path: Path
    trials: list[str]
    packs: list[list[str]] | None  # task index -> its trials (None: recorded without them)


class LeaseHeld(Exception):
    """Another launcher holds the results directory; the message says who and what to do."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    proc_start: str | None  # /proc/PID/stat's start time: with the pid, names one process
    started_at: str
    token: str
    heartbeat_age_s: float

    def describe(self) -> str:
        return (
            f"the launcher on host {self.host}, pid {self.pid}, started {self.started_at}"
            f" (last heartbeat {self.heartbeat_age_s:.0f} s ago)"
        )

    def gone(self) -> bool:
        """Provably not running: on this host, and its pid is no longer that process."""
        if self.host != socket.gethostname():
            return False
        if Path("/proc/self/stat").exists():
            return _proc_start(self.pid) != self.proc_start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


class ResultsLease:
    def __init__(
        self, results_dir: str | os.PathLike[str], heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ):
        self.root = Path(results_dir)
        self.path = self.root / LEASE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = secrets.token_hex(16)
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- holding ------------------------------------------------------------------------

    def acquire(self, take_over: bool = False) -> None:
        """Hold the lease, or raise LeaseHeld saying who holds it and how to take over."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for _ in range(3):
            try:
                self._create()
                break
            except FileExistsError:
                pass
            holder = self.holder()
            if holder is not None:
                self._take_over(holder, take_over)
        else:
            raise LeaseHeld(f"{self.path}: could not create the lease (others keep taking it)")
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="results-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.holder()
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> ResultsLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _create(self) -> None:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "token": self.token,
        }
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def holder(self) -> Holder | None:
        """Who holds the lease now; None if nobody. A lease that cannot be read or parsed
        (being written right now, or damaged) has an unknown holder, judged by its age alone."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError:
            age = 0.0  # cannot tell: count it as fresh
        info = _read_json(self.path)
        return Holder(
            str(info.get("host", "?")),
            int(info.get("pid", -1)),
            info.get("proc_start"),
            str(info.get("started_at", "?")),
            str(info.get("token", "")),
            age,
        )

    def _take_over(self, holder: Holder, take_over: bool) -> None:
        """Move the holder's lease aside if that is safe and allowed, else raise LeaseHeld."""
        where = f"results directory {self.root} is in use by {holder.describe()}"
        gone = holder.gone()
        if not gone and holder.heartbeat_age_s < self.stale_s:
            raise LeaseHeld(
                f"{where}. Wait for it to finish, or stop it; --take-over is refused while its heartbeat is"
                f" fresh (stale after {self.stale_s:.0f} s) or its SLURM arrays are queued."
            )
        queued = self.queued_arrays()
        if queued:
            raise LeaseHeld(
                f"{where}; it is gone, but its SLURM arrays {', '.join(sorted(queued))} are still queued"
                f" (squeue). Wait for them to finish, or scancel them, then run again (with --take-over)."
            )
        if not (gone or take_over):
            raise LeaseHeld(
                f"{where}: its heartbeat is stale (older than {self.stale_s:.0f} s). If that launcher is gone,"
                f" run again with --take-over."
            )
        aside = self.path.with_name(f"{LEASE}.taken-{int(time.time())}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # released meanwhile
        moved = _read_json(aside)
        if moved.get("token") != holder.token:  # someone else's fresh lease: put it back
            try:
                os.link(aside, self.path)
            finally:
                aside.unlink(missing_ok=True)
            raise LeaseHeld(f"results directory {self.root}: another launcher took it over just now")
        log.warning("took over the results lease of %s (kept as %s)", holder.describe(), aside.name)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                token = json.loads(read_bytes(self.path)).get("token")
                if token == self.token:
                    os.utime(self.path)
                    continue
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:  # an NFS hiccup: the next beat tries again
                log.warning("heartbeat of %s failed (%s)", self.path, exc)
                continue
            log.error("the results lease %s was taken over or removed: stopping this launcher", self.path)
            _thread.interrupt_main()
            return

    # -- SLURM arrays -------------------------------------------------------------------

    def record_array(self, array_id: str, packs: list[list[str]]) -> None:
        """The SLURM executor's on_submit: remember an array and its trials (task i runs packs[i])."""
        record = {
            "array_id": array_id,
            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "trials": [key for pack in packs for key in pack],
            "packs": packs,
        }
        atomic_write_bytes(self.root / ARRAYS / f"{array_id}.json", json.dumps(record).encode())

    def recorded_arrays(self) -> dict[str, RecordedArray]:
        """The SLURM arrays recorded here, whether or not they are still queued."""
        out = {}
        folder = self.root / ARRAYS
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            record = _read_json(path)
            packs = record.get("packs")
            out[str(record.get("array_id") or path.stem)] = RecordedArray(
                path, list(record.get("trials") or []), packs if isinstance(packs, list) else None
            )
        return out

    def queued_arrays(self) -> dict[str, list[str]]:
        """Recorded arrays that SLURM still holds (or that squeue cannot rule out), with their
        trials' keys. The holder removes the records of arrays that have left the queue."""
        queued: dict[str, list[str]] = {}
        for array_id, record in self.recorded_arrays().items():
            tasks = queued_tasks(array_id)
            if UNKNOWN in tasks:
                log.warning(
                    "squeue cannot say whether SLURM array %s (%s) is still queued: its trials count as in flight;"
                    " delete that record if the array has ended",
                    array_id,
                    record.path,
                )
            if tasks:
                queued[array_id] = record.trials
            elif self.held:
                record.path.unlink(missing_ok=True)
        return queued

    def in_flight(self) -> dict[str, str]:
        """trial key -> the id of the queued SLURM array that holds it."""
        return {key: array_id for array_id, keys in self.queued_arrays().items() for key in keys}

    # -- what a local or Ray holder runs now --------------------------------------------

    def record_started(self, executor: str, trials: Collection[str]) -> None:
        """The trials this holder's executor has started and not finished, replacing the last
        record (local: in a worker; Ray: submitted and ready, running or waiting for resources)."""
        record = {"token": self.token, "executor": executor, "trials": sorted(trials)}
        atomic_write_bytes(self.root / IN_FLIGHT, json.dumps(record).encode())

    def clear_started(self) -> None:
        (self.root / IN_FLIGHT).unlink(missing_ok=True)

    def holders_started(self) -> tuple[str, list[str]] | None:
        """(executor, trials) the live holder recorded with record_started; None without a live
        holder or its record. A record left by a holder that is gone or stale is not believed."""
        holder = self.holder()
        if holder is None or holder.gone() or holder.heartbeat_age_s >= self.stale_s:
            return None
        record = _read_json(self.root / IN_FLIGHT)
        if not record or record.get("token") != holder.token:
            return None
        return str(record.get("executor", "?")), [str(t) for t in record.get("trials") or []]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_bytes(path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _proc_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(") ", 1)[1].split()[19]
