"""A scoring actor killed (SIGKILL of its process, or ``ray.kill``) in the middle of a pool pass: the actor
restarts, its shards are retried, and the pass scores every id exactly once with the scores of a
fault-free pass."""

import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from procfs import cpu_ticks

from actors.scoring import ScorerPool
from segxal.data.cityscapes import cityscapes_manifest
from segxal.eem.config import EEMConfig
from segxal.models.unet import UNet, UNetConfig

pytestmark = pytest.mark.slow
SCORER_ARGS = {
    "eem": EEMConfig(min_region_area=2),
    "label_set": "cityscapes",
    "size": None,
    "batch_size": 1,
    "device": "cpu",
}


def pool_rows(synthetic_root, copies: int) -> pa.Table:
    """The training images ``copies`` times over, each copy under its own ids: a pass long enough to
    be interrupted."""
    manifest = cityscapes_manifest(synthetic_root, "train")
    column = manifest.schema.get_field_index("sample_id")
    ids = manifest["sample_id"].to_pylist()
    return pa.concat_tables(
        [
            manifest.set_column(column, "sample_id", pa.array([f"{i}#{k}" for i in ids]))
            for k in range(copies)
        ]
    )


def tiny_checkpoint() -> dict:
    torch.manual_seed(0)
    return UNet(UNetConfig(num_classes=19, width=4, depth=2)).to_checkpoint()


def actor_pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda scorer: os.getpid()))


def model_version(actor) -> int | None:
    """The model version the actor's current process loaded (None: it has scored nothing)."""
    return ray.get(actor.__ray_call__.remote(lambda scorer: scorer.version))


def pass_under_way(pool: ScorerPool, rows: pa.Table, pid: int) -> tuple[threading.Thread, dict]:
    """A pass started in the background (its thread, and its outcome once done: ``table`` or ``error``),
    returned as soon as the actor process ``pid`` works on it (0.05 s of CPU) while it still runs."""
    idle = cpu_ticks(pid)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["table"] = pool.score(rows, "eem")
        except BaseException as error:  # reported by the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while cpu_ticks(pid) < idle + 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive(), "the pass ended before the fault"
    return thread, outcome


def assert_scored_once_like(result: pa.Table, reference: pa.Table, rows: pa.Table) -> None:
    ids = result["sample_id"].to_pylist()
    assert Counter(ids) == Counter(rows["sample_id"].to_pylist())  # every id, exactly once
    assert ids == reference["sample_id"].to_pylist()
    np.testing.assert_allclose(
        result["score"].to_numpy(), reference["score"].to_numpy(), rtol=1e-6, atol=1e-9
    )


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


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
        reference = pool.score(rows, "eem")
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
