"""The experiment configuration: typed, frozen, loaded from YAML with ``--set`` overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.cost import BudgetUnit
from orchestrator.gate import check_theta
from orchestrator.stopping import StopConfig
from orchestrator.strategies import get_strategy
from orchestrator.sweep_config import SweepConfig
from orchestrator.typed_config import load_config
from segxal.data.synthetic import SyntheticConfig
from segxal.eem.config import EEMConfig
from segxal.models.unet import UNetConfig
from segxal.pebal.config import PebalConfig
from segxal.training import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["synthetic", "cityscapes", "camvid"] = "synthetic"
    root: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    image_size: tuple[int, int] | None = (
        256,
        512,
    )  # (H, W) every image is resized to; null keeps file size
    crop_size: tuple[int, int] | None = None  # random training crop (H, W) after resizing
    max_train_images: int | None = None  # first N of the sorted manifest, for quick runs
    max_val_images: int | None = None
    # DataLoader processes that decode ahead, per training process (jobs.train, Ray Train workers,
    # training in the driver) and per scoring actor: up to the CPUs each has (scaling.cpus_per_worker,
    # al.scorer_cpus); 0 decodes in the process itself
    loader_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net; ``dropout`` after the blocks in ``dropout_at`` (MC dropout for BALD)."""

    width: int = 16
    depth: int = 4
    dropout: float = 0.0
    dropout_at: tuple[str, ...] = ("bottleneck",)

    def __post_init__(self) -> None:
        self.unet(num_classes=1)  # its checks, when the config loads

    def unet(self, num_classes: int) -> UNetConfig:
        return UNetConfig(num_classes, 3, self.width, self.depth, self.dropout, self.dropout_at)


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "segxal"
    run_name: str | None = None


