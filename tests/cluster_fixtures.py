"""Toy jobs and helpers shared by the executor and cluster tests.

Job functions are module level (picklable by reference for local workers; the Ray and
SLURM tests register this module for pickling by value, as their workers do not have the
tests directory on sys.path). Each job appends a line to `<out>/<key>.log` on every run
(so a test can count runs) and writes its output `<out>/<key>.out` atomically.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# What a toy job asks for (Job's resource fields): small enough for a SLURM array task; the
# SLURM executor packs the trials of a wave by its time limit.
TOY = {"cpus": 1, "gpus": 0, "mem_gb": 0.5, "timeout_min": 10}


def _append(path: Path, line: str) -> int:
    """Append one line (O_APPEND: atomic for short writes); return the line count after."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    return len(path.read_text().splitlines())


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def record(out: str, key: str, sleep: float = 0.0, status: str = "ok") -> str:
    """Log start/end times and pid, write the output; return `status`."""
    out_dir = Path(out)
    start = time.time()
    if sleep:
        time.sleep(sleep)
    end = time.time()
    _append(out_dir / f"{key}.log", f"{start:.6f} {end:.6f} {os.getpid()} {socket.gethostname()}")
    _atomic_write(out_dir / f"{key}.out", f"{key}\n")
    return status


def die_once(out: str, key: str) -> str:
    """SIGKILL its own process on the first run; succeed on the next."""
    out_dir = Path(out)
    runs = _append(out_dir / f"{key}.log", f"{time.time():.6f} {time.time():.6f} {os.getpid()} start")
    if runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _atomic_write(out_dir / f"{key}.out", f"{key}\n")
    return "ok"


def die_always(out: str, key: str) -> str:
    _append(Path(out) / f"{key}.log", f"{time.time():.6f} {time.time():.6f} {os.getpid()} start")
    os.kill(os.getpid(), signal.SIGKILL)
    return "ok"  # never reached


def raise_error(out: str, key: str) -> str:
    _append(Path(out) / f"{key}.log", f"{time.time():.6f} {time.time():.6f} {os.getpid()} start")
    raise RuntimeError(f"job {key} crashed")


def wait_for_release(out: str, key: str, timeout: float = 120.0) -> str:
    """Write its pid to `<key>.pids`, wait until `<out>/release` exists, write the output.

    Lets a test find the worker's pid and kill it while the job runs.
    """
    out_dir = Path(out)
    _append(out_dir / f"{key}.pids", str(os.getpid()))
    deadline = time.time() + timeout
    while not (out_dir / "release").exists():
        if time.time() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.05)
    return record(out, key)


def runs(out: str | Path, key: str) -> list[list[str]]:
    path = Path(out) / f"{key}.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def start_end(out: str | Path, key: str) -> tuple[float, float]:
    rows = runs(out, key)
    assert len(rows) == 1, f"{key} ran {len(rows)} times"
    return float(rows[0][0]), float(rows[0][1])


def run_quiet(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def slurm_wait_for_release(out: str, key: str, timeout: float = 120.0) -> str:
    """Record the SLURM task id (`<key>.slurm`, one line per run), wait for `<out>/release`."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        task = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:  # submitit submits a batch of one as a plain job
        task = os.environ.get("SLURM_JOB_ID", "-")
    _append(Path(out) / f"{key}.slurm", task)
    return wait_for_release(out, key, timeout)


def record_node(out: str, key: str, sleep: float = 0.0) -> str:
    """Like `record`, but logs the Ray node's IP in place of the host name."""
    import ray

    out_dir = Path(out)
    start = time.time()
    time.sleep(sleep)
    ip = ray.util.get_node_ip_address()
    _append(out_dir / f"{key}.log", f"{start:.6f} {time.time():.6f} {os.getpid()} {ip}")
    _atomic_write(out_dir / f"{key}.out", f"{key}\n")
    return "ok"


def processes_with(marker: str) -> dict[int, tuple[str, dict[str, str]]]:
    """pid -> (name, environment) of each process whose command line holds `marker`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    env = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                    found[int(entry.name)] = (
                        (entry / "comm").read_text().strip(),
                        dict(e.split("=", 1) for e in env if "=" in e),
                    )
            except OSError:
                continue
    return found


def ray_processes_gone(*markers: str) -> None:
    """No process's command line holds any of the markers (a job's Ray cluster is all gone)."""
    for marker in markers:
        left = processes_with(marker)
        assert not left, f"processes left behind ({marker}): {[name for name, _ in left.values()]}"


def custom_model_sweep(root: Path, name: str) -> dict[str, object]:
    """A tiny sweep of a user's own model (`model: custom`) whose code is written under `root`,
    outside the package (a factory file and a helper module it imports), compared with the CNN. The workers must import
    the launcher's snapshot of it (RESULTS/code), the only copy the ids vouch for."""
    (root / "mymodels").mkdir(parents=True, exist_ok=True)
    (root / "mymodels" / "helper.py").write_text("PIXELS = 784\n")
    (root / "mymodels" / "net.py").write_text(
        "import torch.nn as nn\n\nimport helper\n\n\ndef make(width=16):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(helper.PIXELS, width), nn.ReLU(), nn.Linear(width, 10))\n"
    )
    return {
        "name": name,
        "data": {"dataset": "digits", "train_size": 200, "test_size": 60},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01},
        "eval": {"attack_size": 16},
        "models": [
            {"model": "custom", "name": "mine", "factory": f"{root / 'mymodels' / 'net.py'}:make"},
            {"model": "cnn_small", "name": "cnn"},
        ],
        "attacks": [{"name": "fgsm"}],
        "compare": [{"models": "mine", "against": "cnn"}],
    }


def custom_model_verdict(results: Path) -> dict[str, object]:
    """The one verdict of custom_model_sweep's results: the custom model against the CNN."""
    import qshield_dist

    (verdict,) = qshield_dist.summarize(results).verdicts.iter_rows(named=True)
    assert verdict["category"] in {"more robust", "less robust", "equal", "undecided"}
    return {k: verdict[k] for k in ("label", "baseline", "eps", "category", "diff", "low", "high")}
