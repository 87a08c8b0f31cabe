"""The errors a user can fix, and how a job reports them: one ``error:`` line, exit status 2.

Every user-facing error derives from ``UserError`` (a ``ValueError``), so ``main_guard`` catches
that base alone: a missing file, a bad option, unpaired data, a foreign checkpoint or backbone.
A job whose work failed (a broken model, storage that refuses every read, too many bad inputs)
raises ``JobFailed``: one ``failed:`` line, exit status 1.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

__all__ = ["UserError", "ConfigError", "UsageError", "DataError", "CheckpointError", "JobFailed", "first_line", "main_guard"]


class UserError(ValueError):
    """A mistake in a job's arguments, inputs or data that the user can fix; the message names the fix."""


class ConfigError(UserError):
    """A bad option or config file."""


class UsageError(UserError):
    """Inputs or a cluster that do not fit what the job was asked to do."""


class DataError(UserError):
    """A problem with the user's data, worded as one line that names the fix."""


class CheckpointError(UserError):
    """A checkpoint (or an exported model) that is missing, unreadable or not in BASNet's layout."""


class JobFailed(RuntimeError):
    """The job ran but its work failed or was stopped (not the user's arguments): exit status 1."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main_guard(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Runs a job's main: a ``UserError`` becomes one ``error:`` line on stderr and exit status 2, a
    ``JobFailed`` one ``failed:`` line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except JobFailed as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return 1

    return wrapper
