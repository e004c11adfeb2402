"""The lint gate: `ruff check` with the project's rules ([tool.ruff] in pyproject.toml: pyflakes,
lines over 120 characters, a few cheap correctness checks) finds nothing in the repository's
Python files. Ruff takes a fraction of a second, so it runs with every `make test`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m ruff check` with the project's pyproject.toml; --no-cache: writes nothing in the tree."""
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: it is in the test extra (make setup, or pip install -e '.[test]')")
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
               "--output-format", "concise", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_the_repository_passes_the_lint():
    run = ruff(".")
    assert run.returncode == 0, "ruff check found (fix them, wrap long lines by hand):\n" + run.stdout + run.stderr
    # The gate looks at the tree: the package, the tests, the scripts and benchmarks are among its files.
    seen = {Path(line).relative_to(ROOT).parts[0] for line in ruff("--show-files", ".").stdout.splitlines()
            if line.startswith(str(ROOT))}
    assert {"mlora", "tests", "scripts", "benchmarks"} <= seen, seen


def test_the_lint_names_a_long_line_and_an_unused_import(tmp_path):
    (tmp_path / "bad.py").write_text("import os\n\nLONG = '" + "x" * 120 + "'\n")
    run = ruff("bad.py", cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "bad.py:1:8: F401" in run.stdout and "bad.py:3:121: E501" in run.stdout, run.stdout
