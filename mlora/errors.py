"""The one exception type for mistakes a user can fix (bad config, missing file, bad flag).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

import sys

# What json's decoder raises a ValueError for (a JSON number with more digits than Python
# converts to an int, sys.get_int_max_str_digits()), said for a user: its own message ends in
# advice to call a Python function.
INTEGER_TOO_LONG = f"an integer of more than {sys.get_int_max_str_digits()} digits, more than mlora reads"


class UserError(Exception):
    """A problem with the user's input; the message names the culprit in one line."""


class PipelineError(Exception):
    """A run-time failure between pipeline ranks: a lost rank, a timeout, ranks that disagree.

    The CLI prints it as one line and exits 3.
    """
