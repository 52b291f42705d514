"""The coordinator: the single writer of the pool state. It draws D^S, selects, calls the oracle, applies
the Dice gate and persists the state after every step. A plain class; on Ray it runs as an actor
(``actors/coordinator.py``) and the loop talks to it through its methods only.

Its memory does not grow with the pool: the state is a file it streams (``PoolState``), and what is pool
sized (D^S, its scores, the training and validation manifests) goes between it and the loop as Parquet
files in the cycle's folder, read and written a batch at a time. Only what is sized by the budget (the
selection and its annotations) and core-set's embeddings are held whole."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from orchestrator.config import ActiveLearningConfig
from orchestrator.gate import dice_gate, dice_per_image
from orchestrator.oracles import AnnotationRequest, Oracle
from orchestrator.parquet_io import read_batches, row_count, take_positions, write_parquet
from orchestrator.pool_state import (
    LABELLED,
    QUARANTINED,
    UNLABELLED,
    VALIDATION,
    IdsDigest,
    PoolState,
)
from orchestrator.strategies import (
    Selection,
    budget_count,
    cycle_rng,
    get_strategy,
    random_positions,
    select,
    subset_positions,
    top_n_of_batches,
)
from segxal.data.io import image_size
from segxal.data.labels import LabelSet

log = logging.getLogger(__name__)
STATE_FILE = "pool_state.parquet"
UNREADABLE = (
    "unreadable"  # scores column: why an image could not be read (null for the scored ones)
)
WORK_MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_path", pa.string()),
        ("label_path", pa.string()),
        ("depth_path", pa.string()),
    ]
)


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
    def __init__(
        self,
        run_dir: str | Path,
        state: PoolState,
        al: ActiveLearningConfig,
        label_set: LabelSet,
        seed: int,
        oracle: Oracle | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.oracle = oracle
        self.al = al
        self.label_set = label_set
        self.seed = seed
        self.strategy = get_strategy(al.strategy)
        self.budget = budget_count(al.budget, state.training_pool_size, name="al.budget")
        unlabelled = state.count(UNLABELLED)
        if self.budget > unlabelled:
            raise ValueError(
                f"al.budget: {self.budget} images per cycle but the unlabelled pool has {unlabelled}"
            )
        self.state = state.copy_to(
            self.run_dir / STATE_FILE
        )  # the run's live state, whatever it starts from

    # -- views of the state -------------------------------------------------------------------
    def _manifest_batches(self, role: str) -> Iterator[pa.Table]:
        """The samples with ``role`` as manifest rows, a batch at a time; labelled samples carry their
        current label (ground truth or accepted re-annotation)."""
        for table in self.state.batches(
            ["sample_id", "image_path", "label_path", "depth_path", "role", "label_source"]
        ):
            rows = table.filter(pc.equal(table["role"], role))
            label = rows["label_source"] if role == LABELLED else rows["label_path"]
            yield pa.table(
                [rows["sample_id"], rows["image_path"], label, rows["depth_path"]],
                schema=WORK_MANIFEST_SCHEMA,
            )

    def training_manifest(self, cycle: int) -> Path:
        """The labelled pool as a manifest file in ``cycle``'s folder."""
        return write_parquet(
            cycle_dir(self.run_dir, cycle) / "train_manifest.parquet",
            WORK_MANIFEST_SCHEMA,
            self._manifest_batches(LABELLED),
        )

    def validation_manifest(self, cycle: int) -> Path:
        return write_parquet(
            cycle_dir(self.run_dir, cycle) / "val_manifest.parquet",
            WORK_MANIFEST_SCHEMA,
            self._manifest_batches(VALIDATION),
        )

    def unlabelled_manifest(self, ids: Sequence[str]) -> pa.Table:
        """The unlabelled samples ``ids`` (a selection: sized by the budget), in the order asked for."""
        wanted = pa.array(list(ids), pa.string())
        rows = pa.concat_tables(
            t.filter(pc.is_in(t["sample_id"], value_set=wanted))
            for t in self._manifest_batches(UNLABELLED)
        )
        return rows.take(pc.index_in(wanted, value_set=rows["sample_id"]))

    # -- the cycle's steps ----------------------------------------------------------------------
    def candidates(self, cycle: int) -> Path:
        """D^S as a manifest file in ``cycle``'s folder: a random subset of the unlabelled pool, the same
        for the same (seed, cycle)."""
        positions = subset_positions(
            self.state.count(UNLABELLED), self.al.subset, cycle_rng(self.seed, cycle, "subset")
        )
        return write_parquet(
            cycle_dir(self.run_dir, cycle) / "candidates.parquet",
            WORK_MANIFEST_SCHEMA,
            take_positions(self._manifest_batches(UNLABELLED), positions),
        )

    def select(
        self,
        cycle: int,
        candidates: Path,
        scores: Path | None,
        labelled_features: np.ndarray | None = None,
    ) -> list[str]:
        """The top n of D^S by the strategy. ``scores``: a Parquet file of one row per candidate in id order
        (``sample_id``, ``score`` or ``embedding``, and ``unreadable``: rows with a reason are left out)."""
        rng = cycle_rng(self.seed, cycle, "random")
        if scores is None:
            count = row_count(candidates)
            positions = random_positions(count, min(self.budget, count), rng)
            return [
                sample_id
                for t in take_positions(read_batches(candidates, ["sample_id"]), positions)
                for sample_id in t["sample_id"].to_pylist()
            ]
        if _ids_digest(scores) != _ids_digest(candidates):
            raise ValueError(
                f"cycle {cycle}: {scores} does not score the candidates {candidates} exactly once, in id order"
            )
        readable = (_readable(t) for t in read_batches(scores))
        if (
            self.strategy.selection is Selection.TOP_N
        ):  # fewer readable candidates than the budget: all of them
            return top_n_of_batches(
                ((t["sample_id"], t["score"]) for t in readable), self.budget
            ).to_pylist()
        everything = pa.concat_tables(readable)
        features = np.asarray(everything["embedding"].to_pylist(), dtype=np.float32)
        ids = everything["sample_id"]
        return select(
            self.strategy,
            ids,
            min(self.budget, len(ids)),
            features=features,
            labelled_features=labelled_features,
            rng=rng,
        ).to_pylist()

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
        self.state.quarantine(
            list(reasons), [f"cycle {cycle}: {reason}" for reason in reasons.values()]
        )

    def annotate(self, cycle: int, requests: Sequence[AnnotationRequest]) -> pa.Table:
        """The oracle re-annotates the selected images; the Dice of each re-annotation against the model's
        segmentation goes through the gate; the state is updated and saved. Returns the cycle's decisions
        (sample_id, dice, accepted, cost, pixels), in the order of ``requests``."""
        if self.oracle is None:
            raise RuntimeError("the coordinator was built without an oracle")
        annotations = self.oracle.annotate(requests)
        by_id = {a.sample_id: a for a in annotations}
        if sorted(by_id) != sorted(r.sample_id for r in requests):
            raise ValueError(
                f"cycle {cycle}: the oracle annotated {sorted(by_id)}, expected {sorted(r.sample_id for r in requests)}"
            )
        ids = [r.sample_id for r in requests]
        oracle = self.oracle.name
        dice = dice_per_image(
            ids,
            [r.prediction for r in requests],
            [by_id[i].label for i in ids],
            self.label_set.num_classes,
        )
        decision = dice_gate(ids, dice, self.al.theta)
        cost = {i: by_id[i].cost for i in ids}
        image_of = {r.sample_id: r.image_path for r in requests}
        if decision.accepted:
            paths = [
                str(self._write_annotation(cycle, i, image_of[i], by_id[i].label))
                for i in decision.accepted
            ]
            self.state.accept(
                list(decision.accepted),
                cycle,
                oracle,
                list(decision.accepted_dice),
                [cost[i] for i in decision.accepted],
                paths,
            )
        if decision.returned:
            self.state.return_to_pool(
                list(decision.returned),
                cycle,
                oracle,
                list(decision.returned_dice),
                [cost[i] for i in decision.returned],
            )
        dice_of = dict(
            zip(
                decision.accepted + decision.returned,
                decision.accepted_dice + decision.returned_dice,
                strict=True,
            )
        )
        accepted = set(decision.accepted)
        return pa.table(
            {
                "sample_id": pa.array(ids, pa.string()),
                "dice": pa.array([dice_of[i] for i in ids], pa.float64()),
                "accepted": pa.array([i in accepted for i in ids]),
                "cost": pa.array([cost[i] for i in ids], pa.float64()),
                "pixels": pa.array([by_id[i].pixels for i in ids], pa.int64()),
            }
        )

    def _write_annotation(
        self, cycle: int, sample_id: str, image_path: str, label: np.ndarray
    ) -> Path:
        """The re-annotation in the dataset's own label encoding at the image's native size, so the
        training loader reads it like any ground-truth label."""
        height, width = image_size(image_path)
        raw = Image.fromarray(self.label_set.to_raw_ids(label)).resize(
            (width, height), Image.NEAREST
        )
        path = annotation_file(self.run_dir, cycle, sample_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw.save(path)
        return path

    # -- persistence ----------------------------------------------------------------------------
    def snapshot(self, cycle: int) -> Path:
        """The state at the end of ``cycle``: where a resumed run starts from. (The live state is
        written by every transition already.)"""
        return self.state.copy_to(snapshot_path(self.run_dir, cycle)).path


def _readable(scores: pa.Table) -> pa.Table:
    if UNREADABLE not in scores.column_names:
        return scores
    return scores.filter(pc.is_null(scores[UNREADABLE]))


def _ids_digest(path: Path) -> str:
    digest = IdsDigest()
    for table in read_batches(path, ["sample_id"]):
        digest.update(table["sample_id"].combine_chunks())
    return digest.hexdigest()
