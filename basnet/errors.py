"""The errors a user can fix. Every job turns a ``UserError`` into one ``error:`` line and exit status 2."""

from __future__ import annotations

__all__ = ["UserError", "ConfigError"]


class UserError(ValueError):
    """A mistake in a job's arguments, inputs or data that the user can fix; the message names the fix."""


class ConfigError(UserError):
    """A bad option or config file."""
