"""Regions of an EEM map: connected areas above a threshold, each with a prompt point where the model is
most uncertain inside it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from segxal.eem.proximity import otsu_threshold


def _as_numpy(name: str, array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be (H, W), got shape {array.shape}")
    return array


RegionThreshold = float | Literal["otsu"]


def otsu_region_threshold(eem: np.ndarray, bins: int = 64) -> float:
    """The Otsu edge of the finite values of ``eem`` (-inf marks pixels out of play), over their own
    range: a threshold that follows the map's scale (BALD's, say, far below the entropy's); +inf where
    the values do not split."""
    values = eem[np.isfinite(eem)]
    if values.size == 0:
        return math.inf
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return math.inf
    unit = torch.from_numpy((values - low) / (high - low)).reshape(1, 1, -1)
    edge = float(otsu_threshold(unit, bins)[0])
    return low + edge * (high - low) if math.isfinite(edge) else math.inf


def extract_regions(
    eem: torch.Tensor | np.ndarray,
    prediction: torch.Tensor | np.ndarray,
    threshold: RegionThreshold = 0.5,
    min_area: int = 16,
    max_regions: int = 10,
    class_names: Sequence[str] | None = None,
    otsu_bins: int = 64,
    uncertainty: torch.Tensor | np.ndarray | None = None,
) -> list[dict]:
    """JSON-ready records of the 8-connected areas with EEM >= ``threshold`` (a value, or ``otsu``:
    :func:`otsu_region_threshold` of this map) and >= ``min_area`` pixels, highest peak first (ids 1,
    2, ... in that order), at most ``max_regions``.

    The prompt is the region's peak of ``uncertainty`` (the EEM's pixel-wise term: entropy or BALD), or
    of the EEM without it, off the image's outermost pixel ring. Not the EEM's own peak: its Grad-CAM
    term is a coarse map (the last decoder block's resolution) whose maximum follows the feature maps'
    border and the near band's edge rather than the model's errors (``bench/prompt_placement.py``,
    bench/RESULTS.md).

    Each record: ``id``, ``prompt`` {x, y}, ``area``, ``mean_eem``, ``peak_eem``,
    ``class_id`` and ``class_name`` (the dominant predicted class; name None without ``class_names``),
    ``bbox`` {x0, y0, x1, y1} (inclusive pixel bounds), ``threshold`` (the EEM value it lies above).
    """
    eem_np = _as_numpy("eem", eem).astype(np.float64)
    pred_np = _as_numpy("prediction", prediction).astype(np.int64)
    if eem_np.shape != pred_np.shape:
        raise ValueError(f"eem shape {eem_np.shape} != prediction shape {pred_np.shape}")
    prompt_np = eem_np if uncertainty is None else _as_numpy("uncertainty", uncertainty)
    if prompt_np.shape != eem_np.shape:
        raise ValueError(f"uncertainty shape {prompt_np.shape} != eem shape {eem_np.shape}")
    if threshold == "otsu":
        threshold = otsu_region_threshold(eem_np, otsu_bins)
    labels, count = ndimage.label(eem_np >= threshold, structure=np.ones((3, 3), dtype=bool))
    candidates = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[window] == index
        if int(inside.sum()) >= min_area:
            record = _record(inside, eem_np, prompt_np, pred_np, window, class_names)
            candidates.append({**record, "threshold": float(threshold)})
    candidates.sort(key=lambda r: (-r["peak_eem"], -r["area"], r["prompt"]["y"], r["prompt"]["x"]))
    return [
        {"id": number, **record} for number, record in enumerate(candidates[:max_regions], start=1)
    ]


def region_map(eem: torch.Tensor | np.ndarray, regions: Sequence[dict]) -> np.ndarray:
    """(H, W) int32 map of the areas behind ``regions`` (records of :func:`extract_regions` for the same
    map): each pixel holds its region's ``id``, 0 elsewhere."""
    shape = _as_numpy("eem", eem).shape
    return queried_region_map(eem, np.zeros(shape, dtype=bool), regions)


def _record(
    inside: np.ndarray,
    values: np.ndarray,
    prompt_values: np.ndarray,
    prediction: np.ndarray,
    window: tuple[slice, slice],
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    """The record fields of one area (``inside``, a mask over ``window``) of a map of ``values``, its
    prompt at the area's peak of ``prompt_values`` off the image's outermost pixel ring (where the last
    convolution's zero padding inflates the uncertainty, though the model is no more often wrong there:
    bench/RESULTS.md), or on it for an area that lies on the ring only."""
    height, width = values.shape
    rows = np.arange(window[0].start, window[0].stop)[:, None]
    cols = np.arange(window[1].start, window[1].stop)[None, :]
    ring = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)
    off_ring = inside & ~ring
    candidates = off_ring if off_ring.any() else inside
    prompts = np.where(candidates, prompt_values[window], -np.inf)
    prompt_y, prompt_x = np.unravel_index(int(np.argmax(prompts)), prompts.shape)
    classes = prediction[window][inside]
    class_id = int(np.bincount(classes - classes.min()).argmax() + classes.min())
    return {
        "prompt": {"x": int(window[1].start + prompt_x), "y": int(window[0].start + prompt_y)},
        "area": int(inside.sum()),
        "mean_eem": float(values[window][inside].mean()),
        "peak_eem": float(values[window][inside].max()),
        "class_id": class_id,
        "class_name": (
            class_names[class_id]
            if class_names is not None and 0 <= class_id < len(class_names)
            else None
        ),
        "bbox": {
            "x0": int(window[1].start),
            "y0": int(window[0].start),
            "x1": int(window[1].stop - 1),
            "y1": int(window[0].stop - 1),
        },
    }


def cell_regions(
    values: torch.Tensor | np.ndarray,
    prediction: torch.Tensor | np.ndarray,
    labelled: np.ndarray,
    cell: int,
    class_names: Sequence[str] | None = None,
) -> list[dict]:
    """Records (as :func:`extract_regions`, plus ``cell``) of the ``cell`` x ``cell`` cells of the image
    that hold an unlabelled pixel, row-major, ids 1, 2, ... over every cell of the grid; a cell's
    ``area``, ``mean_eem`` and prompt are over its unlabelled pixels of ``values``."""
    values_np = _as_numpy("values", values).astype(np.float64)
    pred_np = _as_numpy("prediction", prediction).astype(np.int64)
    height, width = values_np.shape
    if labelled.shape != values_np.shape:
        raise ValueError(f"labelled shape {labelled.shape} != map shape {values_np.shape}")
    columns = -(-width // cell)
    records = []
    for top in range(0, height, cell):
        for left in range(0, width, cell):
            window = (slice(top, min(top + cell, height)), slice(left, min(left + cell, width)))
            inside = ~labelled[window]
            if not inside.any():
                continue
            number = (top // cell) * columns + left // cell + 1
            record = _record(inside, values_np, values_np, pred_np, window, class_names)
            records.append({"id": number, **record, "cell": cell})
    return records


def queried_region_map(
    eem: torch.Tensor | np.ndarray, labelled: np.ndarray, regions: Sequence[dict]
) -> np.ndarray:
    """(H, W) int32 map of the unlabelled pixels of ``regions``, each its record's ``id``, 0 elsewhere.
    A cell is its box; an EEM region is the area above its record's ``threshold`` of this ``eem``
    (unlabelled pixels only) that holds its prompt, or, where recomputing moved the prompt below the
    threshold, the area above it in its box (the whole box when none is)."""
    eem_np = np.where(labelled, -np.inf, _as_numpy("eem", eem).astype(np.float64))
    components: dict[float, np.ndarray] = {}  # the connected areas above each threshold
    out = np.zeros(eem_np.shape, dtype=np.int32)
    for region in regions:
        box = region["bbox"]
        window = (slice(box["y0"], box["y1"] + 1), slice(box["x0"], box["x1"] + 1))
        in_box = np.zeros(eem_np.shape, dtype=bool)
        in_box[window] = True
        if "cell" in region:
            out[in_box & ~labelled] = region["id"]
            continue
        threshold = region["threshold"]
        if threshold not in components:
            above = eem_np >= threshold
            components[threshold] = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))[0]
        labels = components[threshold]
        component = labels[region["prompt"]["y"], region["prompt"]["x"]]
        if component > 0:
            area = labels == component
        else:
            above_in_box = in_box & (eem_np >= threshold)
            area = above_in_box if above_in_box.any() else in_box
        out[area & ~labelled] = region["id"]
    return out
