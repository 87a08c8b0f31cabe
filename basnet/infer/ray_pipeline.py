"""Bulk masking on Ray Data: decode on CPU tasks, BASNet in an actor pool, encode and write on CPU tasks.

    items (from_items) -> decode_batch (CPU tasks) -> MaskPredictor (ActorPoolStrategy)
                       -> write_batch (CPU tasks) -> manifest rows streamed back to the driver

Rows are small (a work item: a URI) until a decode task reads and decodes them, and every stage is
streamed, so memory stays flat however many images there are. The driver only collects the
manifest rows (flushed to Parquet parts as they come) and shows progress.

Library use (the evaluation job masks DUTS-TE this way)::

    from basnet.infer.config import InferConfig
    from basnet.infer.ray_pipeline import run_inference

    summary = run_inference(InferConfig(output="/preds", weights="/runs/x/epoch_0010", root="/DUTS-TE/Image"),
                            images=["/DUTS-TE/Image/a.jpg", ...])   # -> /preds/a.png ...
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Sequence

import numpy as np
import ray
import ray.data
import torch

from basnet.infer.config import InferConfig
from basnet.infer.manifest import InferSummary, ManifestWriter, Progress
from basnet.infer.plan import InferPlan, plan_inference, save_config
from basnet.infer.predictor import MaskPredictor
from basnet.infer.stages import decode_batch, write_batch

logger = logging.getLogger(__name__)

__all__ = ["run_inference", "execute", "build_dataset", "resolve_resources"]


def run_inference(cfg: InferConfig, *, images: Sequence[str] | None = None) -> InferSummary:
    """Masks a collection; joins or starts Ray if this process has not already and there is work.

    Args:
        cfg: The job's options (``basnet.infer.config.InferConfig``).
        images: Explicit image URIs to mask instead of listing ``cfg.input``; their masks mirror
            their paths relative to ``cfg.root`` (or ``cfg.input``), e.g. ``<root>/a/x.jpg`` ->
            ``<output>/a/x.png``.

    Returns:
        Counts, the output root, the manifest parts and the saved config's URI.

    Raises:
        ConfigError, UsageError, CheckpointError: Bad arguments (nothing is run).
    """
    from basnet.ray_init import init_ray

    plan = plan_inference(cfg, images=images)
    if plan.items:
        init_ray(plan.config.address)
    return execute(plan)


def _alive_node_cpus() -> list[float]:
    return [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]


def resolve_resources(cfg: InferConfig) -> InferConfig:
    """Fills actors, GPUs and CPUs per actor from the cluster's resources.

    With GPUs: one actor per GPU (or per ``--num-gpus-per-actor``), 1 CPU each. Without: one
    actor per node, each with its node's CPUs less the decode and write share, since the model is
    the bottleneck and an actor cannot span nodes.
    """
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    num_gpus = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else (1.0 if gpus else 0.0)
    node_cpus = _alive_node_cpus() or [total.get("CPU", 1.0)]
    actors = cfg.actors or (max(1, int(gpus // num_gpus)) if num_gpus else len(node_cpus))
    cpus_per_actor = cfg.cpus_per_actor
    if cpus_per_actor is None:
        per_node = math.ceil(actors / len(node_cpus))  # actors spread evenly over the nodes
        cpus_per_actor = 1.0 if num_gpus else max(1.0, min(node_cpus) / per_node - 2 * cfg.task_cpus)
    return dataclasses.replace(cfg, actors=actors, num_gpus_per_actor=num_gpus, cpus_per_actor=cpus_per_actor)


class _PredictorActor:
    """The Ray actor around ``MaskPredictor``: gets the weights from the object store once."""

    def __init__(self, weights: tuple, threads: int, options: dict) -> None:
        # The reference arrives inside a tuple so Ray does not resolve it before the actor needs it.
        state = ray.get(weights[0])
        use_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:
            # Ray sets OMP_NUM_THREADS=1 in workers; use the whole CPUs this actor reserved. Never
            # more: an intra-op thread that loses its core stalls every op, and on 2 cores shared
            # with the decode and write tasks 2 threads ran several times slower than 1.
            torch.set_num_threads(threads)
        self.predictor = MaskPredictor(state, device=device, **options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.predictor(batch)


def _num_blocks(n: int, batch_size: int) -> int:
    """Several batches per block for throughput, enough blocks to spread and stream."""
    return max(1, min(n, 1000, math.ceil(n / (4 * batch_size))))


def build_dataset(plan: InferPlan, cfg: InferConfig, weights_ref: ray.ObjectRef) -> ray.data.Dataset:
    """The three-stage pipeline over the plan's work items; yields manifest rows."""
    rows = [dataclasses.asdict(item) for item in plan.items]
    task_args = {"num_cpus": cfg.task_cpus, "batch_format": "numpy", "batch_size": cfg.task_batch_size}
    if cfg.resources("task_resources"):
        task_args["resources"] = cfg.resources("task_resources")
    actor_args = {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.num_gpus_per_actor}
    if cfg.resources("actor_resources"):
        actor_args["resources"] = cfg.resources("actor_resources")
    ds = ray.data.from_items(rows, override_num_blocks=_num_blocks(len(rows), cfg.task_batch_size))
    ds = ds.map_batches(decode_batch, fn_kwargs={
        "size": cfg.image_size, "max_pixels": cfg.max_pixels, "keep_bytes": cfg.format == "rgba",
        "overwrite": cfg.overwrite, "batch_size": cfg.task_batch_size}, **task_args)
    options = {"precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile}
    ds = ds.map_batches(_PredictorActor, fn_constructor_kwargs={
        "weights": (weights_ref,), "threads": max(1, int(cfg.cpus_per_actor)), "options": options},
        compute=ray.data.ActorPoolStrategy(size=cfg.actors), batch_size=cfg.batch_size,
        batch_format="numpy", **actor_args)
    return ds.map_batches(write_batch, fn_kwargs={"fmt": cfg.format, "threshold": cfg.threshold}, **task_args)


def _stream(plan: InferPlan, cfg: InferConfig, writer: ManifestWriter, progress: Progress) -> None:
    """Runs the pipeline, feeding each finished batch's rows to the manifest and the progress line."""
    # Held until the run ends: restarted actors (e.g. after losing a node) fetch the weights again.
    weights_ref = ray.put(plan.state_dict)
    for batch in build_dataset(plan, cfg, weights_ref).iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
        progress.update(len(batch["status"]), writer.counts)


def execute(plan: InferPlan) -> InferSummary:
    """Runs a plan on the Ray this process is connected to (none needed if nothing is left to do)."""
    cfg = plan.config
    if plan.items:  # with nothing left to do (a finished run again) Ray is not needed at all
        cfg = resolve_resources(cfg)
        save_config(cfg, plan.config_uri, plan.run_id)  # now with the resolved resources
        logger.info("masking %s%d inputs into %s at %d px: %d actor(s), %.2g GPU and %.2g CPU each",
                    "at least " if plan.has_shards else "", plan.known_total, plan.output_root,
                    cfg.image_size, cfg.actors, cfg.num_gpus_per_actor, cfg.cpus_per_actor)
    start = time.perf_counter()
    writer = ManifestWriter(plan.output_root, plan.run_id)
    progress = Progress(None if plan.has_shards else plan.known_total)
    if plan.decided:
        writer.add({k: [row[k] for row in plan.decided] for k in plan.decided[0]})
        progress.update(len(plan.decided), writer.counts)
    if plan.items:
        _stream(plan, cfg, writer, progress)
    progress.close()
    parts = writer.close()
    counts = writer.counts
    return InferSummary(written=counts.get("written", 0), skipped=counts.get("skipped", 0),
                        failed=counts.get("failed", 0), seconds=time.perf_counter() - start,
                        output=plan.output_root, manifest=parts, config=plan.config_uri, run_id=plan.run_id)
