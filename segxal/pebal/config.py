"""PEBAL settings: the ``pebal:`` section of an experiment config.

Every field is an int, float, str, bool, Literal, a union of those (``X | None``), tuple or a nested
frozen dataclass, so the experiment YAML loader can build it. Values are validated on construction.

Regulariser weights: the paper (eq. 8 and sec. 4.2) gives β1 = 5e-4 to smoothness and β2 = 3e-6 to
sparsity; the authors' code swaps them (smoothness 3e-6, sparsity 5e-4). ``beta_smooth`` and
``beta_sparse`` always weight the term they are named after; left at ``None`` they take the value of
the chosen ``variant``, so switching the variant alone reproduces either source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from segxal.data.anomaly import AnomalyLayout
from segxal.training import TrainConfig

Variant = Literal["paper", "reference"]
VARIANTS = ("paper", "reference")

# Meta-OoD's list (Chan et al. 2021, the AnomalyMix recipe PEBAL follows: COCO classes that Cityscapes
# also labels) plus "train", a Cityscapes class Meta-OoD's list misses. Street furniture that Cityscapes
# leaves void or lacks (fire hydrant, parking meter, bench) stays in: such objects are anomalies for a
# driving label set and are among the objects that Fishyscapes / Road Anomaly label anomalous.
DRIVING_COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "bus",
    "train",
    "truck",
    "traffic light",
    "stop sign",
)

PAPER_BETA_SMOOTH, PAPER_BETA_SPARSE = 5e-4, 3e-6
REFERENCE_BETA_SMOOTH, REFERENCE_BETA_SPARSE = 3e-6, 5e-4


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_finite_floats(config) -> None:
    name = type(config).__name__
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}.{field.name} must be finite, got {value}")


@dataclass(frozen=True)
class AnomalyMixConfig:
    """Outlier pasting. Without ``coco_root`` the outliers are procedural shapes (the default).

    ``coco_root``: folder where the JSON's ``file_name`` entries are found, either directly or under
    ``<split>/`` or ``images/<split>/`` (split from ``instances_<split>.json``); ``coco_annotations``: the
    instances JSON, by default ``<coco_root>/annotations/instances_train2017.json``.
    ``scale_min``/``scale_max``: the pasted object's longer side as a fraction of the target image's
    shorter side. Each mixed image gets between 1 and ``max_objects`` objects.
    """

    fraction: float = 0.5
    max_objects: int = 2
    scale_min: float = 0.1
    scale_max: float = 0.4
    flip_probability: float = 0.5
    coco_root: str | None = None
    coco_annotations: str | None = None
    excluded_coco_classes: tuple[str, ...] = DRIVING_COCO_CLASSES
    min_instance_area: float = 64.0  # COCO ``area`` in pixels; smaller instances are skipped

    def __post_init__(self) -> None:
        _check_finite_floats(self)
        _require(
            0.0 <= self.fraction <= 1.0,
            f"AnomalyMixConfig.fraction must be in [0, 1], got {self.fraction}",
        )
        _require(
            self.max_objects >= 1,
            f"AnomalyMixConfig.max_objects must be >= 1, got {self.max_objects}",
        )
        _require(
            0.0 < self.scale_min <= self.scale_max <= 1.0,
            f"AnomalyMixConfig.scale_min ({self.scale_min}) and scale_max ({self.scale_max}) must satisfy "
            "0 < scale_min <= scale_max <= 1",
        )
        _require(
            0.0 <= self.flip_probability <= 1.0,
            f"AnomalyMixConfig.flip_probability must be in [0, 1], got {self.flip_probability}",
        )
        _require(
            self.coco_annotations is None or self.coco_root is not None,
            "AnomalyMixConfig.coco_annotations is set but coco_root (the image folder) is not",
        )
        _require(self.min_instance_area >= 0, "AnomalyMixConfig.min_instance_area must be >= 0")

    @property
    def uses_coco(self) -> bool:
        return self.coco_root is not None


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """The optimiser settings of PEBAL fine-tuning: :class:`TrainConfig` with PEBAL's defaults (a
    subclass, not an instance default, so that overriding one key keeps the others' PEBAL values)."""

    epochs: int = 5
    lr: float = 5e-3


