"""A non-finite loss in supervised training stops at once, naming the batch's samples, before the
optimiser step can spoil the weights. (PEBAL's non-finite loss: test_pebal_train, test_pebal_losses.)"""

import re

import pytest
import torch
from torch.utils.data import DataLoader

from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.models.unet import UNet, UNetConfig
from segxal.training import TrainConfig, make_optimizer, train_one_epoch


@pytest.mark.parametrize(
    "bias, loss", [(float("nan"), "nan"), (float("-inf"), "inf")]
)  # -inf: road impossible
def test_a_non_finite_loss_stops_training_naming_the_samples(synthetic_root, bias, loss):
    four = cityscapes_manifest(synthetic_root, "train").slice(0, 4)
    loader = DataLoader(
        SegmentationDataset(four, CITYSCAPES, SampleTransform(size=(32, 64))), batch_size=2
    )
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=4, depth=2))
    with torch.no_grad():
        model.head.bias[0] = bias
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    optimizer = make_optimizer(model.parameters(), TrainConfig(lr=0.01, device="cpu"))
    first_batch = four["sample_id"].to_pylist()[:2]
    with pytest.raises(
        FloatingPointError, match=re.escape(f"training loss is {loss} at batch of {first_batch}")
    ):
        train_one_epoch(model, loader, optimizer, torch.device("cpu"))
    for name, value in model.named_parameters():  # no optimiser step was taken
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)
