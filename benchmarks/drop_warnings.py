"""gpu_session.sh's log filter: stdin to stdout, each line as it comes, without Python's warning
messages, the two lines warnings.formatwarning writes for each:

    /path/to/file.py:12: UserWarning: the message
      the source line that warned

Every other line is kept: a traceback whole (its frames through warnings.py too), a test named
test_..._warn..., any line that merely says "warn" (`grep -v -i warn` dropped all of those).
A warning's message of several lines keeps its lines after the first (they cannot be told from
output), and so its source line. (transformers' logging warnings are off in the session:
TRANSFORMERS_VERBOSITY=error; its "[transformers] ..." lines cannot be told from its errors.)
"""

from __future__ import annotations

import re
import sys

# "path:lineno: SomeWarning: message": a path (it may hold spaces, never starts with one), a
# line number, the category's class name (formatwarning writes category.__name__)
WARNING_LINE = re.compile(rb"^\S.*?:\d+: \w*Warning: ")
# formatwarning's source line: two spaces, then the line stripped (a traceback's frame, '  File
# "...", line N, in f', is never one)
SOURCE_LINE = re.compile(rb"^  (?!File \")\S")


def main() -> None:
    read, out = sys.stdin.buffer.readline, sys.stdout.buffer
    after_warning = False
    while line := read():
        warning = WARNING_LINE.match(line) is not None
        dropped = warning or (after_warning and SOURCE_LINE.match(line) is not None)
        after_warning = warning
        if not dropped:
            out.write(line)
            out.flush()


if __name__ == "__main__":
    main()
