"""Paired image/label transforms on tensors (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segxal.data.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a (..., 3, H, W) tensor in [0, 1]; follows its device and dtype."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype).view(3, 1, 1)
    return image * std + mean


def resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an (H, W) label or depth map, keeping its dtype."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(
        mask.dtype
    )


def random_crop_flip(
    image: torch.Tensor,
    label: torch.Tensor,
    crop_size: tuple[int, int] | None,
    generator: torch.Generator | None = None,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same random crop and horizontal flip on image (C, H, W), label (H, W) and ``extra`` (H, W).

    Inputs smaller than the crop are padded (image with 0, label with ignore, extra with 0).
    """
    if crop_size is not None:
        crop_h, crop_w = crop_size
        pad_h = max(crop_h - image.shape[-2], 0)
        pad_w = max(crop_w - image.shape[-1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
            extra = None if extra is None else F.pad(extra, (0, pad_w, 0, pad_h))
        top = int(torch.randint(0, image.shape[-2] - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.shape[-1] - crop_w + 1, (1,), generator=generator))
        window = (..., slice(top, top + crop_h), slice(left, left + crop_w))
        image, label = image[window], label[window]
        extra = None if extra is None else extra[window]
    if torch.rand((), generator=generator) < 0.5:
        image, label = image.flip(-1), label.flip(-1)
        extra = None if extra is None else extra.flip(-1)
    return image, label, extra
