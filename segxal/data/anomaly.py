"""Anomaly segmentation benchmarks in their released folder layouts, mapped to 0 inlier / 1 anomaly / 255 void.

``anomaly_benchmark(root)`` recognises the layout of ``root`` (or of its single benchmark subfolder):

- ``original/*.{png,jpg,webp}`` + ``labels/<stem>.png`` — the Fishyscapes validation sets as released for
  Meta-OoD, SynBoost and PEBAL (``<fishyscapes>/LostAndFound`` and ``<fishyscapes>/Static``; labels 0 inlier,
  1 anomaly, 255 void, and 2, the "unlabeled" id of Fishyscapes' class table, also void). The same layout
  holds this project's synthetic split (``<root>/anomaly``, ANOMALY label set) and PEBAL's preprocessed
  Road Anomaly (``original/*.jpg``, labels 0/1). The folder name picks the benchmark name.
- ``images/<fid>.{jpg,webp}`` + ``labels_masks/<fid>_labels_semantic.png`` — SegmentMeIfYouCan
  (``dataset_AnomalyTrack``: RoadAnomaly21, jpg; ``dataset_ObstacleTrack``: RoadObstacle21, webp), labels
  0 not anomaly, 1 anomaly, 255 void (road-anomaly-benchmark ``datasets/tracks.py``; for RoadObstacle21
  everything off the road is void, so the evaluation stays inside the road). Only labelled frames
  (the validation frames; test labels are withheld) enter the manifest.
- ``images/<i>.{png,jpg,webp}`` + ``labels_masks/<i>.png`` (the same stem) — the widely circulated
  validation pack of Fishyscapes Lost & Found, Fishyscapes Static, RoadAnomaly21 and RoadObstacle21
  (``same_stem``), labels 0 in-distribution, 1 anomaly, 255 void. A folder whose label files fit both
  this and the SegmentMeIfYouCan naming is an error that lists them: detection never guesses.
- ``frames/<name>.{jpg,webp,png}`` + ``frames/<name>.labels/labels_semantic.png`` — Road Anomaly (Lis et al.
  2019; ``RoadAnomaly`` or ``RoadAnomaly_jpg``), labels 0 background, 2 anomaly (the release's readme).
- ``leftImg8bit/<split>/<scene>/<fid>_leftImg8bit.{png,jpg,webp}`` +
  ``gtCoarse/<split>/<scene>/<fid>_gtCoarse_labelIds.png`` — LostAndFound, label ids 0 unlabeled (void),
  1 free road (inlier), 2..43 objects (anomaly), as road-anomaly-benchmark evaluates it (PEBAL's own table
  leaves the seven "non-hazard" objects out; here every object counts).

Each benchmark carries a :class:`LabelSet` from raw label values to 0/1/255; values outside its table are
errors naming the file (see :meth:`LabelSet.to_train_ids`). Its name comes from the folder (official
folder names map to the usual benchmark names) unless one is given; ``pebal.benchmarks`` refuses two
benchmarks with one name (:func:`check_unique_names`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

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


def _binary_label_set(
    name: str, inlier: list[int], anomaly: list[int], void: list[int]
) -> LabelSet:
    raw_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    raw_valid = np.zeros(256, dtype=bool)
    for values, train_id in ((inlier, 0), (anomaly, 1), (void, IGNORE_INDEX)):
        raw_to_train[values] = train_id
        raw_valid[values] = True
    return LabelSet(name, ANOMALY.class_names, ANOMALY.colors, raw_to_train, raw_valid)


FISHYSCAPES = _binary_label_set("fishyscapes", [0], [1], [2, 255])
ROAD_ANOMALY = _binary_label_set("road_anomaly", [0], [2], [255])
LOST_AND_FOUND = _binary_label_set("lost_and_found", [1], list(range(2, 44)), [0])

# official folder names (lower case) -> benchmark names; other folders are named after themselves
KNOWN_NAMES = {
    "lostandfound": "fishyscapes_lost_and_found",
    "static": "fishyscapes_static",
    "anomaly": "synthetic",
    "dataset_anomalytrack": "road_anomaly_21",
    "dataset_obstacletrack": "road_obstacle_21",
}
AnomalyLayout = Literal["original_labels", "smiyc", "same_stem", "road_anomaly", "lost_and_found"]
LAYOUTS: tuple[str, ...] = get_args(AnomalyLayout)


def folder_name(folder: Path) -> str:
    """The benchmark name of ``folder``: its official name, else its own name in snake case."""
    own = folder.resolve().name
    return KNOWN_NAMES.get(own.lower(), re.sub(r"[^0-9a-z]+", "_", own.lower()).strip("_"))


@dataclass(frozen=True)
class AnomalyBenchmark:
    name: str  # e.g. "fishyscapes_lost_and_found", "road_anomaly_21", "synthetic"
    layout: str  # one of LAYOUTS
    root: Path
    manifest: pa.Table
    label_set: LabelSet

    def dataset(self, transform: SampleTransform = SampleTransform()) -> SegmentationDataset:
        """Items with ``label`` 0 inlier, 1 anomaly, 255 void."""
        return SegmentationDataset(self.manifest, self.label_set, transform)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def original_labels_benchmark(root: str | Path, name: str | None = None) -> AnomalyBenchmark:
    """``original/`` + ``labels/`` (Fishyscapes validation, the synthetic split, preprocessed Road Anomaly)."""
    root = Path(root)
    name = name or folder_name(root)
    label_set = ANOMALY if name == "synthetic" else FISHYSCAPES
    samples = [
        SampleFiles(f"{name}/{image.stem}", name, image, root / "labels" / f"{image.stem}.png")
        for image in _images(root / "original")
    ]
    return AnomalyBenchmark(
        name, "original_labels", root, build_manifest(samples, str(root / "original")), label_set
    )


def _masks_benchmark(root: Path, layout: str, suffix: str, name: str | None) -> AnomalyBenchmark:
    """``images/`` + ``labels_masks/<stem><suffix>``: the frames that have a label file."""
    name = name or folder_name(root)
    samples = []
    for image in _images(root / "images"):
        label = root / "labels_masks" / f"{image.stem}{suffix}"
        if label.is_file():
            samples.append(SampleFiles(f"{name}/{image.stem}", name, image, label))
    return AnomalyBenchmark(
        name, layout, root, build_manifest(samples, str(root / "images")), ANOMALY
    )


def smiyc_benchmark(root: str | Path, name: str | None = None) -> AnomalyBenchmark:
    """SegmentMeIfYouCan ``dataset_AnomalyTrack`` / ``dataset_ObstacleTrack`` (labelled frames only)."""
    return _masks_benchmark(Path(root), "smiyc", SMIYC_LABEL_SUFFIX, name)


def same_stem_benchmark(root: str | Path, name: str | None = None) -> AnomalyBenchmark:
    """The validation pack's ``images/<i>.<ext>`` + ``labels_masks/<i>.png``."""
    return _masks_benchmark(Path(root), "same_stem", ".png", name)


