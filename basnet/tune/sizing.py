"""Sizing a search's trials so that training workers and Ray Data never starve each other."""

from __future__ import annotations

import dataclasses
import logging
import math

from basnet.errors import UsageError
from basnet.train.config import TrainConfig
from basnet.tune.config import SearchConfig

logger = logging.getLogger(__name__)

__all__ = ["size_trials"]


def size_trials(base: TrainConfig, search: SearchConfig, resources: dict[str, float]) -> tuple[TrainConfig, int]:
    """Sizes each trial and the number that run at once, from what the cluster has.

    A trial needs its training workers plus CPUs left free for Ray Data (which decodes on plain
    CPUs outside the workers' reservation); the Tune function itself reserves no CPU. On CPU a
    worker takes 1 CPU (less when that would not fit); on GPU one GPU and 1 CPU.

    Returns:
        (base with ``num_workers``, ``cpus_per_worker`` and ``gpu`` set, trials at a time).

    Raises:
        UsageError: One trial does not fit in the cluster.
    """
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpu = bool(gpus > 0 if search.gpus_per_worker is None else search.gpus_per_worker)
    gpw = 1.0 if search.gpus_per_worker is None or not gpu else float(search.gpus_per_worker)
    workers, data_cpus = search.workers_per_trial, search.data_cpus_per_trial
    if gpu and gpus < workers * gpw:
        raise UsageError(f"a trial needs {workers * gpw:g} GPU(s) but the cluster has {gpus:g}: lower "
                         "--workers-per-trial or pass --gpus-per-worker 0")
    cpw = base.cpus_per_worker
    if cpw is None:  # 1 CPU per worker, or what is left once Ray Data has its share
        cpw = min(1.0, math.floor(4 * (cpus - data_cpus) / workers) / 4) if cpus > data_cpus else 0
    need = workers * cpw + data_cpus
    if cpw <= 0 or need > cpus + 1e-9:
        raise UsageError(f"a trial needs {workers} worker(s) x {cpw:g} CPU + {data_cpus:g} CPU for Ray Data "
                         f"but the cluster has {cpus:g} CPUs: lower --workers-per-trial, --cpus-per-worker "
                         "or --data-cpus-per-trial")
    fits = int(cpus // need)
    if gpu:
        fits = min(fits, int(gpus / (workers * gpw) + 1e-9))
    concurrent = search.max_concurrent_trials or max(1, fits)
    if concurrent > fits:
        logger.warning("--max-concurrent-trials %d but the cluster fits %d trial(s): the others wait, "
                       "and Ray Data may starve", concurrent, fits)
    sized = dataclasses.replace(base, num_workers=workers, min_workers=None, cpus_per_worker=cpw, gpu=gpu,
                                gpus_per_worker=gpw)
    logger.info("each trial: %d worker(s) x %g CPU%s + %g CPU for Ray Data; %d trial(s) at a time",
                workers, cpw, " + 1 GPU" if gpu else "", data_cpus, concurrent)
    return sized, concurrent
