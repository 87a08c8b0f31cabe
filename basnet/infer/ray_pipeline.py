"""Bulk masking on Ray Data: listing, decoding and writing in CPU tasks, BASNet in an actor pool.

    units (one Ray task finds them) -> list_batch (CPU tasks, one unit each: rows as found)
        -> decode_batch (CPU tasks) -> _PredictorActor (ActorPoolStrategy)
        -> write_batch (CPU tasks) -> manifest rows streamed back to the driver

The listing is split into units (``basnet.infer.inputs``: subfolder trees, groups of listed
images) that tasks list in parallel, so the first masks are written while other folders are
still being listed, and the driver holds counts, never lists: its memory is the same for a
million inputs as for ten (and a bounded heap of the least confident masks, ``--review``). The
weights are loaded by a Ray task (the driver never imports torch) into the object store.

A run stops with ``JobFailed`` (exit status 1) when it is broken rather than some inputs
(``basnet.infer.monitor``), and when the model keeps failing: a model error restarts its replica
(a fresh process, and on GPUs a fresh CUDA context) up to ``MODEL_RESTARTS`` times per run,
after which the job ends naming the model's own error.

Library use (the evaluation job masks DUTS-TE this way)::

    from basnet.infer.config import InferConfig; from basnet.infer.ray_pipeline import run_inference
    summary = run_inference(InferConfig(output="/preds", weights="/runs/x/epoch_0010", root="/DUTS-TE/Image"),
                            images=["/DUTS-TE/Image/a.jpg", ...])   # -> /preds/a.png ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Sequence

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data

from basnet import storage
from basnet.errors import JobFailed, UserError
from basnet.infer.config import InferConfig, cpu_batch_size
from basnet.infer.listing import list_batch
from basnet.infer.manifest import DryRun, InferSummary
from basnet.infer.monitor import MODEL_RESTARTS, model_failed
from basnet.infer.plan import InferPlan, find_units, plan_inference, save_config
from basnet.infer.ray_health import ModelHealth, stop_replicas
from basnet.infer.recorder import RunRecorder, no_inputs
from basnet.infer.stages import decode_batch, write_batch
from basnet.ray_errors import get, user_error
from basnet.ray_progress import watched_dataset

logger = logging.getLogger(__name__)

__all__ = ["run_inference", "execute", "dry_run", "build_dataset", "resolve_resources",
           "MODEL_RESTARTS"]

DATASET_NAME = "masking"  # the pipeline's name in Ray Data's bookkeeping (and in a stall's report)
_LIGHT = {"num_cpus": 0.1}  # the small driver-side tasks (units, weights)


def run_inference(cfg: InferConfig, *, images: Sequence[str] | None = None) -> InferSummary:
    """Masks a collection; joins or starts Ray if this process has not already.

    Args:
        cfg: The job's options (``basnet.infer.config.InferConfig``).
        images: Explicit image URIs to mask instead of listing ``cfg.input``; their masks mirror
            their paths relative to ``cfg.root`` (or ``cfg.input``), e.g. ``<root>/a/x.jpg`` ->
            ``<output>/a/x.png``.

    Returns:
        Counts, stage seconds, the output root, the manifest parts and the saved config's URI.

    Raises:
        ConfigError, UsageError, CheckpointError: Bad arguments.
        JobFailed: The run failed or was stopped (see ``basnet.infer.monitor``).
    """
    from basnet.ray_init import init_ray

    plan = plan_inference(cfg, images=images)
    init_ray(plan.config.address)
    return execute(plan)


def _alive_node_cpus() -> list[float]:
    return [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]


def resolve_resources(cfg: InferConfig) -> InferConfig:
    """Fills actors, GPUs, CPUs, torch threads and the batch per actor from the cluster's resources.

    With GPUs: one actor per GPU (or per ``--num-gpus-per-actor``), 1 CPU each. Without: one actor
    per node; it reserves its node's CPUs less the decode and write share, and runs as many torch
    threads as its node has CPUs (the model is the bottleneck; see docs/infer.md for the figures).
    ``--runtime onnxruntime`` always takes the second way, GPUs or not.
    """
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    if cfg.runtime == "onnxruntime":
        gpus = 0.0  # CPU replicas even on a cluster with GPUs (InferConfig refuses --num-gpus-per-actor)
    num_gpus = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else (1.0 if gpus else 0.0)
    node_cpus = _alive_node_cpus() or [total.get("CPU", 1.0)]
    actors = cfg.actors or (max(1, int(gpus // num_gpus)) if num_gpus else len(node_cpus))
    per_node = math.ceil(actors / len(node_cpus))  # actors spread evenly over the nodes
    cpus_per_actor = cfg.cpus_per_actor
    if cpus_per_actor is None:
        cpus_per_actor = 1.0 if num_gpus else max(1.0, min(node_cpus) / per_node - 2 * cfg.task_cpus)
    threads = cfg.actor_threads or max(1, int(cpus_per_actor if num_gpus else min(node_cpus) / per_node))
    batch = cfg.batch_size or (8 if num_gpus else cpu_batch_size(cfg.image_size))
    return dataclasses.replace(cfg, actors=actors, num_gpus_per_actor=num_gpus, cpus_per_actor=cpus_per_actor,
                               actor_threads=threads, batch_size=batch)


class _PredictorActor:
    """The Ray actor around ``MaskPredictor`` (torch is imported here for ``--runtime torch``, never
    on the driver)."""

    def __init__(self, weights: tuple, health, threads: int, image_size: int, options: dict,
                 write: dict | None = None) -> None:
        from basnet.infer.predictor import MaskPredictor

        # The reference arrives inside a tuple so Ray does not resolve it before the actor needs it.
        state = ray.get(weights[0])
        context = ray.get_runtime_context()
        health.started.remote(context.get_actor_id(), context.current_actor)
        device = "cpu"
        if options.get("runtime") != "onnxruntime":  # the ONNX path never imports torch (0.47 GB)
            device = "cuda" if ray.get_gpu_ids() and __import__("torch").cuda.is_available() else "cpu"
        self.health, self.write = health, write
        try:
            # Ray sets OMP_NUM_THREADS=1 in workers: a CPU replica runs its model on the CPUs it asked for.
            self.predictor = MaskPredictor(state, device=device, image_size=image_size,
                                           threads=threads if device == "cpu" else None, **options)
        except UserError as exc:
            ray.get(health.failed_start.remote(exc))
            raise

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from basnet.infer.predictor import ModelError

        try:
            out = self.predictor(batch)
        except ModelError as exc:
            failures = ray.get(self.health.failed.remote(str(exc)))
            logger.error("model error %d: %s", failures, exc)
            if failures > MODEL_RESTARTS:
                raise  # fails the dataset; the driver names this error
            os._exit(1)  # a fresh process (and CUDA context): Ray restarts the actor and retries the batch
        return write_batch(out, **self.write) if self.write else out


@ray.remote(num_returns=2, max_calls=1, **_LIGHT)  # its worker exits after: no torch left in the CPU stages
def _load_weights(uri: str, image_size: int | None, runtime: str = "torch"):
    """``basnet.infer.predictor.load_weights`` as a task: what the replicas load (into the object store)
    and the inference size."""
    from basnet.infer.predictor import load_weights

    return load_weights(uri, image_size, runtime)


_loaded: dict[tuple, tuple[ray.ObjectRef, ray.ObjectRef]] = {}  # the last weights this driver loaded


def _weights(cfg: InferConfig) -> tuple[ray.ObjectRef, ray.ObjectRef]:
    """Refs of what the replicas load (state dict or ONNX graph) and of the image size, once per
    driver, Ray session, weights version and runtime: a second run in one process starts without
    reading 350 MB again, or exporting a checkpoint again (18-20 s on 2 CPUs)."""
    key = (ray.get_runtime_context().get_job_id(), cfg.weights, cfg.image_size, cfg.runtime, _versions(cfg.weights))
    if key not in _loaded:
        _loaded.clear()  # only the latest: each holds 350 MB of the object store
        _loaded[key] = tuple(_load_weights.remote(cfg.weights, cfg.image_size, cfg.runtime))
    return _loaded[key]


def _versions(uri: str) -> tuple:
    """(size, mtime) of the file, or of every file of the checkpoint folder."""
    fs, path = storage.filesystem(uri)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True)) if storage.is_dir(uri) else [
        fs.get_file_info(path)]
    return tuple((info.path, info.size, info.mtime_ns) for info in found if info.type == pafs.FileType.File)


_find_units = ray.remote(**_LIGHT)(find_units)


def _units(plan: InferPlan) -> list[dict]:
    return plan.units if plan.units is not None else get(_find_units.remote(plan))


def _task_args(cfg: InferConfig) -> dict:
    args = {"num_cpus": cfg.task_cpus, "batch_format": "numpy"}
    if cfg.resources("task_resources"):
        args["resources"] = cfg.resources("task_resources")
    return args


def _task_pools(cfg: InferConfig) -> tuple[int, int]:
    """How many listing and decode tasks may run at once: decoding gets half of the CPUs the model
    replicas leave, listing a quarter, so write tasks always find a CPU. Without a cap, decoding
    small images runs ahead through the whole collection (its output is too small for Ray Data's
    memory backpressure), and listing would start a worker process per task."""
    model = (cfg.actors or 0) * (cfg.cpus_per_actor or 0)
    spare = max(ray.cluster_resources().get("CPU", 1.0) - model, cfg.task_cpus * 4)
    return max(1, int(spare / 4 / (cfg.task_cpus / 2))), max(1, int(spare / 2 / cfg.task_cpus))


def _listed(plan: InferPlan, units: list[dict]) -> ray.data.Dataset:
    """Units in, listed rows out. A task takes a block of units and yields rows as it lists them,
    so the first rows flow on at once; a few blocks per listing task keep the pool busy without a
    task (and its scheduling) per folder. Listing is cheap: half a task's CPUs."""
    cfg = plan.config
    pool = _task_pools(cfg)[0]
    args = {**_task_args(cfg), "num_cpus": cfg.task_cpus / 2}  # never fused into the decode stage
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 4 * pool)))
    return ds.map_batches(list_batch, batch_size=1, compute=ray.data.TaskPoolStrategy(size=pool),
                          fn_kwargs=plan.listing_options(), **args)


