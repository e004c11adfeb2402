"""metrics.jsonl: one JSON object per line, appended and flushed as training goes."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends records; `truncate_to` cuts the file first (0 for a fresh run, the byte offset
    saved in a checkpoint for a resumed one, so the log reads as one uninterrupted run)."""

    def __init__(self, path: str | Path, truncate_to: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and self.path.exists():
            with open(self.path, "r+b") as f:
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
