"""Acquisition strategies: what each needs scored for every image of D^S, and how it selects.

A strategy is one object. ``score_kind`` says what the scoring actors compute per candidate (the
scoring side maps a kind to one function); ``select`` picks n ids from the scored candidates, streamed
in id order. Adding a strategy is one class (or an instance of one below) and one entry in
:data:`STRATEGIES`; configs name strategies by their key there.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.parquet_io import take_positions
from orchestrator.records import EMBEDDING_SCHEMA, REGION_SCORE_SCHEMA, SCORE_SCHEMA
from orchestrator.selection import k_center_greedy, random_positions, top_n_of_batches
from segxal.eem.config import EEMConfig


class ScoreKind(str, Enum):
    """What the scoring actors compute for each candidate."""

    EEM = "eem"  # alpha * ProxGradCAM + beta * entropy, reduced to one score (needs depth)
    PAE = "pae"  # ProxGradCAM alone through the EEM reduction (needs depth)
    EBU = "ebu"  # entropy map alone through the EEM reduction (no depth)
    ENTROPY = "entropy"  # plain mean pixel entropy of the softmax (baseline)
    BALD = "bald"  # mean MC-dropout mutual information (needs model.dropout > 0)
    EMBEDDING = "embedding"  # pooled encoder features

    @property
    def schema(self) -> pa.Schema:
        """The scores table of this kind: ``sample_id``, ``score`` or ``embedding``, ``unreadable``."""
        return EMBEDDING_SCHEMA if self is ScoreKind.EMBEDDING else SCORE_SCHEMA

    @property
    def column(self) -> str:
        """The scores table's value column: ``score``, or ``embedding``."""
        return self.schema.names[1]  # the schemas are (sample_id, value, unreadable)

    def eem_config(self, config: EEMConfig) -> EEMConfig:
        """The EEM settings this kind scores and explains with: the ablations zero one term; every other
        kind explains its selection with the full EEM."""
        weights = {ScoreKind.PAE: (1.0, 0.0), ScoreKind.EBU: (0.0, 1.0)}.get(self)
        if weights is None:
            return config
        return dataclasses.replace(config, alpha=weights[0], beta=weights[1])


RegionSource = Literal["eem", "cells"]


@dataclass(frozen=True)
class RegionSpec:
    """What the scorers find and score in each candidate in region mode: connected EEM regions
    (``source`` eem) or ``cell`` x ``cell`` cells, over its unlabelled pixels only; ``kind``: the map a
    region's score is the mean of (None: no score, the run draws a random one)."""

    source: RegionSource
    kind: ScoreKind | None
    cell: int

    schema: ClassVar[pa.Schema] = REGION_SCORE_SCHEMA


@dataclass(frozen=True)
class Candidates:
    """D^S as a strategy sees it: ``batches`` of its readable rows in id order (``sample_id`` and, for a
    scored strategy, the ``score`` or ``embedding`` column), streamed once; ``count``: how many rows
    the batches hold at most (D^S's size)."""

    batches: Iterable[pa.Table]
    count: int
    rng: np.random.Generator
    labelled_embeddings: np.ndarray | None = None  # core-set: of the labelled pool


class Strategy(ABC):
    name: str
    description: str
    score_kind: ScoreKind | None  # None: nothing to score
    needs_labelled_embeddings: ClassVar[bool] = False

    @property
    def needs_depth(self) -> bool:
        return self.score_kind in (ScoreKind.EEM, ScoreKind.PAE)

    @property
    def explain_kind(self) -> ScoreKind:
        """The EEM variant the selected images are explained with (maps, prompts, panels)."""
        return (
            self.score_kind if self.score_kind in (ScoreKind.PAE, ScoreKind.EBU) else ScoreKind.EEM
        )

    @abstractmethod
    def select(self, candidates: Candidates, n: int) -> list[str]:
        """n ids of ``candidates`` (all of them when fewer), best first where there is an order."""

    # -- region mode (al.unit: region) -----------------------------------------------------------
    has_region_mode: ClassVar[bool] = True

    @property
    def region_source(self) -> RegionSource:
        """EEM strategies query their EEM regions; the others, cells."""
        return (
            "eem" if self.score_kind in (ScoreKind.EEM, ScoreKind.PAE, ScoreKind.EBU) else "cells"
        )

    def region_spec(self, cell: int) -> RegionSpec:
        return RegionSpec(self.region_source, self.score_kind, cell)

    def rank_regions(self, regions: pa.Table, rng: np.random.Generator) -> pa.Table:
        """``regions`` (a batch of ``REGION_SCORE_SCHEMA`` rows, in id order) with the ``score`` they are
        ranked by, highest first."""
        return regions


