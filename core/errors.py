"""One exception type for mistakes a user can fix.

The CLI prints ``error: <message>`` and exits with code 2 for these; the dashboard
shows the message in a box. Anything else is a bug and keeps its traceback.
A message names the problem *and* the fix, e.g.
``"column 'review' not found in data.csv (columns: text, stars); pass --text-column"``.
"""


class LayerscopeError(Exception):
    """A problem with the user's input, files or environment, with a fix in the message."""