def _masks_layout(root: Path) -> str:
    """``smiyc`` or ``same_stem``, from the label files next to the images; an error when both or
    neither fit."""
    images = _images(root / "images")
    masks = root / "labels_masks"
    smiyc = [i for i in images if (masks / f"{i.stem}{SMIYC_LABEL_SUFFIX}").is_file()]
    same_stem = [i for i in images if (masks / f"{i.stem}.png").is_file()]
    if smiyc and same_stem:
        raise DataError(
            f"{root}: both label namings are there, {len(smiyc)} images with "
            f"labels_masks/<stem>{SMIYC_LABEL_SUFFIX} (SegmentMeIfYouCan, e.g. {smiyc[0].name}) and "
            f"{len(same_stem)} with labels_masks/<stem>.png (the validation pack, e.g. {same_stem[0].name}): "
            "keep one, or give the benchmark's layout"
        )
    if smiyc:
        return "smiyc"
    if same_stem:
        return "same_stem"
    example = images[0].name if images else "<image>"
    stem = images[0].stem if images else "<stem>"
    raise DataError(
        f"{root}: no label file for any image of images/ (for images/{example} looked for "
        f"labels_masks/{stem}.png and labels_masks/{stem}{SMIYC_LABEL_SUFFIX})"
        + (" — SegmentMeIfYouCan withholds its test labels" if "track" in root.name.lower() else "")
    )


def road_anomaly_benchmark(root: str | Path, name: str | None = None) -> AnomalyBenchmark:
    """Road Anomaly: ``frames/<name>.<ext>`` with ``frames/<name>.labels/labels_semantic.png``."""
    root = Path(root)
    name = name or "road_anomaly"
    frames = root / "frames"
    samples = [
        SampleFiles(
            f"{name}/{image.stem}",
            name,
            image,
            frames / f"{image.stem}.labels" / "labels_semantic.png",
        )
        for image in _images(frames)
    ]
    return AnomalyBenchmark(
        name, "road_anomaly", root, build_manifest(samples, str(frames)), ROAD_ANOMALY
    )