@dataclass(frozen=True)
class BenchmarkConfig:
    """One ``pebal.benchmarks`` entry written as a mapping (a plain path is the same with the defaults).

    ``name``: the benchmark's name in tables and metrics (default: from the folder); ``layout``: one of
    :data:`segxal.data.anomaly.LAYOUTS` when detection should not decide; ``split``: LostAndFound only;
    ``min_predicted_component`` / ``min_gt_component``: this benchmark's component-size filters (pixels
    at the label resolution; default: ``pebal.evaluation``'s)."""

    path: str
    name: str | None = None
    layout: AnomalyLayout | None = None
    split: str | None = None
    min_predicted_component: int | None = None
    min_gt_component: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.path), "BenchmarkConfig.path must not be empty")
        _require(
            self.name is None or bool(self.name.strip()), "BenchmarkConfig.name must not be empty"
        )
        for field in ("min_predicted_component", "min_gt_component"):
            value = getattr(self, field)
            _require(
                value is None or value >= 0, f"BenchmarkConfig.{field} must be >= 0, got {value}"
            )


@dataclass(frozen=True)
class EvaluationConfig:
    """How the anomaly benchmarks are scored (the AnomalyMix'd validation split stays at the training size).

    ``protocol``:
    - ``label_resolution`` (default): each image is scored at ``input_height`` with its aspect kept
      (``training``: the height of ``data.image_size``; ``native``: the file's own size), the score maps
      are upsampled bilinearly to the label's resolution and every metric is computed there;
    - ``training_size``: image and label are both resized to ``data.image_size`` (squashes the aspect
      and loses small anomalies; kept to compare with older tables).

    Component metrics (SegmentMeIfYouCan's sIoU, PPV and mean F1) binarise each method's score at its
    best pixel-wise F1 threshold on the benchmark, drop predicted components under
    ``min_predicted_component`` pixels and count ground-truth components under ``min_gt_component`` as
    void (SMIYC: 500 / 100 on the anomaly track, 50 / 10 on the obstacle track, at 2048 x 1024).
    """

    protocol: Literal["label_resolution", "training_size"] = "label_resolution"
    input_height: int | Literal["training", "native"] = "training"
    min_predicted_component: int = 500
    min_gt_component: int = 100

    def __post_init__(self) -> None:
        _require(
            not isinstance(self.input_height, int) or self.input_height >= 8,
            f"EvaluationConfig.input_height must be >= 8 pixels, got {self.input_height}",
        )
        _require(
            self.min_predicted_component >= 0 and self.min_gt_component >= 0,
            "EvaluationConfig.min_predicted_component and min_gt_component must be >= 0",
        )


