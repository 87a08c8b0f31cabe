"""The driver's side of a masking run, whichever executor runs its stages: the manifest, the
failure monitor, progress, the files that are not images and the review of the least confident
masks, fed one batch of finished rows at a time (counts and a bounded heap, never lists)."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from basnet.errors import UsageError
from basnet.imaging import IMAGE_SUFFIXES
from basnet.infer.manifest import InferSummary, ManifestWriter, Progress, not_images_line, without_not_images
from basnet.infer.monitor import RunMonitor
from basnet.infer.plan import InferPlan
from basnet.infer.review import QualityReview

__all__ = ["RunRecorder", "no_inputs"]


def no_inputs(plan: InferPlan, not_images: Counter) -> UsageError:
    others = f" ({not_images_line(not_images)})" if not_images else ""
    return UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or .tar shards under {plan.config.input}{others}")


class RunRecorder:
    """Records finished rows; ``finish`` gives the run's verdict, ``summary`` its figures."""

    def __init__(self, plan: InferPlan, *, start: float | None = None) -> None:
        cfg = plan.config
        self.plan, self.start = plan, time.perf_counter() if start is None else start
        self.writer = ManifestWriter(plan.output_root, plan.run_id)
        self.monitor = RunMonitor(cfg.max_failed_fraction)
        self.progress = Progress(None)
        self.not_images: Counter = Counter()
        self.review = QualityReview(cfg.review, cfg.flag_below)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Records a batch of rows; raises ``JobFailed`` when the monitor stops the run."""
        batch = without_not_images(batch, self.not_images)
        self.writer.add(batch)
        self.review.add(batch)
        self.progress.update(len(batch["status"]), self.writer.counts)
        self.monitor.add(batch["status"], batch["error"])

    def finish(self) -> None:
        """The verdict once every row is in: raises ``UsageError`` (no inputs) or ``JobFailed``."""
        if not self.writer.rows:
            raise no_inputs(self.plan, self.not_images)
        self.monitor.finish()

    def close(self) -> None:
        self.progress.close()
        self.writer.close()

    def summary(self) -> InferSummary:
        counts, plan = self.writer.counts, self.plan
        return InferSummary(written=counts.get("written", 0), skipped=counts.get("skipped", 0),
                            failed=counts.get("failed", 0), seconds=time.perf_counter() - self.start,
                            output=plan.output_root, manifest=self.writer.parts, config=plan.config_uri,
                            run_id=plan.run_id, stage_seconds=dict(self.writer.stage_seconds),
                            not_images=self.not_images, quality=self.review.line(),
                            review=self.review.write(plan.output_root, max_pixels=plan.config.max_pixels))
