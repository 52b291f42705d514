"""Supervised training of the segmenter: the steps, and the epoch loop that runs in this process or on
Ray Train (:mod:`segxal.training_session`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from segxal.data.labels import IGNORE_INDEX
from segxal.metrics import ConfusionMatrix
from segxal.models.unet import UNet
from segxal.training_session import LocalSession, TrainingSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """``min_steps``: at least this many optimiser steps per training run, over its ``epochs``: where a
    pass over the training set is shorter than :meth:`steps_per_epoch`, an epoch passes over it again
    (reshuffled) until then. An active-learning benchmark sets it so that every strategy trains the same
    steps whatever its pool holds (region labels spread over many images, whole images over few), and
    validates ``epochs`` times; 0: one pass per epoch."""

    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    class_weights: tuple[float, ...] | None = None  # one per class: a class-balanced loss
    min_steps: int = 0

    def __post_init__(self) -> None:
        if self.class_weights is not None and not all(
            math.isfinite(w) and w >= 0 for w in self.class_weights
        ):
            raise ValueError(f"class_weights must be finite and >= 0, got {self.class_weights}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def steps_per_epoch(self, batches_per_pass: int) -> int:
        """The optimiser steps of one epoch over a training set of ``batches_per_pass`` batches."""
        return max(batches_per_pass, -(-self.min_steps // self.epochs))


def check_class_weights(config: TrainConfig, class_names: Sequence[str]) -> None:
    """``train.class_weights``, when set, has one weight per class."""
    if config.class_weights is not None and len(config.class_weights) != len(class_names):
        raise ValueError(
            f"train.class_weights: {len(config.class_weights)} weights for the "
            f"{len(class_names)} classes {list(class_names)}"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def make_optimizer(
    parameters: Iterable[nn.Parameter], config: TrainConfig
) -> torch.optim.Optimizer:
    params = [p for p in parameters if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def segmentation_loss(
    logits: torch.Tensor, label: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over the labelled pixels of the batch (255 = unlabelled), each pixel weighted
    alike (or by its class's weight): an image counts by its labelled pixels, so one holding a few
    region labels is neither dropped nor up-weighted. A batch without a labelled pixel gives 0."""
    total = F.cross_entropy(
        logits, label, weight=class_weights, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    valid = label != IGNORE_INDEX
    if class_weights is None:
        count = valid.sum()
    else:
        count = class_weights[label[valid]].sum()
    return total / count.clamp_min(1e-12) if bool(valid.any()) else total * 0.0


def passes(loader: Iterable[dict], steps: int | None) -> Iterator[dict]:
    """The batches of one pass over ``loader``, or of as many passes as ``steps`` batches take; the last
    pass stops at ``steps``. A shuffling DataLoader reshuffles each pass; a DistributedSampler (Ray
    Train) repeats its epoch's order, since only ``set_epoch`` reshuffles it."""
    if steps is None:
        yield from loader
        return
    taken = 0
    while taken < steps:
        before = taken
        for batch in loader:
            yield batch
            taken += 1
            if taken == steps:
                return
        if taken == before:
            return  # an empty loader


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    class_weights: Sequence[float] | None = None,
    steps: int | None = None,
) -> dict[str, float]:
    """One pass of :func:`segmentation_loss`, or ``steps`` batches (see :func:`passes`); returns mean
    loss, images/s and the labelled pixels of each class seen (``class_pixels/<c>``: what
    class-balanced acquisition weighs by)."""
    model.train()
    weights = (
        None
        if class_weights is None
        else torch.tensor(class_weights, dtype=torch.float32).to(device)
    )
    total_loss, images, start = 0.0, 0, time.perf_counter()
    class_pixels: torch.Tensor | None = None
    for batch in passes(loader, steps):
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        logits = model(image)
        counts = torch.bincount(label[label != IGNORE_INDEX].flatten(), minlength=logits.shape[1])
        class_pixels = counts if class_pixels is None else class_pixels + counts
        loss = segmentation_loss(logits, label, weights)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at batch of {batch['sample_id'][:4]}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * image.shape[0]
        images += image.shape[0]
    seconds = time.perf_counter() - start
    counted = [] if class_pixels is None else class_pixels.tolist()
    return {
        "loss": total_loss / max(images, 1),
        "images_per_s": images / max(seconds, 1e-9),
        **{f"class_pixels/{c}": float(n) for c, n in enumerate(counted)},
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[dict], num_classes: int, device: torch.device
) -> ConfusionMatrix:
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    for batch in loader:
        logits = model(batch["image"].to(device))
        confusion.update(logits.argmax(1), batch["label"].to(device))
    return confusion


