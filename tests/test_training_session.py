"""Training in the driver (``scaling.num_workers: 0``): LocalSession's checkpoints and resume, and
:func:`actors.ray_train.run_training` without Ray Train."""

import pytest
import torch
from helpers import sklearn_miou, tiny_training_job

from actors.ray_train import TrainingRunFailed, manifest_table, run_training, train_segmenter_job
from orchestrator.config import ScalingConfig
from segxal.checkpoint import load_checkpoint
from segxal.data.dataset import SegmentationDataset
from segxal.data.labels import LABEL_SETS
from segxal.models.unet import UNet
from segxal.training_session import LocalSession

CPU = torch.device("cpu")


def test_local_session_keeps_the_best_and_the_last_and_resumes(tmp_path):
    session = LocalSession(tmp_path, "val/miou", CPU)
    assert session.restored_state() is None and session.best_checkpoint is None
    for epoch, miou in enumerate([0.2, 0.5, 0.4]):
        session.report(
            {"epoch": epoch, "val/miou": miou}, {"epoch": epoch, "metrics": {"val/miou": miou}}
        )
    session.report({"epoch": 3})  # a report without a checkpoint (another rank) changes nothing
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    resumed = LocalSession(tmp_path, "val/miou", CPU)
    assert resumed.best_metrics == {"val/miou": 0.5} and resumed.restored_state()["epoch"] == 2
    resumed.report({"epoch": 3, "val/miou": 0.5}, {"epoch": 3, "metrics": {"val/miou": 0.5}})
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3  # a tie: the later epoch


def test_training_in_the_driver_returns_the_best_epochs_checkpoint(synthetic_root, tmp_path):
    job = tiny_training_job(synthetic_root, epochs=3)
    result = train_segmenter_job(job, ScalingConfig(num_workers=0), tmp_path, "driver")
    assert {p.name for p in (tmp_path / "driver").iterdir()} == {"best.pt", "last.pt"}
    best, last = load_checkpoint(result.best_checkpoint), load_checkpoint(result.last_checkpoint)
    assert last["epoch"] == 2 and best["epoch"] == result.best_metrics["epoch"]
    assert result.best_metrics["val/miou"] == pytest.approx(last["best_miou"])
    model = UNet.from_checkpoint(best["model"]).eval()
    label_set = LABEL_SETS[job.label_set]
    dataset = SegmentationDataset(manifest_table(job.val_manifest), label_set, job.val_transform)
    assert sklearn_miou(model, dataset, label_set.num_classes) == pytest.approx(
        result.best_metrics["val/miou"], abs=1e-6
    )


def fails_after_one_epoch(session, loop_config):
    session.report({"epoch": 0, "score": 1.0}, {"epoch": 0})
    raise ValueError("the loop's own error")


def test_a_failure_in_the_driver_names_the_cause_and_the_last_checkpoint(tmp_path):
    with pytest.raises(TrainingRunFailed, match="the loop's own error") as failure:
        run_training(
            fails_after_one_epoch, {}, ScalingConfig(num_workers=0), tmp_path, "x", "score"
        )
    assert isinstance(failure.value.cause, ValueError)
    assert failure.value.last_checkpoint == tmp_path / "x" / "last.pt"
    with pytest.raises(ValueError, match="num_workers >= 1"):
        run_training(
            fails_after_one_epoch,
            {},
            ScalingConfig(num_workers=0),
            tmp_path,
            "y",
            "score",
            [object()],
        )
