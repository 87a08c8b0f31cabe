"""Bulk masking's record of every input: the Parquet manifest, the run's summary, progress.

Every input ends as exactly one row, ``written``, ``skipped`` or ``failed``, so ``written +
skipped + failed = N`` by construction. Rows are written as Parquet parts
``<output>/_manifest/part-<run-id>-NNNN.parquet``, flushed every 100,000 rows.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from basnet import storage
from basnet.config import plain
from basnet.infer.naming import printable

logger = logging.getLogger(__name__)

__all__ = ["PENDING", "WRITTEN", "SKIPPED", "FAILED", "MANIFEST_DIR", "MANIFEST_SCHEMA", "failed_row",
           "InferSummary", "ManifestWriter", "read_run_manifest", "Progress"]

PENDING, WRITTEN, SKIPPED, FAILED = "pending", "written", "skipped", "failed"
MANIFEST_DIR = "_manifest"  # Parquet parts only, so pyarrow/Ray can read the folder as one table

MANIFEST_SCHEMA = pa.schema([
    ("input", pa.string()), ("output", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("seconds", pa.float64()), ("run_id", pa.string()),
])


def failed_row(input_uri: str, error: str, output: str = "", seconds: float = 0.0) -> dict:
    """A manifest row for an input that failed (or, with its status changed, was settled otherwise)."""
    return {"input": printable(input_uri), "output": output, "width": 0, "height": 0,
            "status": FAILED, "error": printable(error), "seconds": seconds}


@dataclass
class InferSummary:
    """Counts and locations of a finished run; ``written + skipped + failed == total``."""

    written: int
    skipped: int
    failed: int
    seconds: float
    output: str
    manifest: list[str]
    config: str
    run_id: str

    @property
    def total(self) -> int:
        return self.written + self.skipped + self.failed

    @property
    def images_per_second(self) -> float:
        """Inputs processed (written or failed; skipped ones cost nothing) per second of the run."""
        return (self.written + self.failed) / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"written {self.written}, skipped {self.skipped}, failed {self.failed} of {self.total} "
                f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)")


class ManifestWriter:
    """Collects manifest rows and writes them as Parquet parts ``_manifest/part-<run>-NNNN.parquet``.

    Parts are flushed every ``rows_per_part`` rows, so the driver's memory stays bounded and a
    killed run keeps the parts it flushed; the run id in the name means no run overwrites another's.
    """

    def __init__(self, output_root: str, run_id: str, *, rows_per_part: int = 100_000) -> None:
        self.folder = storage.join(output_root, MANIFEST_DIR)
        self.run_id, self.rows_per_part = run_id, rows_per_part
        self.columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
        self.counts = {WRITTEN: 0, SKIPPED: 0, FAILED: 0}
        self.parts: list[str] = []

    def add(self, batch: dict[str, Iterable]) -> None:
        """Adds rows given as columns (lists or arrays keyed by the manifest's column names)."""
        for name in MANIFEST_SCHEMA.names:
            if name != "run_id":
                self.columns[name].extend(plain(v) for v in batch[name])
        self.columns["run_id"].extend([self.run_id] * len(batch["status"]))
        for value in batch["status"]:
            self.counts[str(value)] = self.counts.get(str(value), 0) + 1
        if len(self.columns["input"]) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        cols = self.columns
        cols["width"] = [v or None for v in cols["width"]]  # 0 = unknown (skipped, failed)
        cols["height"] = [v or None for v in cols["height"]]
        cols["error"] = [v or None for v in cols["error"]]
        cols["output"] = [v or None for v in cols["output"]]
        table = pa.table(cols, schema=MANIFEST_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        uri = storage.join(self.folder, f"part-{self.run_id}-{len(self.parts):04d}.parquet")
        storage.write_bytes(uri, sink.getvalue().to_pybytes())
        self.parts.append(uri)
        self.columns = {name: [] for name in MANIFEST_SCHEMA.names}

    def close(self) -> list[str]:
        if self.columns["input"] or not self.parts:
            self.flush()
        return self.parts


def read_run_manifest(summary: InferSummary) -> pa.Table:
    """One run's manifest as a single table (all its parts)."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri))) for uri in summary.manifest]
    return pa.concat_tables(tables)


class Progress:
    """A one-line bar on a terminal; a log line every ``interval`` seconds otherwise."""

    def __init__(self, total: int | None, *, interval: float = 15.0, stream=None) -> None:
        self.total, self.interval = total, interval
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int, counts: dict[str, int]) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.tty and now - self.last < self.interval:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"{self.done}/{self.total}" if self.total else str(self.done)
        text = (f"{of} inputs: written {counts.get(WRITTEN, 0)}, skipped {counts.get(SKIPPED, 0)}, "
                f"failed {counts.get(FAILED, 0)} ({rate:.1f}/s)")
        if self.tty:
            filled = int(30 * self.done / self.total) if self.total else 0
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}")
            self.stream.flush()
        else:
            logger.info("%s", text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
