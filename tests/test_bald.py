"""BALD with MC dropout: known answers, the batched sampling, the U-Net's dropout, and BALD as the EEM's
uncertainty term and as a strategy."""

import math

import numpy as np
import pytest
import torch

from orchestrator.config import load_experiment
from orchestrator.strategies import ScoreKind, get_strategy
from segxal.eem.bald import bald, mc_probabilities, normalized_bald
from segxal.eem.config import EEMConfig
from segxal.eem.pipeline import score_batch
from segxal.models.unet import UNet, UNetConfig


def entropy_by_hand(p: np.ndarray) -> np.ndarray:
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=-1)


def test_bald_is_zero_when_every_sample_agrees():
    p = torch.softmax(torch.randn(1, 2, 5, 3, 4), dim=2).repeat(6, 1, 1, 1, 1)
    assert torch.allclose(bald(p), torch.zeros(2, 3, 4), atol=1e-6)  # float32 rounding


def test_bald_on_a_two_class_toy_by_hand():
    # one pixel, two samples that disagree: (0.9, 0.1) and (0.1, 0.9)
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64).reshape(2, 1, 2, 1, 1)
    expected = math.log(2) - (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))  # 0.36806
    assert bald(p).item() == pytest.approx(expected, rel=1e-12)
    assert normalized_bald(p).item() == pytest.approx(expected / math.log(2), rel=1e-12)


def test_bald_matches_the_definition_on_random_samples():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 2, 4, 3, 3))
    p = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    moved = np.moveaxis(p, 2, -1)  # (T, B, H, W, C)
    expected = entropy_by_hand(moved.mean(axis=0)) - entropy_by_hand(moved).mean(axis=0)
    np.testing.assert_allclose(bald(torch.tensor(p)).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.fixture
def dropout_model():
    torch.manual_seed(0)
    config = UNetConfig(num_classes=4, width=4, depth=2, dropout=0.5, dropout_at=("bottleneck", "decoder.1"))  # fmt: skip
    return UNet(config).eval()


def test_mc_sampling_is_one_batched_forward_with_batchnorm_frozen(dropout_model):
    images = torch.randn(3, 3, 16, 16)
    stats = {k: v.clone() for k, v in dropout_model.state_dict().items() if "running" in k}
    calls = []
    hook = dropout_model.head.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    p = mc_probabilities(dropout_model, images, samples=5)
    hook.remove()
    assert calls == [15] and p.shape == (5, 3, 4, 16, 16)  # 5 x 3 images in one forward
    assert not dropout_model.training and not dropout_model.mc_sampling
    assert all(torch.equal(v, dropout_model.state_dict()[k]) for k, v in stats.items())
    assert not torch.allclose(p[0], p[1])  # dropout was active
    with torch.no_grad():
        assert torch.equal(dropout_model(images), dropout_model(images))  # and is off again
    assert torch.allclose(p.sum(dim=2), torch.ones(5, 3, 16, 16))


def test_bald_needs_dropout():
    with pytest.raises(ValueError, match="needs a model with dropout"):
        mc_probabilities(UNet(UNetConfig(num_classes=2, width=4, depth=2)), torch.randn(1, 3, 8, 8), 4)  # fmt: skip
    with pytest.raises(ValueError, match=r"dropout_at: \['decoder.7'\] are not blocks"):
        UNetConfig(num_classes=2, depth=2, dropout=0.2, dropout_at=("decoder.7",))
    with pytest.raises(ValueError, match="model.dropout: BALD"):
        load_experiment(None, ["al.strategy=bald"])
    with pytest.raises(ValueError, match="model.dropout: BALD"):
        load_experiment(None, ["eem.uncertainty=bald"])
    assert load_experiment(None, ["al.strategy=bald", "model.dropout=0.2"]).model.dropout == 0.2


def test_a_checkpoint_keeps_the_dropout(dropout_model):
    restored = UNet.from_checkpoint(dropout_model.to_checkpoint())
    assert restored.config == dropout_model.config


def test_the_eem_takes_bald_as_its_uncertainty_term(dropout_model):
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(7)
    expected = normalized_bald(mc_probabilities(dropout_model, images, 6))
    config = EEMConfig(alpha=0.0, beta=1.0, uncertainty="bald", mc_samples=6)
    torch.manual_seed(7)
    result = score_batch(dropout_model, images, config, return_maps=True)
    torch.testing.assert_close(result.maps.entropy, expected)
    torch.testing.assert_close(result.score, expected.mean(dim=(1, 2)))


def test_the_bald_strategy_ranks_by_mean_bald():
    strategy = get_strategy("bald")
    assert strategy.score_kind is ScoreKind.BALD and strategy.region_source == "cells"