def build_dataset(plan: InferPlan, units: list[dict], weights_ref: ray.ObjectRef, health) -> ray.data.Dataset:
    """The four-stage pipeline (``plan.config`` resolved); yields manifest rows."""
    cfg = plan.config
    task_args = {**_task_args(cfg), "batch_size": cfg.task_batch_size}
    actor_args = {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.num_gpus_per_actor}
    if cfg.resources("actor_resources"):
        actor_args["resources"] = cfg.resources("actor_resources")
    ds = _listed(plan, units).map_batches(decode_batch, fn_kwargs=cfg.decode_options(cfg.task_batch_size),
                                          compute=ray.data.TaskPoolStrategy(size=_task_pools(cfg)[1]), **task_args)
    write = cfg.write_options()
    in_actor = _write_in_actor(cfg)
    ds.set_name(DATASET_NAME)
    ds = ds.map_batches(_PredictorActor, fn_constructor_kwargs={
        "weights": (weights_ref,), "health": health, "threads": cfg.actor_threads, "image_size": cfg.image_size,
        "options": cfg.model_options(), "write": write if in_actor else None},
        compute=ray.data.ActorPoolStrategy(size=cfg.actors), batch_size=cfg.batch_size, batch_format="numpy",
        **actor_args)
    return ds if in_actor else ds.map_batches(write_batch, fn_kwargs=write, **task_args)


