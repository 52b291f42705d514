"""Reading a Label Studio JSON export back: every task of the cycle, checked, decoded to a label mask.

Checks, each an error that names the file and the task: the JSON parses and is a list of tasks; each
task's ``sample_id`` is one the cycle exported, once; its image reference resolves inside the dataset root
to the image exported for that sample; it has a submitted annotation; every region is a brush or polygon
of the labelling config with one class of the label set, at the image's native size (``original_width``
/ ``original_height`` and the RLE's length, against the size recorded at export); every exported sample
has a task. Keypoints (the EEM prompts) and the queried regions' layer (region mode) are skipped.

Regions are painted in the order of the annotation's result list, a later region over an earlier one;
pixels no region covers are 255 (not annotated).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Outline

from orchestrator.labelstudio.rle import rle_to_mask
from orchestrator.labelstudio.tasks import BRUSH, IMAGE, POLYGON, PROMPT, QUERY, ImageReferences
from segxal.data.io import DataError
from segxal.data.labels import IGNORE_INDEX, LabelSet

REGION_TAGS = {"brushlabels": BRUSH, "polygonlabels": POLYGON, "keypointlabels": PROMPT}
MAX_EXPORT_BYTES = 1 << 30  # a cycle's brush masks are RLE-compressed: far below this
MAX_NESTING = 32  # a Label Studio JSON export nests 7 levels


class LabelStudioImportError(DataError):
    """A Label Studio export does not fit the cycle it is imported into; the message names the task."""


@dataclass(frozen=True)
class ExportedTask:
    """What the cycle's manifest records of each exported image."""

    sample_id: str
    image_path: str
    image: str  # the reference Label Studio was given
    height: int  # native image size: what Label Studio shows and its masks have
    width: int


def read_export(
    path: str | Path, exported: Sequence[ExportedTask], images: ImageReferences, label_set: LabelSet
) -> dict[str, np.ndarray]:
    """sample id -> (H, W) uint8 train ids at the image's native size, for every exported image."""
    path = Path(path)
    tasks = _load_tasks(path)
    by_id = {task.sample_id: task for task in exported}
    labels: dict[str, np.ndarray] = {}
    for index, item in enumerate(tasks):
        name = _task_name(item, index)
        try:
            sample_id, label = _read_task(item, by_id, images, label_set)
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # malformed JSON content
            detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            raise LabelStudioImportError(f"{path}: {name}: {detail}") from error
        if sample_id in labels:
            raise LabelStudioImportError(f"{path}: {name}: a second task for {sample_id}")
        labels[sample_id] = label
    missing = [task.sample_id for task in exported if task.sample_id not in labels]
    if missing:
        raise LabelStudioImportError(
            f"{path}: no task for {missing}: export every task of the cycle"
        )
    return labels


