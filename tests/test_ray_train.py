"""Ray Train on a real local Ray: the training loop reports checkpoints and keeps the best."""

import pytest
import ray
import torch

from actors.ray_train import TrainingJob, train_on_ray
from orchestrator.config import ScalingConfig
from segxal.checkpoint import load_checkpoint
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform
from segxal.models.unet import UNet, UNetConfig
from segxal.training import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def tiny_training_job(synthetic_root, epochs: int) -> TrainingJob:
    """A small U-Net on the tiny synthetic dataset at 32x64."""
    return TrainingJob(
        train_manifest=cityscapes_manifest(synthetic_root, "train"),
        val_manifest=cityscapes_manifest(synthetic_root, "val"),
        label_set="cityscapes",
        unet=UNetConfig(num_classes=19, width=4, depth=2),
        train=TrainConfig(epochs=epochs, batch_size=4, lr=0.01, device="cpu"),
        train_transform=SampleTransform(size=(32, 64), augment=True),
        val_transform=SampleTransform(size=(32, 64)),
    )


def test_torch_trainer_reports_best_checkpoint(local_ray, synthetic_root, tmp_path):
    job = tiny_training_job(synthetic_root, epochs=3)
    result = train_on_ray(job, ScalingConfig(num_workers=1), tmp_path / "ray", "unit")
    assert result.last_metrics["epoch"] == 2
    state = load_checkpoint(result.best_checkpoint)
    assert state["metrics"]["val/miou"] == pytest.approx(result.best_metrics["val/miou"])
    assert result.best_metrics["val/miou"] == pytest.approx(state["best_miou"])
    model = UNet.from_checkpoint(state["model"]).eval()
    assert model(torch.zeros(1, 3, 32, 64)).shape == (1, 19, 32, 64)
