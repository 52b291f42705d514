"""Depth backends: each turns a batch of images into a proximity map in [0, 1] (1 = nearest).

- ``midas``: transformers ``DPTForDepthEstimation`` with a ViT or hybrid backbone (``Intel/dpt-hybrid-midas``,
  ``Intel/dpt-large``); outputs relative inverse depth.
- ``dinov2``: ``DPTForDepthEstimation`` with a DINOv2 backbone (``facebook/dpt-dinov2-small-kitti``, metric
  depth) or ``DepthAnythingForDepthEstimation`` (relative inverse depth, or metric per its config).
- ``dataset``: the disparity shipped with the data (0 = unknown, taken as infinitely far).
- ``geometric``: a flat-ground perspective prior, no weights and no data: a fallback when neither a depth
  model nor dataset depth is available. Its proximity is the same for every image.

Checkpoints load from a local folder or a hub id through ``from_pretrained(..., local_files_only=True)``
(``download`` lifts that where the hub is reachable). Inverse depth becomes proximity by per-image min-max;
metric depth is inverted (1 / depth) first, so the nearest pixel gets 1 in both conventions.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from segxal.data.transforms import denormalize
from segxal.eem.config import DepthConfig
from segxal.eem.fusion import minmax_per_image

Convention = Literal["inverse_depth", "depth"]
DPT_DEFAULT_MEAN = (0.5, 0.5, 0.5)
DPT_DEFAULT_STD = (0.5, 0.5, 0.5)
MIN_METRIC_DEPTH = 1e-3  # metres; keeps 1 / depth finite where a metric head outputs 0


class DepthCheckpointError(FileNotFoundError):
    """A depth checkpoint cannot be found offline; the message names it and says how to provide it."""


def to_proximity(prediction: torch.Tensor, convention: Convention) -> torch.Tensor:
    """(B, H, W) model output -> proximity in [0, 1] per image, nearest pixel = 1 (flat maps give 0)."""
    if prediction.dim() != 3:
        raise ValueError(f"depth prediction must be (B, H, W), got shape {tuple(prediction.shape)}")
    if convention == "inverse_depth":
        return minmax_per_image(prediction.float())
    if convention == "depth":
        return minmax_per_image(1.0 / prediction.float().clamp(min=MIN_METRIC_DEPTH))
    raise ValueError(f"depth convention must be inverse_depth or depth, got {convention!r}")


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")


class DepthBackend(ABC):
    """``proximity(images, depth)``: ImageNet-normalised (B, 3, H, W) images (and, for ``dataset``, the
    batch's (B, H, W) disparity) -> (B, H, W) proximity in [0, 1] on the images' device."""

    name: str
    convention: Convention
    needs_depth: bool = False

    @abstractmethod
    def proximity(
        self, images: torch.Tensor, depth: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class DatasetDepth(DepthBackend):
    """Disparity shipped with the data; unknown (0, e.g. sky) is treated as infinitely far."""

    name = "dataset"
    convention = "inverse_depth"
    needs_depth = True

    def proximity(self, images: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(images)
        if depth is None:
            raise ValueError(
                "depth: the 'dataset' depth backend needs the batch's disparity "
                "(build the dataset with load_depth=True)"
            )
        if tuple(depth.shape) != (images.shape[0], *images.shape[-2:]):
            raise ValueError(
                f"depth shape {tuple(depth.shape)} does not match images {tuple(images.shape)}"
            )
        disparity = depth.to(images.device).float()
        disparity = torch.where(
            torch.isfinite(disparity) & (disparity > 0), disparity, torch.zeros_like(disparity)
        )
        return to_proximity(disparity, "inverse_depth")


class GeometricDepth(DepthBackend):
    """Flat ground seen by a level camera: below the horizon row v0 the ground's inverse depth grows
    linearly with (v - v0); above it proximity is 0. Image content is ignored."""

    name = "geometric"
    convention = "inverse_depth"

    def __init__(self, horizon: float = 0.45) -> None:
        if not 0.0 <= horizon < 1.0:
            raise ValueError(f"horizon must be in [0, 1), got {horizon}")
        self.horizon = horizon

    def proximity(self, images: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(images)
        batch, _, height, width = images.shape
        rows = torch.arange(height, device=images.device, dtype=torch.float32)
        inverse_depth = (rows - self.horizon * (height - 1)).clamp(min=0)
        return to_proximity(
            inverse_depth[None, :, None].expand(batch, height, width), "inverse_depth"
        )


def _architecture(config) -> str:
    """``vit`` (square input), ``hybrid`` (fixed input) or ``dinov2`` (any patch multiple)."""
    if config.model_type == "depth_anything":
        return "dinov2"
    if config.model_type != "dpt":
        raise ValueError(
            f"model type {config.model_type!r} is not a DPT or Depth Anything depth model"
        )
    if config.is_hybrid:
        return "hybrid"
    backbone = getattr(config, "backbone_config", None)
    if backbone is None:
        return "vit"
    if backbone.model_type == "dinov2":
        return "dinov2"
    raise ValueError(
        f"DPT with a {backbone.model_type!r} backbone is not supported (ViT, hybrid or DINOv2)"
    )


def checkpoint_convention(config) -> Convention:
    """What a transformers depth config outputs: Depth Anything per ``depth_estimation_type``; DPT with
    a DINOv2 backbone is a metric head (KITTI/NYU); MiDaS-style DPT outputs relative inverse depth."""
    if config.model_type == "depth_anything":
        return "depth" if config.depth_estimation_type == "metric" else "inverse_depth"
    return "depth" if _architecture(config) == "dinov2" else "inverse_depth"


def _how_to_provide(checkpoint: str) -> str:
    return (
        f"To provide it, on a machine with internet run\n"
        f'  python -c "from transformers import AutoModelForDepthEstimation as M, AutoImageProcessor as P; '
        f"M.from_pretrained('{checkpoint}').save_pretrained('DIR'); P.from_pretrained('{checkpoint}').save_pretrained('DIR')\"\n"
        f"copy DIR to this machine and set eem.depth.checkpoint: DIR in the experiment config "
        f"(or eem.depth.download: true where the Hugging Face hub is reachable)."
    )


def _normalisation(
    checkpoint: str, local_only: bool
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std from the checkpoint's ``preprocessor_config.json`` if it has one, else DPT's 0.5/0.5."""
    folder = Path(checkpoint).expanduser()
    path: str | Path | None
    if folder.is_dir():
        path = folder / "preprocessor_config.json"
        path = path if path.is_file() else None
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(checkpoint, "preprocessor_config.json")
        path = cached if isinstance(cached, str) else None
        if path is None and not local_only:
            try:
                path = hf_hub_download(checkpoint, "preprocessor_config.json")
            except Exception:  # the checkpoint ships no processor config: DPT defaults apply
                path = None
    if path is None:
        return DPT_DEFAULT_MEAN, DPT_DEFAULT_STD
    settings = json.loads(Path(path).read_text())
    if settings.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def triple(value, default):
        value = default if value is None else value
        return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))

    return triple(settings.get("image_mean"), DPT_DEFAULT_MEAN), triple(
        settings.get("image_std"), DPT_DEFAULT_STD
    )


