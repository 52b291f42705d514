"""A torch Dataset over a manifest: decoded, validated, resized and normalised samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from segxal.data.io import (
    DataError,
    check_same_size,
    image_size,
    open_rgb,
    read_disparity,
    read_label,
)
from segxal.data.labels import IGNORE_INDEX, LabelSet
from segxal.data.transforms import (
    normalize,
    random_crop_flip,
    resize_nearest,
    to_tensor,
)


@dataclass(frozen=True)
class SampleTransform:
    """``size``: (H, W) every sample is resized to (None keeps the file's size); or ``height``: each
    sample is resized to that height, its width by the file's aspect. ``crop_size`` and ``flip`` apply
    only when ``augment`` is on (training). ``label_at_file_size``: only the image (and depth) is resized,
    the label keeps the file's resolution (evaluation at the label's resolution)."""

    size: tuple[int, int] | None = None
    augment: bool = False
    crop_size: tuple[int, int] | None = None
    height: int | None = None
    label_at_file_size: bool = False

    def __post_init__(self) -> None:
        if self.size is not None and self.height is not None:
            raise ValueError("SampleTransform: give size or height, not both")
        if self.augment and self.label_at_file_size:
            raise ValueError("SampleTransform: augmentation needs the label resized with the image")

    def target_size(self, file_size: tuple[int, int]) -> tuple[int, int] | None:
        """The (H, W) a file of ``file_size`` is resized to; None keeps it."""
        if self.height is not None:
            return self.height, max(1, round(self.height * file_size[1] / file_size[0]))
        return self.size


class SegmentationDataset(Dataset):
    """Items are dicts: ``image`` (3, H, W) float normalised, ``label`` (H, W) int64 train ids with
    255 = ignore (all-ignore when the manifest has no label), ``depth`` (H, W) float disparity (0 where
    unknown) when ``load_depth``, ``index`` and ``sample_id``. With ``load_label`` off (scoring, which
    needs no label) the label file is never read and items carry no ``label``; with ``load_image`` off
    (the ground truth of a simulated annotator) the image's pixels are never decoded (its size comes
    from the file's header) and items carry no ``image``."""

    def __init__(
        self,
        manifest: pa.Table,
        label_set: LabelSet,
        transform: SampleTransform = SampleTransform(),
        load_depth: bool = False,
        load_label: bool = True,
        load_image: bool = True,
    ) -> None:
        if transform.augment and not (load_label and load_image):
            raise ValueError(
                "augmentation moves the label with the image: it needs load_label and load_image"
            )
        self.rows = manifest.select(
            ["sample_id", "image_path", "label_path", "depth_path"]
        ).to_pylist()
        self.label_set = label_set
        self.transform = transform
        self.load_depth = load_depth
        self.load_label = load_label
        self.load_image = load_image

    def __len__(self) -> int:
        return len(self.rows)

    def load_raw(
        self, index: int
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, tuple[int, int] | None]:
        """Decoded and validated: (image uint8 HxWx3, already at the transform's size, or None without
        ``load_image``; train-id label
        uint8 or None without ``load_label``; disparity float or None; both at the file's size; the
        transform's size, None to keep the file's). The image is resized by Pillow on its 8-bit pixels,
        before any copy into numpy: the decode-and-resize costs what Pillow alone does."""
        row = self.rows[index]
        image = open_rgb(row["image_path"]) if self.load_image else None
        file_size = (
            (image.height, image.width) if image is not None else image_size(row["image_path"])
        )
        label: np.ndarray | None = None
        if self.load_label and row["label_path"] is not None:
            raw = read_label(row["label_path"])
            check_same_size(row["image_path"], file_size, row["label_path"], raw.shape)
            label = self.label_set.to_train_ids(raw, row["label_path"])
        elif self.load_label:
            label = np.full(file_size, IGNORE_INDEX, dtype=np.uint8)
        depth = None
        if self.load_depth:
            if row["depth_path"] is not None:
                depth = read_disparity(row["depth_path"])
                check_same_size(row["image_path"], file_size, row["depth_path"], depth.shape)
            else:
                depth = np.zeros(file_size, dtype=np.float32)
        size = self.transform.target_size(file_size)
        if image is None:
            return None, label, depth, size
        if size is not None and size != file_size:  # antialiased bilinear when shrinking
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(image), label, depth, size

    def __getitem__(self, index: int) -> dict:
        image_np, label_np, depth_np, size = self.load_raw(index)
        label = None if label_np is None else torch.from_numpy(label_np.astype(np.int64))
        depth = None if depth_np is None else torch.from_numpy(depth_np)
        if size is not None:
            depth = None if depth is None else resize_nearest(depth, size)
            if label is not None and not self.transform.label_at_file_size:
                label = resize_nearest(label, size)
        item: dict = {"index": index, "sample_id": self.rows[index]["sample_id"]}
        if image_np is not None:
            image = to_tensor(image_np)
            if self.transform.augment:
                assert label is not None  # checked in __init__
                image, label, depth = random_crop_flip(
                    image, label, self.transform.crop_size, extra=depth
                )
            item["image"] = normalize(image)
        if label is not None:
            item["label"] = label
        if depth is not None:
            item["depth"] = depth
        return item


__all__ = ["DataError", "SampleTransform", "SegmentationDataset"]
