"""Ray Train on a real local Ray: the training loop reports checkpoints and keeps the best."""

import pytest
import torch
from helpers import tiny_training_job

from actors.ray_train import train_segmenter_job
from orchestrator.config import ScalingConfig
from segxal.checkpoint import load_checkpoint
from segxal.models.unet import UNet

pytestmark = pytest.mark.slow


def test_torch_trainer_reports_best_checkpoint(local_ray, synthetic_root, tmp_path):
    job = tiny_training_job(synthetic_root, epochs=3)
    result = train_segmenter_job(job, ScalingConfig(num_workers=1), tmp_path / "ray", "unit")
    state = load_checkpoint(result.best_checkpoint)
    assert state["metrics"]["val/miou"] == pytest.approx(result.best_metrics["val/miou"])
    assert result.best_metrics["val/miou"] == pytest.approx(state["best_miou"])
    model = UNet.from_checkpoint(state["model"]).eval()
    assert model(torch.zeros(1, 3, 32, 64)).shape == (1, 19, 32, 64)
