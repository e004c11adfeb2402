"""Reading a file the user names that may be a pipe: `--config <(jq ...)` or `--prompt_file
<(printf ...)` hand mlora /dev/fd/63, a FIFO. Such a file is read once, to its end: it has no
size to ask for and cannot be read again."""

from __future__ import annotations

import os

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # (POSIX's; Windows has no FIFOs)


def read_without_waiting(path: str | os.PathLike) -> bytes:
    """The file's bytes; a FIFO that no process writes to reads as empty, where opening it waited
    forever. A pipe with a writer reads as it is written, to its end. A directory raises
    IsADirectoryError, a missing path FileNotFoundError."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK)  # (a FIFO's plain open waits for a writer)
    with open(fd, "rb") as f:
        if _NONBLOCK:
            os.set_blocking(fd, True)  # read what a writer sends, to its end
        return f.read()
