"""AnomalyMix: paste outlier objects into inlier training images and label them as the anomaly class.

Works on batches as the training loop holds them: ImageNet-normalised images (B, 3, H, W) and train-id
labels (B, H, W) with the anomaly index Y = number of inlier classes. Objects are uint8 RGB crops with a
mask; a pasted object is resized (bilinear image, thresholded bilinear mask) so that its longer side is
a random fraction in [scale_min, scale_max] of the image's shorter side, flipped horizontally with
``flip_probability``, placed at a random position where it fits, normalised like the dataset's images
and written over the pixels under its mask, whose labels become Y (void pixels included: the object
covers them). Each batch mixes floor(f·B) images plus one more with probability frac(f·B), so the mixed
fraction is f on average and never further than one image from it.

Outliers come from COCO instances (``coco_root`` set) or, by default, from procedural shapes: random
star polygons, ellipses and blobs in saturated colours with stripes, checks or noise. All randomness
comes from the ``numpy.random.Generator`` passed in, so a seed fixes the result.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from segxal.data.io import DataError
from segxal.data.transforms import normalize, to_tensor
from segxal.pebal.coco import CocoInstance, coco_instances, crop_instance, mask_window
from segxal.pebal.config import AnomalyMixConfig


@dataclass(frozen=True)
class OutlierObject:
    image: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool, not empty
    source: str


class CocoOutliers:
    """Instances of a COCO instances file, cropped from their images when sampled."""

    def __init__(self, instances: list[CocoInstance]) -> None:
        if not instances:
            raise ValueError("CocoOutliers needs at least one instance")
        self.instances = instances

    @classmethod
    def from_config(cls, config: AnomalyMixConfig) -> CocoOutliers:
        if config.coco_root is None:
            raise ValueError(
                "CocoOutliers.from_config needs AnomalyMixConfig.coco_root (the image folder)"
            )
        root = Path(config.coco_root)
        annotations = config.coco_annotations or root / "annotations" / "instances_train2017.json"
        instances = coco_instances(
            annotations, root, config.excluded_coco_classes, config.min_instance_area
        )
        if not instances:
            raise DataError(
                f"{annotations}: no instances left after excluding {list(config.excluded_coco_classes)} and "
                f"areas below {config.min_instance_area}; nothing to paste"
            )
        return cls(instances)

    def sample(self, rng: np.random.Generator) -> OutlierObject:
        for _ in range(10):  # degenerate polygons can rasterise to nothing; draw another instance
            instance = self.instances[int(rng.integers(len(self.instances)))]
            crop = crop_instance(instance)
            if crop is not None:
                return OutlierObject(
                    *crop, source=f"coco:{instance.category}:{instance.annotation_id}"
                )
        raise DataError(
            f"{self.instances[0].source}: 10 sampled instances in a row had empty masks"
        )


def _vivid_color(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
    return np.asarray(rgb) * 255


def synthetic_outlier(rng: np.random.Generator, size: int = 96) -> OutlierObject:
    """A procedural object on a ``size`` x ``size`` canvas (see module docstring)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    centre = size / 2
    kind = rng.choice(["star", "ellipse", "blob"])
    if kind == "star":
        count = int(rng.integers(3, 13))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = size * 0.48 * rng.uniform(0.35, 1.0, count)
        draw.polygon(
            [
                (centre + r * np.cos(a), centre + r * np.sin(a))
                for r, a in zip(radii, angles, strict=True)
            ],
            fill=1,
        )
    elif kind == "ellipse":
        rx, ry = size * 0.48 * rng.uniform(0.3, 1.0, 2)
        draw.ellipse([centre - rx, centre - ry, centre + rx, centre + ry], fill=1)
    else:
        for _ in range(int(rng.integers(2, 5))):
            r = size * rng.uniform(0.12, 0.25)
            x, y = rng.uniform(centre - size * 0.22, centre + size * 0.22, 2)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    mask = np.asarray(canvas, dtype=bool)
    rows, cols = np.mgrid[0:size, 0:size]
    first, second = _vivid_color(rng), _vivid_color(rng)
    texture = rng.choice(["solid", "stripes", "checks", "noise"])
    if texture == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        pattern = (np.cos(angle) * cols + np.sin(angle) * rows) % period < period / 2
    elif texture == "checks":
        cell = int(rng.integers(3, 12))
        pattern = (rows // cell + cols // cell) % 2 == 0
    else:
        pattern = (
            np.ones((size, size), dtype=bool)
            if texture == "solid"
            else rng.uniform(size=(size, size)) < 0.5
        )
    image = np.where(pattern[..., None], first, second) + rng.normal(0, 6, (size, size, 3))
    window = mask_window(mask)  # every shape above spans many pixels, so the mask is not empty
    return OutlierObject(
        np.clip(image, 0, 255).astype(np.uint8)[window],
        mask[window],
        source=f"synthetic:{kind}:{texture}",
    )


class SyntheticOutliers:
    """Procedural outliers: the embedded default when no COCO path is configured."""

    def sample(self, rng: np.random.Generator) -> OutlierObject:
        return synthetic_outlier(rng)


def _resized(obj: OutlierObject, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(
        Image.fromarray(obj.image).resize((width, height), Image.Resampling.BILINEAR)
    )
    soft = np.asarray(
        Image.fromarray(obj.mask.astype(np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )
    mask = soft >= 0.5
    if not mask.any():  # an object shrunk below a pixel keeps its strongest pixel
        mask = soft >= soft.max()
    return image, mask


class AnomalyMix:
    """Callable batch augmentation; ``anomaly_index`` is the label written under pasted objects."""

    def __init__(self, config: AnomalyMixConfig, anomaly_index: int, outliers=None) -> None:
        if anomaly_index < 1:
            raise ValueError(
                f"anomaly_index must be >= 1 (the number of inlier classes), got {anomaly_index}"
            )
        self.config = config
        self.anomaly_index = anomaly_index
        if outliers is None:
            outliers = CocoOutliers.from_config(config) if config.uses_coco else SyntheticOutliers()
        self.outliers = outliers

    def _paste(self, image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator) -> None:
        cfg, (height, width) = self.config, image.shape[-2:]
        obj = self.outliers.sample(rng)
        longer = rng.uniform(cfg.scale_min, cfg.scale_max) * min(height, width)
        factor = longer / max(obj.mask.shape)
        h = int(np.clip(round(obj.mask.shape[0] * factor), 1, height))
        w = int(np.clip(round(obj.mask.shape[1] * factor), 1, width))
        patch, mask = _resized(obj, h, w)
        if rng.uniform() < cfg.flip_probability:
            patch, mask = patch[:, ::-1], mask[:, ::-1]
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        patch_t = normalize(to_tensor(patch)).to(device=image.device, dtype=image.dtype)
        mask_t = torch.from_numpy(mask.copy()).to(image.device)
        region = (slice(top, top + h), slice(left, left + w))
        image[(slice(None), *region)] = torch.where(mask_t, patch_t, image[(slice(None), *region)])
        label[region] = torch.where(
            mask_t, torch.full_like(label[region], self.anomaly_index), label[region]
        )

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mixed images, mixed labels, (B,) bool: which images got objects); inputs are not modified."""
        if (
            images.dim() != 4
            or images.shape[1] != 3
            or labels.shape != (images.shape[0], *images.shape[2:])
        ):
            raise ValueError(
                f"expected images (B, 3, H, W) and labels (B, H, W), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        images, labels = images.clone(), labels.clone()
        batch = images.shape[0]
        expected = self.config.fraction * batch
        count = int(np.floor(expected)) + int(rng.uniform() < expected - np.floor(expected))
        mixed = torch.zeros(batch, dtype=torch.bool, device=images.device)
        for index in rng.choice(batch, size=count, replace=False):
            for _ in range(int(rng.integers(1, self.config.max_objects + 1))):
                self._paste(images[index], labels[index], rng)
            mixed[int(index)] = True
        return images, labels, mixed
