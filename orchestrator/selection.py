"""Selection rules, model-free: the random subset D^S, uniform draws, top n by score, k-center greedy.

Ids are handled as Arrow string arrays (no per-row Python objects for large pools); functions accept
lists, NumPy arrays or Arrow arrays of ids and return ``pa.StringArray``. Every random choice takes an
explicit ``np.random.Generator`` (or an int seed) and sorts its input ids first, so the result depends
only on the seed and the set of ids, not on the order they arrived in. The strategies
(``orchestrator.strategies``) are built from these.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Budget: TypeAlias = int | float
"""A count (int >= 1) or a fraction (float in (0, 1]) of a pool."""

IdsLike: TypeAlias = Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray


def cycle_rng(seed: int, cycle: int, stream: str) -> np.random.Generator:
    """A generator that depends only on (seed, cycle, stream), so a resumed run draws what an
    uninterrupted one would have drawn; ``stream`` names the purpose (e.g. "subset", "random")."""
    return np.random.default_rng([int(seed), int(cycle), zlib.crc32(stream.encode())])


def _as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be a numpy Generator or an int seed (selection must be reproducible), got {rng!r}"
    )


def as_ids(ids: IdsLike, name: str = "ids", *, sort: bool = False) -> pa.StringArray:
    """``ids`` as one Arrow string array, sorted when ``sort``; nulls and duplicates are errors
    naming ``name``. Already-sorted input (the pool's own id lists) costs one linear pass."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not isinstance(ids, pa.Array):
        ids = pa.array(
            np.asarray(ids, dtype=object) if isinstance(ids, np.ndarray) else list(ids),
            type=pa.string(),
        )
    if not pa.types.is_string(ids.type):
        ids = ids.cast(pa.string())
    if ids.null_count:
        raise ValueError(f"{name}: {ids.null_count} null sample ids")
    if len(ids) < 2 or pc.all(pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py():
        return ids
    ordered = ids.take(pc.sort_indices(ids))
    same = pc.equal(ordered.slice(0, len(ids) - 1), ordered.slice(1))
    if pc.any(same).as_py():
        dupes = pc.unique(pc.filter(ordered.slice(1), same))
        raise ValueError(f"{name}: duplicate sample ids {dupes[:5].to_pylist()}")
    return ordered if sort else ids


def _resolve(value: Budget, total: int, name: str) -> int:
    """A count as given, or a fraction of ``total`` rounded half up."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be an int count or a float fraction in (0, 1], got {value!r}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{name} fraction must be in (0, 1], got {value}")
        count = math.floor(value * total + 0.5)
        if count < 1:
            raise ValueError(
                f"{name} fraction {value} of {total} samples is 0 samples; use a larger fraction or a count"
            )
        return count
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def budget_count(budget: Budget, pool_size: int, *, name: str = "budget") -> int:
    """Resolve a count or a fraction of ``pool_size`` (fractions round half up) into a number of
    samples; a non-positive budget, a budget larger than the pool or an empty pool is an error."""
    if pool_size < 1:
        raise ValueError(f"{name}: the pool is empty")
    count = _resolve(budget, pool_size, name)
    if count > pool_size:
        raise ValueError(f"{name} {budget} is larger than the pool ({pool_size} samples)")
    return count


def subset_positions(
    pool_size: int, size_or_fraction: Budget, rng: np.random.Generator | int
) -> np.ndarray:
    """Sorted positions of D^S among the ``pool_size`` unlabelled ids in id order: a fraction of the pool,
    or a count (one larger than the pool takes the whole pool, as late cycles may have fewer unlabelled
    images than the configured subset size)."""
    generator = _as_generator(rng)
    if pool_size < 1:
        raise ValueError("D^S: the unlabelled pool is empty")
    count = _resolve(size_or_fraction, pool_size, "subset size")
    if count >= pool_size:
        return np.arange(pool_size, dtype=np.int64)
    return np.sort(generator.choice(pool_size, size=count, replace=False))


def draw_subset(
    unlabelled_ids: IdsLike, size_or_fraction: Budget, rng: np.random.Generator | int
) -> pa.StringArray:
    """The random subset D^S of the unlabelled pool, sorted by id (see ``subset_positions``)."""
    ids = as_ids(unlabelled_ids, "unlabelled_ids", sort=True)
    return ids.take(pa.array(subset_positions(len(ids), size_or_fraction, rng)))


def random_positions(count: int, n: int, rng: np.random.Generator | int) -> np.ndarray:
    """n of ``count`` positions drawn uniformly without replacement, sorted."""
    generator = _as_generator(rng)
    n = _check_n(n, count)
    return np.sort(generator.choice(count, size=n, replace=False)).astype(np.int64)


def _check_n(n: int, available: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if n > available:
        raise ValueError(f"n = {n} is larger than the {available} candidates")
    return int(n)


def _top_n_order(ids: pa.StringArray, scores, n: int) -> pa.Array:
    """Positions of the n highest ``scores``, highest first, equal scores by id ascending."""
    if isinstance(scores, (pa.Array, pa.ChunkedArray)):
        if scores.null_count:
            raise ValueError(f"scores: {scores.null_count} missing scores")
        scores = scores.to_numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(ids),):
        raise ValueError(
            f"scores: expected {len(ids)} scores (one per id), got shape {scores.shape}"
        )
    nan = np.isnan(scores)
    if nan.any():
        raise ValueError(
            f"scores: NaN for {int(nan.sum())} ids, e.g. {ids.filter(pa.array(nan))[:5].to_pylist()}"
        )
    n = _check_n(n, len(ids))
    if n == 0:
        return pa.array([], pa.int64())
    table = pa.table({"id": ids, "score": scores})
    return pc.select_k_unstable(
        table, k=n, sort_keys=[("score", "descending"), ("id", "ascending")]
    )


def top_n_of_batches(batches: Iterable[tuple[IdsLike, Any]], n: int) -> pa.StringArray:
    """``top_n`` of (ids, scores) batches streamed in, holding only the best n so far: the same result
    as ranking everything at once. Fewer than n ids in all give them all, ranked."""
    best_ids, best_scores = pa.array([], pa.string()), np.empty(0)
    for ids, scores in batches:
        ids = as_ids(pa.concat_arrays([best_ids, as_ids(ids)]))  # an id seen twice is an error
        scores = np.concatenate([best_scores, np.asarray(scores, dtype=np.float64)])
        order = _top_n_order(ids, scores, min(n, len(ids)))
        best_ids, best_scores = ids.take(order), scores[order.to_numpy()]
    return best_ids


def spend_on_regions(batches: Iterable[pa.Table], budget: int, costs) -> pa.Table:
    """The best regions of ``batches`` (tables with ``sample_id``, ``region`` and ``score``) until
    ``budget`` is spent, best first (equal scores by id, then region); ``costs(table)``: what each row
    of a table spends. The last region may overspend by less than its own cost. Streamed: only the
    regions that could still be taken are held."""
    if budget < 1:
        raise ValueError(f"budget: expected >= 1, got {budget}")
    kept: pa.Table | None = None
    for table in batches:
        if table.num_rows == 0:
            continue
        if table["score"].null_count or pc.any(pc.is_nan(table["score"])).as_py():
            raise ValueError("scores: a region without a score (null or NaN)")
        merged = table if kept is None else pa.concat_tables([kept, table.cast(kept.schema)])
        merged = merged.take(
            pc.sort_indices(
                merged,
                sort_keys=[
                    ("score", "descending"),
                    ("sample_id", "ascending"),
                    ("region", "ascending"),
                ],
            )
        )
        spent = np.cumsum(np.asarray(costs(merged), dtype=np.int64))
        kept = merged.slice(0, int(np.searchsorted(spent, budget)) + 1)
    return kept


def _as_features(features, name: str) -> np.ndarray:
    array = np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (samples, dims), got shape {array.shape}")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return array


def _squared_distances(
    points: np.ndarray, point_norms: np.ndarray, centres: np.ndarray
) -> np.ndarray:
    """(len(points), len(centres)) squared Euclidean distances, clamped at 0 against round-off."""
    d = (
        point_norms[:, None]
        - 2.0 * (points @ centres.T)
        + np.einsum("ij,ij->i", centres, centres)[None, :]
    )
    return np.maximum(d, 0.0)


def k_center_greedy(
    features_unlabelled, features_labelled, n: int, *, chunk_bytes: int = 256 << 20
) -> np.ndarray:
    """Core-set selection (Sener & Savarese, 2018): n row indices of ``features_unlabelled``, in the
    order picked, each the point farthest from the centres chosen so far (the labelled points plus
    earlier picks).

    With no labelled features (None or zero rows) the first centre is the unlabelled point nearest the
    mean of the unlabelled features, a deterministic, central start. Ties go to the lowest index, so
    pass features in id order for ties broken by id. Distances use ``|x|^2 - 2 x.c + |c|^2`` in the
    features' float precision; ``chunk_bytes`` bounds the distance block against the labelled pool.
    """
    points = _as_features(features_unlabelled, "features_unlabelled")
    n = _check_n(n, len(points))
    norms = np.einsum("ij,ij->i", points, points)
    chosen: list[int] = []
    labelled = (
        None if features_labelled is None else _as_features(features_labelled, "features_labelled")
    )
    if labelled is not None and len(labelled):
        if labelled.shape[1] != points.shape[1]:
            raise ValueError(
                f"features_labelled has {labelled.shape[1]} dims but features_unlabelled has {points.shape[1]}"
            )
        labelled = labelled.astype(points.dtype, copy=False)
        nearest = np.full(len(points), np.inf, dtype=points.dtype)
        step = max(1, chunk_bytes // (8 * max(1, len(points))))
        for start in range(0, len(labelled), step):
            block = _squared_distances(points, norms, labelled[start : start + step])
            np.minimum(nearest, block.min(axis=1), out=nearest)
    elif n:
        centre = points.mean(axis=0, keepdims=True)
        first = int(np.argmin(_squared_distances(points, norms, centre)[:, 0]))
        chosen.append(first)
        nearest = _squared_distances(points, norms, points[first : first + 1])[:, 0]
        nearest[first] = -1.0
    else:
        return np.empty(0, dtype=np.int64)
    while len(chosen) < n:
        pick = int(np.argmax(nearest))  # first maximum: lowest index among ties
        chosen.append(pick)
        np.minimum(
            nearest, _squared_distances(points, norms, points[pick : pick + 1])[:, 0], out=nearest
        )
        nearest[pick] = -1.0  # never pick a centre twice, even among duplicate points
    return np.asarray(chosen, dtype=np.int64)
