"""A masking run's record of its model replicas, kept outside them (basnet/infer/ray_pipeline.py).

A replica that fails restarts with no memory of its own, and Ray hands the driver a replica's failed
start only as text: this actor counts the model errors, keeps the user's error a start raised, and
knows the replicas, so a failed run can make sure none outlives it.
"""

from __future__ import annotations

import ray

__all__ = ["ModelHealth", "stop_replicas"]


@ray.remote(num_cpus=0)
class ModelHealth:
    """Counts the model errors of a run's replicas (a restarted replica keeps no memory of its own),
    and knows the replicas, so a failed run can make sure none outlives it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.replicas: dict[str, object] = {}
        self.start_error: Exception | None = None

    def failed_start(self, error: Exception) -> None:
        self.start_error = error

    def why_not_started(self) -> Exception | None:
        """The user's error a replica's start raised (weights it cannot load), which Ray hands the
        driver only as text inside an ``ActorDiedError``."""
        return self.start_error

    def started(self, actor_id: str, replica) -> None:
        self.replicas[actor_id] = replica  # a restarted replica is the same actor

    def all_replicas(self) -> list:
        return list(self.replicas.values())

    def failed(self, message: str) -> int:
        self.errors.append(message)
        return len(self.errors)

    def last(self) -> str | None:
        return self.errors[-1] if self.errors else None


def stop_replicas(health) -> None:
    """Kills a failed run's model replicas. Ray Data shuts a failed execution down gently, and a
    replica that was restarting then (after a model error) was seen to outlive the run, holding its
    CPUs or GPU."""
    for replica in ray.get(health.all_replicas.remote()):
        ray.kill(replica, no_restart=True)
