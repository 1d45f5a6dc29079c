"""Every private Ray API raycmr relies on, in one place.

Ray gives no public way to do these few things; each wrapper names the private API it reads, so
that a Ray upgrade that moves one breaks here (and in ``tests/test_compat.py``, which checks them
all against the installed Ray) instead of silently somewhere inside training or tuning.

===========================================  ==================================================
private API                                  used for
===========================================  ==================================================
``DataContext._execution_idx``               the epoch of a Ray Data execution (per-epoch
                                             image augmentation seeds)
``ray.train._internal.session.get_session``  how many results a Tune trial reported so far
                                             (``raycmr tune --resume`` of a finished run)
``AsyncHyperBandScheduler._trial_info``,     replaying a restored trial's results into its
``._time_attr``, ``._metric``,               ASHA bracket (rung cutoffs survive a resume)
``._metric_op``
``ray.serve._private.common``                the actor-name prefix of Serve replicas (the load
``.REPLICA_ID_FULL_ID_STR_PREFIX``           test kills one replica by name)
``ray._private.state.state``                 the autoscaler's node types and max counts, and
``.get_cluster_config``,                     each node's free resources (the resource check
``available_resources_per_node``             before training/serving)
``ray.train.v2._internal.execution``         a Tune trial's worker placement group, removed
``.callback.WorkerGroupCallback``,           by the Tune driver when the trial stops
``WorkerGroup.get_worker_group_state()``     (raycmr.tune.placement)
``.placement_group_handle``
``ray.autoscaler._private.util``             validating the cluster launcher YAML against
``.prepare_config`` / ``.validate_config``   Ray's own schema (tests)
===========================================  ==================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DATA_EPOCH = "ray.data.DataContext._execution_idx"
TRAIN_SESSION = "ray.train._internal.session.get_session().iteration"
ASHA_FIELDS = ("_trial_info", "_time_attr", "_metric", "_metric_op")
AUTOSCALER_VALIDATE = "ray.autoscaler._private.util.prepare_config/validate_config"
SERVE_REPLICA_PREFIX = "ray.serve._private.common.REPLICA_ID_FULL_ID_STR_PREFIX"
WORKER_GROUP_PG = ("ray.train.v2._internal.execution.callback.WorkerGroupCallback, "
                   "WorkerGroup.get_worker_group_state().placement_group_handle")
AUTOSCALER_CONFIG = ("ray._private.state.state.get_cluster_config (autoscaler node groups), "
                     "ray._private.state.available_resources_per_node")


def data_epoch() -> int:
    """The 0-based index of the current Ray Data execution of a dataset (its epoch), read
    inside a map task; 0 where Ray does not set it."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


def trial_reports_so_far() -> int | None:
    """How many results this Tune trial process has reported (None when unknown)."""
    try:
        from ray.train._internal.session import get_session

        return int(get_session().iteration)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def asha_replay(scheduler: Any, trial: Any, results: list[dict[str, Any]]) -> None:
    """Feed a restored trial's recorded ``results`` into its bracket of the ASHA ``scheduler``
    (after ``on_trial_add`` assigned one), as if they had just been reported."""
    bracket = scheduler._trial_info[trial.trial_id]
    time_attr, metric, sign = scheduler._time_attr, scheduler._metric, scheduler._metric_op
    for result in results:
        if time_attr in result and metric in result:
            bracket.on_result(trial, result[time_attr], sign * result[metric])


def validate_cluster_config(config: dict[str, Any]) -> None:
    """Ray's own validation of a cluster launcher config (raises on a schema error)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def autoscaler_node_groups() -> list[tuple[str, dict[str, float], int]] | None:
    """The connected cluster's autoscaler node groups, ``(name, resources of one node,
    max_count)`` each (-1: no limit), None without an autoscaler; read from the cluster config
    the autoscaler keeps in the GCS, as Ray Train's own maximum-resources check does."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in config.node_group_configs]


def available_resources_per_node() -> dict[str, dict[str, float]]:
    """Free resources of each alive node, by node id (hex)."""
    from ray._private.state import available_resources_per_node as per_node

    return per_node()


