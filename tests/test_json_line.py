"""The JSON lines generate and eval print: letters as written, escaped where stdout cannot write them."""

from __future__ import annotations

import io
import json
import sys

import pytest

from mlora.json_line import json_line

LINE = {"adapter": "日本語", "prompt": "café", "output": "ok"}


@pytest.mark.parametrize("encoding,escaped", [("utf-8", False), ("ascii", True), ("latin-1", True),
                                              ("cp1252", True)])
def test_letters_as_written_unless_stdout_cannot_encode_them(monkeypatch, encoding, escaped):
    """Printing "日本語" to an ASCII or Latin-1 stdout ended generate (and eval) with a
    UnicodeEncodeError traceback; there the line is \\u-escaped, the same JSON."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    monkeypatch.setattr(sys, "stdout", stdout)
    line = json_line(LINE)
    assert line == json.dumps(LINE, ensure_ascii=escaped) and json.loads(line) == LINE
    print(line)  # (writes)


def test_a_latin_1_stdout_keeps_its_letters_only_when_all_fit(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))
    assert json_line({"prompt": "café"}) == '{"prompt": "café"}'
