"""Where a training loop runs: the one process it is in (:class:`LocalSession`), or a Ray Train worker
(``actors.ray_train.RayTrainSession``). The loops are written once against :class:`TrainingSession`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from segxal.checkpoint import load_checkpoint, save_checkpoint

LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pt", "best.pt"


class TrainingSession(Protocol):
    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` on the device; the module to train (DDP-wrapped when ``world`` > 1)."""
        ...

    def prepare_loader(self, loader: DataLoader, move_to_device: bool = True) -> DataLoader: ...

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        """A new shuffle for ``epoch`` where the loader's sampler is shared across workers."""
        ...

    def restored_state(self) -> dict | None:
        """The state to continue from (a checkpoint of an interrupted run), if any."""
        ...

    def report(self, metrics: dict, state: dict | None = None) -> None:
        """An epoch's ``metrics``, with the resumable ``state`` as its checkpoint (rank 0)."""
        ...

    def epochs(self, first: int, total: int, desc: str, show: bool) -> Iterable[int]: ...


class LocalSession:
    """Training in this process, with no Ray: ``folder/last.pt`` after every report and ``best.pt`` when
    ``score_attribute`` is at its best so far (ties: the later). An existing ``last.pt`` is resumed from.
    With no ``folder``, nothing is written and only the best metrics are kept."""

    rank, world = 0, 1

    def __init__(
        self, folder: str | Path | None, score_attribute: str, device: torch.device
    ) -> None:
        self.folder = None if folder is None else Path(folder)
        self.score_attribute = score_attribute
        self.device = device
        self.best_score = -math.inf
        self.best_metrics: dict | None = None
        best = self.best_checkpoint_file
        if best is not None and best.is_file():
            self.best_metrics = load_checkpoint(best)["metrics"]
            self.best_score = self.best_metrics[score_attribute]

    @property
    def best_checkpoint_file(self) -> Path | None:
        return None if self.folder is None else self.folder / BEST_CHECKPOINT

    @property
    def last_checkpoint(self) -> Path | None:
        last = None if self.folder is None else self.folder / LAST_CHECKPOINT
        return last if last is not None and last.is_file() else None

    @property
    def best_checkpoint(self) -> Path | None:
        return None if self.best_metrics is None else self.best_checkpoint_file

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader, move_to_device: bool = True) -> DataLoader:
        return loader  # the loops move each batch to the device

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        pass  # one process: the loader's own generator reshuffles every epoch

    def restored_state(self) -> dict | None:
        last = self.last_checkpoint
        return None if last is None else load_checkpoint(last, map_location=self.device)

    def report(self, metrics: dict, state: dict | None = None) -> None:
        if state is None:
            return
        score = metrics[self.score_attribute]
        if score >= self.best_score:
            self.best_score, self.best_metrics = score, metrics
            if self.folder is not None:
                save_checkpoint(self.folder / BEST_CHECKPOINT, state)
        if self.folder is not None:
            save_checkpoint(self.folder / LAST_CHECKPOINT, state)

    def epochs(self, first: int, total: int, desc: str, show: bool) -> Iterator[int]:
        from tqdm import tqdm

        yield from tqdm(
            range(first, total),
            total=total,
            initial=first,
            desc=desc,
            unit="epoch",
            disable=not show,
        )
