"""What SLURM still holds of an array: one `squeue` call, without submitit, so the launcher can
ask on a login node before it decides what to submit (results lease, in-flight trials)."""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)

UNKNOWN = "?"  # squeue could not answer: counted as still queued


def queued_tasks(array_id: str) -> set[str]:
    """Ids of the array's tasks still in the queue (pending, running, requeued...), one per
    task (`-r`), e.g. {'12_3'}; {UNKNOWN} when squeue fails; empty once the array has left."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", array_id, "-o", "%i"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("squeue failed: %s", exc)
        return {UNKNOWN}
    if out.returncode != 0:
        # 'Invalid job id' once the whole array has left the queue.
        return set() if "Invalid job id" in out.stderr else {UNKNOWN}
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}
