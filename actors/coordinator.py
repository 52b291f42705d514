"""The coordinator as a Ray actor: the one process that writes the pool state."""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.coordinator import Coordinator


class CoordinatorHandle:
    """Calls a coordinator actor's methods as if it were local: each call waits for its result."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self._actor = actor

    def __getattr__(self, name: str):
        method = getattr(self._actor, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))

    def shutdown(self) -> None:
        ray.kill(self._actor)


def start_coordinator(*args, **kwargs) -> CoordinatorHandle:
    """A :class:`Coordinator` actor on this (the driver's) node, where the run folder is; it holds no
    CPU so it never waits behind training or scoring."""
    node = ray.get_runtime_context().get_node_id()
    actor = (
        ray.remote(Coordinator)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        .remote(*args, **kwargs)
    )
    return CoordinatorHandle(actor)
