"""BALD (Houlsby et al. 2011; Gal et al. 2017) with MC dropout: per pixel, the mutual information between
the prediction and the model's weights, H(mean_t p_t) - mean_t H(p_t), over T stochastic forwards."""

from __future__ import annotations

import math

import torch

from segxal.models.unet import UNet, mc_dropout


@torch.no_grad()
def mc_probabilities(model: UNet, images: torch.Tensor, samples: int) -> torch.Tensor:
    """(T, B, C, H, W) softmax probabilities of ``samples`` forwards with dropout active (BatchNorm in
    eval), batched: the batch is repeated T times and goes through the model once."""
    if samples < 2:
        raise ValueError(f"MC dropout needs at least 2 samples, got {samples}")
    if model.config.dropout == 0.0:
        raise ValueError("BALD needs a model with dropout (model.dropout > 0): without it the T "
                         "forwards agree and BALD is 0 everywhere")  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        with mc_dropout(model):
            logits = model(images.repeat(samples, 1, 1, 1)).float()
    finally:
        model.train(was_training)
    return torch.softmax(logits, dim=1).reshape(samples, images.shape[0], *logits.shape[1:])


def bald(probabilities: torch.Tensor) -> torch.Tensor:
    """(T, B, C, H, W) probabilities -> (B, H, W) mutual information in nats, in [0, log C]."""
    if probabilities.dim() != 5:
        raise ValueError(f"probabilities must be (T, B, C, H, W), got {tuple(probabilities.shape)}")
    mean_entropy = torch.special.entr(probabilities).sum(dim=2).mean(dim=0)
    entropy_of_mean = torch.special.entr(probabilities.mean(dim=0)).sum(dim=1)
    return (entropy_of_mean - mean_entropy).clamp_min(0.0)


def normalized_bald(probabilities: torch.Tensor) -> torch.Tensor:
    """BALD divided by its maximum log C: (B, H, W) in [0, 1], like the normalised entropy."""
    classes = probabilities.shape[2]
    return bald(probabilities) / math.log(classes) if classes > 1 else bald(probabilities) * 0
