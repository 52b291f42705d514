"""Near region from a proximity map (1 = nearest) and the depth-informed image built from it."""

from __future__ import annotations

import math
from typing import Literal

import torch


def _check_maps(name: str, maps: torch.Tensor) -> None:
    if maps.dim() != 3:
        raise ValueError(f"{name} must be (B, H, W), got shape {tuple(maps.shape)}")


def otsu_threshold(proximity: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Per-image Otsu threshold of (B, H, W) values in [0, 1]: the bin edge t maximising the
    between-class variance of {< t} and {>= t}; +inf where no split exists (a flat map)."""
    _check_maps("proximity", proximity)
    batch = proximity.shape[0]
    values = proximity.reshape(batch, -1).float()
    index = (values.clamp(0.0, 1.0) * bins).long().clamp_(max=bins - 1)
    hist = torch.zeros(batch, bins, device=values.device).scatter_add_(
        1, index, torch.ones_like(values)
    )
    prob = hist / values.shape[1]
    centers = (torch.arange(bins, device=values.device, dtype=torch.float32) + 0.5) / bins
    omega = prob.cumsum(1)[:, :-1]  # weight of the far class for a split after bin k
    mu = (prob * centers).cumsum(1)[:, :-1]
    mu_total = (prob * centers).sum(1, keepdim=True)
    valid = (omega > 0) & (omega < 1)
    between = (mu_total * omega - mu) ** 2 / (omega * (1 - omega)).clamp(min=1e-12)
    between = torch.where(valid, between, torch.full_like(between, -1.0))
    best = between.argmax(1)
    threshold = (best + 1).float() / bins
    has_split = valid.any(1)
    return torch.where(has_split, threshold, torch.full_like(threshold, math.inf)).to(
        proximity.dtype
    )


def near_region(
    proximity: torch.Tensor,
    method: Literal["otsu", "quantile", "fixed"] = "otsu",
    quantile: float = 0.7,
    fixed: float = 0.5,
    bins: int = 64,
) -> torch.Tensor:
    """(B, H, W) bool near mask, one threshold per image.

    ``otsu``: proximity >= the Otsu edge; ``quantile``: proximity > the image's ``quantile`` (strict,
    so a flat far background tied at the quantile stays far); ``fixed``: proximity >= ``fixed``.
    """
    _check_maps("proximity", proximity)
    if method == "otsu":
        return proximity >= otsu_threshold(proximity, bins)[:, None, None]
    if method == "quantile":
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        flat = proximity.reshape(proximity.shape[0], -1)
        k = min(max(1, math.ceil(quantile * flat.shape[1])), flat.shape[1])
        threshold = flat.kthvalue(k, dim=1).values
        return proximity > threshold[:, None, None]
    if method == "fixed":
        return proximity >= fixed
    raise ValueError(f"threshold method must be otsu, quantile or fixed, got {method!r}")


def mask_weight(
    proximity: torch.Tensor, near: torch.Tensor, mode: Literal["hard", "soft"] = "hard"
) -> torch.Tensor:
    """(B, H, W) float weight of the depth-informed image: the near mask (``hard``) or the proximity."""
    if proximity.shape != near.shape:
        raise ValueError(
            f"near shape {tuple(near.shape)} does not match proximity {tuple(proximity.shape)}"
        )
    if mode == "hard":
        return near.to(proximity.dtype)
    if mode == "soft":
        return proximity
    raise ValueError(f"mask mode must be hard or soft, got {mode!r}")


def depth_informed_image(
    images: torch.Tensor,
    proximity: torch.Tensor,
    near: torch.Tensor,
    mode: Literal["hard", "soft"] = "hard",
) -> torch.Tensor:
    """The depth-informed image: the ImageNet-normalised (B, 3, H, W) tensor times the near mask
    (``hard``) or the proximity (``soft``).

    Weighting the normalised tensor fades masked pixels to 0, the dataset-mean colour: the usual
    no-information baseline of occlusion-style explanations, which feeds (almost) nothing into the first
    layer. Black in pixel space would instead be a strong input of its own (dark road, shadow).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if proximity.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"proximity shape {tuple(proximity.shape)} does not match images {tuple(images.shape)}"
        )
    return images * mask_weight(proximity, near, mode).to(images.dtype)[:, None]
