"""The JSON lines `mlora generate` and `mlora eval` print on stdout."""

from __future__ import annotations

import json
import sys


def json_line(value: dict) -> str:
    """`value` as one line of JSON: non-ASCII text (a prompt, an output, an adapter's name or
    path) as written, as a reader of the terminal wants it; \\u-escaped where stdout cannot
    encode it (an ASCII or Latin-1 locale, PYTHONIOENCODING=ascii), where writing the letters
    ended the command with a UnicodeEncodeError. Both are the same JSON to a parser."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return json.dumps(value)
    return text
