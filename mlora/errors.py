"""The one exception type for mistakes a user can fix (bad config, missing file, bad flag).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the culprit in one line."""


class PipelineError(Exception):
    """A run-time failure between pipeline ranks: a lost rank, a timeout, ranks that disagree.

    The CLI prints it as one line and exits 3.
    """
