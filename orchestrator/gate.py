"""The Dice gate (SegXAL §3.4): which re-annotated images join the labelled pool.

For each image sent to the oracle, Dice compares the model's segmentation with the re-annotation. If
it is strictly above theta the image joins D^L with the re-annotation as its label; otherwise it goes
back to D^U for a later cycle. theta = 0 turns the gate off: every re-annotated image is accepted,
whatever its Dice (including NaN, when no pixel is valid). With theta > 0 a NaN Dice is returned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.records import Metric
from segxal.data.labels import IGNORE_INDEX
from segxal.metrics import mean_dice


def check_theta(theta: float) -> float:
    """theta as a float in [0, 1]; anything else is a ValueError naming theta."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.integer, np.floating)):
        raise ValueError(f"theta must be a number in [0, 1], got {theta!r}")
    theta = float(theta)
    if not 0.0 <= theta <= 1.0:  # also rejects NaN
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    return theta


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict; ``accepted`` and ``returned`` keep the order of the input ids."""

    theta: float
    accepted: tuple[str, ...]
    returned: tuple[str, ...]
    accepted_dice: tuple[float, ...]
    returned_dice: tuple[float, ...]

    @property
    def enabled(self) -> bool:
        return self.theta > 0.0


def dice_gate(ids: Sequence[str], dice: Sequence[float], theta: float) -> GateDecision:
    """Split ``ids`` into accepted (Dice > theta, or all of them when theta = 0) and returned."""
    theta = check_theta(theta)
    ids = [str(sample_id) for sample_id in ids]
    values = np.asarray(dice, dtype=np.float64).reshape(-1)
    if len(values) != len(ids):
        raise ValueError(f"dice: expected {len(ids)} values (one per id), got {len(values)}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids: duplicate sample ids")
    outside = ~np.isnan(values) & ((values < 0.0) | (values > 1.0))
    if outside.any():
        bad = [(ids[i], float(values[i])) for i in np.flatnonzero(outside)[:5]]
        raise ValueError(f"dice must be in [0, 1] (or NaN), got {bad}")
    keep = np.ones(len(ids), dtype=bool) if theta == 0.0 else values > theta  # NaN > theta is False
    return GateDecision(
        theta=theta,
        accepted=tuple(i for i, k in zip(ids, keep, strict=True) if k),
        returned=tuple(i for i, k in zip(ids, keep, strict=True) if not k),
        accepted_dice=tuple(float(v) for v in values[keep]),
        returned_dice=tuple(float(v) for v in values[~keep]),
    )


def _as_label_tensor(x) -> torch.Tensor:
    """A read-only array (one that came through Ray's object store) is copied rather than aliased."""
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def image_dice(prediction, annotation, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean Dice over classes present in either label map (``segxal.metrics.mean_dice``); pixels void
    in either map are ignored; NaN when no pixel is valid. Tensors or arrays of the same shape."""
    prediction = _as_label_tensor(prediction)
    annotation = _as_label_tensor(annotation)
    if prediction.shape != annotation.shape:
        raise ValueError(
            f"prediction shape {tuple(prediction.shape)} != annotation shape {tuple(annotation.shape)}"
        )
    return mean_dice(prediction, annotation.to(prediction.device), num_classes, ignore_index)


def dice_per_image(
    ids: Sequence[str],
    predictions: Iterable,
    annotations: Iterable,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Dice per image, aligned with ``ids``; a shape mismatch names the image."""
    predictions, annotations = list(predictions), list(annotations)
    if not len(predictions) == len(annotations) == len(ids):
        raise ValueError(
            f"expected one prediction and one annotation per id: {len(ids)} ids, "
            f"{len(predictions)} predictions, {len(annotations)} annotations"
        )
    values = []
    for sample_id, prediction, annotation in zip(ids, predictions, annotations, strict=True):
        try:
            values.append(image_dice(prediction, annotation, num_classes, ignore_index))
        except ValueError as error:
            raise ValueError(f"{sample_id}: {error}") from error
    return np.asarray(values, dtype=np.float64)


def gate_summary(decision: GateDecision) -> dict[str, float]:
    """The gate's metrics for tracking: counts, and the mean Dice overall and of each side (NaN where
    there is none)."""

    def mean(values: tuple[float, ...]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return {
        Metric.THETA: decision.theta,
        Metric.SELECTED: float(len(decision.accepted) + len(decision.returned)),
        Metric.ACCEPTED: float(len(decision.accepted)),
        Metric.RETURNED: float(len(decision.returned)),
        Metric.MEAN_DICE: mean(decision.accepted_dice + decision.returned_dice),
        Metric.ACCEPTED_DICE: mean(decision.accepted_dice),
        Metric.RETURNED_DICE: mean(decision.returned_dice),
    }
