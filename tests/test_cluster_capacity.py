"""The cluster check on the real session cluster (8 CPUs, no GPU): an autoscaler's node types
read from the cluster config the autoscaler keeps in the GCS (a fake one written by the test,
removed afterwards), and capacity that a running actor holds subtracted."""

from __future__ import annotations

import time

import pytest

from raycmr.resources import ClusterTooSmall, Demand, check_cluster_fits

WORKERS = Demand(bundles=[{"CPU": 16.0, "GPU": 1.0}] * 2, labels=["worker 0", "worker 1"],
                 what="training", settings="train.cpus_per_worker")


def _put_cluster_config(groups: list[tuple[str, dict[str, float], int]] | None) -> None:
    """Write (or with None, delete) the autoscaler's cluster config in the GCS, as a real
    autoscaler (KubeRay, the cluster launcher) does."""
    import ray._raylet as raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    key = raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    namespace = raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    if groups is None:
        _internal_kv_del(key, namespace=namespace)
        return
    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add(name=name, max_count=max_count, min_count=0)
        group.resources.update({k: int(v) for k, v in resources.items()})
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)


@pytest.fixture
def fake_autoscaler(ray_cluster):
    yield _put_cluster_config
    _put_cluster_config(None)


@pytest.mark.ray
def test_node_types_too_small_for_a_worker_are_refused(fake_autoscaler) -> None:
    """8-CPU / 1-GPU node types, 8 of them: 64 CPUs and 8 GPUs in all (the old total check
    passed), but no node can hold a {CPU: 16, GPU: 1} worker."""
    fake_autoscaler([("head", {"CPU": 8}, 0), ("gpu", {"CPU": 8, "GPU": 1}, 8)])
    with pytest.raises(ClusterTooSmall) as exc:
        check_cluster_fits(WORKERS)
    assert str(exc.value) == (
        "the Ray cluster is too small for training: it needs {CPU: 16, GPU: 1} on a single node "
        "for worker 0 (no node type of the autoscaler holds it; the closest has "
        "{CPU: 8, GPU: 1}); change train.cpus_per_worker, or add nodes (ray start --address ...)")
    fake_autoscaler([("head", {"CPU": 8}, 0), ("gpu", {"CPU": 16, "GPU": 1}, 2)])
    check_cluster_fits(WORKERS)  # two such nodes may come up


@pytest.mark.ray
def test_capacity_held_by_a_running_actor_is_not_free(ray_cluster) -> None:
    import ray

    demand = Demand(bundles=[{"CPU": 1.0}] * 2, free_cpus=2.0, what="training")
    check_cluster_fits(demand)

    @ray.remote(num_cpus=5)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    try:
        with pytest.raises(ClusterTooSmall) as exc:
            check_cluster_fits(demand)
        assert str(exc.value) == (
            "the Ray cluster is too small for training: it needs 4 CPU in total (the cluster has "
            "8, 5 of them in use), or add nodes (ray start --address ...)")
    finally:
        ray.kill(holder)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    check_cluster_fits(demand)
