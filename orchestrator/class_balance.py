"""Class-balanced acquisition (``al.class_balance``): any score times the rarity, in the labelled pool,
of the classes the model predicts where it looks.

A class's weight is w_c = 1 / (C f_c + 1), with f_c its share of the labelled pixels the last training
saw (``train/class_pixels/<c>``) and C the number of classes: 1 for a class never labelled, 1/2 at a
uniform share, 1/(C + 1) for a class that is all the labelled pool holds. An image's (or region's) score
is multiplied by the mean weight of its predicted pixels (CBDA-style), so among equally uncertain images
the one showing rare classes comes first, and the flag combines with every scored strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.records import Metric


def class_weights(class_pixels: Sequence[float]) -> tuple[float, ...]:
    """w_c from the labelled pixel counts per class (all equal when nothing is counted)."""
    total = float(sum(class_pixels))
    classes = len(class_pixels)
    if total <= 0:
        return (1.0,) * classes
    return tuple(1.0 / (classes * count / total + 1.0) for count in class_pixels)


def class_pixels_of(metrics: dict[str, float], classes: int) -> list[float]:
    """The per-class labelled pixel counts a training reported (0 where it reported none)."""
    return [float(metrics.get(Metric.class_pixels(c), 0.0)) for c in range(classes)]
