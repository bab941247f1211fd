"""What SLURM still holds of an array: one `squeue` call, without submitit, so the launcher can
ask on a login node before it decides what to submit (results lease, in-flight trials), and
`launch --status` can say which trials are running and which are queued."""

from __future__ import annotations

import logging
import re
import subprocess

log = logging.getLogger(__name__)

UNKNOWN = "?"  # squeue could not answer: counted as still queued
# States of a task that holds a node now; every other state squeue shows is waiting for one.
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"})


def task_states(array_id: str) -> dict[str, str] | None:
    """The array's tasks still in the queue, task id -> state (`{'12_3': 'RUNNING'}`; pending
    tasks may show as one range, `{'12_[4-9%2]': 'PENDING'}`); empty once the array has left
    the queue; None when squeue cannot answer (absent, failing, timing out)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("squeue failed: %s", exc)
        return None
    if out.returncode != 0:
        # 'Invalid job id' once the whole array has left the queue.
        return {} if "Invalid job id" in out.stderr else None
    return parse_task_states(out.stdout)


def parse_task_states(stdout: str) -> dict[str, str]:
    """`squeue -h -o '%i %T'` output -> task id -> state."""
    states = {}
    for line in stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        if task:
            states[task] = state.strip().upper()
    return states


def queued_tasks(array_id: str) -> set[str]:
    """Ids of the array's tasks still in the queue (pending, running, requeued...), e.g.
    {'12_3'}; {UNKNOWN} when squeue fails; empty once the array has left."""
    states = task_states(array_id)
    return {UNKNOWN} if states is None else set(states)


def task_indices(task_id: str, array_id: str) -> list[int]:
    """The indices of `array_id` that squeue's task id names: '12_3' -> [3],
    '12_[3-5,8%2]' -> [3, 4, 5, 8], '12_[0-6:3]' -> [0, 3, 6]; '12' -> [0] (a plain job: the
    SLURM executor submits an array of one pack so); [] for another array's task."""
    prefix, _, rest = task_id.partition("_")
    if prefix != array_id:
        return []
    if task_id == array_id:
        return [0]
    if rest.isdigit():
        return [int(rest)]
    found: list[int] = []
    if rest.startswith("[") and rest.endswith("]"):
        for part in rest[1:-1].split("%")[0].split(","):
            bounds = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
            if bounds:
                lo, hi, step = bounds.groups()
                found.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return found
