"""Files that survive crashes and shared filesystems: the one atomic write and the one read
that rides out a transient I/O error. Everything the package writes for later goes through
atomic_writer (result files, compacted parts, checkpoints, the manifest, the results ledger,
the SLURM executor's status files), and every file it must tell "unreadable now" from "corrupt" apart
is read through read_bytes (or read_retried, for a large file read in parts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_ATTEMPTS = 4  # an NFS server that is failing over answers EIO or ESTALE for seconds
READ_BACKOFF_S = 0.5  # then 1 s, 2 s: about 3.5 s in all before the error is believed


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically and durably (atomic_writer)."""
    with atomic_writer(path, mode) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A handle on a new file that gets its name only when the block ends: then it is fsynced,
    named `path` (replacing what was there), and the directory fsynced. A reader sees the old file
    or the whole new one, and after a crash (of this process or of the machine) the name is on
    disk too. The file is written unnamed (O_TMPFILE), so a writer killed mid-write (SIGKILL, a
    node lost) leaves nothing behind; where the filesystem cannot (NFS), it is a dot-file in the
    same directory (listings skip it), removed if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), mode)
            if tmp is None:
                _name(handle.fileno(), path)
        if tmp is not None:
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _dot_name(path: Path) -> str:
    return str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")


def _new_file(path: Path) -> tuple[int, str | None]:
    """(fd, None) for an unnamed file in path's directory; (fd, its name) where O_TMPFILE (or
    /proc, through which the file gets its name) is missing."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o600), None
        except OSError:  # EOPNOTSUPP (NFS and others), EISDIR (kernels before 3.11)
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return fd, tmp


def _name(fd: int, path: Path) -> None:
    """Link the unnamed file `fd` as `path`. A new name is linked directly; an existing one is
    replaced through a complete, fsynced dot-file that exists only between a link and a rename."""
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N, as open(2) shows; os.link calls plain
    # link(), which does not follow that link, unless it is given a directory fd.
    proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            os.link(str(fd), path, src_dir_fd=proc_fds)
            return
        except FileExistsError:
            pass
        tmp = _dot_name(path)
        os.link(str(fd), tmp, src_dir_fd=proc_fds)
    finally:
        os.close(proc_fds)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, retrying an OSError (an NFS hiccup) with backoff (read_retried).
    Decoding is the caller's: an error there is the file's own, and only that is corruption."""

    def whole(p: Path) -> bytes:
        with open(p, "rb") as handle:
            return handle.read()

    return read_retried(path, whole)


def read_retried(path: Path, read: Callable[[Path], T]) -> T:
    """read(path), retried with backoff on an OSError (an NFS hiccup); the last error is
    raised when every attempt failed. FileNotFoundError means absent and is raised at once."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt + 1 == READ_ATTEMPTS:
                raise
            delay = READ_BACKOFF_S * 2**attempt
            log.warning("reading %s failed (%s); retrying in %.1f s", path, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
