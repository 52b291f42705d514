"""The SegXAL active-learning loop, independent of where the work runs.

Cycle 0 trains on the initial labelled pool. Each later cycle: draw D^S, score it, select the top n,
explain them (EEM maps, prompts, panels), the oracle re-annotates, the Dice gate updates the pool,
retrain, evaluate. The pool state is saved after every step; at the end of a cycle it is snapshot and
``progress.json`` records the cycle, so a resumed run restarts an interrupted cycle from the state it
began with and, every draw being a function of (seed, cycle), ends as an uninterrupted run would.

A cycle's query (score, select, explain) and its annotation (oracle, gate) are separate halves, so that
a run can stop between them while people annotate (a :class:`Handoff`) and a later run finish the cycle.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.coordinator import UNREADABLE, Coordinator, cycle_dir, cycle_name
from orchestrator.oracles import AnnotationRequest
from orchestrator.parquet_io import write_parquet
from orchestrator.strategies import Scorer, StrategySpec
from segxal.files import write_atomically

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class TrainOutcome:
    checkpoint: Path  # segxal.checkpoint file with "model" = UNet.to_checkpoint()
    metrics: dict[
        str, float
    ]  # validation metrics of that checkpoint: val/miou, val/iou/<class>, ...


@dataclass(frozen=True)
class ScoreOutcome:
    scores: pa.Table  # sample_id, score and/or embedding [, unreadable], one row per candidate
    labelled_features: np.ndarray | None = None  # core-set: embeddings of the labelled pool


@dataclass(frozen=True)
class Explained:
    """A request per readable selected image, and why each other one could not be read."""

    requests: list[AnnotationRequest]
    unreadable: dict[str, str] = field(default_factory=dict)


class CycleBackend(Protocol):
    """Where the heavy work runs (Ray actors and Ray Train in ``actors/``; fakes in tests)."""

    def train(
        self, cycle: int, train: pa.Table, val: pa.Table, init_checkpoint: Path | None
    ) -> TrainOutcome: ...

    def score(
        self, cycle: int, checkpoint: Path, candidates: pa.Table, labelled: pa.Table | None
    ) -> ScoreOutcome: ...

    def explain(
        self, cycle: int, checkpoint: Path, selected: pa.Table, panel_dir: Path, panels: int
    ) -> Explained: ...


@dataclass(frozen=True)
class Query:
    """The first half of a cycle: what the oracle is asked."""

    requests: list[AnnotationRequest]  # the selected images, best first
    metrics: dict[str, float]  # time/score_s, time/select_s, time/explain_s
    artifacts: list[Path]  # the prompt regions (JSON) and EEM panels


class Handoff(Protocol):
    """An oracle the run waits for (people in Label Studio): the loop hands a cycle's query over and stops;
    a later run takes it back, its oracle holding the people's annotations by then."""

    def hand_over(self, cycle: int, query: Query) -> None: ...

    def take_back(self, cycle: int) -> Query | None: ...


@dataclass
class Progress:
    """What a resumed run needs: the last completed cycle, its model, the MLflow run."""

    completed_cycle: int = -1
    checkpoint: str | None = None
    tracking_run_id: str | None = None

    @classmethod
    def load(cls, run_dir: Path) -> Progress:
        path = run_dir / PROGRESS_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, run_dir: Path) -> None:
        write_atomically(
            run_dir / PROGRESS_FILE,
            lambda handle: handle.write(json.dumps(self.__dict__, indent=2).encode()),
        )


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{stage}_s"] = time.perf_counter() - start


CycleCallback = Callable[[int, dict[str, float], list[Path]], None]


