"""Explainable Error Mask (EEM): entropy, proximity, Grad-CAM, fusion, regions and prompt points.

Depth backends live in :mod:`segxal.models.depth`; panels in :mod:`segxal.eem.panels` (matplotlib).
"""

from segxal.eem.config import DepthConfig, EEMConfig
from segxal.eem.entropy import normalized_entropy, pixel_entropy
from segxal.eem.fusion import fuse_eem, image_scores, minmax_per_image, unit_max_per_image
from segxal.eem.gradcam import grad_cam, resolve_layer
from segxal.eem.pipeline import EEMMaps, EEMScorer, EEMScores, score_batch
from segxal.eem.proximity import depth_informed_image, mask_weight, near_region, otsu_threshold
from segxal.eem.regions import extract_regions

__all__ = [
    "DepthConfig",
    "EEMConfig",
    "EEMMaps",
    "EEMScorer",
    "EEMScores",
    "depth_informed_image",
    "extract_regions",
    "fuse_eem",
    "grad_cam",
    "image_scores",
    "mask_weight",
    "minmax_per_image",
    "near_region",
    "normalized_entropy",
    "otsu_threshold",
    "pixel_entropy",
    "resolve_layer",
    "score_batch",
    "unit_max_per_image",
]
