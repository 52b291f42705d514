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
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from orchestrator.class_balance import class_pixels_of, class_weights
from orchestrator.config import ActiveLearningConfig
from orchestrator.cost import region_cost
from orchestrator.gate import dice_gate, dice_per_image, gate_summary
from orchestrator.oracles import Annotation, AnnotationRequest, Oracle
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
    WHOLE_IMAGE,
    WORK_MANIFEST_SCHEMA,
    Metric,
)
from orchestrator.run_layout import RunLayout, file_name
from orchestrator.selection import budget_count, cycle_rng, spend_on_regions, subset_positions
from orchestrator.stopping import stop_reason
from orchestrator.strategies import Candidates, RegionSpec, ScoreKind, get_strategy
from segxal.data.io import image_size
from segxal.data.labels import LabelSet
from segxal.data.region_labels import (
    labelled_mask,
    merge_region,
    read_region_labels,
    training_label,
    write_region_labels,
)
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
        self,
        cycle: int,
        checkpoint: Path,
        rows: Iterable[pa.Table],
        kind: ScoreKind | RegionSpec,
        class_weights: Sequence[float] | None = None,
    ) -> Iterator[pa.Table]:
        """With a :class:`RegionSpec`: one row per queryable region of each image (at least one row per
        image: a null ``region`` where it has none), ``REGION_SCORE_SCHEMA``. With ``class_weights``
        (``al.class_balance``), every score times its predicted classes' mean weight."""
        ...

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
        """Region mode: ``queried`` holds each selected image's queried region records."""
        ...


@dataclass(frozen=True)
class Query:
    """The first half of a cycle: what the oracle is asked."""

    requests: list[AnnotationRequest]  # the selected images, best first
    metrics: dict[str, float]  # time/score_s, time/select_s, time/explain_s
    # the prompt regions (JSON), then the EEM panels in the order of the requests
    artifacts: list[Path]


class Handoff(Protocol):
    """An oracle the run waits for (people in Label Studio): the run hands a cycle's query over and stops;
    a later run takes it back, its oracle holding the people's annotations by then."""

    def hand_over(self, cycle: int, query: Query) -> None: ...

    def take_back(self, cycle: int) -> Query | None: ...


@dataclass
class Progress:
    """What a resumed run needs: the last completed cycle, its model, the MLflow run, and for the
    stopping rules the value they track at each cycle and why the run stopped (None: it goes on)."""

    completed_cycle: int = -1
    checkpoint: str | None = None
    tracking_run_id: str | None = None
    trace: list[float] = field(default_factory=list)
    stopped: str | None = None
    class_pixels: list[float] = field(default_factory=list)  # the last training's, per class

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


OTSU_HINT = (
    "eem.region_threshold: otsu follows the EEM's own scale, which falls as the model grows confident "
    "and with eem.uncertainty: bald lies far below the entropy's"
)
NO_EEM_REGION_HINT = f"no pixel reaches eem.region_threshold; {OTSU_HINT}"


