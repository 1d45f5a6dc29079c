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
``ray._private.state.state``                 the autoscaler's maximum resources (the resource
``.get_max_resources_from_cluster_config``   check before training/serving)
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
AUTOSCALER_MAX = "ray._private.state.state.get_max_resources_from_cluster_config"


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


def autoscaler_max_resources() -> dict[str, float] | None:
    """The connected cluster's autoscaler maximum per resource (None without an autoscaler); the
    same call Ray Train's worker group makes."""
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config()


def _check_autoscaler_max() -> None:
    from ray._private.state import state

    if not callable(getattr(state, "get_max_resources_from_cluster_config", None)):
        raise TypeError("ray._private.state.state.get_max_resources_from_cluster_config is gone")


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
    AUTOSCALER_MAX: _check_autoscaler_max,
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
