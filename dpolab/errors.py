"""Errors the user can fix, apart from the command line that prints them.

Library modules raise :class:`UserError`; the `dpolab` command prints its message without a
traceback and exits 2. Python callers catch it like any other exception. :class:`Stopped` is
a run that stopped on request and saved its place (exit 128 + the signal number).
"""


class UserError(Exception):
    """An error the user can fix (bad file, bad row, bad option): printed without a traceback."""


class DataError(UserError):
    """A preference data problem the user can fix; the message starts with FILE or FILE:ROW."""


class Stopped(Exception):
    """A run that stopped when asked (SIGTERM, SIGHUP) after writing a checkpoint; the message
    says where it is and how to resume. The command exits with `exit_code`, 128 + the signal
    number, as a process ended by that signal would."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
