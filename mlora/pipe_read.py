"""Reading a file the user names that may be a pipe: `--config <(jq ...)` or `--prompt_file
<(printf ...)` hand mlora /dev/fd/63, a FIFO. Such a file is read once, to its end: it has no
size to ask for and cannot be read again. A device other than /dev/null is not read at all: /dev/zero or
/dev/urandom has no end, and reading one to its end filled memory until the command was killed."""

from __future__ import annotations

import errno
import os
import stat

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # (POSIX's; Windows has no FIFOs)


class NotAFileOrPipe(OSError):
    """The path is a device other than a terminal (/dev/zero, a disk), which may have no end;
    its strerror says so, as the callers' messages of an OSError take it."""

    def __init__(self, kind: str):
        super().__init__(errno.EINVAL, f"{kind}, not a file or a pipe: reading it may never end")


def _is_null_device(fd: int) -> bool:
    """Whether `fd` is the null device, which ends at once: it reads as empty (and the callers
    then say the config or dataset is empty), where "may never end" would be untrue."""
    try:
        return os.fstat(fd).st_rdev == os.stat(os.devnull).st_rdev
    except OSError:
        return False


def read_without_waiting(path: str | os.PathLike) -> bytes:
    """The file's bytes; a FIFO that no process writes to reads as empty, where opening it waited
    forever. A pipe with a writer reads as it is written, to its end; so does a terminal (typed
    input, to Ctrl-D), and /dev/null, as empty. A directory raises IsADirectoryError, a missing
    path FileNotFoundError, another device NotAFileOrPipe (an OSError)."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK)  # (a FIFO's plain open waits for a writer)
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode  # (of what was opened: /dev/stdin's or /dev/fd/N's target)
        if stat.S_ISBLK(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd) and not _is_null_device(fd)):
            raise NotAFileOrPipe("a block device" if stat.S_ISBLK(mode) else "a character device")
        if _NONBLOCK:
            os.set_blocking(fd, True)  # read what a writer sends, to its end
        return f.read()
