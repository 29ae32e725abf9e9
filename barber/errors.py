"""Exceptions that the command-line tools turn into one-line messages.

Every mistake a user can make (a bad path, a bad option, a corrupt file) raises a
subclass of `BarberError`; the CLI prints `error: <message>` and exits with the
class's `exit_code`, never a traceback. Anything else is a bug and keeps its traceback.

Every subclass lives here. `summary` is the class's line in the exit-code table of
`barber-stream --help` (`exit_code_table`); None keeps a class out of it (one that never
reaches the CLI, or whose code is per instance).
"""

from __future__ import annotations

#: What an interrupted run's message ends with.
RESUME_HINT = "run the same command again to resume"


class BarberError(Exception):
    """A user-facing error: the message is one line that names the problem."""

    exit_code = 1
    summary: str | None = "other barber error"


class UsageError(BarberError):
    """Bad command-line options or option combinations."""

    exit_code = 2
    summary = (
        "usage: bad options, --out not usable (input, inside it, non-empty, in use), nothing to --resume, "
        "or an interrupted run with a different checkpoint/calibration/settings"
    )


class BudgetError(BarberError):
    """A memory budget the model cannot be pruned within, even at the smallest plan."""

    exit_code = 2
    summary = "a memory budget the model cannot be pruned within"


class CheckpointError(BarberError):
    """The input checkpoint is missing, incomplete, corrupt or unsupported."""

    exit_code = 3
    summary = "input checkpoint missing, incomplete, corrupt or unsupported, or an unreadable tokenizer"


class DataError(BarberError):
    """Calibration or evaluation data is missing or insufficient."""

    exit_code = 4
    summary = "calibration or evaluation data missing, unreadable or too short"


class SettingsError(UsageError):
    """A pruning setting out of range or contradicting another; `field` names it (the CLI shows its option)."""

    summary = None  # a usage error, in UsageError's row

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.detail = message


class FetchError(DataError):
    """A fetch step of barber-fetch-assets failed (pip, checksum, archive layout); the message is one line."""

    summary = None  # not a pruning error: barber-fetch-assets exits with it


class OutputError(BarberError):
    """The output could not be written (disk full, permissions)."""

    exit_code = 5
    summary = "the output cannot be written (no space left, permissions); the run stays resumable"


class DistributedError(BarberError):
    """A data-parallel run lost a rank (it failed, was killed, or stopped answering within the timeout)."""

    exit_code = 6
    summary = "a data-parallel run lost a rank (failed, killed or silent past --dist-timeout); the run stays resumable"


class StateError(BarberError):
    """A saved state cannot be read or is inconsistent (the caller adds what to do about it).

    `barber.run` turns it into a `UsageError` saying how to start over, so it never reaches the CLI.
    """

    summary = None


class Interrupted(BarberError):
    """The run stopped on a signal with its state saved; the exit code is 128 + the signal number."""

    summary = None  # the code depends on the signal: see the signal lines of the CLI's table

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def _classes(cls: type[BarberError]) -> list[type[BarberError]]:
    """`cls` and all its subclasses, depth first in definition order."""
    out = [cls]
    for sub in cls.__subclasses__():
        if sub.__module__ == __name__:  # not a subclass some caller defined
            out += _classes(sub)
    return out


def exit_code_table() -> list[tuple[int, str]]:
    """(exit code, what it means) of every error class with a `summary`, by code; one code's summaries joined."""
    by_code: dict[int, list[str]] = {}
    for cls in _classes(BarberError):
        if cls.summary is not None:
            by_code.setdefault(cls.exit_code, []).append(cls.summary)
    return [(code, "; ".join(lines)) for code, lines in sorted(by_code.items())]
