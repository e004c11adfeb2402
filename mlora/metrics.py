"""metrics.jsonl: one JSON object per line, appended and flushed as training goes."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from mlora.plural import counted


class MetricsLog:
    """Appends records; `truncate_to` cuts the file first (0 for a fresh run, the byte offset
    saved in a checkpoint for a resumed one, so the log reads as one uninterrupted run)."""

    def __init__(self, path: str | Path, truncate_to: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and self.path.exists():
            with open(self.path, "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                if size < truncate_to:
                    # Lines were lost since the checkpoint (the log emptied or replaced): truncate()
                    # would pad it with NUL bytes up to the checkpoint's offset, and no JSON reader
                    # could read it again. Keep what is there, up to its last whole line.
                    f.seek(0)
                    keep = f.read().rfind(b"\n") + 1
                    f.truncate(keep)
                    print(f"mlora: note: {self.path} holds {counted(size, 'byte')}, {truncate_to} when the checkpoint "
                          f"was written; the resumed run's lines follow its {counted(keep, 'byte')} of whole lines",
                          file=sys.stderr)
                else:
                    f.truncate(truncate_to)
        self._file = open(self.path, "a", encoding="utf-8")

    def tell(self) -> int:
        self._file.flush()
        return self._file.tell()

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
