"""fileio.atomic_writer: a reader sees the old file or the whole new one, and a writer that is
killed or raises leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qshield_dist import fileio

REPO = Path(__file__).resolve().parents[1]

KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from qshield_dist.fileio import atomic_writer
with atomic_writer(Path(sys.argv[1])) as handle:
    handle.write(b"half of the new")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _no_o_tmpfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The filesystem refuses O_TMPFILE, as NFS does."""
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


@pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="needs Linux's O_TMPFILE")
def test_a_writer_killed_mid_write_leaves_nothing_and_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "rows.parquet"
    target.write_bytes(b"old")
    for path in (target, tmp_path / "new.parquet"):  # replacing a file, and a new name
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_MID_WRITE, str(path)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            timeout=120,
        )
        assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.parquet"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "dot_file"])
def test_a_file_is_written_whole_with_its_mode_and_a_failed_block_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    if not unnamed:
        _no_o_tmpfile(monkeypatch)
    target = tmp_path / "sub" / "f.json"
    fileio.atomic_write_bytes(target, b"first", mode=0o644)
    fileio.atomic_write_bytes(target, b"second", mode=0o640)
    assert target.read_bytes() == b"second"
    assert target.stat().st_mode & 0o777 == 0o640
    with pytest.raises(RuntimeError):
        with fileio.atomic_writer(target) as handle:
            handle.write(b"never named")
            raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