def _write_in_actor(cfg: InferConfig) -> bool:
    """CPU replicas resize, encode and write their own masks; GPU replicas hand them to CPU tasks.

    On a CPU node writing costs about 1 % of the model's time (at 32 px: infer 26 s, encode 0.2 s,
    write 0.3 s per 1000 images), but a separate write stage's Ray task per block steals moments
    from the model's threads: 1000 images took 45 s of model time instead of 26 s. A GPU replica
    must never wait for a PNG encoder, so there the write stage stays apart."""
    return not cfg.num_gpus_per_actor


@contextlib.contextmanager
def _block_size(cfg: InferConfig):
    """Blocks of about one task batch while the pipeline runs. Ray Data's default (128 MiB) makes a
    task's whole output one block when rows are small (a 32 px image is 3 KB), so each stage waits
    for the one before to finish a whole input block, and the first mask is written only at the
    end of a 1000-image run."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = max(64 * 1024, cfg.task_batch_size * cfg.image_size ** 2 * 4)
    try:
        yield
    finally:
        ctx.target_max_block_size = saved


def execute(plan: InferPlan) -> InferSummary:
    """Runs a plan on the Ray this process is connected to.

    Raises:
        UsageError, CheckpointError: The input holds no images, or the weights cannot be loaded.
        JobFailed: The run failed or was stopped; its manifest holds every row seen until then.
    """
    start = time.perf_counter()
    cfg = plan.config
    state_ref, size_ref = _weights(cfg)  # loads while the units are found
    units = _units(plan)
    # Waiting for the weights (loaded while the units were found) keeps a bad checkpoint a one-line
    # error; replicas started before would fail their start with Ray's tracebacks.
    cfg = resolve_resources(dataclasses.replace(cfg, image_size=get(size_ref, state_ref)))
    plan = dataclasses.replace(plan, config=cfg)
    save_config(cfg, plan.config_uri, plan.run_id)  # now with the size and resources resolved
    logger.info("masking %s into %s at %d px: %d listing unit(s), %d %s actor(s), %.2g GPU, %.2g CPU and "
                "%d thread(s) each", cfg.input or f"{sum(len(u['uris']) for u in units)} images", plan.output_root,
                cfg.image_size, len(units), cfg.actors, cfg.runtime, cfg.num_gpus_per_actor, cfg.cpus_per_actor,
                cfg.actor_threads)
    recorder = RunRecorder(plan, start=start)
    health = ModelHealth.remote()
    try:
        with _block_size(cfg), contextlib.closing(watched_dataset(
                build_dataset(plan, units, state_ref, health), DATASET_NAME, cfg.stall_timeout)) as batches:
            for batch in batches:
                recorder.add(batch)
        recorder.finish()
    except Exception as exc:
        stop_replicas(health)
        if isinstance(exc, (JobFailed, UserError)) and not isinstance(exc, ray.exceptions.RayError):
            raise  # the monitor's own verdict
        if (error := user_error(exc)) is not None:  # a Ray or Ray Data error carrying a user's cause
            raise error from None
        if (error := ray.get(health.why_not_started.remote())) is not None:
            raise error from None
        if (model_error := ray.get(health.last.remote())) is not None:
            raise JobFailed(model_failed(model_error)) from None
        raise
    finally:
        recorder.close()
        ray.kill(health)
    return recorder.summary()


def dry_run(plan: InferPlan, *, examples: int = 3) -> DryRun:
    """Lists and assigns outputs as a run would, without the model; nothing is written."""
    start = time.perf_counter()
    result = DryRun()
    listed = _listed(plan, _units(plan))
    listed.set_name("listing")
    for batch in watched_dataset(listed, "listing", plan.config.stall_timeout):
        result.add(batch, examples)
    result.seconds = time.perf_counter() - start
    if result.empty:
        raise no_inputs(plan, result.not_images)
    return result
