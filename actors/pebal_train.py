"""PEBAL fine-tuning on Ray Train (``TorchTrainer``; DDP across workers when ``scaling.num_workers`` > 1),
or in the driver process with ``scaling.num_workers: 0``.

Every worker starts from the trained segmenter, adds the abstention channel and freezes all but
``pebal.trainable`` (:func:`segxal.pebal.model.prepare_pebal_model`: its forward pre-hooks keep frozen
BatchNorm layers in eval mode through ``model.train()`` and Ray's ``prepare_model``, whose DDP wrapper
calls the same module forward; tests/test_pebal_train.py checks the statistics after a Ray run).
Per batch: AnomalyMix on the inlier training images (a numpy generator seeded by seed, rank and epoch)
→ :func:`segxal.pebal.losses.pebal_loss` → :func:`segxal.pebal.losses.check_finite`, which stops the run
with the step and the batch in the error. Rank 0 evaluates PEBAL's score on the AnomalyMix'd validation
set after each epoch and reports ``val/ap`` (the objective), ``val/fpr95`` and ``val/auroc`` with a
checkpoint; Ray keeps the best checkpoints by ``val/ap`` and always the latest, so after a failure the
last good epoch's checkpoint is the run's latest (:class:`PebalTrainingError` names it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from actors.ray_train import TrainingRunFailed, run_training
from orchestrator.config import ExperimentConfig, ScalingConfig
from orchestrator.datasets import datasets_for, label_set_for, manifest_for
from segxal.checkpoint import load_checkpoint
from segxal.data.dataset import SegmentationDataset
from segxal.models.unet import UNet
from segxal.pebal.anomalymix import AnomalyMix
from segxal.pebal.config import PebalConfig
from segxal.pebal.evaluate import (
    PEBAL,
    Method,
    MixedValidationSet,
    calibrate_margins,
    evaluate_anomaly,
    mixed_validation_name,
)
from segxal.pebal.losses import TERMS, check_finite, pebal_loss
from segxal.pebal.model import prepare_pebal_model
from segxal.training import make_optimizer, passes, restore_training_state, training_state
from segxal.training_session import TrainingSession

log = logging.getLogger(__name__)
OBJECTIVE = "val/ap"


@dataclass(frozen=True)
class PebalJob:
    """Everything a worker needs; pickled to the workers by Ray.

    ``pretrained``: ``UNet.to_checkpoint()`` of the segmenter (shipped in the job, so workers on other
    nodes need no shared file system); ``pebal``: the settings with the margins already resolved;
    ``train_set``: inlier training images (labels are train ids); ``val_set``: items with 0/1/255
    anomaly labels (a :class:`MixedValidationSet`); ``train_outliers``: the AnomalyMix source
    (``None``: procedural shapes).
    """

    train_set: Dataset
    val_set: Dataset
    pretrained: dict
    pebal: PebalConfig
    seed: int = 0
    train_outliers: object = None
    eval_batch_size: int = 4


def pebal_train_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    mixer: AnomalyMix,
    config: PebalConfig,
    rng: np.random.Generator,
    device: torch.device,
    epoch: int = 0,
    first_step: int = 0,
) -> dict[str, float]:
    """One epoch of AnomalyMix + PEBAL loss: a pass over ``loader``, or ``config.finetune``'s
    ``steps_per_epoch`` batches (:func:`segxal.training.passes`). Returns mean loss terms (``loss`` =
    total), ``images_per_s``, ``step_s`` (mean forward-backward-update time, data loading and mixing
    excluded) and ``steps``.

    Raises :class:`segxal.pebal.losses.NonFiniteLossError` naming the global step and the batch (its
    index in the epoch and first sample ids) before any update from a non-finite loss.
    """
    model.train()  # frozen BatchNorm layers stay in eval mode (forward pre-hook)
    sums: dict[str, float] = defaultdict(float)
    images, steps, compute_s, start = 0, 0, 0.0, time.perf_counter()
    batches = passes(loader, config.finetune.steps_per_epoch(len(loader)))
    for index, batch in enumerate(batches):
        step = first_step + index
        image, label, _ = mixer(batch["image"], batch["label"], rng)
        tick = time.perf_counter()
        terms = pebal_loss(model(image.to(device)), label.to(device), config)
        samples = ", ".join(str(s) for s in batch["sample_id"][:4])
        check_finite(terms, step, f"{index} of epoch {epoch} (samples {samples})")
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_s += time.perf_counter() - tick
        for name, value in terms.items():
            sums[name] += value.item() * image.shape[0]
        images += image.shape[0]
        steps += 1
    seconds = time.perf_counter() - start
    stats = {"loss": sums.pop("total", 0.0) / max(images, 1)}
    stats.update({f"loss/{name}": sums[name] / max(images, 1) for name in TERMS})
    stats.update(
        {
            "images_per_s": images / max(seconds, 1e-9),
            "step_s": compute_s / max(steps, 1),
            "steps": steps,
        }
    )
    return stats


def validation_metrics(model: nn.Module, job: PebalJob, device: torch.device) -> dict[str, float]:
    """PEBAL's score (smoothed energy of the abstention model) on ``job.val_set``."""
    method = Method(PEBAL, PEBAL, "smoothed_energy", abstention=True)
    result = evaluate_anomaly(
        {PEBAL: model},
        job.val_set,
        "val",
        (method,),
        (job.pebal.smoothing_kernel, job.pebal.smoothing_sigma),
        device,
        job.eval_batch_size,
    )
    return {f"val/{key}": value for key, value in result.metrics[PEBAL].items()}


