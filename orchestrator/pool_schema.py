"""The pool state's invariants, checked batch by batch whenever a pool file is read in full or written.

The set of ids never changes after creation: its size and a SHA-256 fingerprint are stored in the schema
metadata (``created_metadata``). Rows are sorted by ``sample_id``, ids unique and non-empty, every role
known, and each row consistent with its role (see ``_broken_rows``). The schema itself is
``orchestrator.records.POOL_SCHEMA``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.records import (
    LABELLED,
    NEVER,
    POOL_SCHEMA,
    QUARANTINED,
    ROLES,
    UNLABELLED,
    VALIDATION,
)

# 2: the ids fingerprint is computed batch by batch (IdsDigest); 3: mask_path and labelled_pixels
FORMAT_VERSION = "3"
META_FORMAT = b"segxal.pool_state.format"
META_COUNT = b"segxal.pool_state.count"
META_IDS = b"segxal.pool_state.ids_sha256"


class PoolStateError(ValueError):
    """The pool table breaks an invariant, or a transition is not allowed."""


def column(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class IdsDigest:
    """SHA-256 fingerprint of a sequence of ids fed in batches; the same however the sequence is cut."""

    def __init__(self) -> None:
        self.count = 0
        self._lengths = hashlib.sha256()
        self._bytes = hashlib.sha256()

    def update(self, ids: pa.Array) -> None:
        ids = ids.cast(pa.large_string())
        offsets_buffer, data_buffer = ids.buffers()[1], ids.buffers()[2]
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
            ids.offset : ids.offset + len(ids) + 1
        ]
        self._lengths.update(np.diff(offsets).tobytes())
        if data_buffer is not None and len(ids):
            self._bytes.update(memoryview(data_buffer)[int(offsets[0]) : int(offsets[-1])])
        self.count += len(ids)

    def hexdigest(self) -> str:
        return hashlib.sha256(
            f"{self.count}:{self._lengths.hexdigest()}:{self._bytes.hexdigest()}".encode()
        ).hexdigest()


def ids_fingerprint(ids: pa.Array) -> str:
    digest = IdsDigest()
    digest.update(ids)
    return digest.hexdigest()


def examples(ids: pa.Array, mask) -> str:
    mask = mask if isinstance(mask, (pa.Array, pa.ChunkedArray)) else pa.array(mask)
    chosen = pc.filter(ids, mask)
    more = f" and {len(chosen) - 5} more" if len(chosen) > 5 else ""
    return f"{chosen[:5].to_pylist()}{more}"


@dataclass(frozen=True)
class PoolSummary:
    """What a handle keeps of its file: enough for the cycle's bookkeeping without reading it."""

    counts: dict[str, int]
    annotation_cost: float


class PoolChecker:
    """Checks a pool table batch by batch against the module's invariants and sums the summary."""

    def __init__(self, schema: pa.Schema) -> None:
        _check_schema(schema)
        self.expected_count, self.expected_ids = created_with(schema.metadata or {})
        self.digest = IdsDigest()
        self.last_id: str | None = None
        self.counts = dict.fromkeys(ROLES, 0)
        self.cost = 0.0

    def check(self, table: pa.Table) -> pa.Table:
        _check_schema(table.schema)
        for field in POOL_SCHEMA:
            if not field.nullable and table.column(field.name).null_count:
                raise PoolStateError(
                    f"column {field.name!r}: {table.column(field.name).null_count} nulls"
                )
        ids = column(table, "sample_id")
        _check_sorted_unique(ids, self.last_id)
        role = column(table, "role")
        bad_role = pc.invert(pc.is_in(role, value_set=pa.array(ROLES)))
        if pc.any(bad_role).as_py():
            raise PoolStateError(
                f"column 'role': values {sorted(set(pc.filter(role, bad_role).to_pylist()))} are not in {list(ROLES)}"
                f" (sample ids {examples(ids, bad_role)})"
            )
        for message, broken in _broken_rows(table):
            if pc.any(broken).as_py():
                raise PoolStateError(f"{message}; broken for sample ids {examples(ids, broken)}")
        self.digest.update(ids)
        for found in pc.value_counts(role).to_pylist():
            self.counts[found["values"]] += found["counts"]
        self.cost += float(pc.sum(column(table, "annotation_cost")).as_py() or 0.0)
        if len(ids):
            self.last_id = ids[-1].as_py()
        return table

    def finish(self) -> PoolSummary:
        if self.digest.count == 0:
            raise PoolStateError("the pool is empty")
        if self.digest.count != self.expected_count:
            raise PoolStateError(
                f"the pool has {self.digest.count} samples but was created with {self.expected_count}: samples were added or lost"
            )
        if self.digest.hexdigest() != self.expected_ids:
            raise PoolStateError(
                f"the pool's sample ids differ from those it was created with ({self.expected_count} samples)"
            )
        return PoolSummary(dict(self.counts), self.cost)


