"""raycmr.tune.placement on the session cluster: a stopped trial's recorded worker placement
group is removed by the Tune driver's callback, and a group already removed is left alone."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest


@pytest.mark.ray
def test_a_stopped_trials_placement_group_is_removed(ray_cluster) -> None:
    import ray
    from ray.util.placement_group import placement_group

    from raycmr.tune.placement import FreeStoppedTrialGroups, RecordPlacementGroup

    group = placement_group([{"CPU": 1.0}] * 2)
    ray.get(group.ready(), timeout=60)
    free_before = ray.available_resources().get("CPU", 0.0)
    worker_group = SimpleNamespace(get_worker_group_state=lambda: SimpleNamespace(
        placement_group_handle=SimpleNamespace(placement_group=group)))
    RecordPlacementGroup("trial-a").after_worker_group_start(worker_group)
    freer = FreeStoppedTrialGroups()
    freer.on_trial_complete(0, [], SimpleNamespace(trial_id="trial-b"))  # nothing recorded
    assert ray.util.placement_group_table(group)["state"] == "CREATED"
    freer.on_trial_complete(0, [], SimpleNamespace(trial_id="trial-a"))
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < free_before + 2 and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) == free_before + 2
    # a second report of the trial, or a group Ray Train removed itself: nothing to do
    assert not freer.free("trial-a")
    again = placement_group([{"CPU": 1.0}])
    ray.get(again.ready(), timeout=60)
    ray.util.remove_placement_group(again)
    RecordPlacementGroup("trial-c").after_worker_group_start(SimpleNamespace(
        get_worker_group_state=lambda: SimpleNamespace(
            placement_group_handle=SimpleNamespace(placement_group=again))))
    assert not freer.free("trial-c")
