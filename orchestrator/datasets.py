"""From the data section of the config to manifests, label set and torch Datasets."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from orchestrator.config import DataConfig
from segxal.data.camvid import camvid_manifest
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.io import read_label
from segxal.data.labels import CAMVID, CITYSCAPES, LabelSet
from segxal.data.synthetic import generate_synthetic


def label_set_for(config: DataConfig) -> LabelSet:
    return CAMVID if config.dataset == "camvid" else CITYSCAPES


def manifest_for(
    config: DataConfig, split: str, limit: int | None = None, progress: bool = False
) -> pa.Table:
    """The split's manifest; synthetic data is generated first if it is not on disk yet."""
    root = Path(config.root)
    if config.dataset == "synthetic":
        generate_synthetic(root, config.synthetic, progress=progress)
    scan = camvid_manifest if config.dataset == "camvid" else cityscapes_manifest
    manifest = scan(root, split)
    return manifest if limit is None else manifest.slice(0, limit)


def check_label_ids(label_paths: Iterable[str], label_set: LabelSet, threads: int = 4) -> int:
    """Read every label file and refuse the first whose ids are outside ``label_set``'s table, naming
    it (a :class:`~segxal.data.io.DataError`); returns how many were read. The files are decoded on
    ``threads`` threads (Pillow releases the GIL while it decodes)."""

    def check(path: str) -> None:
        label_set.to_train_ids(read_label(path), path)

    count = 0
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(check, label_paths):
            count += 1
    return count


def _height_width(size: Sequence[int] | None) -> tuple[int, int] | None:
    """``size`` as an (H, W) tuple, also when the config holds a list."""
    if size is None:
        return None
    height, width = size
    return (height, width)


def datasets_for(
    config: DataConfig, progress: bool = False
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, validation) datasets: training with random crop and flip, validation plain."""
    label_set = label_set_for(config)
    train = manifest_for(config, config.train_split, config.max_train_images, progress)
    val = manifest_for(config, config.val_split, config.max_val_images)
    size = _height_width(config.image_size)
    crop = _height_width(config.crop_size)
    return (
        SegmentationDataset(
            train, label_set, SampleTransform(size=size, augment=True, crop_size=crop)
        ),
        SegmentationDataset(val, label_set, SampleTransform(size=size)),
    )