def _broken_rows(table: pa.Table) -> list[tuple[str, pa.Array]]:
    """(what is wrong, which rows) for each row-level invariant."""
    role = column(table, "role")
    is_ = {r: pc.equal(role, r) for r in ROLES}
    cycle, cost = column(table, "cycle_labelled"), column(table, "annotation_cost")
    return [
        ("labelled samples need cycle_labelled >= 0", pc.and_(is_[LABELLED], pc.less(cycle, 0))),
        (
            "labelled samples need a label_source",
            pc.and_(is_[LABELLED], pc.is_null(column(table, "label_source"))),
        ),
        (
            "unlabelled and validation samples need cycle_labelled = -1 and no label_source",
            pc.and_(
                pc.or_(is_[UNLABELLED], is_[VALIDATION]),
                pc.or_(pc.not_equal(cycle, NEVER), pc.is_valid(column(table, "label_source"))),
            ),
        ),
        (
            "quarantine_reason must be set exactly for quarantined samples",
            pc.xor(is_[QUARANTINED], pc.is_valid(column(table, "quarantine_reason"))),
        ),
        ("times_returned must be >= 0", pc.less(column(table, "times_returned"), 0)),
        (
            "only labelled samples have a mask_path",
            pc.and_(pc.invert(is_[LABELLED]), pc.is_valid(column(table, "mask_path"))),
        ),
        ("labelled_pixels must be >= 0", pc.less(column(table, "labelled_pixels"), 0)),
        (
            "annotation_cost must be finite and >= 0",
            pc.invert(pc.and_(pc.is_finite(cost), pc.greater_equal(cost, 0))),
        ),
        (
            "dice must be in [0, 1] or null",
            pc.fill_null(
                pc.or_(pc.less(column(table, "dice"), 0), pc.greater(column(table, "dice"), 1)),
                False,
            ),
        ),
    ]


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")


def _check_schema(schema: pa.Schema) -> None:
    names = schema.names
    missing = [f.name for f in POOL_SCHEMA if f.name not in names]
    if missing:
        raise PoolStateError(f"pool table is missing columns {missing}")
    if names != POOL_SCHEMA.names:
        raise PoolStateError(f"pool table columns {names} differ from {POOL_SCHEMA.names}")
    for field in POOL_SCHEMA:
        if schema.field(field.name).type != field.type:
            raise PoolStateError(
                f"column {field.name!r} has type {schema.field(field.name).type}, expected {field.type}"
            )


def _check_sorted_unique(ids: pa.Array, previous: str | None) -> None:
    """``ids`` strictly ascending, and after ``previous`` (the last id of the batch before)."""
    if pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py():
        raise PoolStateError("column 'sample_id': empty sample ids")
    if previous is not None and len(ids):
        ids = pa.concat_arrays([pa.array([previous], pa.string()), ids])
    if len(ids) < 2:
        return
    ascending = pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))
    if pc.all(ascending).as_py():
        return
    later = ids.slice(1)
    duplicate = pc.and_(pc.invert(ascending), pc.equal(ids.slice(0, len(ids) - 1), later))
    if pc.any(duplicate).as_py():
        raise PoolStateError(
            f"column 'sample_id': duplicate sample ids {examples(later, duplicate)}"
        )
    raise PoolStateError(
        f"column 'sample_id': not sorted, first out of order at {examples(later, pc.invert(ascending))}"
    )


def created_with(metadata: Mapping[bytes, bytes]) -> tuple[int, str]:
    """The sample count and ids fingerprint the pool was created with."""
    if metadata.get(META_FORMAT) != FORMAT_VERSION.encode():
        raise PoolStateError(
            f"pool table metadata {META_FORMAT.decode()} is {metadata.get(META_FORMAT)!r}, expected {FORMAT_VERSION!r}"
            " (build pool states with PoolState.create)"
        )
    try:
        return int(metadata[META_COUNT]), metadata[META_IDS].decode()
    except (KeyError, ValueError) as error:
        raise PoolStateError(f"pool table metadata lacks a valid {error}") from None
