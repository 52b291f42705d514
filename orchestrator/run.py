"""One active-learning campaign, owned by one object in the driver: :class:`ActiveLearningRun` holds the
run's folder (:class:`RunLayout`), its pool state and its cycle. Heavy work goes through the narrow
:class:`CycleBackend` seam (scoring actors and Ray Train in ``actors/``; fakes in tests).

Cycle 0 trains on the initial labelled pool. Each later cycle: draw D^S, score it, select the top n,
explain them (EEM maps, prompts, panels), the oracle re-annotates, the Dice gate updates the pool,
retrain, evaluate. Every transition of the pool state is saved; at the end of a cycle the state is
snapshot and ``progress.json`` records the cycle, so a resumed run restarts an interrupted cycle from the
state it began with and, every draw being a function of (seed, cycle), ends as an uninterrupted run would.

What is pool-sized (D^S, its scores, the training and validation manifests) is streamed a row group at a
time, from the pool state to the backend, with a copy written to the cycle's folder as the audit trail;
what is held whole is sized by the budget (the selection, its requests and annotations) or is core-set's
embeddings.

A cycle's query (score, select, explain) and its annotation (oracle, gate) are separate halves, so that a
run can stop between them while people annotate (a :class:`Handoff`) and a later run finish the cycle.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from orchestrator.config import ActiveLearningConfig
from orchestrator.gate import dice_gate, dice_per_image, gate_summary
from orchestrator.oracles import AnnotationRequest, Oracle
from orchestrator.parquet_io import take_positions, tee_parquet, write_parquet
from orchestrator.pool_schema import IdsDigest
from orchestrator.pool_state import PoolState
from orchestrator.records import (
    DECISION_SCHEMA,
    LABELLED,
    QUARANTINED,
    UNLABELLED,
    UNREADABLE,
    VALIDATION,
    WORK_MANIFEST_SCHEMA,
    Metric,
)
from orchestrator.run_layout import RunLayout
from orchestrator.selection import budget_count, cycle_rng, subset_positions
from orchestrator.strategies import Candidates, ScoreKind, get_strategy
from segxal.data.io import image_size
from segxal.data.labels import LabelSet
from segxal.files import naming, write_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    checkpoint: Path  # segxal.checkpoint file with "model" = UNet.to_checkpoint()
    metrics: dict[
        str, float
    ]  # validation metrics of that checkpoint: val/miou, val/iou/<class>, ...


@dataclass(frozen=True)
class Explained:
    """A request per readable selected image, and why each other one could not be read."""

    requests: list[AnnotationRequest]
    unreadable: dict[str, str] = field(default_factory=dict)


class CycleBackend(Protocol):
    """Where the heavy work runs. Manifests come as batches of ``WORK_MANIFEST_SCHEMA`` rows in id order;
    ``score`` gives back one scores table (``kind.schema``) per batch, its rows in id order."""

    def train(
        self,
        cycle: int,
        train: Iterable[pa.Table],
        val: Iterable[pa.Table],
        init_checkpoint: Path | None,
    ) -> TrainOutcome: ...

    def score(
        self, cycle: int, checkpoint: Path, rows: Iterable[pa.Table], kind: ScoreKind
    ) -> Iterator[pa.Table]: ...

    def explain(
        self,
        cycle: int,
        checkpoint: Path,
        selected: pa.Table,
        kind: ScoreKind,
        panel_dir: Path,
        panels: int,
    ) -> Explained: ...


@dataclass(frozen=True)
class Query:
    """The first half of a cycle: what the oracle is asked."""

    requests: list[AnnotationRequest]  # the selected images, best first
    metrics: dict[str, float]  # time/score_s, time/select_s, time/explain_s
    artifacts: list[Path]  # the prompt regions (JSON) and EEM panels


class Handoff(Protocol):
    """An oracle the run waits for (people in Label Studio): the run hands a cycle's query over and stops;
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
    def load(cls, layout: RunLayout) -> Progress:
        path = layout.progress_file
        if not path.is_file():
            return cls()
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:  # bad JSON, bad UTF-8, unknown or missing keys
            raise ValueError(
                f"{path} is damaged ({error}); the run's cycles are in {layout.root / 'cycles'}: "
                "restore the file from a backup, or start the run anew under another name"
            ) from None

    def save(self, layout: RunLayout) -> None:
        text = json.dumps(self.__dict__, indent=2).encode()
        write_atomically(layout.progress_file, lambda handle: handle.write(text))


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[Metric.stage_seconds(stage)] = time.perf_counter() - start


