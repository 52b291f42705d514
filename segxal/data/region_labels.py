"""An image's region labels (``al.unit: region``): the pixels labelled so far and their classes, at the
scoring resolution, in one 8-bit PNG: a train id where a class was labelled, ``LABELLED_VOID`` where a
labelled region holds void, ``UNLABELLED`` (the ignore index) everywhere else. Labels merge here
exactly, region by region; training reads the label file derived from it at the image's native size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segxal.data.labels import IGNORE_INDEX
from segxal.files import write_atomically

UNLABELLED = IGNORE_INDEX
LABELLED_VOID = IGNORE_INDEX - 1


def read_region_labels(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 region labels of ``size``; all unlabelled when ``path`` is None."""
    if path is None:
        return np.full(size, UNLABELLED, dtype=np.uint8)
    labels = np.asarray(Image.open(path))
    if labels.shape != tuple(size) or labels.dtype != np.uint8:
        raise ValueError(
            f"{path}: region labels are {labels.dtype} {labels.shape}, expected uint8 {tuple(size)}"
        )
    return labels


def merge_region(labels: np.ndarray, region: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    """``labels`` with the pixels of ``region`` (bool) set from ``annotation`` (train ids, the ignore
    index for void)."""
    annotated = np.where(annotation == IGNORE_INDEX, LABELLED_VOID, annotation).astype(np.uint8)
    return np.where(region, annotated, labels).astype(np.uint8)


def labelled_mask(labels: np.ndarray) -> np.ndarray:
    return labels != UNLABELLED


def training_label(labels: np.ndarray) -> np.ndarray:
    """Train ids with the ignore index wherever no class was labelled."""
    return np.where(labels >= LABELLED_VOID, IGNORE_INDEX, labels).astype(np.uint8)


def write_region_labels(path: Path, labels: np.ndarray) -> None:
    image = Image.fromarray(labels.astype(np.uint8))
    write_atomically(path, lambda handle: image.save(handle, format="PNG"))
