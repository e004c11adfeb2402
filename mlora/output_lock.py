"""One run at a time per output directory: `mlora train` holds a lock on its output_dir while
it runs, so a second run started into the same directory is refused in one line instead of
interleaving its metrics log, checkpoints and adapters with the first's (each run's resumable
state would then describe neither)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mlora.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None


@contextlib.contextmanager
def output_dir_lock(out: str | os.PathLike, shared: bool = False):
    """Hold a lock on the directory `out` (it exists) for the block. flock on the directory
    itself: no lock file is left behind (an output_dir a failed start created must still be
    removable when empty), and the OS drops the lock when the process ends, even after
    kill -9, so a crashed run never blocks its --resume.

    shared: a pipeline rank's (ranks 0 and the last share one output_dir, possibly as threads
    of one process): ranks do not exclude each other, but a one-process run excludes them and
    they exclude it. Two pipeline jobs on one host already collide on their master port."""
    if fcntl is None:
        yield
        return
    path = Path(out)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        # A directory this user may write into but not read (mode 0333, a drop box) trains
        # fine, but cannot be opened to lock it: not guarded, as where flock is missing (it
        # was PermissionError's traceback).
        fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"output_dir {path} is in use by another mlora train run (wait for it to end, "
                            "or choose another output_dir)") from None
        except OSError:  # a file system without flock (some network mounts): not guarded
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
