"""The coordinator: the single writer of the pool state. It draws D^S, selects, calls the oracle, applies
the Dice gate and persists the state after every step. A plain class; on Ray it runs as an actor
(``actors/coordinator.py``) and the loop talks to it through its methods only."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from orchestrator.config import ActiveLearningConfig
from orchestrator.gate import dice_gate, dice_per_image
from orchestrator.oracles import AnnotationRequest, Oracle
from orchestrator.pool_state import LABELLED, QUARANTINED, UNLABELLED, VALIDATION, PoolState
from orchestrator.strategies import budget_count, cycle_rng, draw_subset, get_strategy, select
from segxal.data.io import image_size
from segxal.data.labels import LabelSet

log = logging.getLogger(__name__)
STATE_FILE = "pool_state.parquet"


def cycle_name(cycle: int) -> str:
    return f"cycle_{cycle:02d}"


def cycle_dir(run_dir: Path, cycle: int) -> Path:
    """Where a cycle keeps its model, scores and end-of-cycle pool state."""
    return Path(run_dir) / "cycles" / cycle_name(cycle)


def snapshot_path(run_dir: Path, cycle: int) -> Path:
    return cycle_dir(run_dir, cycle) / STATE_FILE


def file_name(sample_id: str) -> str:
    """A sample id (``<split>/<stem>``) as a flat file name."""
    return sample_id.replace("/", "__")


def annotation_file(run_dir: Path, cycle: int, sample_id: str) -> Path:
    return Path(run_dir) / "annotations" / cycle_name(cycle) / (file_name(sample_id) + ".png")


class Coordinator:
    def __init__(self, run_dir: str | Path, state: PoolState, al: ActiveLearningConfig, label_set: LabelSet, seed: int,
                 oracle: Oracle | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.state = state
        self.oracle = oracle
        self.al = al
        self.label_set = label_set
        self.seed = seed
        self.strategy = get_strategy(al.strategy)
        self.budget = budget_count(al.budget, state.training_pool_size, name="al.budget")
        unlabelled = state.count(UNLABELLED)
        if self.budget > unlabelled:
            raise ValueError(f"al.budget: {self.budget} images per cycle but the unlabelled pool has {unlabelled}")

    # -- views of the state -------------------------------------------------------------------
    def _manifest(self, role: str, ids: Sequence[str] | None = None) -> pa.Table:
        table = self.state.table
        mask = pc.equal(table["role"], role)
        if ids is not None:
            mask = pc.and_(mask, pc.is_in(table["sample_id"], pa.array(list(ids), pa.string())))
        rows = table.filter(mask)
        if ids is not None:  # in the order asked for (a selection's rank)
            rows = rows.take(pc.index_in(pa.array(list(ids), pa.string()), rows["sample_id"]))
        label = rows["label_source"] if role == LABELLED else rows["label_path"]
        return pa.table({"sample_id": rows["sample_id"], "image_path": rows["image_path"],
                         "label_path": label, "depth_path": rows["depth_path"]})

    def training_manifest(self) -> pa.Table:
        """The labelled pool, each sample with its current label (ground truth or accepted re-annotation)."""
        return self._manifest(LABELLED)

    def validation_manifest(self) -> pa.Table:
        return self._manifest(VALIDATION)

    def unlabelled_manifest(self, ids: Sequence[str] | None = None) -> pa.Table:
        return self._manifest(UNLABELLED, ids)

    # -- the cycle's steps ----------------------------------------------------------------------
    def candidates(self, cycle: int) -> pa.Table:
        """D^S: a random subset of the unlabelled pool, the same for the same (seed, cycle)."""
        ids = draw_subset(self.state.ids(UNLABELLED), self.al.subset, cycle_rng(self.seed, cycle, "subset"))
        return self.unlabelled_manifest(ids.to_pylist())

    def select(self, cycle: int, candidates: pa.Table, scores: pa.Table | None,
               labelled_features: np.ndarray | None = None) -> list[str]:
        """The top n of D^S by the strategy (scores aligned by ``sample_id``)."""
        ids = candidates["sample_id"]
        n = min(self.budget, len(ids))
        if scores is not None:
            scores = scores.sort_by("sample_id")
            if scores["sample_id"].to_pylist() != sorted(ids.to_pylist()):
                raise ValueError(f"cycle {cycle}: scores do not cover the candidates exactly once")
            ids = scores["sample_id"]
        features = None
        if scores is not None and "embedding" in scores.column_names:
            features = np.asarray(scores["embedding"].to_pylist(), dtype=np.float32)
        chosen = select(self.strategy, ids, n,
                        scores=None if scores is None or "score" not in scores.column_names else scores["score"].to_numpy(),
                        features=features, labelled_features=labelled_features,
                        rng=cycle_rng(self.seed, cycle, "random"))
        return chosen.to_pylist()

    def pool_metrics(self) -> dict[str, float]:
        return {
            "pool/labelled_fraction": self.state.labelled_fraction,
            "pool/labelled": self.state.count(LABELLED),
            "pool/unlabelled": self.state.count(UNLABELLED),
            "pool/quarantined": self.state.count(QUARANTINED),
            "oracle/total_cost": self.state.total_annotation_cost,
        }

    def quarantine(self, cycle: int, reasons: dict[str, str]) -> None:
        """Take unreadable images (sample id -> why) out of the pools for good, their reason recorded in the
        pool state; the run goes on without them."""
        for sample_id, reason in reasons.items():
            log.warning("cycle %d: %s quarantined: %s", cycle, sample_id, reason)
            self.state = self.state.quarantine(sample_id, f"cycle {cycle}: {reason}")
        if reasons:
            self.save()

    def annotate(self, cycle: int, requests: Sequence[AnnotationRequest]) -> pa.Table:
        """The oracle re-annotates the selected images; the Dice of each re-annotation against the model's
        segmentation goes through the gate; the state is updated and saved. Returns the cycle's decisions
        (sample_id, dice, accepted, cost, pixels), in the order of ``requests``."""
        if self.oracle is None:
            raise RuntimeError("the coordinator was built without an oracle")
        annotations = self.oracle.annotate(requests)
        by_id = {a.sample_id: a for a in annotations}
        if sorted(by_id) != sorted(r.sample_id for r in requests):
            raise ValueError(f"cycle {cycle}: the oracle annotated {sorted(by_id)}, expected {sorted(r.sample_id for r in requests)}")
        ids = [r.sample_id for r in requests]
        oracle = self.oracle.name
        dice = dice_per_image(ids, [r.prediction for r in requests], [by_id[i].label for i in ids],
                              self.label_set.num_classes)
        decision = dice_gate(ids, dice, self.al.theta)
        cost = {i: by_id[i].cost for i in ids}
        if decision.accepted:
            paths = [str(self._write_annotation(cycle, i, by_id[i].label)) for i in decision.accepted]
            self.state = self.state.accept(list(decision.accepted), cycle, oracle, list(decision.accepted_dice),
                                           [cost[i] for i in decision.accepted], paths)
        if decision.returned:
            self.state = self.state.return_to_pool(list(decision.returned), cycle, oracle, list(decision.returned_dice),
                                                   [cost[i] for i in decision.returned])
        self.save()
        dice_of = dict(zip(decision.accepted + decision.returned, decision.accepted_dice + decision.returned_dice))
        accepted = set(decision.accepted)
        return pa.table({
            "sample_id": pa.array(ids, pa.string()),
            "dice": pa.array([dice_of[i] for i in ids], pa.float64()),
            "accepted": pa.array([i in accepted for i in ids]),
            "cost": pa.array([cost[i] for i in ids], pa.float64()),
            "pixels": pa.array([by_id[i].pixels for i in ids], pa.int64()),
        })

    def _write_annotation(self, cycle: int, sample_id: str, label: np.ndarray) -> Path:
        """The re-annotation in the dataset's own label encoding at the image's native size, so the
        training loader reads it like any ground-truth label."""
        image_path = self.state.record(sample_id)["image_path"]
        height, width = image_size(image_path)
        raw = Image.fromarray(self.label_set.to_raw_ids(label)).resize((width, height), Image.NEAREST)
        path = annotation_file(self.run_dir, cycle, sample_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw.save(path)
        return path

    # -- persistence ----------------------------------------------------------------------------
    def save(self) -> Path:
        return self.state.save(self.run_dir / STATE_FILE)

    def snapshot(self, cycle: int) -> Path:
        """The state at the end of ``cycle``: where a resumed run starts from."""
        path = snapshot_path(self.run_dir, cycle)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.state.save(path)
        self.save()
        return path