def pebal_loop(session: TrainingSession, loop_config: dict) -> None:
    job: PebalJob = loop_config["job"]
    torch.manual_seed(job.seed)
    model = prepare_pebal_model(UNet.from_checkpoint(job.pretrained), job.pebal.trainable)
    trained_model = session.prepare_model(model)
    optimizer = make_optimizer(model.parameters(), job.pebal.finetune)
    first_epoch, step, history = 0, 0, []
    state = session.restored_state()
    if state is not None:
        first_epoch, step, history = (
            restore_training_state(model, optimizer, state),
            state["step"],
            state["history"],
        )
    batch_size = job.pebal.finetune.batch_size
    loader = DataLoader(
        job.train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(job.train_set) > batch_size * session.world,
        generator=torch.Generator().manual_seed(job.seed),
    )
    loader = session.prepare_loader(loader, move_to_device=False)  # mixing happens on the CPU
    mixer = AnomalyMix(job.pebal.anomalymix, model.num_classes - 1, job.train_outliers)
    show = loop_config.get("progress", False) and session.rank == 0
    for epoch in session.epochs(first_epoch, job.pebal.finetune.epochs, "PEBAL epochs", show):
        session.set_epoch(loader, epoch)
        rng = np.random.default_rng([job.seed, session.rank, epoch])
        stats = pebal_train_epoch(
            trained_model, loader, optimizer, mixer, job.pebal, rng, session.device, epoch, step
        )
        step += stats["steps"]
        metrics = {"epoch": epoch, **{f"train/{k}": v for k, v in stats.items()}}
        if session.rank != 0:
            session.report(metrics)
            continue
        # the unwrapped model: no DDP collective
        metrics.update(validation_metrics(model, job, session.device))
        history.append(metrics)
        session.report(
            metrics,
            training_state(
                model,
                optimizer,
                epoch,
                step=step,
                metrics=metrics,
                history=history,
                pebal=dataclasses.asdict(job.pebal),
            ),
        )


@dataclass(frozen=True)
class FinetuneResult:
    best_checkpoint: Path  # a checkpoint.pt file (segxal.checkpoint format), best val/ap
    best_metrics: dict
    last_checkpoint: Path  # the last epoch's
    history: list[dict]  # rank 0's metrics of every epoch


