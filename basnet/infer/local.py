"""Bulk masking in this process, without Ray: a run on one machine with no cluster to join.

A Ray started for one run on one CPU machine gives the job nothing one process cannot: the model
takes every core either way, and decoding and writing overlap it in threads as they would in Ray
tasks (Pillow, OpenCV, ONNX Runtime and torch release the GIL in their loops). It costs a start of
about 12 s on 2 cores (Ray, its helper actors, the replica's own process) and Ray's processes'
memory, which made the job slower than a plain loop up to about 100 photos (docs/infer.md,
"In this process"). So ``jobs/infer.py`` runs here when ``--executor auto`` finds no cluster (no
``--address``, no ``RAY_ADDRESS``), no Ray-only option and, for the torch runtime, no GPU.

The stages are the Ray pipeline's own functions (``basnet.infer.listing``, ``basnet.infer.stages``,
``basnet.infer.predictor``) and the record is the same (``basnet.infer.recorder``), so a run gives
the same masks (within one grey level: torch's sums depend on the batch's make-up), manifest and
exit status on either executor:

    listing + decoding (the watchdog's thread) -> the model (this thread) -> writing (a thread pool)

Decoding runs one batch ahead of the model and writing a few batches behind it, so memory does not
grow with the collection. A model error rebuilds the model and retries its batch up to
``MODEL_RESTARTS`` times, as the Ray pipeline restarts its replica. ``--stall-timeout`` bounds the
wait for a decoded batch (a hung read) and for a written one, not a model call. A failed run's
manifest holds every batch whose masks were written or being written. Never imports Ray.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Iterator

import numpy as np

from basnet.errors import JobFailed
from basnet.infer.config import InferConfig, cpu_batch_size
from basnet.infer.listing import list_batch
from basnet.infer.manifest import DryRun, InferSummary
from basnet.infer.monitor import MODEL_RESTARTS, model_failed
from basnet.infer.plan import InferPlan, find_units, save_config
from basnet.infer.recorder import RunRecorder, no_inputs
from basnet.infer.stages import decode_batch, write_batch
from basnet.watchdog import StreamStalled, watched

logger = logging.getLogger(__name__)

__all__ = ["runs_here", "execute_local", "dry_run_local"]

_QUEUED_BATCHES = 2  # model batches waiting to be written, per write thread


def _gpu_devices() -> list[str]:
    """This machine's GPU device files (NVIDIA's, or AMD's compute device), without importing torch."""
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd")


def runs_here(cfg: InferConfig) -> bool:
    """Whether ``cfg`` runs in this process (``--executor``; see the module's docs for ``auto``)."""
    if cfg.executor != "auto":
        return cfg.executor == "local"
    if cfg.ray_options() or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a library caller already on a Ray
        return False
    return cfg.resolved_runtime() == "onnxruntime" or not _gpu_devices()


def _listed(plan: InferPlan, units: list[dict]) -> Iterator[dict[str, np.ndarray]]:
    for unit in units:
        yield from list_batch({key: [value] for key, value in unit.items()}, **plan.listing_options())


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's
    limit, which ``os.cpu_count`` ignores: on a 64-core host with a 2-CPU quota it says 64)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _resolved(cfg: InferConfig, image_size: int) -> InferConfig:
    """The size, the model's threads (every CPU, as the Ray pipeline gives a CPU node's only replica)
    and batch; saved as ``executor: local``, so the config runs here again with ``--config``."""
    return dataclasses.replace(cfg, image_size=image_size, executor="local",
                               actor_threads=cfg.actor_threads or available_cpus(),
                               batch_size=cfg.batch_size or cpu_batch_size(image_size))


def _decoded(plan: InferPlan, units: list[dict]) -> Iterator[dict[str, np.ndarray]]:
    """Listed and decoded rows in model-sized batches (the model starts after one batch)."""
    options = plan.config.decode_options(plan.config.batch_size)
    for listed in _listed(plan, units):
        yield from decode_batch(listed, **options)


