"""The launcher: dry run, resume after a kill, retry of failures, other sweeps untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from qshield_dist import launch
from qshield_dist.results.store import ResultStore
from qshield_dist.sweep import make_executor

REPO = Path(__file__).resolve().parents[1]


def _files(results: Path) -> list[Path]:
    return sorted(results.rglob("*.parquet"))


def _done(results: Path, checkpoints: Path) -> dict[str, str]:
    """trial id -> ok | failed, of the trials the manifest lists whose rows count."""
    store = ResultStore(results, checkpoints)
    return store.done(store.read_manifest()[1]).status


def test_dry_run_lists_trials_and_writes_nothing(tmp_path, capsys):
    assert (
        launch.main(
            [
                "sweeps/smoke.yaml",
                "--dry-run",
                "--results",
                str(tmp_path / "r"),
                "--checkpoints",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 train, 6 attack, 0 diagnostic trials, 0 already done" in out
    assert "hqcnn[cnn_small] linear" in out and "/ pgd (paper)" in out
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_killed_launcher_resumes_without_duplicates(tmp_path):
    results, ckpt = tmp_path / "results", tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "qshield_dist.launch",
        "sweeps/smoke.yaml",
        "--results",
        str(results),
        "--checkpoints",
        str(ckpt),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while len(_files(results)) < 3:  # some trials done, others not
        assert proc.poll() is None and time.time() < deadline, (
            proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        )
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name for p in _files(results)}
    assert not [p for p in results.rglob("*") if p.name.startswith(".")], (
        "no partial (temporary) file is left behind"
    )
    assert len(first) < 9

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(first)} already done, {9 - len(first)} to run" in rerun.stderr
    files = _files(results)
    assert len(files) == 9 and len({p.stem for p in files}) == 9
    assert {p.name for p in files} >= first
    rows = [row for p in files for row in pq.read_table(p).to_pylist()]
    assert sorted(r["trial_id"] for r in rows) == sorted(_done(results, ckpt))

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "9 already done, 0 to run" in again.stderr


def _organamnist(path: Path, complete: bool) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 110), ("val", 22), ("test", 44)):
        if split == "test" and not complete:
            continue  # a truncated download: present, but unusable
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 11).reshape(-1, 1)
    np.savez(path, **arrays)


def test_failed_trials_are_rows_and_retry_failed_reruns_them(tmp_path, monkeypatch):
    """Trials that fail (a corrupt data file) are recorded as rows and the others complete;
    --retry-failed runs only the failures again."""
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    _organamnist(Path("data/organamnist.npz"), complete=False)
    sweep = {
        "name": "fails",
        "data": {"dataset": ["digits", "organamnist"], "data_root": "data"},
        "train": {"epochs": 1},
        "eval": {"attack_size": 8},
        "models": [{"model": "dnn"}],
        "attacks": [{"name": "fgsm"}],
    }
    Path("s.yaml").write_text(yaml.safe_dump(sweep))

    assert launch.main(["s.yaml"]) == 1
    rows = [r for p in Path("results/fails").rglob("*.parquet") for r in pq.read_table(p).to_pylist()]
    by_dataset = {
        d: sorted(r["status"] for r in rows if r["dataset"] == d) for d in ("digits", "organamnist")
    }
    assert by_dataset == {"digits": ["ok", "ok"], "organamnist": ["failed", "failed"]}
    assert all("test_images" in r["error"] for r in rows if r["status"] == "failed")

    _organamnist(Path("data/organamnist.npz"), complete=True)
    assert launch.main(["s.yaml"]) == 1  # without --retry-failed the failures stay as they are
    assert sorted(_done(Path("results/fails"), Path("checkpoints")).values()) == [
        "failed",
        "failed",
        "ok",
        "ok",
    ]
    assert launch.main(["s.yaml", "--retry-failed"]) == 0
    done = _done(Path("results/fails"), Path("checkpoints"))
    assert set(done.values()) == {"ok"} and len(done) == 4
    assert not list(Path("results/fails").rglob("*.failed.parquet"))


def test_other_sweeps_in_the_same_directory_are_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = Path("results/other/stage=attack/dataset=digits/Aforeign.parquet")
    other.parent.mkdir(parents=True)
    other.write_bytes(b"someone else's result")
    before = other.stat().st_mtime_ns
    sweep = {
        "name": "mine",
        "results_dir": "results/mine",
        "data": {"dataset": "digits", "train_size": 100, "test_size": 40},
        "train": {"epochs": 1},
        "models": [{"model": "dnn"}],
        "attacks": [],
    }
    Path("s.yaml").write_text(yaml.safe_dump(sweep))
    assert launch.main(["s.yaml"]) == 0
    assert other.read_bytes() == b"someone else's result" and other.stat().st_mtime_ns == before
    assert oct(Path("results/mine").stat().st_mode & 0o777) == "0o700"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _slow_sweep(tmp_path: Path) -> Path:
    """smoke.yaml with a first trial of a minute or more: long enough to be interrupted."""
    sweep = yaml.safe_load((REPO / "sweeps/smoke.yaml").read_text())
    sweep["train"]["epochs"] = 400
    sweep.update(results_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ckpt"))
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _interrupt_inside_the_first_trial(cmd: list[str], sig: int) -> None:
    """Run `cmd` (a launch, its own process group), send `sig` 3 s into its first trial, and
    check it exits 130 within 15 s and leaves no process of its group behind; whatever happens,
    kill that group at the end."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while "to run on local" not in (line := proc.stderr.readline()):
            assert line and time.time() < deadline, "the launch never started its trials"
        time.sleep(3)  # inside the first training trial
        proc.send_signal(sig)
        start = time.time()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"signal {sig} did not stop the launch")
        assert code == 130
        assert time.time() - start < 15, "the launch waited for the running trial instead of stopping it"
        while _group_alive(proc.pid) and time.time() - start < 30:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "a worker outlived the launch"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a worker behind, pass or fail
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_promptly_leaves_no_worker_and_no_partial_file(tmp_path, sig):
    """SIGINT or SIGTERM to the launcher alone (as a scheduler or `timeout` sends it) stops the
    running trial too, rather than waiting for it or leaving its worker running unowned, and
    leaves only complete result files."""
    path = _slow_sweep(tmp_path)
    _interrupt_inside_the_first_trial([sys.executable, "-m", "qshield_dist.launch", str(path)], sig)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    # One worker, interrupted inside the first trial, which every other trial waits for: the
    # interrupted trial wrote nothing, and nothing else could have run.
    assert _files(tmp_path / "results") == []