class PebalTrainingError(RuntimeError):
    """Fine-tuning failed; ``cause`` is the worker's exception and ``last_checkpoint`` the checkpoint.pt
    of the last epoch that completed (None if none did)."""

    def __init__(
        self, message: str, cause: BaseException | None, last_checkpoint: Path | None
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.last_checkpoint = last_checkpoint


def finetune(
    job: PebalJob,
    scaling: ScalingConfig,
    storage_path: str | Path,
    name: str,
    callbacks: Sequence = (),
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune (:func:`actors.ray_train.run_training`: on Ray Train, or in this process with
    ``scaling.num_workers: 0``); checkpoints persist under ``storage_path/name``.

    ``callbacks``: Ray Train callbacks (e.g. Tune's ``TuneReportCallback`` inside a trial).
    Raises :class:`PebalTrainingError` naming the loop's error and the last good checkpoint.
    """
    loop_config = {"job": job, "progress": progress}
    try:
        result = run_training(
            pebal_loop, loop_config, scaling, storage_path, name, OBJECTIVE, callbacks
        )
    except TrainingRunFailed as failure:
        last = failure.last_checkpoint
        where = f"last good checkpoint: {last}" if last else "no epoch completed, no checkpoint"
        raise PebalTrainingError(
            f"PEBAL fine-tuning failed: {failure.cause} ({where})", failure.cause, last
        ) from failure
    return FinetuneResult(
        result.best_checkpoint,
        result.best_metrics,
        result.last_checkpoint,
        load_checkpoint(result.last_checkpoint)["history"],
    )


def load_finetuned(path: str | Path) -> UNet:
    """The fine-tuned (Y+1-output) segmenter of a checkpoint written by :func:`pebal_loop`."""
    return UNet.from_checkpoint(load_checkpoint(path)["model"]).eval()


def prepare_pebal_job(
    config: ExperimentConfig,
    pretrained: dict,
    outliers: tuple = (None, None),
    progress: bool = False,
) -> PebalJob:
    """The fine-tuning job of ``config``: datasets, AnomalyMix'd validation set, resolved margins.

    ``pretrained``: ``UNet.to_checkpoint()`` of the segmenter; ``outliers``: (training, validation)
    sources from :func:`segxal.pebal.evaluate.split_outliers`. With ``pebal.margin_quantiles`` the margins
    are calibrated on the pre-trained model's inlier energy over the (un-augmented) training images.
    """
    train_set, val_set = datasets_for(config.data, progress=progress)
    label_set = label_set_for(config.data)
    model = UNet.from_checkpoint(pretrained)
    if model.num_classes != label_set.num_classes:
        raise ValueError(
            f"the pre-trained segmenter has {model.num_classes} classes, the {label_set.name} "
            f"label set of data.dataset {config.data.dataset!r} has {label_set.num_classes}"
        )
    pebal = config.pebal
    if pebal.margin_quantiles is not None:
        manifest = manifest_for(config.data, config.data.train_split, config.data.max_train_images)
        plain = SegmentationDataset(manifest, label_set, val_set.transform)  # no crop or flip
        pebal = calibrate_margins(
            pebal, model, DataLoader(plain, batch_size=pebal.finetune.batch_size)
        )
        log.info(
            "margins calibrated at quantiles %s of the inlier energy: m_in %.3f, m_out %.3f",
            config.pebal.margin_quantiles,
            pebal.m_in,
            pebal.m_out,
        )
    mixed_val = MixedValidationSet(
        val_set,
        pebal.anomalymix,
        label_set.num_classes,
        config.seed,
        outliers[1],
        name=mixed_validation_name(label_set),
    )
    return PebalJob(
        train_set, mixed_val, pretrained, pebal, config.seed, outliers[0], pebal.finetune.batch_size
    )
