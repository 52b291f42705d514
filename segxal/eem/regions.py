"""Regions of an EEM map: connected areas above a threshold, each with a prompt point at its peak."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage


def _as_numpy(name: str, array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be (H, W), got shape {array.shape}")
    return array


def extract_regions(
    eem: torch.Tensor | np.ndarray,
    prediction: torch.Tensor | np.ndarray,
    threshold: float = 0.5,
    min_area: int = 16,
    max_regions: int = 10,
    class_names: Sequence[str] | None = None,
) -> list[dict]:
    """JSON-ready records of the 8-connected areas with EEM >= ``threshold`` and >= ``min_area`` pixels,
    highest peak first (ids 1, 2, ... in that order), at most ``max_regions``.

    Each record: ``id``, ``prompt`` {x, y} (the EEM peak), ``area``, ``mean_eem``, ``peak_eem``,
    ``class_id`` and ``class_name`` (the dominant predicted class; name None without ``class_names``),
    ``bbox`` {x0, y0, x1, y1} (inclusive pixel bounds).
    """
    eem_np = _as_numpy("eem", eem).astype(np.float64)
    pred_np = _as_numpy("prediction", prediction).astype(np.int64)
    if eem_np.shape != pred_np.shape:
        raise ValueError(f"eem shape {eem_np.shape} != prediction shape {pred_np.shape}")
    labels, count = ndimage.label(eem_np >= threshold, structure=np.ones((3, 3), dtype=bool))
    candidates: list[dict[str, Any]] = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[window] == index
        area = int(inside.sum())
        if area < min_area:
            continue
        values = np.where(inside, eem_np[window], -np.inf)
        peak_y, peak_x = np.unravel_index(int(np.argmax(values)), values.shape)
        classes = pred_np[window][inside]
        class_id = int(np.bincount(classes - classes.min()).argmax() + classes.min())
        candidates.append(
            {
                "prompt": {"x": int(window[1].start + peak_x), "y": int(window[0].start + peak_y)},
                "area": area,
                "mean_eem": float(eem_np[window][inside].mean()),
                "peak_eem": float(values[peak_y, peak_x]),
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
        )
    candidates.sort(key=lambda r: (-r["peak_eem"], -r["area"], r["prompt"]["y"], r["prompt"]["x"]))
    return [
        {"id": number, **record} for number, record in enumerate(candidates[:max_regions], start=1)
    ]


def region_map(
    eem: torch.Tensor | np.ndarray, regions: Sequence[dict], threshold: float
) -> np.ndarray:
    """(H, W) int32 map of the areas behind ``regions`` (records of :func:`extract_regions` for the same
    map and threshold): each pixel holds its region's ``id``, 0 elsewhere."""
    eem_np = _as_numpy("eem", eem).astype(np.float64)
    labels, _ = ndimage.label(eem_np >= threshold, structure=np.ones((3, 3), dtype=bool))
    out = np.zeros(labels.shape, dtype=np.int32)
    for region in regions:
        component = labels[region["prompt"]["y"], region["prompt"]["x"]]
        out[labels == component] = region["id"]
    return out
