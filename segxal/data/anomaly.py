"""Anomaly segmentation benchmarks in their released folder layouts, mapped to 0 inlier / 1 anomaly / 255 void.

``anomaly_benchmark(root)`` recognises the layout of ``root`` (or of its single benchmark subfolder):

- ``original/*.{png,jpg,webp}`` + ``labels/<stem>.png`` — the Fishyscapes validation sets as released for
  Meta-OoD, SynBoost and PEBAL (``<fishyscapes>/LostAndFound`` and ``<fishyscapes>/Static``; labels 0 inlier,
  1 anomaly, 255 void, and 2, the "unlabeled" id of Fishyscapes' class table, also void). The same layout
  holds this project's synthetic split (``<root>/anomaly``, ANOMALY label set) and PEBAL's preprocessed
  Road Anomaly (``original/*.jpg``, labels 0/1). The folder name picks the benchmark name.
- ``images/<fid>.{jpg,webp}`` + ``labels_masks/<fid>_labels_semantic.png`` — SegmentMeIfYouCan
  (``dataset_AnomalyTrack``: RoadAnomaly21, jpg; ``dataset_ObstacleTrack``: RoadObstacle21, webp), labels
  0 not anomaly, 1 anomaly, 255 void (road-anomaly-benchmark ``datasets/tracks.py``). Only labelled frames
  (the validation frames; test labels are withheld) enter the manifest.
- ``frames/<name>.{jpg,webp,png}`` + ``frames/<name>.labels/labels_semantic.png`` — Road Anomaly (Lis et al.
  2019; ``RoadAnomaly`` or ``RoadAnomaly_jpg``), labels 0 background, 2 anomaly (the release's readme).
- ``leftImg8bit/<split>/<scene>/<fid>_leftImg8bit.{png,jpg,webp}`` +
  ``gtCoarse/<split>/<scene>/<fid>_gtCoarse_labelIds.png`` — LostAndFound, label ids 0 unlabeled (void),
  1 free road (inlier), 2..43 objects (anomaly), as road-anomaly-benchmark evaluates it (PEBAL's own table
  leaves the seven "non-hazard" objects out; here every object counts).

Each benchmark carries a :class:`LabelSet` from raw label values to 0/1/255; values outside its table are
errors naming the file (see :meth:`LabelSet.to_train_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.io import DataError
from segxal.data.labels import ANOMALY, IGNORE_INDEX, LabelSet
from segxal.data.manifest import SampleFiles, build_manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LAF_IMAGE_SUFFIX = "_leftImg8bit"
LAF_LABEL_SUFFIX = "_gtCoarse_labelIds.png"
SMIYC_LABEL_SUFFIX = "_labels_semantic.png"


def _binary_label_set(name: str, inlier: list[int], anomaly: list[int], void: list[int]) -> LabelSet:
    raw_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    raw_valid = np.zeros(256, dtype=bool)
    for values, train_id in ((inlier, 0), (anomaly, 1), (void, IGNORE_INDEX)):
        raw_to_train[values] = train_id
        raw_valid[values] = True
    return LabelSet(name, ANOMALY.class_names, ANOMALY.colors, raw_to_train, raw_valid)


FISHYSCAPES = _binary_label_set("fishyscapes", [0], [1], [2, 255])
ROAD_ANOMALY = _binary_label_set("road_anomaly", [0], [2], [255])
LOST_AND_FOUND = _binary_label_set("lost_and_found", [1], list(range(2, 44)), [0])

ORIGINAL_LABELS_NAMES = {"lostandfound": "fishyscapes_lost_and_found", "static": "fishyscapes_static", "anomaly": "synthetic"}


@dataclass(frozen=True)
class AnomalyBenchmark:
    name: str  # e.g. "fishyscapes_lost_and_found", "road_anomaly_21", "synthetic"
    layout: str  # "original_labels" | "smiyc" | "road_anomaly" | "lost_and_found"
    root: Path
    manifest: pa.Table
    label_set: LabelSet

    def dataset(self, transform: SampleTransform = SampleTransform()) -> SegmentationDataset:
        """Items with ``label`` 0 inlier, 1 anomaly, 255 void."""
        return SegmentationDataset(self.manifest, self.label_set, transform)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def original_labels_benchmark(root: str | Path) -> AnomalyBenchmark:
    """``original/`` + ``labels/`` (Fishyscapes validation, the synthetic split, preprocessed Road Anomaly)."""
    root = Path(root)
    folder = root.resolve().name
    name = ORIGINAL_LABELS_NAMES.get(folder.lower(), folder.lower())
    label_set = ANOMALY if name == "synthetic" else FISHYSCAPES
    samples = [
        SampleFiles(f"{name}/{image.stem}", name, image, root / "labels" / f"{image.stem}.png")
        for image in _images(root / "original")
    ]
    return AnomalyBenchmark(name, "original_labels", root, build_manifest(samples, str(root / "original")), label_set)


def smiyc_benchmark(root: str | Path) -> AnomalyBenchmark:
    """SegmentMeIfYouCan ``dataset_AnomalyTrack`` / ``dataset_ObstacleTrack`` (labelled frames only)."""
    root = Path(root)
    name = "road_obstacle_21" if "obstacle" in root.resolve().name.lower() else "road_anomaly_21"
    samples = []
    for image in _images(root / "images"):
        label = root / "labels_masks" / f"{image.stem}{SMIYC_LABEL_SUFFIX}"
        if label.is_file():
            samples.append(SampleFiles(f"{name}/{image.stem}", name, image, label))
    if not samples:
        raise DataError(
            f"{root / 'labels_masks'}: no *{SMIYC_LABEL_SUFFIX} matches an image in {root / 'images'} "
            "(SegmentMeIfYouCan withholds test labels; only the validation frames can be evaluated)"
        )
    return AnomalyBenchmark(name, "smiyc", root, build_manifest(samples, str(root / "images")), ANOMALY)


def road_anomaly_benchmark(root: str | Path) -> AnomalyBenchmark:
    """Road Anomaly: ``frames/<name>.<ext>`` with ``frames/<name>.labels/labels_semantic.png``."""
    root = Path(root)
    frames = root / "frames"
    samples = [
        SampleFiles(
            f"road_anomaly/{image.stem}",
            "road_anomaly",
            image,
            frames / f"{image.stem}.labels" / "labels_semantic.png",
        )
        for image in _images(frames)
    ]
    return AnomalyBenchmark("road_anomaly", "road_anomaly", root, build_manifest(samples, str(frames)), ROAD_ANOMALY)


def lost_and_found_benchmark(root: str | Path, split: str | None = None) -> AnomalyBenchmark:
    """LostAndFound (Cityscapes-style folders); ``split`` defaults to "test", or the only split there is."""
    root = Path(root)
    image_root = root / "leftImg8bit"
    splits = sorted(p.name for p in image_root.iterdir() if p.is_dir()) if image_root.is_dir() else []
    if split is None:
        split = "test" if "test" in splits or len(splits) != 1 else splits[0]
    image_dir = image_root / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: LostAndFound split {split!r} not found (splits there: {splits})")
    samples = []
    for image in sorted(p for p in image_dir.glob(f"*/*{LAF_IMAGE_SUFFIX}.*") if p.suffix.lower() in IMAGE_SUFFIXES):
        fid = image.stem[: -len(LAF_IMAGE_SUFFIX)]
        label = root / "gtCoarse" / split / image.parent.name / f"{fid}{LAF_LABEL_SUFFIX}"
        samples.append(SampleFiles(f"{split}/{fid}", split, image, label))
    return AnomalyBenchmark("lost_and_found", "lost_and_found", root, build_manifest(samples, str(image_dir)), LOST_AND_FOUND)


def _layout_of(folder: Path) -> str | None:
    def has(*names: str) -> bool:
        return all((folder / name).is_dir() for name in names)

    if has("original", "labels"):
        return "original_labels"
    if has("images", "labels_masks"):
        return "smiyc"
    if has("frames") and any(p.is_dir() and p.suffix == ".labels" for p in (folder / "frames").iterdir()):
        return "road_anomaly"
    if has("leftImg8bit", "gtCoarse"):
        return "lost_and_found"
    return None


LOADERS = {
    "original_labels": original_labels_benchmark,
    "smiyc": smiyc_benchmark,
    "road_anomaly": road_anomaly_benchmark,
    "lost_and_found": lost_and_found_benchmark,
}


def detect_anomaly_layout(root: str | Path) -> tuple[str, Path]:
    """(layout, folder) for ``root`` itself or, failing that, its one benchmark subfolder
    (e.g. a synthetic dataset root holding ``anomaly/``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: anomaly dataset folder not found")
    layout = _layout_of(root)
    if layout is not None:
        return layout, root
    found = [(layout, child) for child in sorted(root.iterdir()) if child.is_dir() and (layout := _layout_of(child))]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(child.name for _, child in found)
        raise DataError(f"{root}: holds several anomaly benchmarks ({names}); pass one of those folders")
    raise DataError(
        f"{root}: not a known anomaly benchmark layout; expected original/ + labels/ (Fishyscapes, synthetic), "
        "images/ + labels_masks/ (SegmentMeIfYouCan), frames/*.labels/ (Road Anomaly) or "
        "leftImg8bit/ + gtCoarse/ (LostAndFound), here or in one subfolder"
    )


def anomaly_benchmark(root: str | Path, split: str | None = None) -> AnomalyBenchmark:
    """The benchmark in ``root`` (layout auto-detected); ``split`` applies to LostAndFound only."""
    layout, folder = detect_anomaly_layout(root)
    if layout == "lost_and_found":
        return lost_and_found_benchmark(folder, split)
    if split is not None:
        raise ValueError(f"{folder}: split={split!r} is only meaningful for LostAndFound, found layout {layout!r}")
    return LOADERS[layout](folder)
