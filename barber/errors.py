"""Exceptions that the command-line tools turn into one-line messages.

Every mistake a user can make (a bad path, a bad option, a corrupt file) raises a
subclass of `BarberError`; the CLI prints `error: <message>` and exits with the
class's `exit_code`, never a traceback. Anything else is a bug and keeps its traceback.
"""


class BarberError(Exception):
    """A user-facing error: the message is one line that names the problem."""

    exit_code = 1


class UsageError(BarberError):
    """Bad command-line options or option combinations."""

    exit_code = 2


class CheckpointError(BarberError):
    """The input checkpoint is missing, incomplete, corrupt or unsupported."""

    exit_code = 3


class DataError(BarberError):
    """Calibration or evaluation data is missing or insufficient."""

    exit_code = 4


class FetchError(DataError):
    """A fetch step failed (pip, checksum, archive layout); the message is one line."""
