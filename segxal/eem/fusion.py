"""EEM = alpha * ProxGradCAM + beta * normalised entropy (+ gamma * normalised anomaly score), and the
reduction of an EEM map to one score per image."""

from __future__ import annotations

import math
from typing import Literal

import torch


def minmax_per_image(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> each image scaled to [0, 1]; flat images become 0."""
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(
        span > 0,
        (maps - low) / span.clamp(min=torch.finfo(maps.dtype).tiny),
        torch.zeros_like(maps),
    )


def unit_max_per_image(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) non-negative maps -> each image divided by its maximum (all-zero images stay 0)."""
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    peak = maps.amax(dim=(1, 2), keepdim=True)
    return torch.where(
        peak > 0, maps / peak.clamp(min=torch.finfo(maps.dtype).tiny), torch.zeros_like(maps)
    )


def fuse_eem(
    proxgradcam: torch.Tensor,
    entropy: torch.Tensor,
    alpha: float = 0.5,
    beta: float = 0.5,
    gamma: float = 0.0,
    anomaly: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, W) EEM from ProxGradCAM and entropy, both already in [0, 1]. ``anomaly`` (higher = more
    anomalous, e.g. PEBAL's energy) is min-max normalised per image and weighted by ``gamma``."""
    if proxgradcam.shape != entropy.shape:
        raise ValueError(
            f"proxgradcam shape {tuple(proxgradcam.shape)} != entropy shape {tuple(entropy.shape)}"
        )
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    eem = alpha * proxgradcam + beta * entropy
    if gamma > 0:
        if anomaly is None:
            raise ValueError("anomaly: gamma > 0 needs an anomaly score map")
        if anomaly.shape != entropy.shape:
            raise ValueError(
                f"anomaly shape {tuple(anomaly.shape)} != entropy shape {tuple(entropy.shape)}"
            )
        eem = eem + gamma * minmax_per_image(anomaly.to(eem.dtype))
    return eem


def image_scores(
    eem: torch.Tensor, reduction: Literal["mean", "topk"] = "mean", topk_percent: float = 10.0
) -> torch.Tensor:
    """(B, H, W) -> (B,) scores: the mean, or the mean of the top ``topk_percent`` % pixels."""
    if eem.dim() != 3:
        raise ValueError(f"eem must be (B, H, W), got shape {tuple(eem.shape)}")
    flat = eem.reshape(eem.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "topk":
        if not 0 < topk_percent <= 100:
            raise ValueError(f"topk_percent must be in (0, 100], got {topk_percent}")
        # rounded first: 375 * 17.6 / 100 is 66.00000000000001 in floating point, and 66 pixels are 17.6 %
        k = max(1, math.ceil(round(flat.shape[1] * topk_percent / 100, 9)))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"reduction must be mean or topk, got {reduction!r}")
