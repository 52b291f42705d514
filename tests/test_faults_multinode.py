"""A worker node lost in the middle of a pool pass, on a multi-node local cluster (head without CPUs and
three 1-CPU worker nodes on 127.0.0.1): the scoring actor it hosted restarts on the spare node and the
pass completes, every id scored once, as a fault-free pass scores it."""

import contextlib
import os
import signal

import pytest
import ray
from helpers import (
    SCORER_ARGS,
    actor_pid,
    assert_scored_once_like,
    model_version,
    pass_under_way,
    pool_rows,
    tiny_checkpoint,
)
from ray.cluster_utils import Cluster

from actors.scoring import ScorerPool
from orchestrator.strategies import ScoreKind

pytestmark = pytest.mark.slow
LOOPBACK = {"node_ip_address": "127.0.0.1"}
# the GCS declares a node dead after about 2 s without an answer (default: 15 s)
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


@pytest.fixture(scope="module")
def cluster(own_ray):
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
            **LOOPBACK,
        },
    )
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, **LOOPBACK)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def node_of(actor) -> str:
    return ray.get(
        actor.__ray_call__.remote(lambda scorer: ray.get_runtime_context().get_node_id())
    )


def test_a_lost_worker_node_does_not_stop_pool_scoring(cluster, synthetic_root):
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    rows = pool_rows(synthetic_root, copies=12)
    pool = ScorerPool(2, SCORER_ARGS, shards_per_actor=36)
    try:
        pool.load_model(tiny_checkpoint())
        reference = pool.score(rows, ScoreKind.EEM)
        victim = pool.actors[0]
        lost_node_id = node_of(victim)
        (lost,) = [node for node in cluster.worker_nodes if node.node_id == lost_node_id]
        pid = actor_pid(victim)
        thread, outcome = pass_under_way(pool, rows, pid)
        cluster.remove_node(lost, allow_graceful=False)
        # A lost machine takes every process on it. Killing its raylet leaves the worker processes it
        # started running for a while (they notice the raylet's death only later, and on some machines
        # only after the pass has ended), so they go too, as they would with the machine.
        with contextlib.suppress(ProcessLookupError):  # it may have noticed already
            os.kill(pid, signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        assert_scored_once_like(outcome["table"], reference, rows)
        assert node_of(victim) not in (
            lost_node_id,
            node_of(pool.actors[1]),
        )  # moved to the spare node
        assert model_version(victim) == pool.version, (
            "the restarted process scored no retried shard"
        )
    finally:
        pool.shutdown()
