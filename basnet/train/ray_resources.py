"""What a training run asks of the Ray cluster: GPUs or not, how many workers, CPUs per worker, and
whether its storage is shared; a run this machine could never place is refused in one line (it
would otherwise wait forever)."""

from __future__ import annotations

import logging
import math
import os

import ray

from basnet import storage
from basnet.errors import UsageError
from basnet.ray_init import started_local_ray
from basnet.train.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["DATA_CPUS", "resolve_resources", "check_shared_storage"]


# CPUs a run leaves free for Ray Data's decoding tasks (each of which takes one CPU): two 1-CPU
# workers on 2 CPUs would starve them and the run would wait forever.
DATA_CPUS = 1.0
_CPU_STEP = 0.25  # CPU shares are handed out in quarters


def _cluster_cpus_gpus() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


def _default_workers(cfg: TrainConfig, gpus: float) -> int:
    """One worker per GPU (or GPU share), as many as split the batch equally; 1 on CPU."""
    if not cfg.gpu:
        return 1
    most = max(1, int(gpus / cfg.gpus_per_worker))
    workers = max(n for n in range(1, most + 1) if cfg.batch_size % n == 0)
    if workers < most:
        logger.warning("%d workers fit the cluster's GPUs but --batch-size %d splits equally across %d: "
                       "training on %d (pass --batch-size to use them all)", most, cfg.batch_size, workers, workers)
    return workers


def resolve_resources(cfg: TrainConfig) -> TrainConfig:
    """Fills GPU use, worker count and CPUs per worker from what the cluster has, and refuses a
    run that this machine could never place (it would otherwise wait forever)."""
    cpus, gpus = _cluster_cpus_gpus()
    if cfg.gpu is None:
        cfg.gpu = gpus > 0
    if cfg.gpu and gpus == 0:
        raise UsageError("--gpu given but the Ray cluster has no GPUs: drop --gpu or add GPU nodes")
    if cfg.num_workers is None:
        cfg.num_workers = _default_workers(cfg, gpus)
    cfg.check_batch_split()
    if cfg.cpus_per_worker is None:
        share = math.floor((cpus - DATA_CPUS) / cfg.num_workers / _CPU_STEP) * _CPU_STEP
        cfg.cpus_per_worker = 1.0 if cfg.gpu else max(share, _CPU_STEP)
    _check_fits(cfg, cpus, gpus)
    return cfg


def _check_fits(cfg: TrainConfig, cpus: float, gpus: float) -> None:
    workers = cfg.min_workers or cfg.num_workers
    need_cpus = workers * cfg.cpus_per_worker + DATA_CPUS
    need_gpus = workers * cfg.gpus_per_worker if cfg.gpu else 0.0
    if need_cpus <= cpus + 1e-9 and need_gpus <= gpus + 1e-9:
        return
    if not started_local_ray():  # a cluster's autoscaler may still add the nodes
        logger.warning("the run needs %g CPUs and %g GPUs; the cluster has %g and %g now: it waits for more nodes",
                       need_cpus, need_gpus, cpus, gpus)
        return
    if need_gpus > gpus + 1e-9:
        fit = int(gpus / cfg.gpus_per_worker)
        raise UsageError(f"--num-workers {workers} needs {need_gpus:g} GPUs but this machine has {gpus:g}: "
                         f"use --num-workers {fit} or fewer, or a smaller --gpus-per-worker")
    fit = int((cpus - DATA_CPUS) / cfg.cpus_per_worker)
    raise UsageError(f"--num-workers {workers} needs {workers} x {cfg.cpus_per_worker:g} CPU for the workers "
                     f"plus {DATA_CPUS:g} for Ray Data's decoding, but this machine has {cpus:g} CPUs: use "
                     f"--num-workers {max(fit, 1)} or fewer" + ("" if fit else " and a smaller --cpus-per-worker"))


def check_shared_storage(cfg: TrainConfig) -> None:
    """Several machines cannot share checkpoints through one machine's local disk."""
    if storage.is_s3(cfg.storage) or os.environ.get("BASNET_STORAGE_IS_SHARED"):
        return
    fix = "pass --storage s3://bucket/prefix (or a shared mount and set BASNET_STORAGE_IS_SHARED=1)"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    addresses = {n["NodeManagerAddress"] for n in nodes}
    if len(addresses) > 1:
        raise UsageError(f"--storage {cfg.storage} is a local path but the cluster has {len(addresses)} "
                         f"machines: {fix}")
    # An autoscaling cluster may show only its head now; if the workers cannot run here, they
    # will run on machines that come later and write to their own disks.
    here = next((n for n in nodes if n["NodeID"] == ray.get_runtime_context().get_node_id()), None)
    resources = here["Resources"] if here else {}
    if resources.get("CPU", 0) < cfg.cpus_per_worker or (cfg.gpu and resources.get("GPU", 0) < cfg.gpus_per_worker):
        raise UsageError(f"--storage {cfg.storage} is a local path but the training workers cannot run "
                         f"on this machine, so they would write elsewhere: {fix}")