def _check_autoscaler_config() -> None:
    from ray._private import state

    if not callable(getattr(state.state, "get_cluster_config", None)):
        raise TypeError("ray._private.state.state.get_cluster_config is gone")
    if not callable(getattr(state, "available_resources_per_node", None)):
        raise TypeError("ray._private.state.available_resources_per_node is gone")
    from ray.core.generated import autoscaler_pb2

    fields = autoscaler_pb2.NodeGroupConfig.DESCRIPTOR.fields_by_name
    if not {"name", "resources", "max_count"} <= set(fields):
        raise AttributeError("autoscaler NodeGroupConfig lacks name/resources/max_count")


def worker_group_callback_base() -> type:
    """Ray Train's ``WorkerGroupCallback``: its subclasses run in the Train controller."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    return WorkerGroupCallback


def worker_group_placement_group(worker_group: Any):
    """The placement group a Ray Train worker group's workers run in."""
    return worker_group.get_worker_group_state().placement_group_handle.placement_group


def _check_worker_group_placement_group() -> None:
    import dataclasses

    from ray.train.v2._internal.execution.worker_group.placement_group_handle import (
        PlacementGroupHandle,
    )
    from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    if not callable(getattr(WorkerGroup, "get_worker_group_state", None)):
        raise TypeError("WorkerGroup.get_worker_group_state is gone")
    if "placement_group_handle" not in {f.name for f in dataclasses.fields(WorkerGroupState)}:
        raise AttributeError("WorkerGroupState has no placement_group_handle")
    if not isinstance(getattr(PlacementGroupHandle, "placement_group", None), property):
        raise TypeError("PlacementGroupHandle.placement_group is not a property")
    if not callable(getattr(worker_group_callback_base(), "after_worker_group_start", None)):
        raise TypeError("WorkerGroupCallback.after_worker_group_start is gone")


def serve_replica_prefix() -> str:
    """How Ray Serve's replica actors' names begin (``"SERVE_REPLICA::"`` in Ray 2.60)."""
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX

    return REPLICA_ID_FULL_ID_STR_PREFIX


def _check_serve_replica_prefix() -> None:
    if not isinstance(serve_replica_prefix(), str) or not serve_replica_prefix():
        raise TypeError("REPLICA_ID_FULL_ID_STR_PREFIX is not a non-empty string")


def _check_data_epoch() -> None:
    from ray.data import DataContext

    if not hasattr(DataContext.get_current(), "_execution_idx"):
        raise AttributeError("DataContext has no _execution_idx")


def _check_train_session() -> None:
    from ray.train._internal.session import get_session

    if not callable(get_session):
        raise TypeError("get_session is not callable")


def _check_asha() -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    scheduler = AsyncHyperBandScheduler(metric="m", mode="max", time_attr="epoch", max_t=4)
    missing = [name for name in ASHA_FIELDS if not hasattr(scheduler, name)]
    if missing:
        raise AttributeError(f"AsyncHyperBandScheduler lacks {', '.join(missing)}")
    if scheduler._metric_op != 1.0 or scheduler._time_attr != "epoch":
        raise ValueError("AsyncHyperBandScheduler's _metric_op/_time_attr changed meaning")
    if not hasattr(next(iter(scheduler._brackets)), "on_result"):
        raise AttributeError("an ASHA bracket has no on_result")


def _check_autoscaler() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not (callable(prepare_config) and callable(validate_config)):
        raise TypeError("prepare_config/validate_config are not callable")


CHECKS: dict[str, Callable[[], None]] = {
    DATA_EPOCH: _check_data_epoch,
    TRAIN_SESSION: _check_train_session,
    "ray.tune.schedulers.AsyncHyperBandScheduler." + "/".join(ASHA_FIELDS): _check_asha,
    AUTOSCALER_VALIDATE: _check_autoscaler,
    SERVE_REPLICA_PREFIX: _check_serve_replica_prefix,
    AUTOSCALER_CONFIG: _check_autoscaler_config,
    WORKER_GROUP_PG: _check_worker_group_placement_group,
}


def missing_private_apis() -> list[str]:
    """``"API: what went wrong"`` for each private API the installed Ray no longer has."""
    problems = []
    for name, check in CHECKS.items():
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - any failure means the API moved
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    return problems