def load_depth_model(
    checkpoint: str, backend: str, download: bool = False
) -> tuple[nn.Module, str]:
    """(model in eval mode, architecture) from a hub id or local folder, checked against ``backend``."""
    from transformers import AutoConfig, DepthAnythingForDepthEstimation, DPTForDepthEstimation

    local_only = not download
    try:
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise DepthCheckpointError(
            f"depth checkpoint {checkpoint!r} (backend {backend!r}) cannot be loaded: it is not a local folder "
            f"with a config.json, nor in the local Hugging Face cache ({error}).\n{_how_to_provide(checkpoint)}"
        ) from error
    architecture = _architecture(config)
    if backend == "midas" and architecture == "dinov2":
        raise ValueError(
            f"eem.depth.checkpoint {checkpoint!r} has a DINOv2 backbone: use backend 'dinov2'"
        )
    if backend == "dinov2" and architecture != "dinov2":
        raise ValueError(
            f"eem.depth.checkpoint {checkpoint!r} is a MiDaS-style DPT ({architecture}): use backend 'midas'"
        )
    model_class = (
        DepthAnythingForDepthEstimation
        if config.model_type == "depth_anything"
        else DPTForDepthEstimation
    )
    try:
        model = model_class.from_pretrained(checkpoint, config=config, local_files_only=local_only)
    except OSError as error:
        raise DepthCheckpointError(
            f"depth checkpoint {checkpoint!r} (backend {backend!r}) has a config but its weights cannot be "
            f"loaded offline ({error}).\n{_how_to_provide(checkpoint)}"
        ) from error
    return model.eval(), architecture


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


