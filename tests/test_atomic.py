"""mlora.atomic: files and directories appear whole, with the modes open() and mkdir() give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mlora.atomic import write_dir_atomically, write_file_atomically


def fill_like_safetensors(tmp: Path) -> None:
    """What a directory's writers leave: a file by open(), and one made private whatever the
    umask, as safetensors' save_file makes its files (0600: the demo's converted base was)."""
    (tmp / "x").write_text("x")
    (tmp / "private").write_text("p")
    (tmp / "private").chmod(0o600)
    (tmp / "sub").mkdir(mode=0o700)


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """tempfile's files are 0600 and its directories 0700; renamed into place, adapters and
    checkpoints were private to their owner whatever the umask said."""
    previous = os.umask(umask)
    try:
        path = write_file_atomically(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("{}"))
        target = write_dir_atomically(tmp_path / "d", fill_like_safetensors)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE(target.stat().st_mode) == dir_mode
    assert stat.S_IMODE((target / "private").stat().st_mode) == file_mode
    assert stat.S_IMODE((target / "sub").stat().st_mode) == dir_mode
    assert path.read_text() == "{}" and (target / "x").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]  # no temporary left behind


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the umask from Linux's /proc")
def test_the_umask_is_read_without_setting_it(tmp_path, monkeypatch):
    """Reading the umask by setting it (os.umask(0), then back) left it 0 for a moment for every
    thread: a file made then was world-writable, and a concurrent reader took 0 for the umask
    and made an adapter 0777 (pipeline ranks run as threads in the tests)."""
    import sys
    import threading

    import mlora.atomic

    previous = os.umask(0o022)
    try:
        modes = set()

        def read_many():
            for _ in range(300):
                modes.add(mlora.atomic._usual_mode(0o777))

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=read_many) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
        assert modes == {0o755}

        def no_setting(mask):
            raise AssertionError(f"os.umask({mask:#o}) called to read the umask")

        monkeypatch.setattr(mlora.atomic.os, "umask", no_setting)
        target = write_dir_atomically(tmp_path / "d", lambda tmp: (tmp / "x").write_text("x"))
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
    finally:
        monkeypatch.undo()
        os.umask(previous)


def cut_the_first_deletion_short(monkeypatch) -> list:
    """mlora.atomic's first rmtree of a directory holding files deletes one, then stops as a
    kill or Ctrl-C would stop it (KeyboardInterrupt); the list returned gets its path."""
    import shutil

    import mlora.atomic

    real_rmtree, cut = shutil.rmtree, []

    def cut_short(path, ignore_errors=False):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else []
        if files and not cut:
            cut.append(path)
            files[0].unlink()
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(mlora.atomic.shutil, "rmtree", cut_short)
    return cut


def test_a_replaced_directory_is_never_seen_half_deleted(tmp_path, monkeypatch):
    """The directory a new one replaces was deleted in place (rmtree, then the rename): cut short
    there (killed, Ctrl-C), or read meanwhile, it was half of itself (one of an adapter's two
    files). Its deletion cut short now leaves the new one whole, and the old one's remains only
    under a hidden name beside it."""
    target = write_dir_atomically(tmp_path / "d", lambda tmp: [(tmp / n).write_text("old") for n in ("a", "b")])
    cut = cut_the_first_deletion_short(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(target, lambda tmp: [(tmp / n).write_text("new") for n in ("a", "b")])
    assert cut and {p.name: p.read_text() for p in target.iterdir()} == {"a": "new", "b": "new"}
    assert all(p.name.startswith(".d.") for p in tmp_path.iterdir() if p != target)


# Names as tempfile gives them: "." + the target's name + "." + eight of [a-z0-9_].
def plant(root: Path, name: str, is_dir: bool) -> None:
    if is_dir:
        (root / name).mkdir()
        (root / name / "state.pt").write_text("half")
    else:
        (root / name).write_text("half")


def test_a_killed_writers_temporaries_go_at_the_next_write_that_cleans(tmp_path):
    """A writer killed mid-write (SIGKILL, the host's OOM killer) left its temporary file or
    directory, hidden, for ever: a checkpoint's holds every adapter's weights and optimizer
    state. A write asked to clean deletes those of its targets, and nothing else: not another
    target's (".dd." is not ".d."), nor a name tempfile would not give, nor anything without
    `clean` (the demo's cache, where two conversions may run at once)."""
    gone = {".d.ab12cd_3": True, ".d.zzzzzzzz": True, ".f.json.q1w2e3r4": False}
    kept = {".dd.ab12cd_3": True, ".e.ab12cd_3": True, "d.ab12cd_3": True, ".d.short": True,
            ".f.json.q1w2e3r4.x": False, ".g.q1w2e3r4": False}
    for name, is_dir in {**gone, **kept}.items():
        plant(tmp_path, name, is_dir)
    (tmp_path / ".d.zzzzzzzz" / "d").mkdir()  # a directory renamed aside, its deletion cut short

    write_dir_atomically(tmp_path / "d", lambda tmp: (tmp / "x").write_text("x"))
    write_file_atomically(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("{}"))
    assert {p.name for p in tmp_path.iterdir()} == {*gone, *kept, "d", "f.json"}  # without clean

    write_dir_atomically(tmp_path / "d", lambda tmp: (tmp / "x").write_text("x"), clean=lambda n: n == "d")
    write_file_atomically(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("{}"), clean=True)
    assert {p.name for p in tmp_path.iterdir()} == {*kept, "d", "f.json"}


def test_old_checkpoints_are_deleted_aside_and_killed_writes_cleaned(tmp_path, monkeypatch):
    """write_checkpoint's pruning deleted old checkpoints in place: cut short, one was left
    half under its own name, which a resume lists as a checkpoint. Now it is renamed aside
    first, and the next checkpoint write deletes what a killed write or deletion left of this
    rank's checkpoints (not another pipeline rank's, which may be writing it now)."""
    from mlora import checkpoint

    def write(iteration: int) -> None:
        checkpoint.write_checkpoint(tmp_path, iteration, {"w": iteration}, {"run": 1}, keep=2)

    write(1), write(2)
    cut = cut_the_first_deletion_short(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write(3)  # written, then the pruning of iter 1 cut short
    monkeypatch.undo()
    assert cut and [i for i, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 3]
    root = checkpoint.checkpoint_root(tmp_path)
    for name, is_dir in {".iter-00000004.abcdefgh": True, ".iter-00000004-rank1.abcdefgh": True,
                         ".manifest.json.abcdefgh": False}.items():
        plant(root, name, is_dir)  # a write of this run's killed, another rank's in flight, a foreign name
    write(4)
    assert sorted(p.name for p in root.iterdir()) == [".iter-00000004-rank1.abcdefgh", ".manifest.json.abcdefgh",
                                                     "iter-00000003", "iter-00000004"]