@dataclass(frozen=True)
class ScalingConfig:
    """How Ray Train runs the training loop: workers (DDP when > 1), GPUs, retries from checkpoint.
    ``num_workers: 0`` trains in the driver process instead: no Ray Train start-up per cycle (small
    runs, one machine), no retries."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class LabelStudioConfig:
    """How Label Studio reaches the images of ``al.oracle: labelstudio``: as local files below
    ``document_root`` (Label Studio's ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``; null: the dataset root),
    or, with ``url_prefix`` set, at ``<url_prefix>/<path relative to the dataset root>``."""

    document_root: str | None = None
    url_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.document_root is not None and self.url_prefix is not None:
            raise ValueError("set document_root or url_prefix, not both")
        if self.url_prefix is not None and not self.url_prefix.strip("/"):
            raise ValueError("url_prefix must not be empty")


@dataclass(frozen=True)
class ActiveLearningConfig:
    """The SegXAL cycle. Budgets are a fraction (float) of the training pool or a count (int):
    ``initial_labelled`` (D^L at the start), ``budget`` (n, images sent to the oracle per cycle) and
    ``subset`` (D^S, the random share of the unlabelled pool that is scored each cycle).

    ``unit: region`` queries regions instead of images (``orchestrator.cost``): then ``budget`` is a
    count in ``budget_unit`` per cycle, D^S is drawn from every image with unlabelled pixels, and
    strategies without EEM regions rank ``region_cell`` x ``region_cell`` cells."""

    strategy: str = "eem"
    oracle: Literal["simulated", "pseudo", "labelstudio"] = "simulated"
    cycles: int = 5
    initial_labelled: int | float = 0.4
    budget: int | float = 0.05
    subset: int | float = 1.0
    unit: Literal["image", "region"] = "image"
    budget_unit: BudgetUnit = "clicks"
    region_cell: int = 32
    class_balance: bool = (
        False  # weight every score by its classes' rarity (orchestrator.class_balance)
    )
    theta: float = 0.5  # Dice gate; 0 turns it off
    warm_start: bool = True
    pseudo_confidence: float = 0.9
    num_scorers: int = 2
    scorer_cpus: float = 0.5  # reserved per scoring actor; they idle while Ray Train runs
    scorer_gpus: float = 0.0  # fractional GPUs per scoring actor
    scorer_batch_size: int = 4
    panels: int = 4  # EEM panels of selected images logged per cycle
    labelstudio: LabelStudioConfig = field(default_factory=LabelStudioConfig)
    stop: StopConfig = field(default_factory=StopConfig)

    def __post_init__(self) -> None:
        get_strategy(self.strategy)
        check_theta(self.theta)
        if self.cycles < 0:
            raise ValueError(f"cycles must be >= 0, got {self.cycles}")
        for name in ("initial_labelled", "budget", "subset"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise ValueError(f"{name}: a fraction must be in (0, 1], got {value}")
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name}: a count must be >= 1, got {value}")
        if self.num_scorers < 1 or self.scorer_batch_size < 1:
            raise ValueError("num_scorers and scorer_batch_size must be >= 1")
        if self.scorer_gpus < 0 or self.scorer_cpus <= 0:
            raise ValueError("scorer_cpus must be > 0 and scorer_gpus >= 0")
        kind = get_strategy(self.strategy).score_kind
        if self.class_balance and (kind is None or kind.value == "embedding"):
            raise ValueError(
                f"class_balance weights a score; strategy {self.strategy} ranks without one"
            )
        if self.region_cell < 2:
            raise ValueError(f"region_cell must be >= 2 pixels, got {self.region_cell}")
        if self.unit == "region":
            if not isinstance(self.budget, int):
                raise ValueError(
                    f"budget: with unit region it is a count of {self.budget_unit} per cycle (an "
                    f"int), got {self.budget!r}"
                )
            if not get_strategy(self.strategy).has_region_mode:
                raise ValueError(f"strategy: {self.strategy} has no region mode (unit: region)")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    al: ActiveLearningConfig = field(default_factory=ActiveLearningConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eem: EEMConfig = field(default_factory=EEMConfig)
    pebal: PebalConfig = field(default_factory=PebalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def acquisition(self) -> str:
        """The strategy with the options that change what it ranks by or queries: ``eem+bald`` (the EEM
        on BALD), ``+max`` (the EEM's Grad-CAM per class, ``eem.target: max``), ``+otsu`` (EEM regions
        above each image's Otsu edge: the units of an EEM strategy in region mode, and where the oracle
        is asked at image level), ``+cb`` (class-balanced); what runs are tagged and compared by."""
        label = self.al.strategy
        explains = get_strategy(label).region_source == "eem"
        if self.eem.uncertainty == "bald" and explains:
            label += "+bald"
        if self.eem.target == "max" and explains:
            label += "+max"
        if self.eem.region_threshold == "otsu":
            label += "+otsu"
        return label + ("+cb" if self.al.class_balance else "")

    def __post_init__(self) -> None:
        bald = self.al.strategy == "bald" or self.eem.uncertainty == "bald"
        if bald and self.model.dropout == 0.0:
            raise ValueError(
                "model.dropout: BALD (al.strategy bald or eem.uncertainty bald) samples MC dropout; "
                "set it > 0 (e.g. 0.2)"
            )
        if self.al.unit != "region":
            return
        if self.data.image_size is None:
            raise ValueError(
                "data.image_size: al.unit region counts pixels at one scoring resolution; set it"
            )
        if self.al.budget_unit == "pixels":
            uses_eem = get_strategy(self.al.strategy).region_source == "eem"
            smallest, what = (
                (self.eem.min_region_area, "eem.min_region_area")
                if uses_eem
                else (self.al.region_cell**2, "al.region_cell squared")
            )
            if self.al.budget < smallest:
                raise ValueError(
                    f"al.budget: {self.al.budget} pixels is smaller than one region ({what}: "
                    f"{smallest} pixels)"
                )


def load_experiment(path: str | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, overrides)
