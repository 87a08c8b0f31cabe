"""Bulk masking's record of every input: the Parquet manifest, the run's summary, progress.

Every input ends as exactly one row, ``written``, ``skipped`` or ``failed``, so ``written +
skipped + failed = N`` by construction. Rows are written as Parquet parts
``<output>/_manifest/part-<run-id>-NNNN.parquet``, flushed every 100,000 rows.
"""

from __future__ import annotations

import io
import logging
import posixpath
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from basnet import storage
from basnet.quality import QUALITY_COLUMNS

logger = logging.getLogger(__name__)

__all__ = ["PENDING", "WRITTEN", "SKIPPED", "FAILED", "NOT_IMAGE", "STAGES", "MANIFEST_DIR", "MANIFEST_SCHEMA",
           "InferSummary", "ManifestWriter", "read_run_manifest", "Progress", "DryRun", "without_not_images",
           "not_images_line"]

PENDING, WRITTEN, SKIPPED, FAILED = "pending", "written", "skipped", "failed"
NOT_IMAGE = "not_image"  # a listed file that is not an image: counted by suffix, never an input of the manifest
MANIFEST_DIR = "_manifest"  # Parquet parts only, so pyarrow/Ray can read the folder as one table

# Where an input's seconds went: listing, reading the bytes, decoding and resizing, its share of
# the model's batch, resizing back and encoding the PNG, writing it.
STAGES = ("list_s", "read_s", "decode_s", "infer_s", "encode_s", "write_s")

