"""Errors the user can fix, apart from the command line that prints them.

Library modules raise :class:`UserError`; the `dpolab` command prints its message without a
traceback and exits 2. Python callers catch it like any other exception.
"""


class UserError(Exception):
    """An error the user can fix (bad file, bad row, bad option): printed without a traceback."""


class DataError(UserError):
    """A preference data problem the user can fix; the message starts with FILE or FILE:ROW."""
