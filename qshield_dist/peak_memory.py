"""This process's peak resident set, resettable on Linux, for `--plan`'s calibration and the
benchmarks: one measured run's peak is its own, not an earlier import's."""

from __future__ import annotations

import resource


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) through /proc/self/clear_refs; False where
    that is not allowed (then the peak is the process's since it started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_bytes(field_name: str) -> int | None:
    """A /proc/self/status size field (VmRSS, VmHWM) in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_rss_bytes() -> int:
    """The process's peak RSS since it started (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes() -> int:
    """The peak since the last `reset_peak` where VmHWM is readable, else since the start."""
    peak = status_bytes("VmHWM")
    return peak if peak is not None else max_rss_bytes()
