"""What a test left running on the session's Ray: actors, placement groups, and tasks or actors still
holding CPUs or GPUs. ``conftest.py`` checks after every test that uses the session's Ray, so a leak
fails the test that leaked (and is cleaned up), not a later one that starves for its CPUs."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

import ray

__all__ = ["Snapshot", "snapshot", "leftovers", "clean_up", "RAY_SINGLETONS"]

# Detached actors Ray itself creates once per cluster and keeps for its life, by design.
RAY_SINGLETONS = ("_AutoscalingCoordinatorActor", "_StatsActor", "ActorLocationTracker")


@dataclass
class Snapshot:
    actors: set[str] = field(default_factory=set)
    placement_groups: set[str] = field(default_factory=set)


def _live_actor_infos() -> dict[str, dict]:
    return {actor_id: info for actor_id, info in ray._private.state.actors().items()
            if info["State"] != "DEAD" and info["ActorClassName"] not in RAY_SINGLETONS}


def _live_actors() -> dict[str, str]:
    return {actor_id: info["ActorClassName"] for actor_id, info in _live_actor_infos().items()}


def _live_placement_groups() -> dict[str, dict]:
    return {pg_id: info for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def snapshot() -> Snapshot:
    return Snapshot(set(_live_actors()), set(_live_placement_groups()))


def _held() -> dict[str, float]:
    free, total = ray.available_resources(), ray.cluster_resources()
    return {k: total.get(k, 0.0) - free.get(k, 0.0) for k in ("CPU", "GPU") if total.get(k, 0.0) - free.get(k, 0.0) > 1e-6}


def leftovers(before: Snapshot, *, wait_s: float = 60.0) -> list[str]:
    """What is still running that was not before the test, after waiting up to ``wait_s`` for Ray's
    asynchronous teardown (a finished training run's workers and coordinators exit on their own)."""
    deadline = time.monotonic() + wait_s
    while True:
        actors = {a: name for a, name in _live_actors().items() if a not in before.actors}
        groups = {g: info for g, info in _live_placement_groups().items() if g not in before.placement_groups}
        held = _held()
        found = ([f"actor {name} ({a[:8]})" for a, name in sorted(actors.items())]
                 + [f"placement group {info.get('name') or g[:8]} {info['state']}" for g, info in sorted(groups.items())]
                 + [f"{amount:g} {kind} still held" for kind, amount in held.items()])
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)  # Ray's state has no event for "everything is gone": poll it


def clean_up(before: Snapshot) -> None:
    """Kills the processes of the actors and removes the placement groups a test left, so later
    tests start clean (the session's Ray is on this machine; Ray kills an actor by handle only)."""
    from ray.util.placement_group import PlacementGroup

    for actor_id, info in _live_actor_infos().items():
        if actor_id not in before.actors and info.get("Pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info["Pid"], signal.SIGKILL)
    for group_id in set(_live_placement_groups()) - before.placement_groups:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
