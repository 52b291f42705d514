"""A Ray Train worker whose process dies (``os._exit``) after the checkpoint of epoch 1: with
``scaling.max_failures`` (Ray's ``FailureConfig``) the run restarts from that checkpoint, trains only the
remaining epochs and ends with the last epoch's checkpoint."""

import os
import sys
from pathlib import Path

import pytest
import ray
import ray.train
from helpers import tiny_training_job
from ray import cloudpickle

from actors import ray_train
from actors.ray_train import CHECKPOINT_FILE, torch_trainer
from orchestrator.config import ScalingConfig
from segxal.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
EPOCHS, DIE_AFTER_EPOCH = 4, 1


def dies_once_after_a_checkpoint(loop_config: dict) -> None:
    """The project's training loop, in a worker whose process exits just after reporting the checkpoint
    of ``die_after_epoch``, the first time only (a marker file remembers); every report is logged."""
    marker, log = Path(loop_config["marker"]), Path(loop_config["log"])
    attempt = 2 if marker.exists() else 1
    report = ray_train.report_with_checkpoint

    def report_then_die(metrics: dict, state: dict) -> None:
        report(metrics, state)
        with log.open("a") as out:
            out.write(f"{attempt} {metrics['epoch']}\n")
        if attempt == 1 and metrics["epoch"] == loop_config["die_after_epoch"]:
            marker.touch()
            # A worker's queue holds one report, taken by the controller's poll; the controller polls
            # again only after handling what the last poll brought. So once two more reports are taken,
            # the checkpoint's report has been handled and the death cannot lose it.
            for _ in range(2):
                ray.train.report({"epoch": metrics["epoch"]})
            os._exit(1)

    ray_train.report_with_checkpoint = report_then_die  # in this worker process only
    ray_train.segmenter_loop(ray_train.RayTrainSession(), loop_config)


@pytest.fixture(scope="module", autouse=True)
def pickled_by_value(local_ray):
    cloudpickle.register_pickle_by_value(
        sys.modules[__name__]
    )  # Ray workers cannot import this module
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_dead_worker_resumes_from_its_last_checkpoint(local_ray, synthetic_root, tmp_path):
    job = tiny_training_job(synthetic_root, EPOCHS)
    loop_config = {
        "job": job,
        "marker": str(tmp_path / "died"),
        "log": str(tmp_path / "reports.log"),
        "die_after_epoch": DIE_AFTER_EPOCH,
    }
    trainer = torch_trainer(
        dies_once_after_a_checkpoint,
        loop_config,
        ScalingConfig(num_workers=1, max_failures=1),
        tmp_path / "ray",
        "dies-once",
        "val/miou",
    )
    result = trainer.fit()
    reports = [
        tuple(map(int, line.split()))
        for line in (tmp_path / "reports.log").read_text().splitlines()
    ]
    assert reports == [
        (1, 0),
        (1, 1),
        (2, 2),
        (2, 3),
    ]  # the second attempt went on from epoch 1's checkpoint
    assert result.metrics["epoch"] == EPOCHS - 1
    assert load_checkpoint(Path(result.checkpoint.path) / CHECKPOINT_FILE)["epoch"] == EPOCHS - 1
