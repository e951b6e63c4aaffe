"""Exception and warning types.

Each error also subclasses the built-in a caller would naturally catch (PEFT's convention), so
``except ValueError`` keeps working while ``except CurvzoError`` catches every input problem the
CLI turns into one stderr line and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "INPUT_ERROR_EXIT",
    "error_line",
    "reported",
    "CurvzoError",
    "ConfigError",
    "DataError",
    "ModelError",
    "UnknownTaskError",
    "CheckpointError",
    "TrainingDiverged",
    "RunInterrupted",
    "RankFailed",
    "CurvzoWarning",
]


class CurvzoError(Exception):
    """Base class for every problem with a user's input (config, data, model, run folder)."""


class ConfigError(CurvzoError, ValueError):
    """A configuration value or combination of values is invalid."""


class DataError(CurvzoError, ValueError):
    """A data file is missing, malformed, or does not fit its task."""


class ModelError(CurvzoError, ValueError):
    """A model cannot be found, fetched or loaded."""


class UnknownTaskError(CurvzoError, KeyError):
    """A task name is not in the registry; the message lists close matches."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a message reads better unquoted.
        return str(self.args[0]) if self.args else ""


class CheckpointError(CurvzoError, ValueError):
    """A run folder or checkpoint cannot be resumed from."""


class TrainingDiverged(CurvzoError, FloatingPointError):
    """Too many consecutive steps had non-finite losses: the learning rate is too large."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says whether a checkpoint was saved and how to resume.

    A ``KeyboardInterrupt``, so that code catching ``Exception`` (a benchmark grid) still stops.
    """


class RankFailed(RuntimeError):
    """Another rank of a distributed run died (or the launcher stopped this one): not an input
    problem, so not a :class:`CurvzoError`; the CLI prints it as one line and exits with code 1."""


class CurvzoWarning(UserWarning):
    """A recoverable situation the user should know about."""


#: Exit code of a command stopped by an input error (argparse's convention for a bad command line).
INPUT_ERROR_EXIT = 2


def error_line(err: BaseException) -> str:
    """The one stderr line an input error gets, from the CLI and from scripts alike."""
    return f"curvzo: error: {err}"


@contextmanager
def reported() -> Iterator[None]:
    """Run a script's body so that an input error ends it as the CLI ends: one line, exit code 2.

    For scripts such as ``examples/``: a missing file or an unreachable hub is the user's to fix,
    and a traceback through the library's frames would hide the one line that says how.
    """
    try:
        yield
    except CurvzoError as err:
        print(error_line(err), file=sys.stderr)
        raise SystemExit(INPUT_ERROR_EXIT) from None
