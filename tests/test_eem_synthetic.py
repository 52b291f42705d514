"""ProxGradCAM on synthetic driving scenes with ground-truth disparity (the ``dataset`` backend)."""

import pytest
import torch
import torch.nn.functional as F

from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.data.synthetic import SyntheticConfig, generate_synthetic
from segxal.eem.config import EEMConfig
from segxal.eem.pipeline import score_batch
from segxal.models.depth import DatasetDepth
from segxal.models.unet import UNet, UNetConfig

OBJECTS = ("pole", "traffic light", "traffic sign", "person", "rider", "car", "truck", "bus")


@pytest.fixture(scope="module")
def scenes_and_model(tmp_path_factory):
    root = generate_synthetic(
        tmp_path_factory.mktemp("synthetic"),
        SyntheticConfig(num_train=12, num_val=0, num_anomaly=0, height=64, width=128, workers=1),
    )
    dataset = SegmentationDataset(cityscapes_manifest(root, "train"), CITYSCAPES, load_depth=True)
    items = [dataset[i] for i in range(len(dataset))]
    batch = {key: torch.stack([item[key] for item in items]) for key in ("image", "label", "depth")}
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=8, depth=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):  # a brief fit, so predictions (the Grad-CAM targets) mean something
        loss = F.cross_entropy(model(batch["image"]), batch["label"], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch, model


def _near_far_means(batch, proxgradcam) -> tuple[float, float]:
    """Mean ProxGradCAM over ground-truth object pixels at least half as near as the nearest pixel
    (disparity >= 0.5 of the image's maximum) and over those at most 0.2 as near (5x farther)."""
    disparity = batch["depth"]
    relative = disparity / disparity.amax(dim=(1, 2), keepdim=True)
    objects = torch.isin(
        batch["label"], torch.tensor([CITYSCAPES.class_names.index(n) for n in OBJECTS])
    )
    near, far = objects & (relative >= 0.5), objects & (relative > 0) & (relative <= 0.2)
    assert near.sum() > 100 and far.sum() > 100, "the scenes should hold both near and far objects"
    return proxgradcam[near].mean().item(), proxgradcam[far].mean().item()


@pytest.mark.parametrize(
    "config", [EEMConfig(), EEMConfig(mask="soft", target="max")], ids=["hard-sum", "soft-max"]
)
def test_proxgradcam_prefers_near_objects(scenes_and_model, config):
    batch, model = scenes_and_model
    result = score_batch(
        model, batch["image"], config, DatasetDepth(), batch["depth"], return_maps=True
    )
    near, far = _near_far_means(batch, result.maps.proxgradcam)
    assert near > 0.1 and near > 3 * far


def test_inverted_depth_loses_the_preference(scenes_and_model):
    """Control: with disparity misread as depth (far looks near) the same check fails."""
    batch, model = scenes_and_model
    disparity = batch["depth"]
    inverted = torch.where(
        disparity > 0, 1.0 / disparity.clamp(min=1e-3), torch.zeros_like(disparity)
    )
    result = score_batch(
        model, batch["image"], EEMConfig(), DatasetDepth(), inverted, return_maps=True
    )
    near, far = _near_far_means(batch, result.maps.proxgradcam)
    assert near < far
