"""The stream watchdog on plain generators (no Ray): items pass through, a stall is one line."""

from __future__ import annotations

import threading
import time

import pytest

from basnet.errors import JobFailed
from basnet.watchdog import StreamStalled, watched


def test_items_pass_through_in_order_and_a_stream_error_is_raised_as_itself():
    assert list(watched(iter(range(5)), stream="train", timeout_s=5)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise KeyError("bad block")

    seen = []
    with pytest.raises(KeyError, match="bad block"):
        for item in watched(broken(), stream="train", timeout_s=5):
            seen.append(item)
    assert seen == [1]


def test_a_stream_that_stops_delivering_fails_within_its_timeout_in_one_line_and_is_stopped():
    release, closed, stopped = threading.Event(), threading.Event(), []

    def stream():
        try:
            yield "first"
            release.wait()  # a read that never returns (until the test lets it go)
            yield "late"
        finally:
            closed.set()

    got, start = [], time.monotonic()
    with pytest.raises(StreamStalled) as info:
        for item in watched(stream(), stream="validation", timeout_s=0.5, report=lambda: "cluster free 0 of 2 CPUs",
                            on_stall=lambda: stopped.append(True)):
            got.append(item)
    waited = time.monotonic() - start
    message = str(info.value)
    assert got == ["first"] and stopped == [True]
    assert 0.5 <= waited < 5, waited
    assert "\n" not in message and message.startswith("the validation stream delivered nothing for")
    assert "--stall-timeout 0.5" in message and message.endswith("cluster free 0 of 2 CPUs")
    assert isinstance(info.value, JobFailed)  # a job reports it as "failed:", exit status 1
    release.set()  # the stuck read returns: the puller finds the consumer gone and closes the stream
    assert closed.wait(5)


def test_a_report_that_fails_does_not_hide_the_stall():
    def stuck():
        threading.Event().wait()
        yield None

    def report():
        raise ConnectionError("no dashboard")

    with pytest.raises(StreamStalled, match=r"no report \(ConnectionError: no dashboard\)"):
        next(watched(stuck(), stream="masking", timeout_s=0.2, report=report))


def test_a_consumer_that_stops_early_closes_the_stream():
    closed = threading.Event()

    def stream():
        try:
            yield from range(100)
        finally:
            closed.set()

    items = watched(stream(), stream="train", timeout_s=5)
    assert next(items) == 0
    items.close()
    assert closed.wait(5)


def test_no_timeout_watches_nothing():
    def stream():
        yield threading.current_thread()

    (thread,) = watched(stream(), stream="train", timeout_s=0)
    assert thread is threading.current_thread()  # read in the consumer's own thread, no puller