def validation_metrics(
    model: nn.Module, loader: Iterable[dict], class_names: tuple[str, ...], device: torch.device
) -> dict[str, float]:
    """``val/miou``, ``val/pixel_accuracy`` and ``val/iou/<class>`` of ``model`` on ``loader``."""
    summary = evaluate(model, loader, len(class_names), device).summary(class_names)
    return {f"val/{k}": v for k, v in summary.items()}


def training_state(model: UNet, optimizer: torch.optim.Optimizer, epoch: int, **extra) -> dict:
    """A resumable checkpoint: model, optimizer, the epoch just finished and ``extra`` (metrics, counters)."""
    return {
        "model": model.to_checkpoint(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        **extra,
    }


def restore_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> int:
    """Load model and optimizer from a :func:`training_state`; returns the epoch to continue from."""
    model.load_state_dict(state["model"]["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"] + 1


def train_segmenter(
    session: TrainingSession,
    model: UNet,
    train_loader: DataLoader,
    val_loader: Iterable[dict],
    config: TrainConfig,
    class_names: tuple[str, ...],
    progress: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``config.epochs`` in ``session``, from its restored state if any; rank 0
    validates after each epoch and reports the metrics with a checkpoint (``best_miou`` kept in it).
    Returns the last epoch's metrics (rank 0: with the validation metrics)."""
    trained_model = session.prepare_model(model)
    optimizer = make_optimizer(model.parameters(), config)
    first_epoch, best_miou, metrics = 0, float("-inf"), {}
    state = session.restored_state()
    if state is not None:
        first_epoch, best_miou = restore_training_state(model, optimizer, state), state["best_miou"]
        log.info("resuming at epoch %d", first_epoch)
    loader = session.prepare_loader(train_loader)
    show = progress and session.rank == 0
    steps = config.steps_per_epoch(len(loader))
    for epoch in session.epochs(first_epoch, config.epochs, "train epochs", show):
        session.set_epoch(loader, epoch)
        stats = train_one_epoch(
            trained_model, loader, optimizer, session.device, config.class_weights, steps
        )
        metrics = {"epoch": epoch, **{f"train/{k}": v for k, v in stats.items()}}
        if session.rank != 0:
            session.report(metrics)
            continue
        # the unwrapped model: DDP's forward would wait for the other ranks
        metrics.update(validation_metrics(model, val_loader, class_names, session.device))
        log.debug("epoch %d: loss %.4f, val mIoU %.4f", epoch, stats["loss"], metrics["val/miou"])
        best_miou = max(best_miou, metrics["val/miou"])
        session.report(
            metrics, training_state(model, optimizer, epoch, best_miou=best_miou, metrics=metrics)
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics


def fit(
    model: UNet,
    train_loader: DataLoader,
    val_loader: Iterable[dict],
    config: TrainConfig,
    class_names: tuple[str, ...],
    checkpoint_dir: str | Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`train_segmenter` in this process on ``train.device``. With ``checkpoint_dir``,
    ``last.pt`` is written every epoch and ``best.pt`` when validation mIoU improves; an existing
    ``last.pt`` is resumed from."""
    session = LocalSession(checkpoint_dir, "val/miou", resolve_device(config.device))
    return train_segmenter(
        session, model, train_loader, val_loader, config, class_names, progress, on_epoch
    )
