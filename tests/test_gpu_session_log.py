"""benchmarks/gpu_session.sh's log(): every line to stdout and $OUT/session.log but Python's
warning messages. Its `grep -v -i warn` also dropped a traceback's lines through warnings.py
and any line saying "warn" (a failing test named ...warn..., a step named warm-up's warn_up)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A warning (two lines: its message, its source line), output that says "warn", and a traceback
# through warnings.py (a message that fails as the warning is shown), as Python prints them.
SCRIPT = '''import warnings
class Unprintable:
    def __str__(self):
        raise RuntimeError("a warning that cannot be shown")
warnings.warn("the cache is cold", FutureWarning)
print("FAILED tests/test_resume.py::test_no_warning_on_resume - assert 1 == 2", flush=True)
warnings.warn(Unprintable())
'''


def test_the_session_log_drops_warnings_and_keeps_tracebacks(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(SCRIPT)
    printed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    # (stderr after stdout: the one stdout line is printed between the two warnings)
    sample = printed.stderr.splitlines(keepends=True)
    assert sample[0] == f"{script}:5: FutureWarning: the cache is cold\n"  # the premise: Python's format
    assert sample[1].startswith("  warnings.warn(") and sample[2] == "Traceback (most recent call last):\n"
    traceback = sample[2:]
    assert any("warnings.py" in line for line in traceback) and traceback[-1].startswith("RuntimeError: a warning")
    text = sample[0] + sample[1] + printed.stdout + "".join(traceback)
    log = subprocess.run(["bash", "-c", 'eval "$(grep "^log()" benchmarks/gpu_session.sh)"; log'], cwd=ROOT,
                         input=text, capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path),
                              "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert log.returncode == 0, log.stderr
    assert log.stdout == printed.stdout + "".join(traceback)
    assert (tmp_path / "session.log").read_text() == log.stdout