def lost_and_found_benchmark(
    root: str | Path, split: str | None = None, name: str | None = None
) -> AnomalyBenchmark:
    """LostAndFound (Cityscapes-style folders); ``split`` defaults to "test", or the only split there is."""
    root = Path(root)
    image_root = root / "leftImg8bit"
    splits = (
        sorted(p.name for p in image_root.iterdir() if p.is_dir()) if image_root.is_dir() else []
    )
    if split is None:
        split = "test" if "test" in splits or len(splits) != 1 else splits[0]
    image_dir = image_root / split
    if not image_dir.is_dir():
        raise DataError(
            f"{image_dir}: LostAndFound split {split!r} not found (splits there: {splits})"
        )
    samples = []
    for image in sorted(
        p for p in image_dir.glob(f"*/*{LAF_IMAGE_SUFFIX}.*") if p.suffix.lower() in IMAGE_SUFFIXES
    ):
        fid = image.stem[: -len(LAF_IMAGE_SUFFIX)]
        label = root / "gtCoarse" / split / image.parent.name / f"{fid}{LAF_LABEL_SUFFIX}"
        samples.append(SampleFiles(f"{split}/{fid}", split, image, label))
    name = name or "lost_and_found"
    return AnomalyBenchmark(
        name, "lost_and_found", root, build_manifest(samples, str(image_dir)), LOST_AND_FOUND
    )


def _layout_of(folder: Path) -> str | None:
    def has(*names: str) -> bool:
        return all((folder / name).is_dir() for name in names)

    if has("original", "labels"):
        return "original_labels"
    if has("images", "labels_masks"):
        return _masks_layout(folder)
    if has("frames") and any(
        p.is_dir() and p.suffix == ".labels" for p in (folder / "frames").iterdir()
    ):
        return "road_anomaly"
    if has("leftImg8bit", "gtCoarse"):
        return "lost_and_found"
    return None


# the layouts without splits (LostAndFound takes one)
LOADERS: dict[str, Callable[[Path, str | None], AnomalyBenchmark]] = {
    "original_labels": original_labels_benchmark,
    "smiyc": smiyc_benchmark,
    "same_stem": same_stem_benchmark,
    "road_anomaly": road_anomaly_benchmark,
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
    found = [
        (layout, child)
        for child in sorted(root.iterdir())
        if child.is_dir() and (layout := _layout_of(child))
    ]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(child.name for _, child in found)
        raise DataError(
            f"{root}: holds several anomaly benchmarks ({names}); pass one of those folders"
        )
    raise DataError(
        f"{root}: not a known anomaly benchmark layout; expected original/ + labels/ (Fishyscapes, synthetic), "
        "images/ + labels_masks/ (SegmentMeIfYouCan, or the validation pack with same-stem labels), "
        "frames/*.labels/ (Road Anomaly) or "
        "leftImg8bit/ + gtCoarse/ (LostAndFound), here or in one subfolder"
    )


def anomaly_benchmark(
    root: str | Path, split: str | None = None, name: str | None = None, layout: str | None = None
) -> AnomalyBenchmark:
    """The benchmark in ``root``: its ``layout`` detected unless given (one of :data:`LAYOUTS`); ``split``
    applies to LostAndFound only; ``name`` replaces the one taken from the folder."""
    if layout is None:
        layout, folder = detect_anomaly_layout(root)
    elif layout not in LAYOUTS:
        raise ValueError(f"{root}: unknown anomaly layout {layout!r} (one of {', '.join(LAYOUTS)})")
    else:
        folder = Path(root)
        if not folder.is_dir():
            raise DataError(f"{folder}: anomaly dataset folder not found")
    if layout == "lost_and_found":
        return lost_and_found_benchmark(folder, split, name)
    if split is not None:
        raise ValueError(
            f"{folder}: split={split!r} is only meaningful for LostAndFound, found layout {layout!r}"
        )
    benchmark = LOADERS[layout](folder, name)
    if benchmark.manifest.num_rows == 0:
        raise DataError(
            f"{folder}: the {benchmark.name} benchmark ({layout} layout) holds no labelled image"
        )
    return benchmark


def check_unique_names(benchmarks: Iterable[AnomalyBenchmark], taken: Iterable[str] = ()) -> None:
    """Two benchmarks with one name would overwrite each other's metrics and curves: an input error."""
    seen: dict[str, Path | None] = dict.fromkeys(taken)
    for benchmark in benchmarks:
        if benchmark.name in seen:
            other = seen[benchmark.name]
            where = (
                f"{other} and {benchmark.root}"
                if other
                else f"{benchmark.root} and another evaluation set"
            )
            raise DataError(
                f"two anomaly benchmarks are named {benchmark.name!r} ({where}): give one a name"
            )
        seen[benchmark.name] = benchmark.root