def _load_tasks(path: Path) -> list:
    if path.is_dir():
        raise LabelStudioImportError(
            f"{path}: is a folder; pass the JSON file Label Studio exported"
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError as error:
        raise LabelStudioImportError(f"{path}: file not found") from error
    if size > MAX_EXPORT_BYTES:
        raise LabelStudioImportError(
            f"{path}: {size / 2**20:.0f} MiB, more than the {MAX_EXPORT_BYTES >> 20} MiB a cycle's "
            "export can need; export only this cycle's project"
        )
    try:
        tasks = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LabelStudioImportError(
            f"{path}: not valid JSON ({error}); is the export file complete?"
        ) from error
    except RecursionError:
        raise LabelStudioImportError(
            f"{path}: JSON nested deeper than the parser allows; not a Label Studio export"
        ) from None
    if not isinstance(tasks, list):
        raise LabelStudioImportError(
            f"{path}: a Label Studio JSON export is a list of tasks, got {type(tasks).__name__}"
        )
    if _nesting(tasks) > MAX_NESTING:
        raise LabelStudioImportError(
            f"{path}: JSON nested more than {MAX_NESTING} levels; not a Label Studio export"
        )
    return tasks


def _nesting(value) -> int:
    """How deep lists and objects nest in ``value``, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        )
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _task_name(item, index: int) -> str:
    if not isinstance(item, dict):
        return f"task #{index + 1}"
    data = item.get("data")
    if not isinstance(data, dict):
        data = {}
    number = item.get("id", f"#{index + 1}")
    return f"task {number} ({data['sample_id']})" if "sample_id" in data else f"task {number}"


def _read_task(
    item, by_id: dict[str, ExportedTask], images: ImageReferences, label_set: LabelSet
) -> tuple[str, np.ndarray]:
    if isinstance(item, dict) and "data" not in item and "sample_id" in item:
        raise ValueError(
            "a JSON-MIN task (fields at the top, no 'data' object): export the project in Label "
            "Studio's JSON format (not JSON-MIN or CSV)"
        )
    if not isinstance(item, dict) or not isinstance(item.get("data"), dict):
        raise ValueError("not a Label Studio task (no 'data' object)")
    data = item["data"]
    sample_id = data.get("sample_id")
    if not isinstance(sample_id, str):
        raise ValueError(f"data.sample_id must be a string, got {type(sample_id).__name__}")
    if sample_id not in by_id:
        raise ValueError(
            f"sample_id {sample_id!r} is not one of the {len(by_id)} images this cycle exported "
            "(export a project that holds this cycle's tasks only)"
        )
    task = by_id[sample_id]
    image = images.resolve(str(data.get("image")))
    if image != Path(task.image_path).resolve():
        raise ValueError(
            f"image {image} is not the image exported for {sample_id} ({task.image_path})"
        )
    label = np.full((task.height, task.width), IGNORE_INDEX, dtype=np.uint8)
    for result in _submitted(item)["result"]:
        _paint(label, result, label_set)
    return sample_id, label


def _submitted(item: dict) -> dict:
    """The task's last annotation that was submitted (not skipped)."""
    if "annotations" not in item:
        raise ValueError(
            "no 'annotations': export the project in Label Studio's JSON format (not JSON-MIN or CSV)"
        )
    submitted = [a for a in item["annotations"] if not a.get("was_cancelled", False)]
    if not submitted:
        raise ValueError(
            "no submitted annotation (skipped or not annotated yet): annotate it and export again"
        )
    return submitted[-1]


def _paint(label: np.ndarray, result: dict, label_set: LabelSet) -> None:
    if not isinstance(result, dict):
        raise ValueError(f"a result must be an object, got {type(result).__name__}")
    kind, region = result.get("type"), result.get("id", "?")
    if (kind, result.get("from_name"), result.get("to_name")) == ("brushlabels", QUERY, IMAGE):
        return  # the queried region as shown, not a label
    if kind not in REGION_TAGS:
        raise ValueError(f"region {region}: type {kind!r} is none of {', '.join(REGION_TAGS)}")
    if (result.get("from_name"), result.get("to_name")) != (REGION_TAGS[kind], IMAGE):
        raise ValueError(
            f"region {region}: from_name/to_name {result.get('from_name')!r}/{result.get('to_name')!r} "
            f"are not the labelling config's {REGION_TAGS[kind]!r}/{IMAGE!r}"
        )
    if kind == "keypointlabels":
        return
    height, width = label.shape
    size = (result.get("original_width"), result.get("original_height"))
    if size != (width, height):
        raise ValueError(
            f"region {region}: mask of size {size[0]}x{size[1]} but the image is {width}x{height}"
        )
    value = result["value"]
    names = value.get(kind)
    if not isinstance(names, list) or len(names) != 1:
        raise ValueError(f"region {region}: expected exactly one class, got {names!r}")
    if names[0] not in label_set.class_names:
        raise ValueError(
            f"region {region}: class {names[0]!r} is not in the {label_set.name} label set"
        )
    try:
        mask = (
            rle_to_mask(value["rle"], height, width)
            if kind == "brushlabels"
            else polygon_mask(value["points"], height, width)
        )
    except ValueError as error:
        raise ValueError(f"region {region}: {error}") from error
    label[mask] = label_set.class_names.index(names[0])


def polygon_mask(points: list, height: int, width: int) -> np.ndarray:
    """(H, W) mask of the pixels whose centre lies inside a polygon given in percent of the image."""
    corners = np.asarray(points, dtype=np.float64)
    if (
        corners.ndim != 2
        or corners.shape[1] != 2
        or len(corners) < 3
        or not np.isfinite(corners).all()
    ):
        raise ValueError(f"a polygon needs at least 3 [x, y] points in percent, got {points!r}")
    if (corners < 0).any() or (corners > 100).any():
        raise ValueError("polygon points must lie in [0, 100] percent of the image")
    corners = corners * [width / 100, height / 100]
    x0, y0 = (math.floor(v) for v in corners.min(0))
    x1, y1 = (
        min(math.ceil(v), limit) for v, limit in zip(corners.max(0), (width, height), strict=True)
    )
    ys, xs = np.mgrid[y0:y1, x0:x1]
    inside = Outline(corners).contains_points(
        np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
    )
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = inside.reshape(ys.shape)
    return mask