CycleCallback = Callable[[int, dict[str, float], list[Path]], None]


class ActiveLearningRun:
    """The run in ``layout``: built from the state it starts from (a new pool, or the last snapshot of
    a resumed run), which becomes the run's live state, and its progress (read from the layout when not
    given). Bad budgets are refused here, before any work."""

    def __init__(
        self,
        layout: RunLayout,
        state: PoolState,
        al: ActiveLearningConfig,
        label_set: LabelSet,
        seed: int,
        oracle: Oracle,
        handoff: Handoff | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.layout = layout
        self.al = al
        self.label_set = label_set
        self.seed = seed
        self.oracle = oracle
        self.handoff = handoff
        self.strategy = get_strategy(al.strategy)
        self.budget = budget_count(al.budget, state.training_pool_size, name="al.budget")
        unlabelled = state.count(UNLABELLED)
        if self.budget > unlabelled:
            raise ValueError(
                f"al.budget: {self.budget} images per cycle but the unlabelled pool has {unlabelled}"
            )
        self.state = state.copy_to(layout.state_file)
        self.progress = Progress.load(layout) if progress is None else progress

    # -- the campaign ----------------------------------------------------------------------------
    def run(
        self,
        backend: CycleBackend,
        cycles: int,
        on_cycle: CycleCallback = lambda cycle, metrics, artifacts: None,
        progress_bar: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
    ) -> list[dict[str, float]]:
        """Cycles ``progress.completed_cycle + 1 .. cycles``; returns each cycle's metrics. With a
        handoff, a cycle whose query it does not give back is handed over and the run stops there."""
        history = []
        for cycle in progress_bar(range(self.progress.completed_cycle + 1, cycles + 1)):
            metrics = self.cycle(backend, cycle, on_cycle)
            if metrics is None:
                break  # people annotate now; a later run takes the query back
            history.append(metrics)
        return history

    def cycle(
        self, backend: CycleBackend, cycle: int, on_cycle: CycleCallback
    ) -> dict[str, float] | None:
        """One cycle, saved, then reported to ``on_cycle``; None when its query was handed over to
        people."""
        timer = StageTimer()
        metrics: dict[str, float] = {}
        artifacts: list[Path] = []
        previous = None if self.progress.checkpoint is None else Path(self.progress.checkpoint)
        if cycle > 0:
            query = None if self.handoff is None else self.handoff.take_back(cycle)
            if query is None:
                assert previous is not None, "a cycle after 0 starts from the previous model"
                query = self.query(backend, cycle, previous)
                if self.handoff is not None:
                    self.handoff.hand_over(cycle, query)
                    return None
            metrics.update(query.metrics)
            artifacts.extend(query.artifacts)
            with timer("annotate"):
                metrics.update(self.annotate(cycle, query.requests))
        with timer("train"):
            outcome = backend.train(
                cycle,
                tee_parquet(
                    self.layout.train_manifest(cycle),
                    WORK_MANIFEST_SCHEMA,
                    self._manifest_batches(LABELLED),
                ),
                tee_parquet(
                    self.layout.val_manifest(cycle),
                    WORK_MANIFEST_SCHEMA,
                    self._manifest_batches(VALIDATION),
                ),
                previous if self.al.warm_start else None,
            )
        model_path = self.layout.model(cycle)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with naming(model_path):
            shutil.copyfile(outcome.checkpoint, model_path)
        metrics.update(outcome.metrics)
        metrics.update(self.pool_metrics())
        metrics.update(timer.seconds)
        artifacts.append(self.state.copy_to(self.layout.snapshot(cycle)).path)
        on_cycle(cycle, metrics, artifacts)
        self.progress.completed_cycle, self.progress.checkpoint = cycle, str(model_path)
        self.progress.save(self.layout)
        log.info(
            "cycle %d: mIoU %.4f, labelled %.1f %%",
            cycle,
            metrics.get(Metric.VAL_MIOU, float("nan")),
            100 * metrics[Metric.LABELLED_FRACTION],
        )
        return metrics

    # -- the query: D^S, scores, selection, explanations ------------------------------------------
    def query(self, backend: CycleBackend, cycle: int, checkpoint: Path) -> Query:
        timer = StageTimer()
        self.layout.cycle_dir(cycle).mkdir(parents=True, exist_ok=True)
        with timer("score"):
            selected = self._score_and_select(backend, cycle, checkpoint)
        panel_dir = self.layout.panel_dir(cycle)
        panel_dir.mkdir(parents=True, exist_ok=True)
        with timer("explain"):
            explained = backend.explain(
                cycle,
                checkpoint,
                self._unlabelled_rows(selected),
                self.strategy.explain_kind,
                panel_dir,
                self.al.panels,
            )
        self.quarantine(cycle, explained.unreadable)
        requests = explained.requests
        regions_file = self.layout.regions_file(cycle)
        regions_file.write_text(json.dumps({r.sample_id: r.regions for r in requests}, indent=1))
        return Query(requests, timer.seconds, [regions_file, *sorted(panel_dir.glob("*.png"))])

    def _score_and_select(self, backend: CycleBackend, cycle: int, checkpoint: Path) -> list[str]:
        """D^S streamed from the pool state to the scorers and the scores to the strategy, each written to
        the cycle's folder on the way; the candidates the scorers could not read are quarantined."""
        positions = subset_positions(
            self.state.count(UNLABELLED), self.al.subset, cycle_rng(self.seed, cycle, "subset")
        )
        candidate_ids, scored_ids = IdsDigest(), IdsDigest()
        unreadable: dict[str, str] = {}

        def candidates() -> Iterator[pa.Table]:
            drawn = take_positions(self._manifest_batches(UNLABELLED), positions)
            for table in tee_parquet(self.layout.candidates(cycle), WORK_MANIFEST_SCHEMA, drawn):
                candidate_ids.update(table["sample_id"].combine_chunks())
                yield table

        def readable(scores: Iterable[pa.Table]) -> Iterator[pa.Table]:
            for table in scores:
                scored_ids.update(table["sample_id"].combine_chunks())
                broken = table.filter(pc.is_valid(table[UNREADABLE]))
                unreadable.update(
                    zip(
                        broken["sample_id"].to_pylist(), broken[UNREADABLE].to_pylist(), strict=True
                    )
                )
                yield table.filter(pc.is_null(table[UNREADABLE]))

        kind = self.strategy.score_kind
        if kind is None:
            rows: Iterator[pa.Table] = candidates()
        else:
            scores = backend.score(cycle, checkpoint, candidates(), kind)
            rows = readable(tee_parquet(self.layout.scores(cycle), kind.schema, scores))
        labelled = None
        if self.strategy.needs_labelled_embeddings:
            labelled = self._labelled_embeddings(backend, cycle, checkpoint)
        rng = cycle_rng(self.seed, cycle, "random")
        selected = self.strategy.select(
            Candidates(rows, len(positions), rng, labelled), self.budget
        )
        for _ in rows:  # the strategy may stop early: finish the pass and its audit files
            pass
        if kind is not None and scored_ids.hexdigest() != candidate_ids.hexdigest():
            raise ValueError(
                f"cycle {cycle}: the scorers did not score the candidates exactly once, in id order"
            )
        self.quarantine(cycle, unreadable)
        return selected

    def _labelled_embeddings(
        self, backend: CycleBackend, cycle: int, checkpoint: Path
    ) -> np.ndarray:
        """Core-set: the labelled pool's embeddings (its unreadable images have none)."""
        embeddings = []
        for table in backend.score(
            cycle, checkpoint, self._manifest_batches(LABELLED), ScoreKind.EMBEDDING
        ):
            embeddings.extend(table.filter(pc.is_null(table[UNREADABLE]))["embedding"].to_pylist())
        return np.asarray(embeddings, dtype=np.float32)

    # -- the annotation: oracle and gate ----------------------------------------------------------
    def annotate(self, cycle: int, requests: list[AnnotationRequest]) -> dict[str, float]:
        """The oracle re-annotates the selected images; the Dice of each re-annotation against the
        model's segmentation goes through the gate, whose decisions are one transition of the pool
        state. Returns the cycle's gate and oracle metrics; the decisions go to the cycle's folder."""
        annotations = self.oracle.annotate(requests)
        by_id = {a.sample_id: a for a in annotations}
        ids = [r.sample_id for r in requests]
        if sorted(by_id) != sorted(ids):
            raise ValueError(
                f"cycle {cycle}: the oracle annotated {sorted(by_id)}, expected {sorted(ids)}"
            )
        dice = dice_per_image(
            ids,
            [r.prediction for r in requests],
            [by_id[i].label for i in ids],
            self.label_set.num_classes,
        )
        decision = dice_gate(ids, dice.tolist(), self.al.theta)
        accepted = set(decision.accepted)
        image_of = {r.sample_id: r.image_path for r in requests}
        paths = [
            str(self._write_annotation(cycle, i, image_of[i], by_id[i].label))
            if i in accepted
            else None
            for i in ids
        ]
        costs = [by_id[i].cost for i in ids]
        flags = [i in accepted for i in ids]
        self.state.record_decisions(ids, cycle, self.oracle.name, dice, costs, flags, paths)
        decisions = pa.table(
            {
                "sample_id": ids,
                "dice": dice,
                "accepted": flags,
                "cost": costs,
                "pixels": [by_id[i].pixels for i in ids],
            },
            schema=DECISION_SCHEMA,
        )
        write_parquet(self.layout.decisions(cycle), DECISION_SCHEMA, [decisions])
        return {
            **gate_summary(decision),
            Metric.CYCLE_COST: float(sum(costs)),
            Metric.CYCLE_PIXELS: float(sum(by_id[i].pixels for i in ids)),
        }

    def _write_annotation(
        self, cycle: int, sample_id: str, image_path: str, label: np.ndarray
    ) -> Path:
        """The re-annotation in the dataset's own label encoding at the image's native size, so the
        training loader reads it like any ground-truth label."""
        height, width = image_size(image_path)
        raw = Image.fromarray(self.label_set.to_raw_ids(label)).resize(
            (width, height), Image.Resampling.NEAREST
        )
        path = self.layout.annotation(cycle, sample_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with naming(path):
            raw.save(path)
        return path

    # -- the pool state --------------------------------------------------------------------------
    def _manifest_batches(self, role: str) -> Iterator[pa.Table]:
        """The samples with ``role`` as work-manifest rows, a batch at a time; labelled samples carry
        their current label (ground truth or accepted re-annotation)."""
        columns = ["sample_id", "image_path", "label_path", "depth_path", "role", "label_source"]
        for table in self.state.batches(columns):
            rows = table.filter(pc.equal(table["role"], role))
            label = rows["label_source"] if role == LABELLED else rows["label_path"]
            yield pa.table(
                [rows["sample_id"], rows["image_path"], label, rows["depth_path"]],
                schema=WORK_MANIFEST_SCHEMA,
            )

    def _unlabelled_rows(self, ids: list[str]) -> pa.Table:
        """The unlabelled samples ``ids`` (a selection: sized by the budget), in the order asked for."""
        wanted = pa.array(ids, pa.string())
        rows = pa.concat_tables(
            t.filter(pc.is_in(t["sample_id"], value_set=wanted))
            for t in self._manifest_batches(UNLABELLED)
        )
        return rows.take(pc.index_in(wanted, value_set=rows["sample_id"]))

    def pool_metrics(self) -> dict[str, float]:
        return {
            Metric.LABELLED_FRACTION: self.state.labelled_fraction,
            Metric.LABELLED: self.state.count(LABELLED),
            Metric.UNLABELLED: self.state.count(UNLABELLED),
            Metric.QUARANTINED: self.state.count(QUARANTINED),
            Metric.TOTAL_COST: self.state.total_annotation_cost,
        }

    def quarantine(self, cycle: int, reasons: dict[str, str]) -> None:
        """Take unreadable images (sample id -> why) out of the pools for good, their reason recorded in
        the pool state; the run goes on without them."""
        for sample_id, reason in reasons.items():
            log.warning("cycle %d: %s quarantined: %s", cycle, sample_id, reason)
        self.state.quarantine(
            list(reasons), [f"cycle {cycle}: {reason}" for reason in reasons.values()]
        )
