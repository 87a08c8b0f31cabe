"""A job's console shows the job's own lines, not Ray's internal chatter (``--verbose`` shows it all).

Ray prints a few lines on every run that tell a user of these jobs nothing they can act on. Each
was read in Ray 2.60's source:

* ``core_worker.cc: Actor with class name ... has constructor arguments in the object store and
  max_restarts > 0``: logged at ERROR for every Ray Data actor pool (Ray Data itself passes its
  map transformer and context by reference) and for Ray Train's own ``PreemptionWatcher``.
* ``Reporting training result N: TrainingReport(...)``: Ray Train logs every report at INFO
  through a logger named after its file path, which ``LoggingConfig(log_level=...)`` cannot reach.
* ``Progress bars disabled. To enable ...``: Ray Data, once per process, because the jobs turn its
  per-operator bars off and print their own progress.
* ``ExecutionOptions.exclude_resources is deprecated`` (and the source line Python prints under
  it): Ray Train's ``DataConfig`` calls Ray Data's deprecated option itself.
* ``Token authentication is enabled for this Ray cluster``: the local Ray a job starts creates and
  uses its token by itself.

Lines that workers print (the training loop's epoch and step lines) reach the console without
Ray's ``(RayTrainWorker pid=...)`` prefix (``RAY_DISABLE_WORKER_LOG_PREFIX``).

Lines that Ray forwards from workers and actors are dropped by Ray's own log deduplicator
(``RAY_DEDUP_LOGS_SKIP_REGEX``, read when Ray is imported); the driver's own native log lines
(written straight to file descriptor 2 by Ray's C++ core) pass through a line filter.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings

__all__ = ["RAY_NOISE", "setup_logging", "quiet_ray_console", "print_last"]

RAY_NOISE = re.compile("|".join((
    r"has constructor arguments in the object store and max_restarts > 0",
    r"Reporting training result \d+: TrainingReport\(",
    r"Progress bars disabled\. To enable, set",
    r"`ExecutionOptions\.exclude_resources` is deprecated",
    r"Token authentication is enabled for this Ray cluster",
    r"^(\x1b\[[0-9;]*m)?(\([^)]*\))?(\x1b\[[0-9;]*m)?\s+self\.exclude_resources = exclude_resources\s*$",
)))

_DRAIN = b"\x00basnet-console-drain\n"
_drained = threading.Event()
_installed = False
_pump: threading.Thread | None = None


def setup_logging(verbose: bool = False) -> None:
    """A job's logging; unless ``verbose``, Ray's internal chatter stays off the console.
    Call it before Ray is imported."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray Data's per-operator progress bars flood job logs; the jobs print their own summaries.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not verbose:
        quiet_ray_console()


def quiet_ray_console() -> None:
    """Keeps Ray's known noise off this process's console. Call it before Ray is imported."""
    global _installed
    if _installed:
        return
    _installed = True
    # The masking job caps its listing and decode pools on purpose (basnet.infer.ray_pipeline); on a
    # run with fewer blocks than the cap, Ray Data warns that the cap cannot be reached.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'MapBatches",
                            category=UserWarning)
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE.pattern)
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    _filter_native_stderr(RAY_NOISE)


def print_last(text: str) -> None:
    """Prints ``text`` on stdout after everything already written to stderr has reached the console,
    so a job's final table really is the last thing shown."""
    sys.stderr.flush()
    if _pump is not None and _pump.is_alive():
        _drained.clear()
        os.write(2, _DRAIN)
        _drained.wait(timeout=2.0)
    print(text, flush=True)


def _filter_native_stderr(pattern: re.Pattern) -> None:
    """Routes file descriptor 2 through a thread that drops whole lines matching ``pattern``.

    Native code writes a log line in one ``write``; partial lines (a progress bar's ``\\r``
    updates) pass at once, so nothing is held back.
    """
    try:
        original = os.dup(2)
        read_fd, write_fd = os.pipe()
    except OSError:
        return
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    bytes_pattern = re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)

    def pump() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                lines = chunk.splitlines(keepends=True)
                kept = [line for line in lines if line != _DRAIN and not bytes_pattern.search(line)]
                if kept:
                    os.write(original, b"".join(kept))
                if _DRAIN in lines:
                    _drained.set()

    global _pump
    _pump = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    _pump.start()

    @atexit.register
    def _restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe ends once every process that inherited it has exited
        _pump.join(timeout=1.0)
