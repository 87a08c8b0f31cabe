"""A progress watchdog for the streams a job waits on: training, validation, masking input.

A consumer of a Ray Data stream waits inside Ray Data's iterator, in a queue with no timeout: a
stream that stops delivering (see docs/design.md, "Stalls") leaves it waiting forever, and on a
cluster that is a GPU node idling until someone looks. :func:`watched` moves the waiting to a
thread of its own and gives the consumer a deadline: when no item arrives for ``timeout_s``
seconds (the first included), it calls ``on_stall`` (to stop the stream) and raises
:class:`StreamStalled`, one line naming the stream, the wait and what ``report`` says of the
cluster. Items are handed over one at a time, so the stream runs at most one item ahead of the
consumer, as it would without the watchdog; an exception of the stream reaches the consumer as
itself.

No Ray here: the Ray-specific report (free CPUs and GPUs, the dataset's operators) is
``basnet.ray_progress``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

from basnet.errors import JobFailed

__all__ = ["StreamStalled", "watched", "DEFAULT_STALL_TIMEOUT_S"]

T = TypeVar("T")

# The slowest legitimate wait measured is far below this (docs/design.md, "Stalls"): a first batch
# on a 2-core machine kept busy by two other processes, a CPU model replica's first batch.
DEFAULT_STALL_TIMEOUT_S = 600.0

_END = object()


class StreamStalled(JobFailed):
    """A stream delivered nothing for its stall timeout (exit status 1, one ``failed:`` line)."""


class _Handoff:
    """One slot between the thread that pulls the stream and the consumer, under one condition:
    no polling, and either side can give up (the consumer on its deadline, the puller on a stop)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.item: object = None
        self.full = False
        self.error: BaseException | None = None
        self.stopped = False

    def put(self, item: object) -> bool:
        """Hands ``item`` over once the slot is free; False if the consumer has stopped."""
        with self.cond:
            self.cond.wait_for(lambda: not self.full or self.stopped)
            if self.stopped:
                return False
            self.item, self.full = item, True
            self.cond.notify_all()
            return True

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()

    def take(self, timeout_s: float | None) -> tuple[bool, object]:
        """(True, item) when one arrives in time (the stream's error is raised), else (False, None)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.full or self.error is not None, timeout=timeout_s):
                return False, None
            if self.full:
                item, self.item, self.full = self.item, None, False
                self.cond.notify_all()
                return True, item
            raise self.error

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.item, self.full = None, False
            self.cond.notify_all()


def _pull(items: Iterable[T], slot: _Handoff) -> None:
    iterator = iter(items)
    try:
        for item in iterator:
            if not slot.put(item):
                break
        else:
            slot.put(_END)
    except BaseException as exc:  # the consumer raises it as its own
        slot.fail(exc)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # a stopped consumer: the stream shuts down from the thread that drives it
            try:
                close()
            except Exception:
                pass


def watched(items: Iterable[T], *, stream: str, timeout_s: float | None,
            report: Callable[[], str] = lambda: "", on_stall: Callable[[], None] = lambda: None,
            thread: bool = False) -> Iterator[T]:
    """The items of ``items``, each of which must arrive within ``timeout_s`` seconds.

    Args:
        items: The stream (a Ray Data ``iter_batches``, any iterable).
        stream: Its name in the error (``train``, ``validation``, ``masking input``).
        timeout_s: The longest wait for one item; ``None`` or ``0`` watches nothing.
        report: What the error says of the cluster (called once, on a stall, before ``on_stall``).
        on_stall: Stops the stream (called once, on a stall, before the error is raised).
        thread: Pull ``items`` in a thread even when nothing is watched, so the stream's own work
            (decoding, in the bulk job's own process) overlaps the consumer's.

    Raises:
        StreamStalled: No item for ``timeout_s`` seconds.
    """
    if not timeout_s and not thread:
        yield from items
        return
    slot = _Handoff()
    puller = threading.Thread(target=_pull, args=(items, slot), name=f"watched-{stream}", daemon=True)
    puller.start()
    try:
        while True:
            start = time.monotonic()
            arrived, item = slot.take(timeout_s or None)
            if not arrived:
                line = _stall_line(stream, time.monotonic() - start, timeout_s, report)  # before it is stopped
                _stop_quietly(on_stall)
                raise StreamStalled(line)
            if item is _END:
                return
            yield item
    finally:
        slot.stop()


def _stop_quietly(on_stall: Callable[[], None]) -> None:
    try:
        on_stall()
    except Exception:  # the error must still say what stalled
        pass


def _stall_line(stream: str, waited: float, timeout_s: float, report: Callable[[], str]) -> str:
    try:
        detail = report()
    except Exception as exc:  # a report that cannot be made must not hide the stall
        detail = f"no report ({type(exc).__name__}: {exc})"
    line = (f"the {stream} stream delivered nothing for {waited:.0f} s (--stall-timeout {timeout_s:g}): "
            "a stalled run, not a slow one")
    return f"{line}; {detail}" if detail else line
