"""The per-test leak check of conftest.py finds what a test leaves on the session's Ray, and cleans it up."""

from __future__ import annotations

import sys

import pytest

from ray_leaks import clean_up, leftovers, snapshot


class Forgotten:
    def ready(self) -> bool:
        return True


@pytest.mark.ray
def test_an_actor_and_a_placement_group_left_behind_are_named_and_removed(ray_session):
    ray = ray_session
    before = snapshot()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    try:
        actor = ray.remote(num_cpus=1)(Forgotten).remote()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.get(actor.ready.remote())
    group = ray.util.placement_group([{"CPU": 0.5}], name="forgotten-group")
    ray.get(group.ready())
    left = leftovers(before, wait_s=0)
    assert any(item.startswith("actor Forgotten") for item in left), left
    assert "placement group forgotten-group CREATED" in left
    assert "1.5 CPU still held" in left
    clean_up(before)
    assert leftovers(before, wait_s=30) == []
