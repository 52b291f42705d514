"""Segmentation and anomaly metrics.

Segmentation: a streaming confusion matrix gives per-class IoU, mIoU and pixel accuracy; Dice
compares two label maps per class. Anomaly: AUROC, average precision and FPR at 95 % TPR over pixels
pooled across a dataset, void ignored, anomaly the positive class. AP and AUROC follow
scikit-learn's definitions (step-wise AP, trapezoidal ROC, tied scores grouped).
"""

from __future__ import annotations

import numpy as np
import torch

from segxal.data.labels import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates ``matrix[true, predicted]`` pixel counts; ignore pixels are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """``prediction`` and ``target``: integer tensors of the same shape (any device)."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}"
            )
        valid = target != self.ignore_index
        target = target[valid].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"target ids must be in [0, {self.num_classes}) or {self.ignore_index}"
            )
        predicted = prediction[valid].long()
        if predicted.numel() and (predicted.min() < 0 or predicted.max() >= self.num_classes):
            bad = sorted(
                {int(v) for v in predicted[(predicted < 0) | (predicted >= self.num_classes)]}
            )
            raise ValueError(
                f"predicted ids must be in [0, {self.num_classes}) at labelled pixels, got {bad[:10]}"
            )
        index = target * self.num_classes + predicted
        counts = torch.bincount(index, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).cpu()

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for classes absent from both target and prediction."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        """Mean IoU over classes present in target or prediction."""
        return float(torch.nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diag().sum() / total) if total > 0 else float("nan")

    def summary(self, class_names: tuple[str, ...] | None = None) -> dict[str, float]:
        """{"miou", "pixel_accuracy", "iou/<class>"} with IoU for present classes only."""
        names = class_names or tuple(str(i) for i in range(self.num_classes))
        result = {"miou": self.miou(), "pixel_accuracy": self.pixel_accuracy()}
        for name, value in zip(names, self.iou().tolist(), strict=True):
            if not np.isnan(value):
                result[f"iou/{name}"] = value
        return result


def dice_per_class(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Dice 2|A∩B|/(|A|+|B|) per class between two label maps; pixels where either is void are
    ignored; NaN for classes absent from both."""
    valid = (a != ignore_index) & (b != ignore_index)
    a, b = a[valid].long(), b[valid].long()
    inter = torch.bincount(a[a == b], minlength=num_classes)[:num_classes].double()
    sizes = (
        torch.bincount(a, minlength=num_classes)[:num_classes]
        + torch.bincount(b, minlength=num_classes)[:num_classes]
    ).double()
    return torch.where(
        sizes > 0, 2 * inter / sizes.clamp(min=1), torch.full_like(inter, float("nan"))
    )


def mean_dice(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> float:
    """Mean Dice over classes present in either map (NaN when no pixel is valid)."""
    per_class = dice_per_class(a, b, num_classes, ignore_index)
    return float(torch.nanmean(per_class)) if (~per_class.isnan()).any() else float("nan")


def _pooled(scores, labels, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(
        scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64
    ).ravel()
    labels = np.asarray(
        labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels
    ).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    valid = labels != ignore_index
    scores, labels = scores[valid], labels[valid]
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("anomaly labels must be 0 (inlier), 1 (anomaly) or the ignore index")
    if not np.isfinite(scores).all():
        raise ValueError("anomaly scores contain NaN or Inf")
    return scores, labels.astype(bool)


def roc_points(
    scores: np.ndarray, positives: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, and those thresholds (a pixel
    is predicted positive at ``score >= threshold``), highest score first."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(positives)[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), scores[last_of_group]


def fpr_at_recall(tps: np.ndarray, fps: np.ndarray, n_neg: int, level: float = 0.95) -> float:
    """The FPR at the operating point whose recall is closest to ``level``; among points equally close
    (a recall that several thresholds share), the one with the largest FPR. This is the convention of
    Hendrycks et al.'s ``fpr_and_fdr_at_recall``, which PEBAL and most anomaly papers report as FPR95,
    in the same float64 arithmetic (so that ties between two distances break as theirs do). On tied
    scores it can differ from the first threshold whose TPR reaches ``level``."""
    recall = tps / tps[-1]
    full = int(np.searchsorted(tps, tps[-1]))  # the first threshold that finds every positive
    recall, fps = recall[full::-1], fps[full::-1]
    return float(fps[np.argmin(np.abs(recall - level))] / n_neg)


def anomaly_metrics(scores, labels, ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """AUROC, AP and FPR95 (:func:`fpr_at_recall`, the anomaly papers' convention) for pixel scores
    (higher = more anomalous).

    ``scores`` and ``labels`` are arrays or tensors of the same size: labels 1 anomaly, 0 inlier,
    ``ignore_index`` void. Both classes must be present.
    """
    scores, positives = _pooled(scores, labels, ignore_index)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"need both anomaly and inlier pixels, got {n_pos} anomaly and {n_neg} inlier"
        )
    tps, fps, _ = roc_points(scores, positives)
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    precision = tps / (tps + fps)
    recall = tps / n_pos
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return {
        "auroc": float(np.trapezoid(tpr, fpr)),
        "ap": ap,
        "fpr95": fpr_at_recall(tps, fps, n_neg),
    }
