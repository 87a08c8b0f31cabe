"""Ray Data streams under ``basnet.watchdog``: what a stalled one reports (the cluster's free CPUs
and GPUs, the CPUs Ray Data's coordinator has reserved for each running dataset, the dataset's
operators), and a dataset's batches watched.

The last two come from Ray's own bookkeeping actors (the autoscaling coordinator and Ray Data's
stats actor), which are Ray internals: each part is best effort, asked with a short timeout, and a
part Ray cannot give is left out rather than failing the report.
"""

from __future__ import annotations

import time
import weakref
from typing import Iterator

import ray
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

from basnet.watchdog import watched

__all__ = ["stall_report", "report_for", "watched_dataset"]

_ASK_S = 10.0  # how long the report waits for each of Ray's actors


def _amount(value: float) -> str:
    return f"{value:g}"


def _free_resources() -> str:
    free, total = ray.available_resources(), ray.cluster_resources()
    return (f"cluster free {_amount(free.get('CPU', 0))} of {_amount(total.get('CPU', 0))} CPUs, "
            f"{_amount(free.get('GPU', 0))} of {_amount(total.get('GPU', 0))} GPUs")


def _reservations(coordinator) -> dict:
    now = time.time()
    return {rid: (sum(b.get("CPU", 0.0) for b in req.reserved_resources.values()), req.expiration_time > now)
            for rid, req in coordinator._ongoing_reqs.items()}


def _data_shares() -> str:
    """CPUs the coordinator reserved for each Ray Data execution (``data-<dataset id>``)."""
    actor = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    reserved = ray.get(actor.__ray_call__.remote(_reservations), timeout=_ASK_S)
    shares = [f"{rid.removeprefix('data-')} {_amount(cpus)}" for rid, (cpus, live) in sorted(reserved.items())
              if rid.startswith("data-") and live]
    return "Ray Data's reserved CPUs: " + (", ".join(shares) if shares else "none")


def _operators(dataset: str) -> str:
    """The running executions of ``dataset`` (its name), each operator's state and progress."""
    from ray.data._internal.stats import get_or_create_stats_actor

    datasets = ray.get(get_or_create_stats_actor().get_datasets.remote(), timeout=_ASK_S)
    running = [(tag, d) for tag, d in datasets.items()
               if tag.startswith(f"{dataset}_") and d.get("state") not in ("FINISHED", "FAILED")]
    if not running:
        return f"dataset {dataset}: no execution running"
    parts = []
    for tag, d in running:
        ops = ", ".join(f"{o.get('name', op)} {o.get('state', '?')} {o.get('progress', 0)}/{o.get('total', 0)}"
                        f" ({o.get('queued_blocks', 0)} queued)" for op, o in d.get("operators", {}).items())
        parts.append(f"dataset {tag}: {ops}")
    return "; ".join(parts)


def stall_report(dataset: str) -> str:
    """One line: free CPUs and GPUs, Ray Data's reserved CPUs, the operators of ``dataset``."""
    parts = []
    for part in (_free_resources, _data_shares, lambda: _operators(dataset)):
        try:
            parts.append(part())
        except Exception as exc:  # a Ray internal that changed or did not answer: say so, go on
            parts.append(f"({part.__name__.strip('_')} unavailable: {type(exc).__name__})")
    return "; ".join(parts)


def report_for(dataset: str):
    """``stall_report`` bound to ``dataset``, as ``basnet.watchdog.watched`` takes it."""
    return lambda: stall_report(dataset)


# The executions started in this process, by dataset id: a stall shuts its own down, even one that
# never delivered (Ray Data keeps no other handle on an execution before its first output).
_started: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


class _RecordStart(ExecutionCallback):
    """Ray Data calls it as an execution of a watched dataset starts."""

    def before_execution_starts(self, executor) -> None:
        _started[executor._dataset_id] = executor


def watched_dataset(ds: ray.data.Dataset, stream: str, timeout_s: float | None) -> Iterator[dict]:
    """``ds``'s numpy batches as they come, the job stopped with one line when none comes for
    ``timeout_s`` seconds; the execution is shut down first (its tasks cancelled, its actors
    killed), so nothing outlives the run. Closing the iterator shuts the pipeline down too."""
    ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, _RecordStart]

    def shut_down() -> None:
        executor = _started.get(ds.get_dataset_id())
        if executor is not None:
            executor.shutdown(force=True)

    return watched(ds.iter_batches(batch_size=None, batch_format="numpy"), stream=stream, timeout_s=timeout_s,
                   report=report_for(ds.name or "dataset"), on_stall=shut_down)
