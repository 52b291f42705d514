"""The segmenter's training loop on Ray Train (``TorchTrainer``: DDP across workers).

Rank 0 evaluates on the validation set after every epoch and reports the metrics with a checkpoint;
Ray keeps the best checkpoints by ``val/miou`` and, with ``max_failures``, restarts failed workers
from the latest one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from orchestrator.config import ScalingConfig
from orchestrator.records import WORK_MANIFEST_SCHEMA
from segxal.checkpoint import load_checkpoint, save_checkpoint
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import LABEL_SETS
from segxal.models.unet import UNet, UNetConfig
from segxal.training import (
    TrainConfig,
    make_optimizer,
    restore_training_state,
    train_one_epoch,
    training_state,
    validation_metrics,
)

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


Manifest = pa.Table | list[ray.ObjectRef]
"""A work manifest, whole or as batches in the object store (:func:`put_manifest`)."""


def put_manifest(batches: Iterable[pa.Table]) -> list[ray.ObjectRef]:
    """A manifest streamed into the object store a batch per object: the driver holds one at a time."""
    return [ray.put(table) for table in batches]


def manifest_table(manifest: Manifest) -> pa.Table:
    if isinstance(manifest, pa.Table):
        return manifest
    return (
        pa.concat_tables(ray.get(list(manifest)))
        if manifest
        else WORK_MANIFEST_SCHEMA.empty_table()
    )


@dataclass(frozen=True)
class TrainingJob:
    """Everything a worker needs; pickled to the workers by Ray."""

    train_manifest: Manifest
    val_manifest: Manifest
    label_set: str
    unet: UNetConfig
    train: TrainConfig
    train_transform: SampleTransform
    val_transform: SampleTransform
    seed: int = 0
    init_checkpoint: str | None = None  # warm start from a best.pt-style file


def restored_state(device: torch.device) -> dict | None:
    """The checkpoint Ray Train restarted this run from (after a worker failure), if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE, map_location=device)


def report_with_checkpoint(metrics: dict, state: dict) -> None:
    """Report rank 0's ``metrics`` with ``state`` as the checkpoint Ray persists and keeps."""
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / CHECKPOINT_FILE, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def epochs_with_progress(first: int, total: int, desc: str, enabled: bool) -> Iterator[int]:
    """``range(first, total)``; when ``enabled`` (rank 0 of a job run from a terminal), with a bar that
    advances as each epoch ends, drawn on the driver by Ray's ``tqdm_ray``."""
    if not enabled:
        yield from range(first, total)
        return
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(desc=desc, total=total, unit="epoch")
    bar.update(first)
    try:
        for epoch in range(first, total):
            yield epoch
            bar.update(1)
    finally:
        bar.close()


def quiet_worker_reports(loop_config: dict) -> None:
    """In a Ray Train worker: its per-report INFO line (the whole TrainingReport) only with --verbose.
    Ray logs it under the module's file name, a logger ``LoggingConfig`` does not reach."""
    if loop_config.get("verbose"):
        return
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    quiet_worker_reports(loop_config)
    job: TrainingJob = loop_config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(job.seed)
    label_set = LABEL_SETS[job.label_set]
    model = UNet(job.unet)
    if job.init_checkpoint is not None:
        model.load_state_dict(load_checkpoint(job.init_checkpoint)["model"]["state_dict"])
    trained_model = ray.train.torch.prepare_model(
        model
    )  # moves to the device, wraps in DDP if world > 1
    optimizer = make_optimizer(model.parameters(), job.train)
    device = ray.train.torch.get_device()
    first_epoch, best_miou = 0, float("-inf")
    state = restored_state(device)
    if state is not None:
        first_epoch, best_miou = restore_training_state(model, optimizer, state), state["best_miou"]
    train_set = SegmentationDataset(
        manifest_table(job.train_manifest), label_set, job.train_transform
    )
    loader = DataLoader(
        train_set,
        batch_size=job.train.batch_size,
        shuffle=True,
        drop_last=len(train_set) > job.train.batch_size * world,
        generator=torch.Generator().manual_seed(job.seed),
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    val_loader = DataLoader(
        SegmentationDataset(manifest_table(job.val_manifest), label_set, job.val_transform),
        batch_size=job.train.batch_size,
    )
    show = loop_config.get("progress", False) and rank == 0
    for epoch in epochs_with_progress(first_epoch, job.train.epochs, "train epochs", show):
        if world > 1:
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(trained_model, loader, optimizer, device, job.train.class_weights)
        metrics = {"epoch": epoch, **{f"train/{k}": v for k, v in stats.items()}}
        if rank != 0:
            ray.train.report(metrics)
            continue
        # the unwrapped model: DDP's forward would wait for the other ranks
        metrics.update(validation_metrics(model, val_loader, label_set.class_names, device))
        best_miou = max(best_miou, metrics["val/miou"])
        report_with_checkpoint(
            metrics, training_state(model, optimizer, epoch, best_miou=best_miou, metrics=metrics)
        )


@dataclass(frozen=True)
class TrainingResult:
    best_checkpoint: Path  # a checkpoint.pt file (segxal.checkpoint format)
    best_metrics: dict


def root_cause(error: BaseException) -> BaseException:
    """The worker's own exception inside a Ray Train failure."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    cause = getattr(
        error, "cause", None
    )  # RayTaskError-style wrappers keep the user's exception here
    return cause if isinstance(cause, BaseException) else error


VERBOSE = "SEGXAL_VERBOSE"  # set by the jobs' --verbose; read where Ray Train is configured


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def torch_trainer(
    loop,
    loop_config: dict,
    scaling: ScalingConfig,
    storage_path: str | Path,
    name: str,
    score_attribute: str,
    callbacks: Sequence = (),
):
    """A ``TorchTrainer`` for ``loop`` with the project's scaling, keeping the two best checkpoints by
    ``score_attribute`` (max) and the latest; workers that fail restart from it (``max_failures``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker,
                **({"GPU": 1} if scaling.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            # Ray Train's per-epoch report and checkpoint lines only with --verbose
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )


def train_on_ray(
    job: TrainingJob,
    scaling: ScalingConfig,
    storage_path: str | Path,
    name: str,
    progress: bool = False,
) -> TrainingResult:
    """Run ``job`` on the connected Ray cluster; checkpoints persist under ``storage_path/name``."""
    loop_config = {"job": job, "progress": progress, "verbose": verbose()}
    result = torch_trainer(
        train_loop_per_worker, loop_config, scaling, storage_path, name, "val/miou"
    ).fit()
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["val/miou"])
    return TrainingResult(Path(checkpoint.path) / CHECKPOINT_FILE, metrics)
