"""A scoring actor killed (SIGKILL of its process, or ``ray.kill``) in the middle of a pool pass: the actor
restarts, its shards are retried, and the pass scores every id exactly once with the scores of a
fault-free pass."""

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

from actors.scoring import ScorerPool
from orchestrator.strategies import ScoreKind

pytestmark = pytest.mark.slow


KILLS = {
    "SIGKILL": lambda actor, pid: os.kill(pid, signal.SIGKILL),
    "ray.kill": lambda actor, pid: ray.kill(actor, no_restart=False),
}


@pytest.mark.parametrize("kill", KILLS)
def test_an_actor_killed_mid_pass_restarts_and_the_pass_completes(local_ray, synthetic_root, kill):
    rows = pool_rows(synthetic_root, copies=12)
    pool = ScorerPool(2, SCORER_ARGS, shards_per_actor=36)
    try:
        pool.load_model(tiny_checkpoint())
        reference = pool.score(rows, ScoreKind.EEM)
        assert len(reference) == len(rows) == 144
        victim = pool.actors[0]
        pid = actor_pid(victim)
        thread, outcome = pass_under_way(pool, rows, pid)
        KILLS[kill](victim, pid)
        thread.join(timeout=300)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        assert_scored_once_like(outcome["table"], reference, rows)
        assert actor_pid(victim) != pid
        assert model_version(victim) == pool.version, (
            "the restarted process scored no retried shard"
        )
    finally:
        pool.shutdown()
