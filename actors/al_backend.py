"""The active-learning run's heavy work on Ray: Ray Train retraining and actor-sharded scoring."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from actors.ray_train import TrainingJob, TrainingRunFailed, put_manifest, train_segmenter_job
from actors.scoring import ScorerPool
from orchestrator.config import ExperimentConfig
from orchestrator.records import Metric
from orchestrator.run import Explained, TrainOutcome
from orchestrator.run_layout import RunLayout, cycle_name
from orchestrator.strategies import RegionSpec, ScoreKind
from segxal.checkpoint import load_checkpoint
from segxal.data.dataset import SampleTransform
from segxal.data.labels import LabelSet


def check_fits_cluster(config: ExperimentConfig) -> None:
    """Scoring actors live through the run while Ray Train starts its workers each cycle: both must
    fit the cluster at once, or training would wait forever for resources (none when training runs
    in the driver, ``scaling.num_workers: 0``)."""
    import ray

    available = ray.cluster_resources().get("CPU", 0.0)
    needed = (
        config.al.num_scorers * config.al.scorer_cpus
        + config.scaling.num_workers * config.scaling.cpus_per_worker
    )
    if needed > available:
        raise RuntimeError(
            f"the run needs {needed:g} CPUs at once (al.num_scorers x al.scorer_cpus + scaling.num_workers x "
            f"scaling.cpus_per_worker) but the Ray cluster has {available:g}: lower those settings"
        )


CLASS_PIXELS = Metric.class_pixels(0).removesuffix("0")  # the keys' common prefix


class RayCycleBackend:
    def __init__(
        self,
        config: ExperimentConfig,
        layout: RunLayout,
        label_set: LabelSet,
        progress: bool = False,
    ) -> None:
        self.config = config
        self.layout = layout
        self.label_set = label_set
        size = None if config.data.image_size is None else tuple(config.data.image_size)
        crop = None if config.data.crop_size is None else tuple(config.data.crop_size)
        self.train_transform = SampleTransform(size=size, augment=True, crop_size=crop)
        self.val_transform = SampleTransform(size=size)
        al = config.al
        check_fits_cluster(config)
        self.scorers = ScorerPool(
            al.num_scorers,
            {
                "eem": config.eem,
                "label_set": label_set.name,
                "size": size,
                "batch_size": al.scorer_batch_size,
                "loader_workers": config.data.loader_workers,
            },
            cpus=al.scorer_cpus,
            gpus=al.scorer_gpus,
            progress=progress,
        )
        self.scorers.wait_ready()  # the actors' start-up belongs to the backend's, not the first pass
        self.progress = progress
        self.loaded: Path | None = None

    def train(
        self,
        cycle: int,
        train: Iterable[pa.Table],
        val: Iterable[pa.Table],
        init_checkpoint: Path | None,
    ) -> TrainOutcome:
        # a cycle interrupted mid-training starts its training afresh, as an uninterrupted run trained it
        shutil.rmtree(self.layout.ray_cycle(cycle), ignore_errors=True)
        job = TrainingJob(
            train_manifest=put_manifest(train),
            val_manifest=put_manifest(val),
            label_set=self.label_set.name,
            unet=self.config.model.unet(self.label_set.num_classes),
            train=self.config.train,
            train_transform=self.train_transform,
            val_transform=self.val_transform,
            seed=self.config.seed + cycle,
            init_checkpoint=None if init_checkpoint is None else str(init_checkpoint),
            loader_workers=self.config.data.loader_workers,
        )
        try:
            result = train_segmenter_job(
                job, self.config.scaling, self.layout.ray_storage, cycle_name(cycle), self.progress
            )
        except TrainingRunFailed as failure:
            if isinstance(failure.cause, OSError) and failure.cause.errno is not None:
                raise failure.cause from failure  # a checkpoint could not be written: the job says which
            raise
        kept = ("val/", CLASS_PIXELS)
        metrics = {k: v for k, v in result.best_metrics.items() if k.startswith(kept)}
        metrics[Metric.BEST_EPOCH] = result.best_metrics["epoch"]
        return TrainOutcome(result.best_checkpoint, metrics)

    def _load(self, checkpoint: Path) -> None:
        if self.loaded != checkpoint:
            self.scorers.load_model(load_checkpoint(checkpoint)["model"])
            self.loaded = checkpoint

    def score(
        self,
        cycle: int,
        checkpoint: Path,
        rows: Iterable[pa.Table],
        kind: ScoreKind | RegionSpec,
        class_weights: Sequence[float] | None = None,
    ) -> Iterator[pa.Table]:
        self._load(checkpoint)
        return self.scorers.score_batches(rows, kind, class_weights=class_weights)

    def explain(
        self,
        cycle: int,
        checkpoint: Path,
        selected: pa.Table,
        kind: ScoreKind,
        panel_dir: Path,
        panels: int,
        queried: Mapping[str, list[dict]] | None = None,
    ) -> Explained:
        self._load(checkpoint)
        return self.scorers.explain(selected, kind, str(panel_dir), panels, queried)

    def shutdown(self) -> None:
        self.scorers.shutdown()