class _Model:
    """The predictor, rebuilt after a model error up to ``MODEL_RESTARTS`` times per run."""

    def __init__(self, state, cfg: InferConfig) -> None:
        self.state, self.cfg, self.failures = state, cfg, 0
        self.predictor = self._build()

    def _build(self):
        from basnet.infer.predictor import MaskPredictor

        cfg = self.cfg
        return MaskPredictor(self.state, device="cpu", image_size=cfg.image_size, threads=cfg.actor_threads,
                             **cfg.model_options())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from basnet.infer.predictor import ModelError

        while True:
            try:
                return self.predictor(batch)
            except ModelError as exc:
                self.failures += 1
                logger.error("model error %d: %s", self.failures, exc)
                if self.failures > MODEL_RESTARTS:
                    raise JobFailed(model_failed(str(exc))) from None
                self.predictor = None
                self.predictor = self._build()


def execute_local(plan: InferPlan) -> InferSummary:
    """Runs a plan in this process (the same outputs, manifest and verdict as ``ray_pipeline.execute``).

    Raises:
        UsageError, CheckpointError: The input holds no images, or the weights cannot be loaded.
        JobFailed: The run failed or was stopped; its manifest holds every row seen until then.
    """
    from basnet.infer.predictor import load_weights

    start = time.perf_counter()
    units = find_units(plan)
    state, size = load_weights(plan.config.weights, plan.config.image_size, plan.config.runtime)
    cfg = _resolved(plan.config, size)
    plan = dataclasses.replace(plan, config=cfg)
    save_config(cfg, plan.config_uri, plan.run_id)  # now with the size and resources resolved
    logger.info("masking %s into %s at %d px in this process (no Ray): %d listing unit(s), %s with %d thread(s)",
                cfg.input or f"{sum(len(u['uris']) for u in units)} images", plan.output_root, cfg.image_size,
                len(units), cfg.runtime, cfg.actor_threads)
    model = _Model(state, cfg)
    del state
    write = cfg.write_options()
    recorder = RunRecorder(plan, start=start)
    writers = max(1, available_cpus() // 4)
    wait = cfg.stall_timeout or None
    pending: deque[Future] = deque()
    # Decoding runs in the watchdog's thread, one batch ahead of the model, and fails the run after
    # --stall-timeout without a batch (a hung read); writing runs in the pool, a few batches deep.
    batches = watched(_decoded(plan, units), stream="masking input", timeout_s=cfg.stall_timeout, thread=True)
    try:
        with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="basnet-write") as pool:
            try:
                for batch in batches:
                    pending.append(pool.submit(write_batch, model(batch), **write))
                    while len(pending) > writers * _QUEUED_BATCHES or (pending and pending[0].done()):
                        recorder.add(_written(pending.popleft(), wait))  # in order; the monitor may stop the run
                while pending:
                    recorder.add(_written(pending.popleft(), wait))
            except BaseException:
                _record_started(pending, recorder)
                raise
        recorder.finish()
    finally:
        batches.close()
        recorder.close()
    return recorder.summary()


def _written(future: Future, wait: float | None) -> dict[str, np.ndarray]:
    try:
        return future.result(timeout=wait)
    except FutureTimeout:
        raise StreamStalled(f"writing a batch of masks took over {wait:g} s (--stall-timeout {wait:g}): a stalled "
                            "run, not a slow one") from None


def _record_started(pending: deque[Future], recorder: RunRecorder) -> None:
    """On the way out of a failed run: batches not yet being written are dropped (their masks do not
    exist, so a re-run does them); those already written or being written get their manifest rows."""
    for future in pending:
        if future.cancel():
            continue
        try:
            recorder.add(future.result())
        except Exception:  # the run is failing already; these rows are in the manifest before the monitor speaks
            pass


def dry_run_local(plan: InferPlan, *, examples: int = 3) -> DryRun:
    """Lists and assigns outputs as a run would, without the model; nothing is written."""
    start = time.perf_counter()
    result = DryRun()
    for batch in _listed(plan, find_units(plan)):
        result.add(batch, examples)
    result.seconds = time.perf_counter() - start
    if result.empty:
        raise no_inputs(plan, result.not_images)
    return result
