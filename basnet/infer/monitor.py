"""Whether a bulk-masking run is working: counts, and the rules that stop a broken run.

The driver feeds every finished batch of manifest rows to a :class:`RunMonitor`. It keeps counts,
never lists, and raises ``JobFailed`` (exit status 1) when the run is the job's failure rather than
some images':

* systemic read errors: ``SYSTEMIC_STREAK`` reads in a row refused for a reason that no retry of
  the same request can fix (access denied, a bad key, no such bucket) stop the run at once;
* too many failures: once ``MIN_TRIED`` inputs were tried, and again at the end, a failed share
  above ``--max-failed-fraction`` stops the run;
* nothing written: a run whose inputs failed and that wrote no mask failed, whatever the share.

The verdict is the collection's, not the run's: an input skipped because its mask exists counts
as done, as a written one does, so a re-run over a finished collection with a few permanently bad
files exits as the first run did.

A model that keeps failing is caught by the pipeline (``basnet.infer.ray_pipeline``), which
names the model's own error.
"""

from __future__ import annotations

import re

import numpy as np

from basnet.errors import JobFailed, UsageError, first_line
from basnet.infer.manifest import FAILED, SKIPPED, WRITTEN

__all__ = ["RunMonitor", "is_systemic", "storage_failure", "model_failed", "SYSTEMIC_STREAK", "MIN_TRIED",
           "MODEL_RESTARTS"]

SYSTEMIC_STREAK = 10
MIN_TRIED = 100
MODEL_RESTARTS = 2  # fresh starts of the model after model errors, per run, before the job fails

_SYSTEMIC = re.compile(r"access.?denied|forbidden|invalidaccesskeyid|signaturedoesnotmatch|expiredtoken|"
                       r"no.?such.?bucket|permission denied|\b403\b", re.IGNORECASE)
_READ_PREFIXES = ("cannot read: ", "cannot list: ")


def is_systemic(error: str) -> bool:
    """A read or listing error no retry fixes: credentials, permissions, a missing bucket."""
    return error.startswith(_READ_PREFIXES) and bool(_SYSTEMIC.search(error))


class RunMonitor:
    """Counts a run's rows as they arrive and stops the run when it is broken (see module docs)."""

    def __init__(self, max_failed_fraction: float) -> None:
        self.max_failed_fraction = max_failed_fraction
        self.counts = {WRITTEN: 0, SKIPPED: 0, FAILED: 0}
        self.streak = 0  # systemic read errors in a row
        self.first_error = ""

    @property
    def tried(self) -> int:
        """Inputs this run tried (written or failed)."""
        return self.counts[WRITTEN] + self.counts[FAILED]

    @property
    def settled(self) -> int:
        """Inputs of the collection with a verdict: done (written now or before, i.e. skipped) or failed."""
        return self.tried + self.counts[SKIPPED]

    def add(self, status: np.ndarray, error: np.ndarray) -> None:
        """Counts one batch; raises ``JobFailed`` when the run should stop now."""
        for value, message in zip(status.tolist(), error.tolist()):
            self.counts[value] = self.counts.get(value, 0) + 1
            if value == FAILED:
                self.first_error = self.first_error or str(message)
                if is_systemic(str(message)):
                    self.streak += 1
                    if self.streak >= SYSTEMIC_STREAK:
                        raise JobFailed(f"stopped early: {self.streak} reads in a row were refused ({message})")
                    continue
            if value == WRITTEN or value == FAILED:
                self.streak = 0
        if self.tried >= MIN_TRIED:
            self._check_fraction("stopped early: ")

    def finish(self) -> None:
        """The end-of-run checks; raises ``JobFailed`` for a run that failed."""
        if self.counts[FAILED] and not (self.counts[WRITTEN] or self.counts[SKIPPED]):
            raise JobFailed(f"wrote no mask: all {self.counts[FAILED]} inputs tried failed "
                            f"(first error: {self.first_error})")
        self._check_fraction("")

    def _check_fraction(self, prefix: str) -> None:
        failed, settled = self.counts[FAILED], self.settled
        if settled and failed / settled > self.max_failed_fraction:
            done = f" ({self.counts[SKIPPED]} done before)" if self.counts[SKIPPED] else ""
            raise JobFailed(f"{prefix}{failed} of {settled} inputs failed{done} ({failed / settled:.0%}), above "
                            f"--max-failed-fraction {self.max_failed_fraction:g} (first error: {self.first_error})")


def storage_failure(what: str, uri: str, exc: BaseException) -> Exception:
    """The error for storage that refused a request: ``JobFailed`` when credentials, permissions or a
    missing bucket are the cause (the arguments are right, the access is not), else ``UsageError``."""
    message = f"cannot read: {first_line(exc)}"
    if is_systemic(message):
        return JobFailed(f"{what} {uri}: access refused ({first_line(exc)})")
    return UsageError(f"cannot read {what} {uri}: {first_line(exc)}")


def model_failed(error: str) -> str:
    """The verdict on a model that failed ``MODEL_RESTARTS + 1`` times: its last error."""
    return f"the model failed {MODEL_RESTARTS + 1} times (restarted {MODEL_RESTARTS} times): {error}"
