"""A stopped trial's worker placement group is removed by the Tune driver itself.

Ray Train frees a run's placement group after its controller dies (a trial ASHA stopped) from a
``PlacementGroupCleaner`` actor whose thread polls the State API; when that thread dies (it
failed to reach the cluster, see :func:`raycmr.runtime.start_local_ray`), nothing frees the group
and the trial's CPUs stay reserved until later trials wait forever. So each trial's Train
controller records its worker group's placement group in the GCS (:class:`RecordPlacementGroup`,
a worker-group callback), and the Tune driver removes it when the trial completes or errors
(:class:`FreeStoppedTrialGroups`), unless Ray Train already did.
"""

from __future__ import annotations

import logging

from ray.tune import Callback

from raycmr import compat

NAMESPACE = "raycmr"
logger = logging.getLogger(__name__)


def _key(trial_id: str) -> bytes:
    return f"trial_placement_group/{trial_id}".encode()


class RecordPlacementGroup(compat.worker_group_callback_base()):
    """Runs in a trial's Train controller: stores the worker group's placement group id under
    the trial's id (again after a worker-group restart, which makes a new group)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id

    def after_worker_group_start(self, worker_group) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        group = compat.worker_group_placement_group(worker_group)
        _internal_kv_put(_key(self.trial_id), group.id.hex(), overwrite=True, namespace=NAMESPACE)


def free_placement_group(group_hex: str) -> bool:
    """Remove the placement group ``group_hex`` unless it is gone already; True if removed."""
    import ray
    from ray.util.placement_group import PlacementGroup

    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_hex)))
    if ray.util.placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    ray.util.remove_placement_group(group)
    return True


class FreeStoppedTrialGroups(Callback):
    """Tune callback (in the driver): a completed or errored trial's recorded placement group
    is removed if Ray Train left it."""

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.free(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.free(trial.trial_id)

    def free(self, trial_id: str) -> bool:
        """Remove ``trial_id``'s recorded placement group if still there; True if it was."""
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

        recorded = _internal_kv_get(_key(trial_id), namespace=NAMESPACE)
        if not recorded:
            return False
        _internal_kv_del(_key(trial_id), namespace=NAMESPACE)
        removed = free_placement_group(recorded.decode())
        if removed:
            logger.warning("trial %s stopped but its workers' placement group %s was still "
                           "held; removed it", trial_id, recorded.decode())
        return removed
