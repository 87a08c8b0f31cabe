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
the same masks, manifest and exit status on either executor:

    listing + decoding (one thread) -> the model (this thread) -> writing (a pool of threads)

Bounded queues between them hold a few model batches, so memory does not grow with the collection.
A model error rebuilds the model and retries its batch up to ``MODEL_RESTARTS`` times, as the Ray
pipeline restarts its replica; ``--stall-timeout`` watches Ray Data's pipeline and has nothing to
watch here. Never imports Ray.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from basnet.errors import JobFailed
from basnet.infer.config import InferConfig, cpu_batch_size
from basnet.infer.inputs import discover_units
from basnet.infer.listing import list_batch
from basnet.infer.manifest import DryRun, InferSummary
from basnet.infer.monitor import MODEL_RESTARTS, model_failed, storage_failure
from basnet.infer.plan import InferPlan, save_config
from basnet.infer.recorder import RunRecorder, add_listed, dry_run_empty, no_inputs
from basnet.infer.stages import decode_batch, write_batch

logger = logging.getLogger(__name__)

__all__ = ["runs_here", "execute_local", "dry_run_local"]

_QUEUED_BATCHES = 2  # model batches waiting on each side of the model


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


def _units(plan: InferPlan) -> list[dict]:
    if plan.units is not None:
        return plan.units
    try:
        return discover_units(plan.input, plan.output_root)
    except OSError as exc:
        raise storage_failure("--input", plan.input.uri, exc) from None


def _listed(plan: InferPlan, units: list[dict]) -> Iterator[dict[str, np.ndarray]]:
    cfg = plan.config
    for unit in units:
        yield from list_batch({key: [value] for key, value in unit.items()}, root=plan.input.root,
                              root_given=plan.input.root_given or plan.input.kind != "manifest",
                              output_root=plan.output_root, overwrite=cfg.overwrite, suffix=cfg.output_suffix())


def _resolved(cfg: InferConfig, image_size: int) -> InferConfig:
    """One CPU replica with every core (as the Ray pipeline gives a CPU node's only replica)."""
    cpus = os.cpu_count() or 1
    return dataclasses.replace(cfg, image_size=image_size, actors=1, num_gpus_per_actor=0.0,
                               cpus_per_actor=float(cpus), actor_threads=cfg.actor_threads or cpus,
                               batch_size=cfg.batch_size or cpu_batch_size(image_size))


class _Decoder(threading.Thread):
    """Lists and decodes in the background, handing model-sized batches through a bounded queue;
    an exception is handed on in its place. ``stop`` ends it at its next batch."""

    _DONE = object()

    def __init__(self, plan: InferPlan, units: list[dict]) -> None:
        super().__init__(name="basnet-decode", daemon=True)
        self.plan, self.units = plan, units
        self.batches: queue.Queue = queue.Queue(maxsize=_QUEUED_BATCHES)
        self.stopping = threading.Event()

    def run(self) -> None:
        cfg = self.plan.config
        try:
            for listed in _listed(self.plan, self.units):
                for batch in decode_batch(listed, size=cfg.image_size, max_pixels=cfg.max_pixels,
                                          reduced=not cfg.full_decode, keep_bytes=cfg.needs_source(),
                                          overwrite=cfg.overwrite, suffix=cfg.output_suffix(),
                                          batch_size=cfg.batch_size):  # the model starts after one batch
                    if not self._put(batch):
                        return
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the model's thread, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.batches.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.batches.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


class _Model:
    """The predictor, rebuilt after a model error up to ``MODEL_RESTARTS`` times per run."""

    def __init__(self, state, cfg: InferConfig) -> None:
        self.state, self.cfg, self.failures = state, cfg, 0
        self.predictor = self._build()

    def _build(self):
        from basnet.infer.predictor import MaskPredictor

        cfg = self.cfg
        return MaskPredictor(self.state, device="cpu", image_size=cfg.image_size, threads=cfg.actor_threads,
                             precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile,
                             runtime=cfg.runtime)

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
    units = _units(plan)
    state, size = load_weights(plan.config.weights, plan.config.image_size, plan.config.runtime)
    cfg = _resolved(plan.config, size)
    plan = dataclasses.replace(plan, config=cfg)
    save_config(cfg, plan.config_uri, plan.run_id)  # now with the size and resources resolved
    logger.info("masking %s into %s at %d px in this process (no Ray): %d listing unit(s), %s with %d thread(s)",
                cfg.input or f"{sum(len(u['uris']) for u in units)} images", plan.output_root, cfg.image_size,
                len(units), cfg.runtime, cfg.actor_threads)
    model = _Model(state, cfg)
    del state
    write = {"fmt": cfg.format, "threshold": cfg.threshold, "size": cfg.image_size, "encoding": cfg.encoding,
             "max_pixels": cfg.max_pixels, "refine": cfg.resolved_refine(), "normalize": cfg.normalize,
             "on_no_object": cfg.on_no_object}
    recorder = RunRecorder(plan, start=start)
    decoder = _Decoder(plan, units)
    writers = max(1, (os.cpu_count() or 1) // 4)
    pending: deque[Future] = deque()
    decoder.start()
    try:
        with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="basnet-write") as pool:
            try:
                for batch in decoder:
                    pending.append(pool.submit(write_batch, model(batch), **write))
                    while len(pending) > writers * _QUEUED_BATCHES or (pending and pending[0].done()):
                        recorder.add(pending.popleft().result())  # in order; the monitor may stop the run
                while pending:
                    recorder.add(pending.popleft().result())
            finally:
                for future in pending:
                    future.cancel()
        recorder.finish()
    finally:
        decoder.stop()
        recorder.close()
    return recorder.summary()


def dry_run_local(plan: InferPlan, *, examples: int = 3) -> DryRun:
    """Lists and assigns outputs as a run would, without the model; nothing is written."""
    start = time.perf_counter()
    result = DryRun()
    for batch in _listed(plan, _units(plan)):
        add_listed(result, batch, examples)
    result.seconds = time.perf_counter() - start
    if dry_run_empty(result):
        raise no_inputs(plan, result.not_images)
    return result