class TransformersDepth(DepthBackend):
    """A transformers depth model with torch preprocessing: undo ImageNet normalisation, resize to the
    model's input geometry, apply the checkpoint's mean/std, predict, resize back to the image."""

    def __init__(
        self,
        model: nn.Module,
        architecture: str,
        name: str,
        convention: Convention,
        mean: tuple[float, ...] = DPT_DEFAULT_MEAN,
        std: tuple[float, ...] = DPT_DEFAULT_STD,
        input_size: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.architecture = architecture
        self.name = name
        self.convention = convention
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        config: Any = model.config  # a transformers config; its fields depend on the architecture
        if architecture == "dinov2":
            backbone = config.backbone_config
            self.patch = int(
                config.patch_size if config.model_type == "depth_anything" else backbone.patch_size
            )
            native = backbone.image_size
        else:
            patch = config.patch_size
            self.patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
            native = config.image_size
        native = int(native[0] if isinstance(native, (list, tuple)) else native)
        if architecture == "hybrid" and input_size not in (None, native):
            raise ValueError(
                f"eem.depth.input_size: DPT-hybrid runs only at its configured {native}; set it "
                f"to null or {native}"
            )
        self.input_size = input_size or native

    def model_input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the model is fed for an image of (height, width)."""
        if self.architecture == "dinov2":
            scale = self.input_size / min(height, width)
            return _round_to(height * scale, self.patch), _round_to(width * scale, self.patch)
        if self.architecture == "hybrid":
            return self.input_size, self.input_size
        side = _round_to(self.input_size, self.patch)
        return side, side  # plain ViT DPT reassembles tokens into a square grid

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Raw model output (B, H, W) at the image size, in the checkpoint's convention."""
        _check_images(images)
        height, width = images.shape[-2:]
        parameter = next(self.model.parameters())
        pixels = denormalize(images.float()).clamp(0, 1).to(parameter.device)
        size = self.model_input_size(height, width)
        if size != (height, width):
            pixels = F.interpolate(
                pixels, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        with torch.no_grad():
            predicted = self.model(pixel_values=pixels.to(parameter.dtype)).predicted_depth.float()
        predicted = F.interpolate(
            predicted[:, None], size=(height, width), mode="bilinear", align_corners=False
        )
        return predicted[:, 0].to(images.device)

    def proximity(self, images: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        return to_proximity(self.predict(images), self.convention)


def build_depth_backend(config: DepthConfig, device: str | torch.device = "cpu") -> DepthBackend:
    """The backend ``config.backend`` names; transformers models are loaded onto ``device``."""
    if config.backend == "dataset":
        return DatasetDepth()
    if config.backend == "geometric":
        return GeometricDepth(config.horizon)
    checkpoint = config.resolved_checkpoint
    if checkpoint is None:  # only the model backends get here, and each has a default checkpoint
        raise ValueError(
            f"eem.depth.checkpoint: backend {config.backend!r} has no default; set one"
        )
    model, architecture = load_depth_model(checkpoint, config.backend, download=config.download)
    convention = (
        checkpoint_convention(model.config) if config.convention == "auto" else config.convention
    )
    mean, std = _normalisation(checkpoint, local_only=not config.download)
    return TransformersDepth(
        model.to(device), architecture, config.backend, convention, mean, std, config.input_size
    )