def run_cycles(
    coordinator: Coordinator,
    backend: CycleBackend,
    strategy: StrategySpec,
    run_dir: Path,
    progress: Progress,
    cycles: int,
    on_cycle: CycleCallback = lambda cycle, metrics, artifacts: None,
    warm_start: bool = True,
    panels: int = 0,
    progress_bar: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
    handoff: Handoff | None = None,
) -> list[dict[str, float]]:
    """Run cycles ``progress.completed_cycle + 1 .. cycles``; returns each cycle's metrics. With a
    ``handoff``, a cycle whose query it does not give back is handed over to it and the run stops there.

    ``coordinator``: a :class:`Coordinator` or a handle with the same methods (a Ray actor's proxy)."""
    run_dir = Path(run_dir)
    history = []
    for cycle in progress_bar(range(progress.completed_cycle + 1, cycles + 1)):
        timer = StageTimer()
        metrics: dict[str, float] = {}
        artifacts: list[Path] = []
        previous = None if progress.checkpoint is None else Path(progress.checkpoint)
        if cycle > 0:
            query = None if handoff is None else handoff.take_back(cycle)
            if query is None:
                query = query_cycle(
                    cycle, coordinator, backend, strategy, run_dir, previous, panels
                )
                if handoff is not None:
                    handoff.hand_over(cycle, query)
                    break  # people annotate now; a later run takes the query back
            metrics.update(query.metrics)
            artifacts.extend(query.artifacts)
            with timer("annotate"):
                metrics.update(annotate_cycle(cycle, coordinator, query.requests, run_dir))
        with timer("train"):
            outcome = backend.train(
                cycle,
                pq.read_table(coordinator.training_manifest(cycle)),
                pq.read_table(coordinator.validation_manifest(cycle)),
                previous if warm_start else None,
            )
        model_path = cycle_dir(run_dir, cycle) / "model.pt"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(outcome.checkpoint, model_path)
        metrics.update(outcome.metrics)
        metrics.update(coordinator.pool_metrics())
        metrics.update(timer.seconds)
        artifacts.append(coordinator.snapshot(cycle))
        on_cycle(cycle, metrics, artifacts)
        progress.completed_cycle, progress.checkpoint = cycle, str(model_path)
        progress.save(run_dir)
        log.info(
            "cycle %d: mIoU %.4f, labelled %.1f %%",
            cycle,
            metrics.get("val/miou", float("nan")),
            100 * metrics["pool/labelled_fraction"],
        )
        history.append(metrics)
    return history


def query_cycle(
    cycle: int,
    coordinator: Coordinator,
    backend: CycleBackend,
    spec: StrategySpec,
    run_dir: Path,
    checkpoint: Path,
    panels: int,
) -> Query:
    """Score D^S, select the top n and explain them (EEM maps, prompts, panels)."""
    timer = StageTimer()
    folder = cycle_dir(run_dir, cycle)
    folder.mkdir(parents=True, exist_ok=True)
    with timer("score"):
        candidates = coordinator.candidates(cycle)
        scores = None
        labelled_features = None
        if spec.scorer is not Scorer.NONE:
            labelled = (
                pq.read_table(coordinator.training_manifest(cycle))
                if spec.needs_labelled_features
                else None
            )
            scored = backend.score(cycle, checkpoint, pq.read_table(candidates), labelled)
            quarantine_unreadable(cycle, coordinator, scored.scores)
            scores = write_parquet(
                folder / "scores.parquet",
                scored.scores.schema,
                [scored.scores.sort_by("sample_id")],
            )
            labelled_features = scored.labelled_features
    with timer("select"):
        selected = coordinator.select(cycle, candidates, scores, labelled_features)
    panel_dir = run_dir / "panels" / cycle_name(cycle)
    panel_dir.mkdir(parents=True, exist_ok=True)
    with timer("explain"):
        explained = backend.explain(
            cycle, checkpoint, coordinator.unlabelled_manifest(selected), panel_dir, panels
        )
    coordinator.quarantine(cycle, explained.unreadable)
    requests = explained.requests
    regions_file = run_dir / "panels" / f"{cycle_name(cycle)}_regions.json"
    regions_file.write_text(json.dumps({r.sample_id: r.regions for r in requests}, indent=1))
    return Query(requests, timer.seconds, [regions_file, *sorted(panel_dir.glob("*.png"))])


def quarantine_unreadable(cycle: int, coordinator: Coordinator, scores: pa.Table) -> None:
    """Quarantine the candidates the scorers could not read (selection leaves them out too)."""
    if UNREADABLE in scores.column_names:
        broken = scores.filter(pc.is_valid(scores[UNREADABLE]))
        coordinator.quarantine(
            cycle,
            dict(zip(broken["sample_id"].to_pylist(), broken[UNREADABLE].to_pylist(), strict=True)),
        )


def annotate_cycle(
    cycle: int, coordinator: Coordinator, requests: list[AnnotationRequest], run_dir: Path
) -> dict[str, float]:
    """The oracle re-annotates, the Dice gate updates the pool; the cycle's gate and oracle metrics."""
    decisions = coordinator.annotate(cycle, requests)
    write_parquet(cycle_dir(run_dir, cycle) / "decisions.parquet", decisions.schema, [decisions])
    accepted = decisions["accepted"].to_numpy(zero_copy_only=False)
    dice = decisions["dice"].to_numpy(zero_copy_only=False)
    return {
        "gate/selected": len(requests),
        "gate/accepted": int(accepted.sum()),
        "gate/returned": int((~accepted).sum()),
        "gate/mean_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
        "oracle/cost": float(pc.sum(decisions["cost"]).as_py() or 0.0),
        "oracle/pixels": float(pc.sum(decisions["pixels"]).as_py() or 0),
    }
