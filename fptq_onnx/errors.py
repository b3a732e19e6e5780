"""The one exception type for user errors.

The CLI catches it once and prints its message as a single line; any other
exception is a bug and is allowed to trace.
"""


class FptqError(Exception):
    """A problem with the user's input (model, data, options, files)."""
