"""Training runs: on Ray Train (``TorchTrainer``: DDP across workers), or in the driver process when
``scaling.num_workers`` is 0 (:func:`run_training`).

Rank 0 evaluates on the validation set after every epoch and reports the metrics with a checkpoint;
Ray keeps the best checkpoints by the score and, with ``max_failures``, restarts failed workers from the
latest one. In the driver, ``last.pt`` and ``best.pt`` are kept (:class:`segxal.training_session.LocalSession`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader

from orchestrator.config import ScalingConfig
from orchestrator.records import WORK_MANIFEST_SCHEMA
from segxal.checkpoint import load_checkpoint, save_checkpoint
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import LABEL_SETS
from segxal.models.unet import UNet, UNetConfig
from segxal.training import TrainConfig, train_segmenter
from segxal.training_session import LocalSession, TrainingSession

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
    loader_workers: int = 0  # DataLoader worker processes per training worker (data.loader_workers)


def report_with_checkpoint(metrics: dict, state: dict) -> None:
    """Report rank 0's ``metrics`` with ``state`` as the checkpoint Ray persists and keeps."""
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / CHECKPOINT_FILE, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class RayTrainSession:
    """A Ray Train worker (:class:`segxal.training_session.TrainingSession`)."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(
            model
        )  # moves to the device, wraps in DDP if world > 1

    def prepare_loader(self, loader: DataLoader, move_to_device: bool = True) -> DataLoader:
        return ray.train.torch.prepare_data_loader(loader, move_to_device=move_to_device)

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        if self.world > 1:
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def restored_state(self) -> dict | None:
        """The checkpoint Ray Train restarted this run from (after a worker failure), if any."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE, map_location=self.device)

    def report(self, metrics: dict, state: dict | None = None) -> None:
        if state is None:
            ray.train.report(metrics)
        else:
            report_with_checkpoint(metrics, state)

    def epochs(self, first: int, total: int, desc: str, show: bool) -> Iterator[int]:
        """``range(first, total)``; when ``show``n, with a bar that advances as each epoch ends, drawn
        on the driver by Ray's ``tqdm_ray``."""
        if not show:
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


def segmenter_loop(session: TrainingSession, loop_config: dict) -> None:
    """:func:`segxal.training.train_segmenter` on the manifests of ``loop_config["job"]``."""
    job: TrainingJob = loop_config["job"]
    torch.manual_seed(job.seed)
    label_set = LABEL_SETS[job.label_set]
    model = UNet(job.unet)
    if job.init_checkpoint is not None:
        model.load_state_dict(load_checkpoint(job.init_checkpoint)["model"]["state_dict"])
    train_set = SegmentationDataset(
        manifest_table(job.train_manifest), label_set, job.train_transform
    )
    loader_args = {"batch_size": job.train.batch_size, "num_workers": job.loader_workers}
    loader = DataLoader(
        train_set,
        shuffle=True,
        drop_last=len(train_set) > job.train.batch_size * session.world,
        generator=torch.Generator().manual_seed(job.seed),
        **loader_args,
    )
    val_loader = DataLoader(
        SegmentationDataset(manifest_table(job.val_manifest), label_set, job.val_transform),
        **loader_args,
    )
    train_segmenter(
        session,
        model,
        loader,
        val_loader,
        job.train,
        label_set.class_names,
        progress=loop_config.get("progress", False),
    )


def ray_worker_entry(loop_config: dict) -> None:
    """What every Ray Train worker runs: ``loop_config["loop"]`` in a :class:`RayTrainSession`."""
    quiet_worker_reports(loop_config)
    loop_config["loop"](RayTrainSession(), loop_config)


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


@dataclass(frozen=True)
class TrainingResult:
    best_checkpoint: Path  # checkpoint files (segxal.checkpoint format)
    best_metrics: dict
    last_checkpoint: Path


class TrainingRunFailed(RuntimeError):
    """Training failed; ``cause`` is the loop's own exception and ``last_checkpoint`` the checkpoint of
    the last epoch that completed (None if none did)."""

    def __init__(self, cause: BaseException, last_checkpoint: Path | None) -> None:
        super().__init__(f"training failed: {cause}")
        self.cause = cause
        self.last_checkpoint = last_checkpoint


def last_ray_checkpoint(run_folder: Path) -> Path | None:
    from ray.train import Result

    try:
        latest = Result.from_path(run_folder).checkpoint
    except RuntimeError:  # no checkpoint manager snapshot: the run failed before any report
        return None
    return None if latest is None else Path(latest.path) / CHECKPOINT_FILE


def run_training(
    loop: Callable[[TrainingSession, dict], None],
    loop_config: dict,
    scaling: ScalingConfig,
    storage_path: str | Path,
    name: str,
    score_attribute: str,
    callbacks: Sequence = (),
) -> TrainingResult:
    """``loop(session, loop_config)``: in this process when ``scaling.num_workers`` is 0 (no Ray Train:
    no start-up per run, no retries), else on Ray Train's workers with ``scaling``. Checkpoints go under
    ``storage_path/name``; the best is the one with the highest ``score_attribute``.
    Raises :class:`TrainingRunFailed` with the loop's own error and the last good checkpoint."""
    loop_config = {**loop_config, "verbose": verbose()}
    folder = Path(storage_path).resolve() / name
    if scaling.num_workers == 0:
        if callbacks:
            raise ValueError("Ray Train callbacks need scaling.num_workers >= 1")
        device = torch.device("cuda" if scaling.use_gpu else "cpu")
        session = LocalSession(folder, score_attribute, device)
        try:
            loop(session, loop_config)
        except Exception as error:
            raise TrainingRunFailed(error, session.last_checkpoint) from error
        assert session.best_checkpoint is not None and session.best_metrics is not None
        assert session.last_checkpoint is not None  # epochs >= 1, so rank 0 reported
        return TrainingResult(
            session.best_checkpoint, session.best_metrics, session.last_checkpoint
        )
    from ray.train import TrainingFailedError

    trainer = torch_trainer(
        ray_worker_entry,
        {**loop_config, "loop": loop},
        scaling,
        storage_path,
        name,
        score_attribute,
        callbacks,
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        raise TrainingRunFailed(root_cause(error), last_ray_checkpoint(folder)) from error
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1][score_attribute])
    assert result.checkpoint is not None
    return TrainingResult(
        Path(checkpoint.path) / CHECKPOINT_FILE,
        metrics,
        Path(result.checkpoint.path) / CHECKPOINT_FILE,
    )


def train_segmenter_job(
    job: TrainingJob,
    scaling: ScalingConfig,
    storage_path: str | Path,
    name: str,
    progress: bool = False,
) -> TrainingResult:
    """Train the segmenter of ``job`` (:func:`run_training`, best by validation mIoU)."""
    return run_training(
        segmenter_loop, {"job": job, "progress": progress}, scaling, storage_path, name, "val/miou"
    )
