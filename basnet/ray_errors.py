"""The user's or the job's own error inside a Ray error, so a job reports it in one line.

A ``UserError`` (exit 2) or ``JobFailed`` (exit 1) raised in a Ray task, an actor, a Ray Data stage
or a training worker reaches the driver wrapped: in a ``RayTaskError`` (its ``cause``), in an
exception's chain, or among a failed training run's ``worker_failures``. :func:`user_error` finds
it; :func:`get` is ``ray.get`` raising it as itself.
"""

from __future__ import annotations

import ray

from basnet.errors import JobFailed, UserError

__all__ = ["user_error", "get"]


def user_error(exc: BaseException) -> BaseException | None:
    """The ``UserError`` or ``JobFailed`` that ``exc`` carries, if any."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # Ray re-raises a task's error as a class deriving from both RayTaskError and the error's
        # own class: the original is its ``cause``.
        if isinstance(current, (UserError, JobFailed)) and not isinstance(current, ray.exceptions.RayError):
            return current
        cause = getattr(current, "cause", None)
        failures = getattr(current, "worker_failures", None) or {}  # a training run's failed workers
        pending += [cause if isinstance(cause, BaseException) else None, current.__cause__, current.__context__,
                    *(f for f in failures.values() if isinstance(f, BaseException))]
    return None


def get(ref, *also_failed):
    """``ray.get``, raising the user or job error a task raised as itself (one line, not a Ray
    traceback). ``also_failed``: refs of the same task, fetched on failure so Ray does not report
    their errors as unhandled."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        for other in also_failed:
            try:
                ray.get(other)
            except ray.exceptions.RayError:
                pass
        if (error := user_error(exc)) is not None:
            raise error from None
        raise
