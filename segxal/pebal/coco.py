"""COCO instances JSON for outlier exposure: validation, polygon and RLE masks, instance crops.

Masks follow COCO: polygons are ``[x1, y1, x2, y2, ...]`` lists in pixel coordinates (several per object
for disconnected parts), rasterised with PIL; RLE counts alternate runs of 0 and 1 (starting with 0)
over the mask in column-major order, either as a list of ints or in COCO's compressed string form
(pycocotools ``rleToString``: 5-bit groups + 48, bit 0x20 = more groups, bit 0x10 of the last group =
sign, runs after the third stored as differences to the run two before). Crowd annotations
(``iscrowd = 1``) are skipped: they cover groups of objects with loose masks.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segxal.data.io import DataError, read_rgb

REQUIRED_KEYS = ("images", "annotations", "categories")


@dataclass(frozen=True)
class CocoInstance:
    annotation_id: int
    category: str
    image_path: Path
    height: int
    width: int
    segmentation: list | dict
    source: str  # the annotations file, named in errors


def load_instances_json(path: str | Path) -> dict:
    """The parsed JSON, checked to be a COCO *instances* file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: COCO annotations file not found")
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON, truncated or corrupt ({error})") from error
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: not a COCO instances JSON (top level is {type(data).__name__}, not an object)"
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(
            f"{path}: not a COCO instances JSON: missing or non-list keys {missing} "
            f"(found keys {sorted(data)}; instances files have {list(REQUIRED_KEYS)})"
        )
    for index, annotation in enumerate(data["annotations"]):
        fields = ("id", "image_id", "category_id", "segmentation")
        absent = [f for f in fields if not isinstance(annotation, dict) or f not in annotation]
        if absent:
            raise DataError(
                f"{path}: annotation #{index} lacks {absent}; not a COCO instances JSON "
                "(captions and panoptic files have no 'segmentation')"
            )
    return data


def _split_name(annotations: Path) -> str | None:
    match = re.fullmatch(r"instances_(.+)\.json", annotations.name)
    return match.group(1) if match else None


def _image_path(root: Path, file_name: str, split: str | None, source: Path) -> Path:
    candidates = [root / file_name]
    if split is not None:
        candidates += [root / split / file_name, root / "images" / split / file_name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(f"{source}: image {file_name!r} not found (tried {tried})")


def coco_instances(
    annotations: str | Path,
    image_root: str | Path,
    excluded_classes: tuple[str, ...] = (),
    min_area: float = 0.0,
) -> list[CocoInstance]:
    """Non-crowd instances of ``annotations`` whose class is not excluded (by name) and whose ``area``
    is at least ``min_area``. Each image's ``file_name`` is looked up under ``image_root`` directly, then
    under ``<split>/`` and ``images/<split>/`` with the split from ``instances_<split>.json`` (the COCO
    and the coco128 layouts)."""
    annotations = Path(annotations)
    root = Path(image_root).absolute()  # instances are cropped later, possibly on a Ray worker
    data = load_instances_json(annotations)
    categories = {c["id"]: c["name"] for c in data["categories"]}
    unknown = sorted(set(excluded_classes) - set(categories.values()))
    if unknown:
        warnings.warn(
            f"{annotations}: excluded classes {unknown} are not categories of this file",
            stacklevel=2,
        )
    images = {image["id"]: image for image in data["images"]}
    split = _split_name(annotations)
    paths: dict[int, Path] = {}
    instances = []
    for annotation in data["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        if annotation["category_id"] not in categories:
            raise DataError(
                f"{annotations}: annotation {annotation['id']} has unknown category_id {annotation['category_id']}"
            )
        if annotation["image_id"] not in images:
            raise DataError(
                f"{annotations}: annotation {annotation['id']} has unknown image_id {annotation['image_id']}"
            )
        category = categories[annotation["category_id"]]
        if category in excluded_classes or annotation.get("area", min_area) < min_area:
            continue
        image = images[annotation["image_id"]]
        if image["id"] not in paths:
            paths[image["id"]] = _image_path(root, image["file_name"], split, annotations)
        instances.append(
            CocoInstance(
                annotation_id=annotation["id"],
                category=category,
                image_path=paths[image["id"]],
                height=int(image["height"]),
                width=int(image["width"]),
                segmentation=annotation["segmentation"],
                source=str(annotations),
            )
        )
    return instances


def decode_rle_string(counts: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools ``rleFrString``)."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError(f"compressed RLE string ends inside a run: {counts!r}")
            group = ord(counts[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(counts: list[int] | str, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask from RLE run lengths (list or compressed string), column-major."""
    runs = decode_rle_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        raise ValueError(
            f"RLE runs sum to {sum(runs)} (or are negative) but the mask has {height}x{width} pixels"
        )
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """(height, width) bool mask: the union of the filled polygons (edges included)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) < 6 or len(polygon) % 2:
            raise ValueError(
                f"a polygon needs an even number (>= 6) of coordinates, got {len(polygon)}"
            )
        draw.polygon(
            [(float(x), float(y)) for x, y in zip(polygon[::2], polygon[1::2], strict=True)],
            fill=1,
            outline=1,
        )
    return np.asarray(canvas, dtype=bool)


def instance_mask(instance: CocoInstance) -> np.ndarray:
    """The instance's full-image mask; errors name the annotations file and the annotation id."""
    segmentation, h, w = instance.segmentation, instance.height, instance.width
    where = f"{instance.source}: annotation {instance.annotation_id}"
    try:
        if isinstance(segmentation, list):
            return polygons_to_mask(segmentation, h, w)
        if isinstance(segmentation, dict) and "counts" in segmentation:
            size = [int(s) for s in segmentation.get("size", (h, w))]
            if size != [h, w]:
                raise ValueError(f"RLE size {size} differs from the image's {h}x{w}")
            return rle_to_mask(segmentation["counts"], h, w)
    except (ValueError, TypeError) as error:
        raise DataError(f"{where}: bad segmentation ({error})") from error
    raise DataError(f"{where}: segmentation is neither polygons nor RLE")


def crop_instance(instance: CocoInstance) -> tuple[np.ndarray, np.ndarray] | None:
    """(image crop (h, w, 3) uint8, mask crop (h, w) bool) over the mask's bounding box; None if empty."""
    image = read_rgb(instance.image_path)
    if image.shape[:2] != (instance.height, instance.width):
        raise DataError(
            f"{instance.image_path}: size {image.shape[0]}x{image.shape[1]} differs from "
            f"{instance.height}x{instance.width} in {instance.source}"
        )
    mask = instance_mask(instance)
    window = mask_window(mask)
    return None if window is None else (image[window].copy(), mask[window].copy())


def mask_window(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Row and column slices of the mask's bounding box; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
