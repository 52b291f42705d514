import math

import pytest
import torch

from segxal.eem.config import DepthConfig, EEMConfig
from segxal.eem.entropy import normalized_entropy, pixel_entropy


@pytest.mark.parametrize("num_classes", [2, 5, 19])
def test_uniform_entropy_is_log2_c_and_normalised_one(num_classes):
    logits = torch.full((2, num_classes, 3, 4), 0.7)
    assert torch.allclose(
        pixel_entropy(logits), torch.full((2, 3, 4), math.log2(num_classes)), atol=1e-5
    )
    assert torch.allclose(normalized_entropy(logits), torch.ones(2, 3, 4), atol=1e-6)


def test_one_hot_entropy_is_zero_even_with_infinite_logits():
    logits = torch.full((1, 4, 2, 2), -math.inf)
    logits[:, 2] = 0.0
    assert torch.equal(pixel_entropy(logits), torch.zeros(1, 2, 2))
    saturated = torch.zeros(1, 4, 2, 2)
    saturated[:, 1] = 1e4
    assert torch.allclose(pixel_entropy(saturated), torch.zeros(1, 2, 2), atol=1e-6)


def test_known_distribution_entropy_in_bits():
    probabilities = torch.tensor([0.5, 0.25, 0.25])  # H = 1.5 bits
    logits = probabilities.log().view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    assert torch.allclose(pixel_entropy(logits), torch.full((1, 2, 2), 1.5), atol=1e-5)
    assert torch.allclose(
        normalized_entropy(logits), torch.full((1, 2, 2), 1.5 / math.log2(3)), atol=1e-5
    )


def test_entropy_does_not_mutate_and_rejects_bad_shapes():
    logits = torch.randn(1, 3, 4, 4)
    before = logits.clone()
    pixel_entropy(logits)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="logits"):
        pixel_entropy(torch.randn(3, 4, 4))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"alpha": -0.1}, "alpha"),
        ({"threshold": "median"}, "threshold"),
        ({"quantile": 1.0}, "quantile"),
        ({"topk_percent": 0.0}, "topk_percent"),
        ({"min_region_area": 0}, "min_region_area"),
        ({"alpha": 0.0, "beta": 0.0}, "alpha"),
        ({"mask": "blur"}, "mask"),
        ({"target": "mean"}, "target"),
    ],
)
def test_eem_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EEMConfig(**kwargs)


def test_depth_config_validation_and_default_checkpoints():
    with pytest.raises(ValueError, match="backend"):
        DepthConfig(backend="zoe")
    with pytest.raises(ValueError, match="input_size"):
        DepthConfig(input_size=4)
    assert DepthConfig(backend="midas").resolved_checkpoint == "Intel/dpt-hybrid-midas"
    assert DepthConfig(backend="dinov2").resolved_checkpoint == "facebook/dpt-dinov2-small-kitti"
    assert (
        DepthConfig(backend="midas", checkpoint="/models/dpt").resolved_checkpoint == "/models/dpt"
    )
    assert DepthConfig(backend="dataset").resolved_checkpoint is None
