"""The executor contract, once for local, Ray and SLURM, on the same toy DAG; then
LocalExecutor's own behaviour (worker processes, deaths, in-process) with toy jobs that write files."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import cluster_fixtures as cf
import pytest

from qshield_dist.executors.base import DependencyGraph, Executor, Job, ProgressSink, topological_waves
from qshield_dist.executors.local import LocalExecutor


class Recorder(ProgressSink):
    def __init__(self) -> None:
        self.started_keys: list[str] = []
        self.finished_keys: dict[str, str] = {}

    def started(self, key: str) -> None:
        self.started_keys.append(key)

    def finished(self, key: str, status: str) -> None:
        assert key not in self.finished_keys, f"{key} finished twice"
        self.finished_keys[key] = status


def rec_job(out: Path, key: str, deps: tuple[str, ...] = (), sleep: float = 0.0, status: str = "ok") -> Job:
    return Job(key, functools.partial(cf.record, str(out), key, sleep, status), deps, **cf.TOY)


def contract_dag(out: Path) -> list[Job]:
    """t1, t2 (train; t2 records a failure), boom (raises: lost) -> a1 needs t1, a2 needs t1+t2,
    a3 needs a2 and a job done in an earlier run; after-boom needs boom, after-after needs
    after-boom and a1: both lost without running."""
    return [
        rec_job(out, "t1", sleep=0.3),
        rec_job(out, "t2", sleep=0.1, status="failed"),
        Job("boom", functools.partial(cf.raise_error, str(out), "boom"), (), **cf.TOY),
        rec_job(out, "a1", ("t1",)),
        rec_job(out, "a2", ("t1", "t2")),
        rec_job(out, "a3", ("a2", "done-in-earlier-run")),
        rec_job(out, "after-boom", ("boom",)),
        rec_job(out, "after-after", ("after-boom", "a1")),
    ]


CONTRACT = {
    "t1": "ok",
    "t2": "failed",
    "boom": "lost",
    "a1": "ok",
    "a2": "ok",
    "a3": "ok",
    "after-boom": "lost",
    "after-after": "lost",
}
NEVER_RAN = ("after-boom", "after-after")


def check_contract(out: Path, result: dict[str, str], rec: Recorder) -> None:
    """Statuses ok/failed/lost, every job reported finished once, each that ran ran once and
    after its dependencies, an exception not retried, the dependents of a lost job lost
    without running (nor reported started)."""
    assert result == CONTRACT
    assert rec.finished_keys == result  # Recorder fails on a second report
    ran = [k for k in result if k not in NEVER_RAN]
    times = {k: cf.start_end(out, k) for k in ran if k != "boom"}  # asserts each ran exactly once
    assert len(cf.runs(out, "boom")) == 1  # an exception is not retried
    assert times["a1"][0] >= times["t1"][1]
    assert times["a2"][0] >= max(times["t1"][1], times["t2"][1])  # 'failed' still unblocks
    assert times["a3"][0] >= times["a2"][1]
    for key in NEVER_RAN:
        assert cf.runs(out, key) == [] and not (out / f"{key}.out").exists()
    assert set(ran) <= set(rec.started_keys) <= set(ran)


def _executor(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Executor:
    if kind.startswith("local"):
        return LocalExecutor(workers=int(kind.split("-")[1]))
    if kind == "ray":
        ray = pytest.importorskip("ray")
        from ray import cloudpickle

        from qshield_dist.executors.ray import RayExecutor

        cloudpickle.register_pickle_by_value(cf)  # Ray workers do not have tests/ on sys.path
        if ray.is_initialized():
            ray.shutdown()
        return RayExecutor(address="local", local_cpus=2)  # a private loopback cluster, stopped after
    pytest.importorskip("submitit")
    import cloudpickle  # submitit pickles with the standalone cloudpickle

    from qshield_dist.executors.slurm import SlurmExecutor

    request.getfixturevalue("slurm_cluster")
    cloudpickle.register_pickle_by_value(cf)
    return SlurmExecutor(
        folder=tmp_path / "submitit", partition="debug", poll_s=1.0, cpus_per_task=1, mem_gb=0.5
    )


@pytest.mark.parametrize(
    "kind", ["local-1", "local-2", "ray", pytest.param("slurm", marks=pytest.mark.slurm)]
)
def test_executor_contract(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """One contract for every executor: the same DAG, the same statuses, each job once."""
    out = tmp_path / "out"
    out.mkdir()
    ex: Any = _executor(kind, tmp_path, request)
    rec = Recorder()
    result = ex.run(contract_dag(out), rec)
    check_contract(out, result, rec)
    if kind != "slurm":  # on SLURM the jobs run in the cluster's processes, not in ours
        assert str(os.getpid()) not in {cf.runs(out, k)[0][2] for k in ("t1", "a1")}


def test_local_in_process(tmp_path: Path) -> None:
    rec = Recorder()
    result = LocalExecutor(workers=1, in_process=True).run(contract_dag(tmp_path), rec)
    check_contract(tmp_path, result, rec)
    assert {cf.runs(tmp_path, k)[0][2] for k in ("t1", "t2", "a1", "a2", "a3")} == {str(os.getpid())}


def test_local_schedules_as_soon_as_deps_finish(tmp_path: Path) -> None:
    # Not wave by wave: 'fast2' depends only on the quick 'fast1' and must start long
    # before the slow job of the same wave finishes.
    jobs = [
        rec_job(tmp_path, "slow", sleep=2.0),
        rec_job(tmp_path, "fast1", sleep=0.05),
        rec_job(tmp_path, "fast2", ("fast1",)),
    ]
    result = LocalExecutor(workers=2).run(jobs)
    assert set(result.values()) == {"ok"}
    assert cf.start_end(tmp_path, "fast2")[1] < cf.start_end(tmp_path, "slow")[1]


def test_local_runs_first_the_job_most_work_waits_on(tmp_path: Path) -> None:
    """A train job given after independent attacks starts first, and among equals the first
    given does: on one worker, the order of starts is the priority order."""
    jobs = [
        rec_job(tmp_path, "attack-1"),
        rec_job(tmp_path, "attack-2"),
        rec_job(tmp_path, "train-cnn"),
        rec_job(tmp_path, "train-hybrid", ("train-cnn",)),
        rec_job(tmp_path, "attack-cnn", ("train-cnn",)),
        rec_job(tmp_path, "attack-hybrid", ("train-hybrid",)),
    ]
    rec = Recorder()
    result = LocalExecutor(workers=1, in_process=True).run(jobs, rec)
    assert set(result.values()) == {"ok"}
    assert rec.started_keys == [
        "train-cnn",
        "train-hybrid",
        "attack-1",
        "attack-2",
        "attack-cnn",
        "attack-hybrid",
    ]


def test_local_runs_in_parallel_in_worker_processes(tmp_path: Path) -> None:
    jobs = [rec_job(tmp_path, f"j{i}", sleep=0.5) for i in range(4)]
    result = LocalExecutor(workers=2).run(jobs)
    assert set(result.values()) == {"ok"}
    pids = {cf.runs(tmp_path, f"j{i}")[0][2] for i in range(4)}
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2
    # Parallel, asserted by overlap rather than wall time (a loaded machine slows both)
    spans = sorted(cf.start_end(tmp_path, f"j{i}") for i in range(4))
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_local_worker_threads_are_capped(tmp_path: Path) -> None:
    ex = LocalExecutor(workers=2)
    assert ex.threads == max(1, len(os.sched_getaffinity(0)) // 2)


def test_local_survives_sigkilled_worker(tmp_path: Path) -> None:
    """Design: a job whose worker dies is retried on a fresh pool (max_retries=1 here);
    one that kills its worker every time ends 'lost' after 2 deaths it alone caused, and so
    do its dependents; jobs that were running beside a death are re-run, never lost."""
    out = str(tmp_path)
    jobs = [
        Job("once", functools.partial(cf.die_once, out, "once"), **cf.TOY),
        Job("always", functools.partial(cf.die_always, out, "always"), **cf.TOY),
        rec_job(tmp_path, "after-once", ("once",)),
        rec_job(tmp_path, "after-always", ("always",)),
        *[rec_job(tmp_path, f"bystander{i}", sleep=0.2) for i in range(3)],
    ]
    ex = LocalExecutor(workers=2, max_retries=1)
    result = ex.run(jobs)
    assert result["once"] == "ok" and len(cf.runs(tmp_path, "once")) == 2
    # 2 attributable deaths (1 + 1 retry), plus one more if its first run shared the pool
    assert result["always"] == "lost" and len(cf.runs(tmp_path, "always")) in (2, 3)
    assert result["after-once"] == "ok" and result["after-always"] == "lost"
    assert cf.runs(tmp_path, "after-always") == []
    for i in range(3):
        assert result[f"bystander{i}"] == "ok"
        assert (tmp_path / f"bystander{i}.out").read_text() == f"bystander{i}\n"
        assert len(cf.runs(tmp_path, f"bystander{i}")) == 1  # logged at the end: completed once
    assert ex.pools_created >= 3  # the pool was rebuilt after each death
    assert (tmp_path / "once.out").exists() and not (tmp_path / "always.out").exists()


def test_local_rejects_cycle(tmp_path: Path) -> None:
    jobs = [rec_job(tmp_path, "a", ("b",)), rec_job(tmp_path, "b", ("a",))]
    with pytest.raises(ValueError, match="cycle"):
        LocalExecutor(workers=1).run(jobs)
    assert cf.runs(tmp_path, "a") == []


def _jobs(deps: dict[str, tuple[str, ...]]) -> list[Job]:
    return [Job(key, print, d, **cf.TOY) for key, d in deps.items()]


def test_waves_and_the_dependency_graph_without_an_executor() -> None:
    """base.py's graph on graphlib: waves by longest path, in the order given; deps outside the
    jobs count as done; a lost job's dependents are lost at once (also one still waiting for
    another dependency); a job may finish before its dependency does (a SLURM poll sees
    whatever status files exist); a cycle is named."""
    jobs = _jobs({"b": ("a",), "a": (), "c": ("b", "earlier-run"), "d": (), "e": ("a", "d"), "f": ("e", "c")})
    assert [[j.key for j in wave] for wave in topological_waves(jobs)] == [
        ["a", "d"],
        ["b", "e"],
        ["c"],
        ["f"],
    ]

    graph = DependencyGraph(jobs)
    assert graph.ready() == ["a", "d"]
    assert graph.finish("a", "ok") == (["b"], [])
    assert graph.finish("b", "lost") == ([], ["c", "f"])  # f still waits for e: lost all the same
    assert graph.finish("d", "ok") == (["e"], [])
    assert graph.finish("e", "ok") == ([], [])
    assert graph.statuses() == {"b": "lost", "a": "ok", "c": "lost", "d": "ok", "e": "ok", "f": "lost"}

    early = DependencyGraph(_jobs({"x": (), "y": ("x",), "z": ("y",)}))
    assert early.finish("y", "ok") == (["x"], [])  # y's status came first
    assert early.finish("x", "ok") == (["z"], [])
    assert early.finish("z", "failed") == ([], [])
    assert early.statuses() == {"x": "ok", "y": "ok", "z": "failed"}

    with pytest.raises(ValueError, match="dependency cycle: .*p.*q"):
        DependencyGraph(_jobs({"p": ("q",), "q": ("p",), "r": ()}))
    with pytest.raises(ValueError, match="duplicate"):
        topological_waves(_jobs({"p": ()}) * 2)


def test_local_rejects_bad_workers() -> None:
    with pytest.raises(ValueError):
        LocalExecutor(workers=0)


@pytest.mark.parametrize(
    "address,expected",
    [
        ("127.0.0.1", True),
        ("127.0.1.1:6379", True),
        ("localhost:8265", True),
        ("local", True),
        ("[::1]:6379", True),
        ("::1", True),
        ("10.1.2.3:6379", False),
        ("node07", False),
        ("0.0.0.0", False),
    ],
)
def test_is_loopback_is_one_rule_for_python_and_run_sh(address: str, expected: bool) -> None:
    """Debian maps the hostname to 127.0.1.1: it is loopback too (the old rules disagreed)."""
    import subprocess
    import sys

    from qshield_dist.cluster import is_loopback

    assert is_loopback(address) is expected
    cli = subprocess.run(
        [sys.executable, "-m", "qshield_dist.cluster", "is-loopback", address], capture_output=True
    )
    assert (cli.returncode == 0) is expected


def test_an_array_that_waits_for_whole_arrays_follows_every_task_of_them() -> None:
    """Past _MAX_DEPENDENCIES task ids, an array's afterok names whole arrays; SLURM then
    cancels it when any task of those fails, so the tasks it is recorded to wait for (which
    _resubmit and the polling follow) must be all of theirs, not only the ones it needs."""
    from types import SimpleNamespace

    from qshield_dist.executors.slurm import _MAX_DEPENDENCIES, SlurmExecutor, Submitted, _Task

    arrays = [Submitted(name, packs=[[f"{name}{i}"] for i in range(40)]) for name in ("11", "12")]
    for a in arrays:
        a.tasks = [
            _Task(SimpleNamespace(job_id=f"{a.array_id}_{i}"), a, k, Path("/nonexistent"))
            for i, k in enumerate(a.packs)
        ]
    few = [arrays[0].tasks[0], arrays[1].tasks[3]]
    assert SlurmExecutor._dependency(None, few) == (["11_0", "12_3"], few)  # type: ignore[arg-type]
    needed = arrays[0].tasks[:35] + arrays[1].tasks[:35]
    assert len(needed) > _MAX_DEPENDENCIES
    ids, followed = SlurmExecutor._dependency(None, needed)  # type: ignore[arg-type]
    assert ids == ["11", "12"]
    assert followed == arrays[0].tasks + arrays[1].tasks  # task 11_39 is not needed, but waited for