def unreadable_of(scores: pa.Table) -> dict[str, str]:
    """sample id -> why, for the rows of a scores table whose image could not be read."""
    broken = scores.filter(pc.is_valid(scores[UNREADABLE]))
    return dict(zip(broken["sample_id"].to_pylist(), broken[UNREADABLE].to_pylist(), strict=True))


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
        image_size: tuple[int, int] | None = None,
    ) -> None:
        self.layout = layout
        self.al = al
        self.label_set = label_set
        self.seed = seed
        self.oracle = oracle
        self.handoff = handoff
        self.strategy = get_strategy(al.strategy)
        self.regions = al.unit == "region"
        if self.regions:
            if image_size is None:
                raise ValueError("data.image_size: region mode counts pixels at the scoring size")
            self.image_size = (int(image_size[0]), int(image_size[1]))
            self.budget = int(al.budget)
        else:
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
        """Cycles ``progress.completed_cycle + 1 .. cycles``, or until a stopping rule (``al.stop``) ends
        the run; returns each cycle's metrics. With a handoff, a cycle whose query it does not give back
        is handed over and the run stops there."""
        history: list[dict[str, float]] = []
        if self.progress.stopped is not None:
            log.info("the run has stopped: %s", self.progress.stopped)
            return history
        for cycle in progress_bar(range(self.progress.completed_cycle + 1, cycles + 1)):
            if cycle > 0 and self._queryable_count() == 0:
                self.progress.stopped = "budget spent: the pool has nothing left to query"
                self.progress.save(self.layout)
            else:
                metrics = self.cycle(backend, cycle, on_cycle)
                if metrics is None:
                    break  # people annotate now; a later run takes the query back
                history.append(metrics)
            if self.progress.stopped is not None:
                log.info("cycle %d: the run stops: %s", cycle, self.progress.stopped)
                break
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
        self.progress.class_pixels = class_pixels_of(outcome.metrics, self.label_set.num_classes)
        metrics.update(self.pool_metrics())
        metrics.update(timer.seconds)
        artifacts.append(self.state.copy_to(self.layout.snapshot(cycle)).path)
        on_cycle(cycle, metrics, artifacts)
        self.progress.completed_cycle, self.progress.checkpoint = cycle, str(model_path)
        tracked = self.al.stop.tracked
        self.progress.trace.append(float(metrics.get(tracked, "nan")) if tracked else math.nan)
        self.progress.stopped = stop_reason(
            self.al.stop, self.progress.trace, self.state.total_annotation_cost
        )
        self.progress.save(self.layout)
        log.debug(  # the job prints its own line per cycle
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
        queried = None
        with timer("score"):
            if self.regions:
                queried, mean_score = self._score_and_select_regions(backend, cycle, checkpoint)
                selected = list(queried)
            else:
                selected, mean_score = self._score_and_select(backend, cycle, checkpoint)
        panel_dir = self.layout.panel_dir(cycle)
        panel_dir.mkdir(parents=True, exist_ok=True)
        with timer("explain"):
            arguments = (
                cycle,
                checkpoint,
                self._queryable_rows(selected),
                self.strategy.explain_kind,
                panel_dir,
                self.al.panels,
            )
            if queried is None:
                explained = backend.explain(*arguments)
            else:
                explained = backend.explain(*arguments, queried=queried)
        self.quarantine(cycle, explained.unreadable)
        requests = explained.requests
        if requests and not self.regions and not any(r.regions for r in requests):
            log.warning(
                "cycle %d: no selected image has an EEM region (%s), so the oracle corrects none of "
                "them and they join the pool as the model's own prediction",
                cycle,
                NO_EEM_REGION_HINT,
            )
        regions_file = self.layout.regions_file(cycle)
        regions_file.write_text(json.dumps({r.sample_id: r.regions for r in requests}, indent=1))
        metrics = {**timer.seconds, Metric.MEAN_SCORE: mean_score}
        panels = [panel_dir / (file_name(r.sample_id) + ".png") for r in requests]
        return Query(requests, metrics, [regions_file, *(p for p in panels if p.is_file())])

    def _score_and_select(
        self, backend: CycleBackend, cycle: int, checkpoint: Path
    ) -> tuple[list[str], float]:
        """D^S streamed from the pool state to the scorers and the scores to the strategy, each written to
        the cycle's folder on the way; the candidates the scorers could not read are quarantined.
        Returns the selection and its mean score (NaN for a strategy without one)."""
        candidate_ids, scored_ids = IdsDigest(), IdsDigest()
        unreadable: dict[str, str] = {}
        positions, candidates = self._draw_candidates(cycle, candidate_ids)

        def readable(scores: Iterable[pa.Table]) -> Iterator[pa.Table]:
            for table in scores:
                scored_ids.update(table["sample_id"].combine_chunks())
                unreadable.update(unreadable_of(table))
                yield table.filter(pc.is_null(table[UNREADABLE]))

        kind = self.strategy.score_kind
        if kind is None:
            rows: Iterator[pa.Table] = candidates()
        else:
            scores = backend.score(cycle, checkpoint, candidates(), kind, **self._balance())
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
        mean_score = math.nan
        if kind is not None and kind is not ScoreKind.EMBEDDING and selected:
            picked = pq.read_table(
                self.layout.scores(cycle),
                columns=["score"],
                filters=[("sample_id", "in", selected)],
            )
            mean_score = float(pc.mean(picked["score"]).as_py())
        return selected, mean_score

    def _balance(self) -> dict[str, tuple[float, ...]]:
        """The scoring call's class weights with ``al.class_balance`` (none without)."""
        if not self.al.class_balance:
            return {}
        return {"class_weights": class_weights(self.progress.class_pixels)}

    def _draw_candidates(
        self, cycle: int, digest: IdsDigest
    ) -> tuple[np.ndarray, Callable[[], Iterator[pa.Table]]]:
        """D^S: its positions among the queryable samples, and its rows streamed (each batch's ids fed
        to ``digest``) with a copy to the cycle's folder."""
        queryable = self._queryable_count()
        if queryable == 0:
            raise ValueError(f"cycle {cycle}: no image is left with unlabelled pixels to query")
        positions = subset_positions(
            queryable, self.al.subset, cycle_rng(self.seed, cycle, "subset")
        )

        def candidates() -> Iterator[pa.Table]:
            drawn = take_positions(self._queryable_batches(), positions)
            for table in tee_parquet(self.layout.candidates(cycle), WORK_MANIFEST_SCHEMA, drawn):
                digest.update(table["sample_id"].combine_chunks())
                yield table

        return positions, candidates

    def _score_and_select_regions(
        self, backend: CycleBackend, cycle: int, checkpoint: Path
    ) -> tuple[dict[str, list[dict]], float]:
        """Region mode: the regions of D^S scored (streamed, written to the cycle's folder), ranked by
        the strategy and taken best first until the budget is spent. Returns each selected image's
        queried region records, the images in the order of their best region, and their mean score
        (NaN for a strategy without one)."""
        candidate_ids, scored_ids = IdsDigest(), IdsDigest()
        unreadable: dict[str, str] = {}
        _, candidates = self._draw_candidates(cycle, candidate_ids)
        spec = self.strategy.region_spec(self.al.region_cell)
        rng = cycle_rng(self.seed, cycle, "random")

        def ranked(scores: Iterable[pa.Table]) -> Iterator[pa.Table]:
            for table in scores:
                scored_ids.update(pc.unique(table["sample_id"].combine_chunks()))
                unreadable.update(unreadable_of(table))
                regions = table.filter(pc.is_valid(table["region"]))
                yield self.strategy.rank_regions(regions, rng)

        scores = backend.score(cycle, checkpoint, candidates(), spec, **self._balance())
        unit = self.al.budget_unit

        def costs(table: pa.Table) -> list[int]:
            return [region_cost(p, unit) for p in table["pixels"].to_pylist()]

        chosen = spend_on_regions(
            ranked(tee_parquet(self.layout.scores(cycle), spec.schema, scores)), self.budget, costs
        )
        if scored_ids.hexdigest() != candidate_ids.hexdigest():
            raise ValueError(
                f"cycle {cycle}: the scorers did not score the candidates exactly once, in id order"
            )
        self.quarantine(cycle, unreadable)
        queried: dict[str, list[dict]] = {}
        if chosen is None:
            hint = f" ({NO_EEM_REGION_HINT})" if spec.source == "eem" else ""
            log.warning(
                "cycle %d: D^S holds no queryable region%s; the cycle queries nothing", cycle, hint
            )
            return queried, math.nan
        spent = sum(costs(chosen))
        if spent < self.budget:
            eem_hint = f" (EEM regions hold only pixels above eem.region_threshold; {OTSU_HINT})"
            hint = eem_hint if spec.source == "eem" else ""
            log.warning(
                "cycle %d: every queryable region of D^S is taken and spends %d of the %d %s of "
                "the budget%s",
                cycle,
                spent,
                self.budget,
                unit,
                hint,
            )
        scored = self.strategy.score_kind is not None
        mean_score = float(pc.mean(chosen["score"]).as_py()) if scored else math.nan
        for sample_id, record in zip(
            chosen["sample_id"].to_pylist(), chosen["record"].to_pylist(), strict=True
        ):
            queried.setdefault(sample_id, []).append(json.loads(record))
        return queried, mean_score

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
    def _annotations(
        self, cycle: int, requests: list[AnnotationRequest]
    ) -> tuple[list[str], dict[str, Annotation]]:
        annotations = self.oracle.annotate(requests)
        by_id = {a.sample_id: a for a in annotations}
        ids = [r.sample_id for r in requests]
        if sorted(by_id) != sorted(ids):
            raise ValueError(
                f"cycle {cycle}: the oracle annotated {sorted(by_id)}, expected {sorted(ids)}"
            )
        return ids, by_id

    def annotate(self, cycle: int, requests: list[AnnotationRequest]) -> dict[str, float]:
        """The oracle re-annotates the selected images; the Dice of each re-annotation against the
        model's segmentation goes through the gate, whose decisions are one transition of the pool
        state. Returns the cycle's gate and oracle metrics; the decisions go to the cycle's folder."""
        if self.regions:
            return self.annotate_regions(cycle, requests)
        ids, by_id = self._annotations(cycle, requests)
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
                "region": [WHOLE_IMAGE] * len(ids),
                "cycle": [cycle] * len(ids),
                "oracle": [self.oracle.name] * len(ids),
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

    def annotate_regions(self, cycle: int, requests: list[AnnotationRequest]) -> dict[str, float]:
        """Region mode: the oracle labels the queried regions; the gate decides region by region on the
        Dice inside it; the accepted regions join their image's region labels (and its training label),
        the returned ones stay queryable. Every region costs its clicks (``orchestrator.cost``)."""
        ids, by_id = self._annotations(cycle, requests)
        rows = self._queryable_rows(ids)
        mask_of = dict(
            zip(rows["sample_id"].to_pylist(), rows["mask_path"].to_pylist(), strict=True)
        )
        keys: list[str] = []
        region_dice, region_ids, region_pixels, owners = [], [], [], []
        spans = []  # each request's regions: a range of the lists above
        for request in requests:
            spans.append(range(len(keys), len(keys) + len(request.regions)))
            label = by_id[request.sample_id].label
            for region in request.regions:
                inside = request.region_map == region["id"]
                keys.append(f"{request.sample_id}#{region['id']}")
                owners.append(request.sample_id)
                region_ids.append(int(region["id"]))
                region_pixels.append(int(inside.sum()))
                region_dice.append(
                    float(
                        dice_per_image(
                            [keys[-1]],
                            [request.prediction[inside]],
                            [label[inside]],
                            self.label_set.num_classes,
                        )[0]
                    )
                )
        decision = dice_gate(keys, region_dice, self.al.theta)
        accepted = set(decision.accepted)
        unit = self.al.budget_unit
        clicks = [region_cost(p, "clicks") for p in region_pixels]
        spent = [region_cost(p, unit) for p in region_pixels]
        flags = [key in accepted for key in keys]
        masks: list[tuple[str, int] | None] = []
        paths: list[str | None] = []
        image_dice, image_cost, returned = [], [], []
        for request, mine in zip(requests, spans, strict=True):
            labels = read_region_labels(mask_of[request.sample_id], self.image_size)
            gained = [k for k in mine if flags[k]]
            for k in gained:
                inside = request.region_map == region_ids[k]
                labels = merge_region(labels, inside, by_id[request.sample_id].label)
            if gained:
                mask_path = self.layout.region_labels(cycle, request.sample_id)
                write_region_labels(mask_path, labels)
                path = self._write_annotation(
                    cycle, request.sample_id, request.image_path, training_label(labels)
                )
                masks.append((str(mask_path), int(labelled_mask(labels).sum())))
                paths.append(str(path))
            else:
                masks.append(None)
                paths.append(None)
            finite = [region_dice[k] for k in mine if not np.isnan(region_dice[k])]
            image_dice.append(float(np.mean(finite)) if finite else float("nan"))
            image_cost.append(float(sum(clicks[k] for k in mine)))
            returned.append(sum(not flags[k] for k in mine))
        self.state.record_decisions(
            ids,
            cycle,
            self.oracle.name,
            image_dice,
            image_cost,
            [m is not None for m in masks],
            paths,
            masks=masks,
            returned=returned,
        )
        decisions = pa.table(
            {
                "sample_id": owners,
                "region": region_ids,
                "cycle": [cycle] * len(owners),
                "oracle": [self.oracle.name] * len(owners),
                "dice": region_dice,
                "accepted": flags,
                "cost": [float(c) for c in clicks],
                "pixels": region_pixels,
            },
            schema=DECISION_SCHEMA,
        )
        write_parquet(self.layout.decisions(cycle), DECISION_SCHEMA, [decisions])
        return {
            **gate_summary(decision),
            Metric.CYCLE_COST: float(sum(clicks)),
            Metric.CYCLE_CLICKS: float(sum(clicks)),
            Metric.CYCLE_PIXELS: float(sum(region_pixels)),
            Metric.RETURNED_COST: float(sum(s for s, f in zip(spent, flags, strict=True) if not f)),
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
        for table in self.state.batches([*WORK_MANIFEST_SCHEMA.names, "role", "label_source"]):
            rows = table.filter(pc.equal(table["role"], role))
            if role == LABELLED:
                rows = rows.set_column(2, "label_path", rows["label_source"])
            yield rows.select(WORK_MANIFEST_SCHEMA.names).cast(WORK_MANIFEST_SCHEMA)

    def _queryable_batches(self) -> Iterator[pa.Table]:
        """The samples a cycle may query, with their ground truth (if any) as the label: the unlabelled
        ones and, in region mode, the labelled ones that still have unlabelled pixels."""
        for table in self.state.batches([*WORK_MANIFEST_SCHEMA.names, "role"]):
            queryable = pc.equal(table["role"], UNLABELLED)
            if self.regions:
                partly = pc.and_(pc.equal(table["role"], LABELLED), pc.is_valid(table["mask_path"]))
                queryable = pc.or_(queryable, partly)
            yield (
                table.filter(queryable)
                .select(WORK_MANIFEST_SCHEMA.names)
                .cast(WORK_MANIFEST_SCHEMA)
            )

    def _queryable_count(self) -> int:
        if not self.regions:
            return self.state.count(UNLABELLED)
        return sum(t.num_rows for t in self._queryable_batches())

    def _queryable_rows(self, ids: list[str]) -> pa.Table:
        """The queryable samples ``ids`` (a selection: sized by the budget), in the order asked for."""
        wanted = pa.array(ids, pa.string())
        rows = pa.concat_tables(
            t.filter(pc.is_in(t["sample_id"], value_set=wanted)) for t in self._queryable_batches()
        )
        return rows.take(pc.index_in(wanted, value_set=rows["sample_id"]))

    def labelled_pixel_fraction(self) -> float:
        """Labelled pixels over the training pool's pixels: a fully labelled image counts whole, a
        region-labelled one its labelled pixels (image mode: the labelled fraction)."""
        if not self.regions:
            return self.state.labelled_fraction
        per_image = self.image_size[0] * self.image_size[1]
        pixels = 0
        for table in self.state.batches(["role", "mask_path", "labelled_pixels"]):
            labelled = table.filter(pc.equal(table["role"], LABELLED))
            partial = pc.is_valid(labelled["mask_path"])
            partial_count = pc.sum(partial.cast(pa.int64())).as_py() or 0
            pixels += per_image * (labelled.num_rows - partial_count)
            pixels += pc.sum(labelled.filter(partial)["labelled_pixels"]).as_py() or 0
        size = self.state.training_pool_size
        return pixels / (size * per_image) if size else 0.0

    def pool_metrics(self) -> dict[str, float]:
        return {
            Metric.LABELLED_FRACTION: self.state.labelled_fraction,
            Metric.LABELLED_PIXEL_FRACTION: self.labelled_pixel_fraction(),
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
