"""Entropy-based uncertainty (EBU): per-pixel Shannon entropy of the segmenter's softmax, in bits."""

from __future__ import annotations

import math

import torch


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_c p_c log2 p_c of ``softmax(logits, dim=1)``: (B, C, H, W) -> (B, H, W) in [0, log2 C].

    ``special.entr`` defines 0 log 0 = 0, so saturated or -inf logits give 0, not NaN.
    """
    _check_logits(logits)
    probabilities = torch.softmax(logits.float(), dim=1)
    bits = torch.special.entr(probabilities).sum(dim=1) / math.log(2.0)
    return bits.clamp(0.0, math.log2(logits.shape[1])).to(logits.dtype)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy divided by its maximum log2 C: (B, H, W) in [0, 1] (all zeros when C = 1)."""
    num_classes = logits.shape[1] if logits.dim() == 4 else 0
    entropy = pixel_entropy(logits)
    if num_classes < 2:
        return torch.zeros_like(entropy)
    return entropy / math.log2(num_classes)