@dataclass(frozen=True)
class PebalConfig:
    """Losses, model surgery, AnomalyMix and scoring settings (names follow DESIGN.md §2).

    ``variant``: "paper" (the default) or "reference" (the authors' public code); see
    :mod:`segxal.pebal.losses` for every difference and why the paper form is the default.
    ``m_in``/``m_out``: energy margins (m_in < m_out). ``lam``: λ on the energy margin terms (the
    reference also applies it to the regulariser). ``ood_weight``: the reference's weight of the
    abstention term on anomaly pixels (unused by the paper variant). ``penalty_min``: the paper variant's
    floor on the penalty a = E² (the reference, like the authors' code, has none); a < 1 would reward abstaining more than predicting the true class and a → 0 makes
    the PAL loss unbounded below (1.0, as in Deep Gamblers' reward o > 1; 0 disables it).
    ``trainable``: UNet submodules that train (``head`` = the 1x1 classifier; e.g. ``decoder.3`` too).
    ``smoothing_kernel``/``smoothing_sigma``: the Gaussian applied to energy anomaly maps.

    Fine-tuning and evaluation (``jobs.pebal``, ``jobs.sweep``): ``finetune`` holds the optimiser settings of
    the last-block fine-tuning (the helper study found Adam at 5e-3 for ~5 epochs right for this project's
    small U-Nets). ``pretrained``: a segxal checkpoint of the trained segmenter (``model`` =
    ``UNet.to_checkpoint()``, as ``jobs.train`` and Ray Train write them); without it the job first trains
    the segmenter with the ``train`` section. ``benchmarks``: anomaly dataset folders (any layout of
    :func:`segxal.data.anomaly.anomaly_benchmark`), as paths or :class:`BenchmarkConfig` mappings, evaluated
    after fine-tuning besides the AnomalyMix'd validation split, as ``evaluation`` says. ``margin_quantiles``: (q_in, q_out) to calibrate the margins from the pre-trained
    model instead of taking ``m_in``/``m_out`` as given: m_in and m_out become those quantiles of its free
    energy on inlier training pixels. The paper's -12/-6 fit a WideResNet38 whose inlier energy sits far
    below; a small U-Net's sits near -3, where those margins are never active. ``panel_images``: images
    per dataset drawn as anomaly-map panels.
    """

    variant: Variant = "paper"
    m_in: float = -12.0
    m_out: float = -6.0
    lam: float = 0.1
    beta_smooth: float | None = None
    beta_sparse: float | None = None
    ood_weight: float = 0.1
    penalty_min: float = 1.0
    trainable: tuple[str, ...] = ("head",)
    smoothing_kernel: int = 7
    smoothing_sigma: float = 1.0
    anomalymix: AnomalyMixConfig = AnomalyMixConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    pretrained: str | None = None
    benchmarks: tuple[str | BenchmarkConfig, ...] = ()
    evaluation: EvaluationConfig = EvaluationConfig()
    margin_quantiles: tuple[float, float] | None = None
    panel_images: int = 3

    def __post_init__(self) -> None:
        _check_finite_floats(self)
        _require(
            self.variant in VARIANTS,
            f"PebalConfig.variant must be one of {VARIANTS}, got {self.variant!r}",
        )
        _require(
            self.m_in < self.m_out,
            f"PebalConfig.m_in ({self.m_in}) must be smaller than PebalConfig.m_out ({self.m_out}): "
            "inlier energy is pushed below m_in and anomaly energy above m_out",
        )
        for name in ("lam", "beta_smooth", "beta_sparse", "ood_weight", "penalty_min"):
            value = getattr(self, name)
            if value is not None:
                _require(
                    math.isfinite(value) and value >= 0,
                    f"PebalConfig.{name} must be >= 0, got {value}",
                )
        _require(len(self.trainable) > 0, "PebalConfig.trainable must name at least one module")
        _require(
            all(isinstance(name, str) and name for name in self.trainable),
            f"PebalConfig.trainable must be non-empty module names, got {self.trainable!r}",
        )
        _require(
            self.smoothing_kernel >= 1 and self.smoothing_kernel % 2 == 1,
            f"PebalConfig.smoothing_kernel must be a positive odd number, got {self.smoothing_kernel}",
        )
        _require(
            self.smoothing_sigma > 0,
            f"PebalConfig.smoothing_sigma must be > 0, got {self.smoothing_sigma}",
        )
        _require(
            isinstance(self.anomalymix, AnomalyMixConfig),
            f"PebalConfig.anomalymix must be an AnomalyMixConfig, got {type(self.anomalymix).__name__}",
        )
        _require(
            isinstance(self.finetune, TrainConfig),
            f"PebalConfig.finetune must be a TrainConfig, got {type(self.finetune).__name__}",
        )
        if self.margin_quantiles is not None:
            q_in, q_out = self.margin_quantiles
            _require(
                0.0 <= q_in < q_out <= 1.0,
                f"PebalConfig.margin_quantiles must be (q_in, q_out) with 0 <= q_in < q_out <= 1, got {self.margin_quantiles}",
            )
        _require(
            self.panel_images >= 0,
            f"PebalConfig.panel_images must be >= 0, got {self.panel_images}",
        )

    @property
    def benchmark_entries(self) -> tuple[BenchmarkConfig, ...]:
        """Every ``benchmarks`` entry as a :class:`BenchmarkConfig`."""
        return tuple(
            BenchmarkConfig(entry) if isinstance(entry, str) else entry for entry in self.benchmarks
        )

    @property
    def smoothness_weight(self) -> float:
        """β of the smoothness term: ``beta_smooth`` or the variant's published value."""
        if self.beta_smooth is not None:
            return self.beta_smooth
        return PAPER_BETA_SMOOTH if self.variant == "paper" else REFERENCE_BETA_SMOOTH

    @property
    def sparsity_weight(self) -> float:
        """β of the sparsity term: ``beta_sparse`` or the variant's published value."""
        if self.beta_sparse is not None:
            return self.beta_sparse
        return PAPER_BETA_SPARSE if self.variant == "paper" else REFERENCE_BETA_SPARSE