API_AFTER_POLARS = """
import logging, sys
import polars  # on import, it takes SIGINT over below Python (for cancelling its queries)
import yaml
import qshield_dist

logging.basicConfig(level=logging.INFO)
sweep = yaml.safe_load(open(sys.argv[1]))
try:
    qshield_dist.run_sweep(qshield_dist.load_config(sweep))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_stops_a_launch_from_the_api_after_import_polars(tmp_path):
    """`import polars` before run_sweep: a SIGINT (Ctrl-C) still stops the launch and its
    running trial, rather than doing nothing until the sweep ends."""
    path = _slow_sweep(tmp_path)
    _interrupt_inside_the_first_trial([sys.executable, "-c", API_AFTER_POLARS, str(path)], signal.SIGINT)


def test_slurm_arrays_take_each_stage_resources_unless_the_slurm_section_sets_them(tmp_path):
    """full.yaml's attack stage asks for 2 CPUs, 0.25 GPU and 8 GB: its array must not inherit
    the train stage's request from fixed slurm: defaults. The parameters are computed without
    SLURM (submitit's executor, which needs srun, is made only to submit)."""
    import submitit

    from qshield_dist.config import read_config
    from qshield_dist.executors.base import Job

    overrides = {"executor": "slurm", "results_dir": str(tmp_path)}
    cfg = read_config("sweeps/smoke.yaml", overrides)
    attack_job = Job("a", print, (), cpus=2, gpus=0.25, mem_gb=8, timeout_min=30)
    params = make_executor(cfg).sbatch_parameters([attack_job], None)
    assert (params["cpus_per_task"], params["mem"], params["time"], params["gpus_per_task"]) == (
        2,
        "8GB",
        30,
        1,
    )
    # names submitit.SlurmExecutor.update_parameters takes
    assert set(params) <= submitit.SlurmExecutor._valid_parameters()

    cfg = read_config("sweeps/smoke.yaml", {**overrides, "slurm": {"cpus_per_task": 4, "mem_gb": 16}})
    params = make_executor(cfg).sbatch_parameters([attack_job], None)
    assert (params["cpus_per_task"], params["mem"]) == (4, "16GB")


_PROGRESS = """
import logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from qshield_dist.sweep import BarProgress
progress = BarProgress(60)
for i in range(60):
    progress.started(str(i))
    progress.finished(str(i), "failed" if i % 7 == 0 else "ok")
progress.close()
"""


def _progress_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_progress_in_a_log_file_is_a_few_lines(tmp_path):
    """stderr a file: periodic log lines, no carriage-return frames (tqdm wrote 155 of them,
    about 50 KB, for the quick sweep)."""
    log_file = tmp_path / "sweep.log"
    with log_file.open("w") as stderr:
        subprocess.run([sys.executable, "-c", _PROGRESS], stderr=stderr, env=_progress_env(), check=True)
    text = log_file.read_text()
    assert "\r" not in text and len(text.encode()) < 5000
    lines = [line for line in text.splitlines() if "trials:" in line]
    assert 2 <= len(lines) <= 11, text
    assert "trials: 60/60 done (9 failed, 0 lost), 0 running" in lines[-1]


def test_progress_on_a_terminal_is_a_live_bar(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen([sys.executable, "-c", _PROGRESS], stderr=child, env=_progress_env())
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait() == 0
    assert b"\r" in out and b"60/60" in out and b"trials: 60/60 done" not in out
