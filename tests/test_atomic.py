"""mlora.atomic: files and directories appear whole, with the modes open() and mkdir() give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mlora.atomic import write_dir_atomically, write_file_atomically


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """tempfile's files are 0600 and its directories 0700; renamed into place, adapters and
    checkpoints were private to their owner whatever the umask said."""
    previous = os.umask(umask)
    try:
        path = write_file_atomically(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("{}"))
        target = write_dir_atomically(tmp_path / "d", lambda tmp: (tmp / "x").write_text("x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE(target.stat().st_mode) == dir_mode
    assert path.read_text() == "{}" and (target / "x").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]  # no temporary left behind