MANIFEST_SCHEMA = pa.schema([
    ("input", pa.string()), ("output", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("seconds", pa.float64()),
    *[(stage, pa.float64()) for stage in STAGES], ("run_id", pa.string()),
    # How sure the model was of a written mask (basnet.quality); null for rows not written by this run.
    *[(key, pa.bool_() if key == "no_object" else pa.float64()) for key in QUALITY_COLUMNS],
])
_QUALITY_TYPES = {key: MANIFEST_SCHEMA.field(key).type for key in QUALITY_COLUMNS}


def without_not_images(batch: dict[str, np.ndarray], counts: Counter) -> dict[str, np.ndarray]:
    """The batch's inputs: its ``not_image`` rows are left out and counted by suffix into ``counts``."""
    status = np.asarray(batch["status"]).astype(str)
    other = status == NOT_IMAGE
    if not other.any():
        return batch
    for name in np.asarray(batch["input"])[other].tolist():
        suffix = posixpath.splitext(str(name).rsplit("/", 1)[-1])[1].lower()
        counts[suffix or "(no suffix)"] += 1
    return {key: np.asarray(values)[~other] for key, values in batch.items()}


def not_images_line(counts: Counter, *, most: int = 5) -> str:
    """``"5 files are not images (.txt 3, .mov 2)"``, the commonest suffixes first; empty for none."""
    total = sum(counts.values())
    if not total:
        return ""
    shown = ", ".join(f"{suffix} {n}" for suffix, n in counts.most_common(most))
    more = f", {len(counts) - most} more suffixes" if len(counts) > most else ""
    return f"{total} file{'s are' if total != 1 else ' is'} not {'images' if total != 1 else 'an image'} ({shown}{more})"


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
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over inputs, per STAGES
    not_images: Counter = field(default_factory=Counter)  # files under --input that are not images, by suffix
    quality: str = ""  # the masks' quality counts (basnet.infer.review), one line
    review: dict[str, str] = field(default_factory=dict)  # the review sheet's files, name -> URI

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

    def stages_line(self) -> str:
        """Where the time went, summed over inputs (stages overlap in a pipeline: the largest bounds it)."""
        parts = ", ".join(f"{stage[:-2]} {self.stage_seconds.get(stage, 0.0):.1f} s" for stage in STAGES)
        return f"stage seconds: {parts}"


class ManifestWriter:
    """Collects manifest rows and writes them as Parquet parts ``_manifest/part-<run>-NNNN.parquet``.

    Rows are kept as Arrow record batches (about 200 bytes a row) and flushed every
    ``rows_per_part`` rows, so the driver's memory stays bounded and a killed run keeps the parts
    it flushed; the run id in the name means no run overwrites another's.
    """

    def __init__(self, output_root: str, run_id: str, *, rows_per_part: int = 100_000) -> None:
        self.folder = storage.join(output_root, MANIFEST_DIR)
        self.run_id, self.rows_per_part = run_id, rows_per_part
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.rows = 0
        self.counts = {WRITTEN: 0, SKIPPED: 0, FAILED: 0}
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)
        self.parts: list[str] = []

    def add(self, batch: dict[str, Iterable]) -> None:
        """Adds rows given as columns (arrays keyed by the manifest's column names; ``seconds`` is
        the sum of the stage columns)."""
        status = np.asarray(batch["status"]).astype(str)
        n = len(status)
        stages = {stage: np.asarray(batch[stage], dtype=np.float64) for stage in STAGES}
        for stage, values in stages.items():
            self.stage_seconds[stage] += float(values.sum())
        values, counts = np.unique(status, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            self.counts[value] = self.counts.get(value, 0) + count
        columns = {
            "input": _strings(batch["input"]), "output": _strings(batch["output"], empty_is_null=True),
            "width": _sizes(batch.get("width"), n), "height": _sizes(batch.get("height"), n),
            "status": pa.array(status, pa.string()), "error": _strings(batch["error"], empty_is_null=True),
            "seconds": pa.array(sum(stages.values()) if stages else np.zeros(n), pa.float64()),
            **{stage: pa.array(values, pa.float64()) for stage, values in stages.items()},
            "run_id": pa.array([self.run_id] * n, pa.string()),
            **_quality(batch, status == WRITTEN),
        }
        self.pending.append(pa.RecordBatch.from_pydict(columns, schema=MANIFEST_SCHEMA))
        self.pending_rows += n
        self.rows += n
        if self.pending_rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        table = pa.Table.from_batches(self.pending, schema=MANIFEST_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        uri = storage.join(self.folder, f"part-{self.run_id}-{len(self.parts):04d}.parquet")
        storage.write_bytes(uri, sink.getvalue().to_pybytes())
        self.parts.append(uri)
        self.pending, self.pending_rows = [], 0

    def close(self) -> list[str]:
        if self.pending_rows or not self.parts:
            self.flush()
        return self.parts


def _strings(values: Iterable, *, empty_is_null: bool = False) -> pa.Array:
    items = [str(v) for v in np.asarray(values, dtype=object).tolist()]
    return pa.array([v or None for v in items] if empty_is_null else items, pa.string())


def _quality(batch: dict, written: np.ndarray) -> dict[str, pa.Array]:
    """The quality columns, null where no mask was written (or the batch carries none)."""
    return {key: pa.array(np.asarray(batch[key]), kind, mask=~written) if key in batch else
            pa.nulls(len(written), kind) for key, kind in _QUALITY_TYPES.items()}


def _sizes(values: Iterable | None, n: int) -> pa.Array:
    """Image sides; 0 (unknown: skipped, failed) becomes null."""
    if values is None:
        return pa.nulls(n, pa.int32())
    array = np.asarray(values, dtype=np.int64)
    return pa.array(array, pa.int32(), mask=array == 0)


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


@dataclass
class DryRun:
    """What a run would do: counts of inputs by fate, and a few examples of each."""

    to_mask: int = 0
    shards: int = 0
    to_skip: int = 0
    refused: int = 0
    seconds: float = 0.0
    examples: dict[str, list[str]] = field(default_factory=lambda: {"mask": [], "skip": [], "refused": []})
    not_images: Counter = field(default_factory=Counter)

    def add(self, batch: dict[str, np.ndarray], examples: int) -> None:
        """Counts a batch of listed rows and keeps the first ``examples`` inputs of each fate by name."""
        batch = without_not_images(batch, self.not_images)
        kinds, status = batch["kind"], batch["status"]
        self.to_mask += int(np.sum(kinds == "image"))
        self.shards += int(np.sum(kinds == "tar"))
        self.to_skip += int(np.sum(status == SKIPPED))
        self.refused += int(np.sum(status == FAILED))
        for fate, rows in (("mask", np.flatnonzero(status == PENDING)), ("skip", np.flatnonzero(status == SKIPPED)),
                           ("refused", np.flatnonzero(status == FAILED))):
            # The first inputs by name, whatever order the listing's batches arrive in.
            found = [f"{batch['input'][i]} -> {batch['output' if fate != 'refused' else 'error'][i]}" for i in rows]
            self.examples[fate] = sorted(self.examples[fate] + found)[:examples]

    @property
    def empty(self) -> bool:
        """Nothing listed: no input to mask, skip or refuse."""
        return not (self.to_mask or self.shards or self.to_skip or self.refused)

    def lines(self, limit: int = 3) -> list[str]:
        shards = f" and {self.shards} tar shard(s) (their members are counted when read)" if self.shards else ""
        head = (f"dry run: to mask {self.to_mask} image(s){shards}, to skip {self.to_skip} (mask exists), "
                f"refused {self.refused}; listed in {self.seconds:.1f} s")
        out = [head]
        for fate, examples in self.examples.items():
            out += [f"  {fate}: {example}" for example in examples[:limit]]
        if others := not_images_line(self.not_images):
            out.append(others)
        return out
