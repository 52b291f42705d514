"""Scoring a batch with the EEM: entropy, proximity, near region, ProxGradCAM, fusion, image scores."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from segxal.eem.bald import mc_probabilities, normalized_bald
from segxal.eem.config import EEMConfig
from segxal.eem.entropy import normalized_entropy
from segxal.eem.fusion import fuse_eem, image_scores, unit_max_per_image
from segxal.eem.gradcam import eval_mode, grad_cam
from segxal.eem.proximity import depth_informed_image, mask_weight, near_region
from segxal.eem.regions import extract_regions
from segxal.models.unet import UNet

if TYPE_CHECKING:
    from segxal.models.depth import DepthBackend


@dataclass(frozen=True)
class EEMMaps:
    """Per-pixel maps, each (B, H, W): ``prediction`` class ids, ``entropy`` the uncertainty term
    normalised to [0, 1] (the entropy, or BALD with ``eem.uncertainty: bald``),
    ``proximity`` (1 = nearest), ``near`` bool, ``proxgradcam`` in [0, 1], ``eem``."""

    prediction: torch.Tensor
    entropy: torch.Tensor
    proximity: torch.Tensor
    near: torch.Tensor
    proxgradcam: torch.Tensor
    eem: torch.Tensor

    def regions(
        self, config: EEMConfig, class_names: Sequence[str] | None = None
    ) -> list[list[dict]]:
        """Region records (see :func:`extract_regions`) for every image of the batch."""
        return [
            extract_regions(
                eem,
                prediction,
                config.region_threshold,
                config.min_region_area,
                config.max_regions,
                class_names,
                config.otsu_bins,
                uncertainty,
            )
            for eem, prediction, uncertainty in zip(
                self.eem.cpu(), self.prediction.cpu(), self.entropy.cpu(), strict=True
            )
        ]


@dataclass(frozen=True)
class EEMScores:
    """(B,) CPU tensors: the image ``score`` and diagnostics (mean normalised entropy, mean
    ProxGradCAM, fraction of near pixels); ``maps`` only when asked for."""

    score: torch.Tensor
    entropy: torch.Tensor
    proxgradcam: torch.Tensor
    near_fraction: torch.Tensor
    maps: EEMMaps | None = None

    def records(self, sample_ids: Sequence[str]) -> list[dict]:
        """One plain dict of scalars per image, keyed by ``sample_id``."""
        if len(sample_ids) != len(self.score):
            raise ValueError(f"sample_ids: {len(sample_ids)} ids for {len(self.score)} scores")
        columns = zip(
            sample_ids,
            self.score.tolist(),
            self.entropy.tolist(),
            self.proxgradcam.tolist(),
            self.near_fraction.tolist(),
            strict=False,
        )
        return [
            {"sample_id": str(sid), "score": s, "entropy": h, "proxgradcam": g, "near_fraction": n}
            for sid, s, h, g, n in columns
        ]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and ATen uses those kernels."""
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(hardware) and "AVX512" in torch.backends.cpu.get_cpu_capability()


_warned_slow_bf16 = False


def segmenter_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of an ``EEMConfig.precision`` on ``device`` (none for fp32). bf16 on a CPU
    without native bfloat16 runs, with a warning (once): there its matmuls are about 26 times slower
    than fp32 (measured on AVX2), so it costs time instead of saving it."""
    global _warned_slow_bf16
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cpu" and not _warned_slow_bf16:
        if not cpu_has_native_bf16():
            _warned_slow_bf16 = True
            warnings.warn(
                "eem.precision bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): its "
                "matmuls run about 26x slower than fp32 here; use eem.precision fp32",
                stacklevel=2,
            )
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"EEMConfig.precision fp16 needs a CUDA device, got {device}; use bf16 on CPU"
        )
    return torch.autocast(
        device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
    )


def score_batch(
    model: nn.Module,
    images: torch.Tensor,
    config: EEMConfig = EEMConfig(),
    depth_backend: DepthBackend | None = None,
    depth: torch.Tensor | None = None,
    anomaly: torch.Tensor | None = None,
    return_maps: bool = False,
) -> EEMScores:
    """EEM scores of ImageNet-normalised ``images`` (B, 3, H, W) under ``model`` (run in eval mode).

    ``depth``: the batch's disparity, for the ``dataset`` backend. ``anomaly``: (B, H, W) anomaly scores
    for the gamma term. Two forwards (the image for prediction and entropy, the depth-informed image for
    Grad-CAM) and one backward per batch, in ``config.precision``, on channels-last images (the same
    numbers, faster convolutions on CPU). With alpha = 0 no depth or Grad-CAM is computed (without a
    backend, proximity and near are then zeros).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    arithmetic = segmenter_precision(config.precision, images.device)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), eval_mode(model), arithmetic:
        logits = model(images).float()
    entropy = normalized_entropy(logits)
    if config.uncertainty == "bald":
        if not isinstance(model, UNet):
            raise ValueError("eem.uncertainty bald samples a segxal UNet with dropout")
        with arithmetic:
            entropy = normalized_bald(mc_probabilities(model, images, config.mc_samples))
    prediction = logits.argmax(dim=1)
    explain = config.alpha > 0
    if depth_backend is None and explain:
        raise ValueError(
            "depth_backend: needed when alpha > 0 (build one with build_depth_backend)"
        )
    if depth_backend is not None and (explain or return_maps):
        proximity = depth_backend.proximity(images, depth).to(images.device)
        near = near_region(
            proximity, config.threshold, config.quantile, config.fixed, config.otsu_bins
        )
    else:
        proximity = torch.zeros_like(entropy)
        near = torch.zeros_like(entropy, dtype=torch.bool)
    if explain:
        informed = depth_informed_image(images, proximity, near, config.mask)
        with arithmetic:
            proxgradcam = grad_cam(
                model, informed, config.target_layer, prediction, near, config.target
            ).float()
        if config.gate_cam:
            proxgradcam = unit_max_per_image(
                proxgradcam * mask_weight(proximity, near, config.mask)
            )
    else:
        proxgradcam = torch.zeros_like(entropy)
    eem = fuse_eem(proxgradcam, entropy, config.alpha, config.beta, config.gamma, anomaly)
    maps = EEMMaps(prediction, entropy, proximity, near, proxgradcam, eem) if return_maps else None
    return EEMScores(
        score=image_scores(eem, config.reduction, config.topk_percent).detach().float().cpu(),
        entropy=entropy.mean(dim=(1, 2)).float().cpu(),
        proxgradcam=proxgradcam.mean(dim=(1, 2)).float().cpu(),
        near_fraction=near.float().mean(dim=(1, 2)).cpu(),
        maps=maps,
    )


class EEMScorer:
    """A model, an EEM config and a depth backend, scoring dataset batches (dicts with ``image`` and,
    for the ``dataset`` backend, ``depth``) on ``device``."""

    def __init__(
        self,
        model: nn.Module,
        config: EEMConfig = EEMConfig(),
        depth_backend: DepthBackend | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from segxal.models.depth import (
            build_depth_backend,
        )  # not at import: segxal.models.depth imports eem

        self.model = model.to(device)
        self.config = config
        self.device = torch.device(device)
        self.depth_backend = depth_backend or build_depth_backend(config.depth, self.device)

    def __call__(
        self, batch: dict, return_maps: bool = False, anomaly: torch.Tensor | None = None
    ) -> EEMScores:
        depth = batch.get("depth")
        return score_batch(
            self.model,
            batch["image"].to(self.device),
            self.config,
            self.depth_backend,
            None if depth is None else depth.to(self.device),
            None if anomaly is None else anomaly.to(self.device),
            return_maps,
        )
