"""PEBAL anomaly segmentation: settings, model surgery, losses, AnomalyMix and anomaly scores.

Benchmark loaders live in :mod:`segxal.data.anomaly`; the metrics in :func:`segxal.metrics.anomaly_metrics`.
"""

from segxal.pebal.anomalymix import (
    AnomalyMix,
    CocoOutliers,
    OutlierObject,
    SyntheticOutliers,
    synthetic_outlier,
)
from segxal.pebal.coco import CocoInstance, coco_instances, crop_instance, load_instances_json
from segxal.pebal.config import AnomalyMixConfig, PebalConfig
from segxal.pebal.losses import TERMS, NonFiniteLossError, check_finite, pebal_loss
from segxal.pebal.model import (
    add_abstention_channel,
    freeze_except,
    parameter_counts,
    prepare_pebal_model,
)
from segxal.pebal.scores import SCORE_METHODS, anomaly_score, free_energy, gaussian_blur

__all__ = [
    "AnomalyMix",
    "AnomalyMixConfig",
    "CocoInstance",
    "CocoOutliers",
    "NonFiniteLossError",
    "OutlierObject",
    "PebalConfig",
    "SCORE_METHODS",
    "SyntheticOutliers",
    "TERMS",
    "add_abstention_channel",
    "anomaly_score",
    "check_finite",
    "coco_instances",
    "crop_instance",
    "free_energy",
    "freeze_except",
    "gaussian_blur",
    "load_instances_json",
    "parameter_counts",
    "pebal_loss",
    "prepare_pebal_model",
    "synthetic_outlier",
]
