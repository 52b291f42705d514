"""SegmentMeIfYouCan's component-level anomaly metrics (Chan et al. 2021): sIoU, PPV and mean F1.

Per image, with the prediction binarised at a threshold:

- ground-truth components ``K``: 8-connected components of the anomaly pixels (label 1); those under
  ``min_gt`` pixels become void;
- predicted components ``K̂``: 8-connected components of the prediction with void pixels (255) removed
  first; those under ``min_predicted`` pixels are dropped; every area below counts non-void pixels only;
- ``sIoU(k) = |k ∩ K̂(k)| / |(k ∪ K̂(k)) \\ A(k)|`` for ``k`` in ``K``, where ``K̂(k)`` is the union of the
  predicted components that meet ``k`` and ``A(k)`` the pixels of the other ground-truth components (a
  prediction that covers two objects is not charged for the second one);
- ``PPV(k̂) = |k̂ ∩ K(k̂)| / |k̂|`` for ``k̂`` in ``K̂``, ``K(k̂)`` the ground-truth components it meets.

Over a dataset, at each τ in 0.25, 0.30, ..., 0.75: TP = ground-truth components with sIoU ≥ τ, FN = the
others, FP = predicted components with PPV < τ, summed over images; F1(τ) = 2TP / (2TP + FN + FP) and
mean F1 is its mean over τ. sIoU and PPV are the means over all components of the dataset. The
threshold is the one of the best pixel-wise F1 on the same data (:func:`best_f1_threshold`), as the
benchmark's code takes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from segxal.data.labels import IGNORE_INDEX
from segxal.metrics import roc_points

TAUS = np.linspace(0.25, 0.75, 11)
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
COMPONENT_METRICS = ("siou", "ppv", "mean_f1")


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold (predict anomaly at ``score >= threshold``) of the best pixel-wise F1 over
    non-void pixels (labels 1 anomaly, 0 inlier)."""
    keep = labels != IGNORE_INDEX
    scores, positives = scores[keep].astype(np.float64), labels[keep] == 1
    tps, fps, thresholds = roc_points(scores, positives)
    f1 = 2 * tps / np.maximum(2 * tps + fps + (positives.sum() - tps), 1)
    return float(thresholds[int(np.argmax(f1))])


@dataclass(frozen=True)
class ImageComponents:
    siou: np.ndarray  # one per ground-truth component
    ppv: np.ndarray  # one per predicted component


def image_components(
    predicted: np.ndarray, label: np.ndarray, min_predicted: int = 0, min_gt: int = 0
) -> ImageComponents:
    """sIoU of each ground-truth component and PPV of each predicted one in one image (boolean
    ``predicted`` and 0/1/255 ``label`` of the same shape)."""
    label = label.copy()
    gt, _ = ndimage.label(label == 1, structure=EIGHT_CONNECTED)
    gt_sizes = np.bincount(gt.ravel())
    label[(gt > 0) & (gt_sizes[gt] < min_gt)] = IGNORE_INDEX
    valid = label != IGNORE_INDEX
    components, _ = ndimage.label(predicted & valid, structure=EIGHT_CONNECTED)
    sizes = np.bincount(components.ravel())
    components[sizes[components] < min_predicted] = 0
    gt = np.where(valid, gt, 0)  # voided specks leave the ground truth
    components = np.where(valid, components, 0)
    gt_ids = np.unique(gt[gt > 0])
    predicted_ids = np.unique(components[components > 0])
    anomaly = gt > 0
    sious = []
    for k in gt_ids:
        own = gt == k
        touching = np.unique(components[own & (components > 0)])
        covered = np.isin(components, touching) & (components > 0)
        others = anomaly & ~own
        intersection = np.count_nonzero(own & covered)
        union = np.count_nonzero((own | covered) & ~others)
        sious.append(intersection / union)
    on_anomaly = np.bincount(components[anomaly], minlength=sizes.size)
    ppv = (
        on_anomaly[predicted_ids]
        / np.bincount(components.ravel(), minlength=sizes.size)[predicted_ids]
    )
    return ImageComponents(np.asarray(sious, dtype=np.float64), ppv.astype(np.float64))


def summarize(images: Iterable[ImageComponents]) -> dict[str, float]:
    """sIoU, PPV and mean F1 (and F1 at τ = 0.25, 0.5, 0.75) over a dataset's images."""
    images = list(images)
    siou = np.concatenate([i.siou for i in images]) if images else np.zeros(0)
    ppv = np.concatenate([i.ppv for i in images]) if images else np.zeros(0)
    f1: dict[int, float] = {}
    for tau in TAUS:
        tp = int(np.count_nonzero(siou >= tau))
        fn = siou.size - tp
        fp = int(np.count_nonzero(ppv < tau))
        f1[round(100 * tau)] = 2 * tp / max(2 * tp + fn + fp, 1)
    return {
        "siou": float(siou.mean()) if siou.size else 0.0,
        "ppv": float(ppv.mean()) if ppv.size else 0.0,
        "mean_f1": float(np.mean(list(f1.values()))),
        **{f"f1_{tau}": f1[tau] for tau in (25, 50, 75)},
    }
