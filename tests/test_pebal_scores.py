"""Anomaly scores: hand values, orientation (higher = more anomalous), Gaussian smoothing."""

import math

import pytest
import torch

from segxal.metrics import anomaly_metrics
from segxal.pebal.scores import (
    SCORE_METHODS,
    anomaly_score,
    energy_score,
    entropy_score,
    gaussian_blur,
    gaussian_kernel1d,
    max_logit_score,
    msp_score,
    smoothed_energy_score,
)

# two pixels (1x2 image), three classes: confident and flat
PIXELS = [[6.0, 0.0, -1.0], [0.3, 0.2, 0.1]]


def logits_of(pixels, extra=None):
    rows = [p + ([extra] if extra is not None else []) for p in pixels]
    return torch.tensor(rows, dtype=torch.float64).T.reshape(1, len(rows[0]), 1, len(rows))


def hand(pixel):
    top = max(pixel)
    lse = top + math.log(sum(math.exp(v - top) for v in pixel))
    p = [math.exp(v - lse) for v in pixel]
    return {
        "energy": -lse,
        "msp": 1 - max(p),
        "max_logit": -top,
        "entropy": -sum(q * math.log(q) for q in p),
    }


@pytest.mark.parametrize("abstention", [False, True])
def test_scores_match_hand_values_and_ignore_abstention(abstention):
    logits = logits_of(
        PIXELS, extra=25.0 if abstention else None
    )  # a huge abstention logit must not matter
    functions = {
        "energy": energy_score,
        "msp": msp_score,
        "max_logit": max_logit_score,
        "entropy": entropy_score,
    }
    for name, function in functions.items():
        score = function(logits, abstention=abstention)
        assert score.shape == (1, 1, 2) and score.dtype == torch.float64
        expected = [hand(p)[name] for p in PIXELS]
        assert score.flatten().tolist() == pytest.approx(expected, rel=1e-12), name
        # the flat pixel is the more anomalous one for every score
        assert score[0, 0, 1] > score[0, 0, 0], name
        assert torch.equal(anomaly_score(logits, name, abstention=abstention), score)


def test_gaussian_taps_and_reflect_padding_by_hand():
    w = [math.exp(-0.5 * k**2) for k in range(-3, 4)]
    w = [v / sum(w) for v in w]
    assert gaussian_kernel1d(7, 1.0, torch.float64, torch.device("cpu")).tolist() == pytest.approx(
        w, rel=1e-12
    )
    # impulse at column 1 of a 1x5 row, reflect padding maps columns -3..-1 to 3..1 and 5..7 to 3..1; out[c]
    # sums w[k+3] over offsets k with reflect(c+k) = 1. The single row is replicated vertically (unchanged).
    row = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    expected = [w[2] + w[4], w[1] + w[3], w[0] + w[2], w[1], w[0] + w[6]]
    assert gaussian_blur(row)[0, 0].tolist() == pytest.approx(expected, rel=1e-12)


def test_blur_preserves_constants_and_is_per_image():
    maps = torch.stack([torch.full((6, 5), 3.0), torch.zeros(6, 5)])
    maps[1, 2, 2] = 1.0
    out = gaussian_blur(maps)
    assert torch.allclose(out[0], torch.full((6, 5), 3.0))
    centre = math.exp(-0.0) / sum(math.exp(-0.5 * k**2) for k in range(-3, 4))
    assert out[1, 2, 2].item() == pytest.approx(
        centre**2, rel=1e-6
    )  # no reflection reaches (2, 2) itself
    assert torch.allclose(gaussian_blur(maps[1:]), out[1:], atol=1e-7)
    assert torch.equal(maps[1, 2, 2], torch.tensor(1.0))  # input not modified


def test_smoothed_energy_is_blurred_energy_with_config_kernel():
    logits = torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(
        smoothed_energy_score(logits, kernel_size=5, sigma=2.0),
        gaussian_blur(energy_score(logits), 5, 2.0),
    )
    assert torch.allclose(
        anomaly_score(logits, "smoothed_energy"), gaussian_blur(energy_score(logits))
    )


def test_scores_rank_a_flat_blob_as_anomalous():
    logits = torch.zeros(1, 3, 12, 12)
    logits[:, 0] = 8.0  # confident class 0 everywhere ...
    logits[:, :, 4:8, 4:8] = 0.0  # ... except a flat 4x4 blob
    labels = torch.zeros(1, 12, 12, dtype=torch.long)
    labels[:, 4:8, 4:8] = 1
    for method in SCORE_METHODS:
        metrics = anomaly_metrics(anomaly_score(logits, method), labels)
        assert metrics["auroc"] > 0.95, method


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown anomaly score 'foo'"):
        anomaly_score(torch.zeros(1, 2, 3, 3), "foo")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        energy_score(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="at least 2 channels"):
        msp_score(torch.zeros(1, 1, 3, 3), abstention=True)
    with pytest.raises(ValueError, match="positive odd"):
        gaussian_blur(torch.zeros(1, 3, 3), kernel_size=4)
