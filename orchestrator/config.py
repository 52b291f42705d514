"""The experiment configuration: typed, frozen, loaded from YAML with ``--set`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from orchestrator.typed_config import load_config
from segxal.data.synthetic import SyntheticConfig
from segxal.training import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["synthetic", "cityscapes", "camvid"] = "synthetic"
    root: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    image_size: tuple[int, int] | None = (256, 512)  # (H, W) every image is resized to; null keeps file size
    crop_size: tuple[int, int] | None = None  # random training crop (H, W) after resizing
    max_train_images: int | None = None  # first N of the sorted manifest, for quick runs
    max_val_images: int | None = None
    loader_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    width: int = 16
    depth: int = 4


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "segxal"
    run_name: str | None = None


@dataclass(frozen=True)
class ScalingConfig:
    """How Ray Train runs the training loop: workers (DDP when > 1), GPUs, retries from checkpoint."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_experiment(path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, overrides)
