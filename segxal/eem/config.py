"""Settings of the Explainable Error Mask (EEM), as frozen dataclasses.

Only int, float, str, bool, Literal, ``X | None``, tuple and nested frozen dataclasses are used, so the
experiment YAML loader can build them (``EEMConfig`` is the ``eem:`` section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DepthBackendName = Literal["midas", "dinov2", "dataset", "geometric"]
DepthConvention = Literal["auto", "inverse_depth", "depth"]

DEFAULT_CHECKPOINTS = {
    "midas": "Intel/dpt-hybrid-midas",
    "dinov2": "facebook/dpt-dinov2-small-kitti",
}


def _check_range(
    owner: str,
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{owner}.{name} must be in {left}{low}, {high}{right}, got {value!r}")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class DepthConfig:
    """Which depth model gives the proximity map.

    ``backend``: ``midas`` (DPT, inverse depth), ``dinov2`` (DPT with a DINOv2 backbone or Depth
    Anything), ``dataset`` (the disparity shipped with the data), ``geometric`` (a ground-plane prior, no
    weights: a fallback). ``checkpoint``: hub id or local folder (None = the backend's default id).
    ``convention``: what the model outputs (midas/dinov2 only); ``auto`` reads it from the checkpoint's
    config.
    ``input_size``: model input resolution, None = the checkpoint's own ``image_size``. Plain-ViT DPT
    takes an ``input_size`` square; DINOv2 backbones take ``input_size`` on the short side, keeping the
    aspect ratio; both rounded to the patch size. DPT-hybrid only runs at its configured size.
    ``download``: fetch a hub id missing from the local cache (only where the hub is reachable).
    ``horizon``: for ``geometric``, the horizon row as a fraction of the image height.
    """

    backend: DepthBackendName = "dataset"
    checkpoint: str | None = None
    convention: DepthConvention = "auto"
    input_size: int | None = None
    download: bool = False
    horizon: float = 0.45

    def __post_init__(self) -> None:
        _check_choice(
            "DepthConfig", "backend", self.backend, ("midas", "dinov2", "dataset", "geometric")
        )
        _check_choice(
            "DepthConfig", "convention", self.convention, ("auto", "inverse_depth", "depth")
        )
        if self.input_size is not None and self.input_size < 14:
            raise ValueError(f"DepthConfig.input_size must be >= 14, got {self.input_size}")
        _check_range("DepthConfig", "horizon", self.horizon, 0.0, 1.0, high_open=True)
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ValueError(
                "DepthConfig.checkpoint must be a hub id or folder path, or null for the default"
            )

    @property
    def resolved_checkpoint(self) -> str | None:
        """The checkpoint to load: the configured one or the backend's default id."""
        return self.checkpoint or DEFAULT_CHECKPOINTS.get(self.backend)


@dataclass(frozen=True)
class EEMConfig:
    """EEM = alpha * ProxGradCAM + beta * normalised entropy + gamma * normalised anomaly score.

    Near region: ``threshold`` on proximity per image (``otsu``; ``quantile``: pixels above the
    ``quantile`` of the image's proximity; ``fixed``: proximity >= ``fixed``). Depth-informed image:
    ``mask`` ``hard`` (image * near) or ``soft`` (image * proximity). Grad-CAM at ``target_layer``
    (None = the model's last decoder block) for the predicted classes inside the near region, either the
    ``sum`` of their logits over the region or per-class maps combined by ``max``. ``gate_cam``: multiply
    the Grad-CAM map by the weight that built the depth-informed image (near mask or proximity) and
    rescale to max 1: pixels whose input was removed carry no evidence, and Grad-CAM would otherwise
    give them whatever the masked baseline's features score. Image score:
    ``reduction`` ``mean`` or ``topk`` (mean of the top ``topk_percent`` % pixels). Regions: connected
    areas with EEM >= ``region_threshold`` and at least ``min_region_area`` pixels, at most
    ``max_regions`` per image (largest peak first). ``region_threshold``: an EEM value (the EEM lies in
    [0, alpha+beta+gamma]), or ``otsu``: each image's Otsu edge over its EEM's range, for an EEM whose
    scale is not the entropy's (with ``uncertainty: bald`` the MC-dropout mutual information is often
    far below 0.01, so no pixel reaches 0.5 and no image has a region).
    ``precision``: the segmenter's arithmetic while scoring: ``fp32`` (exact, the default), or autocast to
    ``bf16`` (CPUs with native bfloat16, e.g. AVX512-BF16 or AMX, and GPUs) or ``fp16`` (GPUs only):
    faster where bfloat16 is native, with scores within 3e-3 of fp32 (the ranking kept; bench/RESULTS.md);
    maps and scores stay float32. On a CPU without native bfloat16, bf16 is about 26x slower: a warning
    says so. ``uncertainty``: the EEM's uncertainty term, the normalised ``entropy`` or ``bald`` (MC-dropout
    mutual information over ``mc_samples`` stochastic forwards, batched; needs ``model.dropout`` > 0);
    ``mc_samples`` is also what the ``bald`` strategy samples.
    """

    alpha: float = 0.5
    beta: float = 0.5
    gamma: float = 0.0
    depth: DepthConfig = field(default_factory=DepthConfig)
    threshold: Literal["otsu", "quantile", "fixed"] = "otsu"
    quantile: float = 0.7
    fixed: float = 0.5
    otsu_bins: int = 64
    mask: Literal["hard", "soft"] = "hard"
    target_layer: str | None = None
    target: Literal["sum", "max"] = "sum"
    gate_cam: bool = True
    reduction: Literal["mean", "topk"] = "mean"
    topk_percent: float = 10.0
    region_threshold: float | Literal["otsu"] = 0.5
    min_region_area: int = 16
    max_regions: int = 10
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    uncertainty: Literal["entropy", "bald"] = "entropy"
    mc_samples: int = 8

    def __post_init__(self) -> None:
        if self.mc_samples < 2:
            raise ValueError(f"EEMConfig.mc_samples must be >= 2, got {self.mc_samples}")
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"EEMConfig.{name} must be >= 0, got {value!r}")
        if self.alpha + self.beta + self.gamma <= 0:
            raise ValueError("EEMConfig.alpha + beta + gamma must be > 0")
        if not isinstance(self.depth, DepthConfig):
            raise ValueError(
                f"EEMConfig.depth must be a DepthConfig, got {type(self.depth).__name__}"
            )
        _check_choice("EEMConfig", "threshold", self.threshold, ("otsu", "quantile", "fixed"))
        _check_choice("EEMConfig", "mask", self.mask, ("hard", "soft"))
        _check_choice("EEMConfig", "target", self.target, ("sum", "max"))
        _check_choice("EEMConfig", "reduction", self.reduction, ("mean", "topk"))
        _check_choice("EEMConfig", "precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_range(
            "EEMConfig", "quantile", self.quantile, 0.0, 1.0, low_open=True, high_open=True
        )
        _check_range("EEMConfig", "fixed", self.fixed, 0.0, 1.0)
        if self.otsu_bins < 2:
            raise ValueError(f"EEMConfig.otsu_bins must be >= 2, got {self.otsu_bins}")
        _check_range("EEMConfig", "topk_percent", self.topk_percent, 0.0, 100.0, low_open=True)
        if self.region_threshold != "otsu" and not (
            isinstance(self.region_threshold, int | float) and self.region_threshold >= 0
        ):
            raise ValueError(
                f"EEMConfig.region_threshold must be >= 0 or 'otsu', got {self.region_threshold!r}"
            )
        if self.min_region_area < 1:
            raise ValueError(f"EEMConfig.min_region_area must be >= 1, got {self.min_region_area}")
        if self.max_regions < 1:
            raise ValueError(f"EEMConfig.max_regions must be >= 1, got {self.max_regions}")
        if self.target_layer is not None and not self.target_layer.strip():
            raise ValueError(
                "EEMConfig.target_layer must be a layer name or null for the last decoder block"
            )