@dataclass(frozen=True)
class TopScore(Strategy):
    """The n highest scores; equal scores by id."""

    name: str
    score_kind: ScoreKind
    description: str

    def select(self, candidates: Candidates, n: int) -> list[str]:
        ranked = ((t["sample_id"], t["score"]) for t in candidates.batches)
        return top_n_of_batches(ranked, n).to_pylist()


@dataclass(frozen=True)
class UniformRandom(Strategy):
    """n of D^S drawn uniformly without replacement, in id order."""

    name: str
    description: str
    score_kind: None = None

    def select(self, candidates: Candidates, n: int) -> list[str]:
        positions = random_positions(candidates.count, min(n, candidates.count), candidates.rng)
        picked = take_positions((t.select(["sample_id"]) for t in candidates.batches), positions)
        return [sample_id for t in picked for sample_id in t["sample_id"].to_pylist()]

    def rank_regions(self, regions: pa.Table, rng: np.random.Generator) -> pa.Table:
        """A uniform random key per region, drawn in id order from one stream: the same keys however
        the rows are batched."""
        keys = pa.array(rng.random(regions.num_rows), pa.float64())
        return regions.set_column(regions.schema.get_field_index("score"), "score", keys)


@dataclass(frozen=True)
class CoreSet(Strategy):
    """k-center greedy on encoder embeddings (Sener & Savarese, 2018), in the order picked: each the
    candidate farthest from the labelled pool and the picks before it."""

    name: str
    description: str
    score_kind: ScoreKind = ScoreKind.EMBEDDING
    needs_labelled_embeddings: ClassVar[bool] = True
    has_region_mode: ClassVar[bool] = False  # an embedding per image, none per region

    def select(self, candidates: Candidates, n: int) -> list[str]:
        tables = list(candidates.batches)
        if not tables:
            return []
        everything = pa.concat_tables(tables)
        ids = everything["sample_id"].combine_chunks()
        if len(ids) > 1 and not pc.all(pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py():
            raise ValueError("core-set: candidates must come in id order (ties are broken by id)")
        features = np.asarray(everything["embedding"].to_pylist(), dtype=np.float32)
        picks = k_center_greedy(features, candidates.labelled_embeddings, min(n, len(ids)))
        return ids.take(pa.array(picks, type=pa.int64())).to_pylist()


STRATEGIES = MappingProxyType(
    {
        strategy.name: strategy
        for strategy in (
            TopScore("eem", ScoreKind.EEM, "SegXAL: EEM = alpha*ProxGradCAM + beta*entropy"),
            TopScore("eem_no_ebu", ScoreKind.PAE, "ablation: PAE only (beta = 0)"),
            TopScore(
                "eem_no_pae", ScoreKind.EBU, "ablation: entropy inside the EEM pipeline (alpha = 0)"
            ),
            TopScore("entropy", ScoreKind.ENTROPY, "baseline: mean pixel entropy"),
            TopScore("bald", ScoreKind.BALD, "baseline: MC-dropout BALD, mean mutual information"),
            UniformRandom("random", "baseline: uniform random"),
            CoreSet("coreset", "baseline: k-center greedy on encoder features"),
        )
    }
)


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}"
        ) from None
