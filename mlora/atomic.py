"""Atomic writes: a reader sees the old file/directory or the new one, never half of one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

# What the temporary names below look like: "." + the target's name + "." + tempfile's eight
# random characters. A process killed mid-write (SIGKILL, the host's OOM killer, a power cut)
# leaves one behind, hidden: a checkpoint's holds every adapter's weights and optimizer state.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}$")


def _usual_mode(mode: int) -> int:
    """`mode` less the process's umask: what open() and mkdir() would have given. tempfile makes
    its files 0600 and its directories 0700 (private to their owner), and a rename keeps that,
    so adapters and checkpoints came out unreadable to the group and others that the umask
    lets read everything else mlora writes (metrics.jsonl, output_dir itself)."""
    return mode & ~_umask()


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status,
    since 4.7). Setting it to read it (os.umask) leaves it 0 for a moment for every thread:
    a file another thread made then was world-writable, and a second reader in that moment
    read 0 and made an adapter 0777 (pipeline ranks run as threads in the tests)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: at least no two readers read each other's 0
        umask = os.umask(0)
        os.umask(umask)
    return umask


def remove_leftovers(directory: Path, is_target: Callable[[str], bool]) -> None:
    """Delete what writers killed mid-write left in `directory`: the temporary files and
    directories below made for a target whose name `is_target` accepts. Only a writer that
    alone writes such targets there may call it (mlora train's output lock, a pipeline rank's
    own checkpoint tag): another's temporary would be deleted under it."""
    try:
        entries = list(os.scandir(directory))
    except OSError:  # (not there yet)
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or not is_target(match["target"]):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def write_file_atomically(path: str | os.PathLike, write: Callable[[str], None],
                          clean: bool = False) -> Path:
    """`write(tmp_path)` fills a temporary file beside `path`, which is then renamed onto it.
    With `clean`, first the temporaries a killed writer of `path` left (see remove_leftovers)."""
    path = Path(path)
    if clean:
        remove_leftovers(path.parent, lambda name: name == path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _usual_mode(0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_dir_atomically(target: str | os.PathLike, fill: Callable[[Path], None],
                         clean: Callable[[str], bool] | None = None) -> Path:
    """`fill(tmp_dir)` fills a temporary directory beside `target`, which then replaces it. The
    old `target` is renamed aside before it is deleted: deleted in place, a reader (or the next
    run, had this one been killed then) found it half deleted. `clean`, when given, names the
    targets (this one, or a family such as every checkpoint-<step>) whose temporaries a killed
    writer left are deleted first (see remove_leftovers)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if clean is not None:
        remove_leftovers(target.parent, clean)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    aside = None
    try:
        fill(tmp)
        _give_usual_modes(tmp)
        if os.path.lexists(target):
            aside = _rename_aside(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside)
    return target


def remove_dir_aside(path: Path) -> None:
    """Delete directory `path` after renaming it to a temporary name: a deletion cut short
    leaves no half directory under its own name (where a reader takes it for whole), only a
    temporary that remove_leftovers deletes later."""
    shutil.rmtree(_rename_aside(path), ignore_errors=True)


def _rename_aside(path: Path) -> Path:
    """Move `path` into a new temporary directory beside it (a name remove_leftovers knows);
    returns that directory."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.rename(path, aside / path.name)
    except OSError:
        aside.rmdir()
        raise
    return aside


def _give_usual_modes(root: Path) -> None:
    """`root` and what `fill` wrote in it get the modes open() and mkdir() would have given:
    writers that make their files private whatever the umask (safetensors' save_file writes
    0600) left the demo's converted base readable to its owner only."""
    root.chmod(_usual_mode(0o777))
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        path.chmod(_usual_mode(0o777 if executable else 0o666))
