"""The active-learning pool state: one Parquet file, the audit trail and what a resumed run starts from.

One row per sample, sorted by ``sample_id``, with its role (labelled / unlabelled / validation /
quarantined) and annotation history. The set of ids never changes after creation: its size and a
SHA-256 fingerprint are stored in the schema metadata, and the invariants are checked whenever the file
is read in full (``load``) or written.

The file is never held in memory whole: a ``PoolState`` is a handle on it (its path, the counts per role
and the total annotation cost), and every query and transition streams it in batches of
``parquet_io.ROWS_PER_BATCH`` rows, so the memory of the process holding it (the coordinator) does not
grow with the pool. Transitions (``accept``, ``return_to_pool``, ``quarantine``) rewrite the file; one
writer at a time.

Every write goes to ``state.parquet`` with a ``state.parquet.sha256`` sidecar (the whole file's SHA-256,
``sha256sum -c`` format), and the previous good state is rotated to ``state.prev.parquet`` (+ its
sidecar). Each file is written to a temporary file in the same folder, fsynced and renamed into place,
and the steps are ordered so that after a crash at any point at least one of the two files verifies and
holds the latest completed write; a truncated or corrupted file fails verification and is never rotated
over the previous good one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.parquet_io import read_batches, write_tables
from orchestrator.strategies import Budget, IdsLike, as_ids, budget_count, draw_subset
from segxal.files import tmp_name, write_atomically, write_synced

LABELLED, UNLABELLED, VALIDATION, QUARANTINED = (
    "labelled",
    "unlabelled",
    "validation",
    "quarantined",
)
ROLES = (LABELLED, UNLABELLED, VALIDATION, QUARANTINED)
NEVER = -1  # cycle_labelled / last_cycle of a sample never labelled / never sent to an oracle
INITIAL_CYCLE = (
    0  # cycle_labelled of the initial labelled pool; active-learning cycles count from 1
)

POOL_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("label_path", pa.string()),  # ground truth from the manifest, if any
        pa.field("depth_path", pa.string()),
        pa.field("role", pa.string(), nullable=False),
        pa.field("cycle_labelled", pa.int32(), nullable=False),
        pa.field("last_cycle", pa.int32(), nullable=False),  # last cycle it went to an oracle
        pa.field("oracle", pa.string()),  # oracle of the last annotation
        pa.field("dice", pa.float64()),  # Dice at the last gate decision
        pa.field("annotation_cost", pa.float64(), nullable=False),  # summed over all annotations
        pa.field("times_returned", pa.int32(), nullable=False),  # times the gate sent it back
        pa.field("quarantine_reason", pa.string()),
        pa.field(
            "label_source", pa.string()
        ),  # the label training uses: ground truth or accepted re-annotation
    ]
)

FORMAT_VERSION = "2"  # 2: the ids fingerprint is computed batch by batch (IdsDigest)
_META_FORMAT = b"segxal.pool_state.format"
_META_COUNT = b"segxal.pool_state.count"
_META_IDS = b"segxal.pool_state.ids_sha256"
_MANIFEST_COLUMNS = ("sample_id", "image_path", "label_path", "depth_path")


class PoolStateError(ValueError):
    """The pool table breaks an invariant, or a transition is not allowed."""


class PoolStateFileError(PoolStateError):
    """A saved pool state is missing, truncated or corrupted; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        message = f"{path}: {reason}"
        previous = previous_path(path)
        if previous != self.path and previous.exists():
            message += f"; a previous state is kept at {previous}: PoolState.load(..., fallback=True) loads it"
        super().__init__(message)


def previous_path(path: str | Path) -> Path:
    """Where ``save`` keeps the previous good state: ``state.parquet`` -> ``state.prev.parquet``."""
    path = Path(path)
    if path.name.endswith(".prev.parquet"):
        return path
    return path.with_name(
        f"{path.stem}.prev{path.suffix}" if path.suffix == ".parquet" else f"{path.name}.prev"
    )


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _column(table: pa.Table, name: str) -> pa.Array:
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


def _examples(ids: pa.Array, mask) -> str:
    mask = mask if isinstance(mask, (pa.Array, pa.ChunkedArray)) else pa.array(mask)
    chosen = pc.filter(ids, mask)
    more = f" and {len(chosen) - 5} more" if len(chosen) > 5 else ""
    return f"{chosen[:5].to_pylist()}{more}"


def _mask(n: int, rows: np.ndarray) -> pa.BooleanArray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pa.array(mask)


def _scatter_strings(column: pa.Array, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """``column`` with ``column[rows[i]] = values[i]``, vectorised."""
    positions = np.full(len(column), len(values), dtype=np.int64)
    positions[rows] = np.arange(len(values))
    spread = pa.concat_arrays([values.cast(pa.string()), pa.nulls(1, pa.string())]).take(
        pa.array(positions)
    )
    return pc.if_else(_mask(len(column), rows), spread, column)


def _set_numbers(column: pa.Array, rows: np.ndarray, values, *, add: bool = False) -> pa.Array:
    array = column.to_numpy(zero_copy_only=False).copy()  # nulls become NaN (float columns only)
    if add:
        array[rows] += values
    else:
        array[rows] = values
    return pa.array(array, type=column.type, from_pandas=True)


def _per_row(values, count: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        array = np.full(count, float(array))
    if array.shape != (count,):
        raise PoolStateError(
            f"{name}: expected {count} values (one per id), got shape {array.shape}"
        )
    return array


def _check_cycle(cycle: int) -> int:
    if isinstance(cycle, bool) or not isinstance(cycle, (int, np.integer)) or cycle < 1:
        raise PoolStateError(
            f"cycle must be an int >= 1 (cycle {INITIAL_CYCLE} is the initial pool), got {cycle!r}"
        )
    return int(cycle)


def _check_text(value: str, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise PoolStateError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_costs(cost, count: int) -> np.ndarray:
    costs = _per_row(cost, count, "cost")
    if not (np.isfinite(costs) & (costs >= 0)).all():
        raise PoolStateError(f"cost must be finite and >= 0, got {costs.tolist()[:5]}")
    return costs


def _check_dice(dice, count: int) -> np.ndarray:
    values = _per_row(dice, count, "dice")
    if ((values < 0) | (values > 1)).any():  # NaN compares False: allowed, stored as null
        raise PoolStateError(f"dice must be in [0, 1] or NaN, got {values.tolist()[:5]}")
    return values


def _manifest_part(manifest: pa.Table, name: str) -> pa.Table:
    missing = [c for c in _MANIFEST_COLUMNS if c not in manifest.column_names]
    if missing:
        raise PoolStateError(
            f"{name}: missing columns {missing} (expected segxal.data.manifest.MANIFEST_SCHEMA)"
        )
    return manifest.select(list(_MANIFEST_COLUMNS)).cast(
        pa.schema([POOL_SCHEMA.field(c).with_nullable(True) for c in _MANIFEST_COLUMNS])
    )


@dataclass(frozen=True)
class _Summary:
    """What a handle keeps of its file: enough for the cycle's bookkeeping without reading it."""

    counts: dict[str, int]
    annotation_cost: float


class _Checker:
    """Checks a pool table batch by batch against the module's invariants and sums the summary."""

    def __init__(self, schema: pa.Schema) -> None:
        _check_schema(schema)
        self.expected_count, self.expected_ids = _created_with(schema.metadata or {})
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
        ids = _column(table, "sample_id")
        _check_sorted_unique(ids, self.last_id)
        role = _column(table, "role")
        bad_role = pc.invert(pc.is_in(role, value_set=pa.array(ROLES)))
        if pc.any(bad_role).as_py():
            raise PoolStateError(
                f"column 'role': values {sorted(set(pc.filter(role, bad_role).to_pylist()))} are not in {list(ROLES)}"
                f" (sample ids {_examples(ids, bad_role)})"
            )
        for message, broken in _broken_rows(table):
            if pc.any(broken).as_py():
                raise PoolStateError(f"{message}; broken for sample ids {_examples(ids, broken)}")
        self.digest.update(ids)
        for found in pc.value_counts(role).to_pylist():
            self.counts[found["values"]] += found["counts"]
        self.cost += float(pc.sum(_column(table, "annotation_cost")).as_py() or 0.0)
        if len(ids):
            self.last_id = ids[-1].as_py()
        return table

    def finish(self) -> _Summary:
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
        return _Summary(dict(self.counts), self.cost)


def _broken_rows(table: pa.Table) -> list[tuple[str, pa.Array]]:
    """(what is wrong, which rows) for each row-level invariant."""
    role = _column(table, "role")
    is_ = {r: pc.equal(role, r) for r in ROLES}
    cycle, cost = _column(table, "cycle_labelled"), _column(table, "annotation_cost")
    return [
        ("labelled samples need cycle_labelled >= 0", pc.and_(is_[LABELLED], pc.less(cycle, 0))),
        (
            "labelled samples need a label_source",
            pc.and_(is_[LABELLED], pc.is_null(_column(table, "label_source"))),
        ),
        (
            "unlabelled and validation samples need cycle_labelled = -1 and no label_source",
            pc.and_(
                pc.or_(is_[UNLABELLED], is_[VALIDATION]),
                pc.or_(pc.not_equal(cycle, NEVER), pc.is_valid(_column(table, "label_source"))),
            ),
        ),
        (
            "quarantine_reason must be set exactly for quarantined samples",
            pc.xor(is_[QUARANTINED], pc.is_valid(_column(table, "quarantine_reason"))),
        ),
        ("times_returned must be >= 0", pc.less(_column(table, "times_returned"), 0)),
        (
            "annotation_cost must be finite and >= 0",
            pc.invert(pc.and_(pc.is_finite(cost), pc.greater_equal(cost, 0))),
        ),
        (
            "dice must be in [0, 1] or null",
            pc.fill_null(
                pc.or_(pc.less(_column(table, "dice"), 0), pc.greater(_column(table, "dice"), 1)),
                False,
            ),
        ),
    ]


class PoolState:
    """A handle on a verified pool-state file; build with ``create`` or ``load``. Queries and
    transitions stream the file; ``table`` reads it whole (for inspection and tests)."""

    def __init__(self, path: Path, summary: _Summary, schema: pa.Schema) -> None:
        self.path, self._summary, self._schema = Path(path), summary, schema

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        manifest: pa.Table,
        initial_labelled: Budget,
        seed: int,
        *,
        validation: pa.Table | None = None,
        validation_split: str | None = None,
    ) -> PoolState:
        """A new pool written to ``path``: validation rows come from the ``validation`` manifest and/or the
        rows of ``manifest`` whose ``split`` is ``validation_split``; the rest is the training pool, of
        which ``initial_labelled`` (a count or a fraction, rounded half up) is drawn with ``seed`` from
        the sorted ids. Initial labelled and validation samples need a ``label_path``."""
        train = _manifest_part(manifest, "manifest")
        val_parts = []
        if validation_split is not None:
            if "split" not in manifest.column_names:
                raise PoolStateError("manifest: no 'split' column to take validation_split from")
            is_val = pc.fill_null(pc.equal(manifest.column("split"), validation_split), False)
            val_parts.append(train.filter(is_val))
            train = train.filter(pc.invert(is_val))
        if validation is not None:
            val_parts.append(_manifest_part(validation, "validation manifest"))
        if train.num_rows == 0:
            raise PoolStateError("manifest: the training pool is empty")
        val = pa.concat_tables(val_parts) if val_parts else train.slice(0, 0)

        table = (
            pa.concat_tables([train, val]).combine_chunks()
            if val.num_rows
            else train.combine_chunks()
        )
        ids = as_ids(
            _column(table, "sample_id"), "manifest sample_id"
        )  # nulls and duplicates are errors
        is_val = np.zeros(table.num_rows, dtype=bool)
        is_val[train.num_rows :] = True

        count = budget_count(initial_labelled, train.num_rows, name="initial_labelled")
        chosen = draw_subset(ids.slice(0, train.num_rows), count, seed)
        is_labelled = pc.is_in(ids, value_set=chosen)

        labels = _column(table, "label_path")
        needs_label = pc.or_(is_labelled, pa.array(is_val))
        missing = pc.and_(needs_label, pc.is_null(labels))
        if pc.any(missing).as_py():
            raise PoolStateError(
                f"initial labelled and validation samples need a label_path; missing for {_examples(ids, missing)}"
            )

        n = table.num_rows
        role = pc.if_else(
            pa.array(is_val), VALIDATION, pc.if_else(is_labelled, LABELLED, UNLABELLED)
        )
        columns = {
            **{c: _column(table, c) for c in _MANIFEST_COLUMNS},
            "role": role,
            "cycle_labelled": pc.if_else(
                is_labelled, pa.scalar(INITIAL_CYCLE, pa.int32()), pa.scalar(NEVER, pa.int32())
            ),
            "last_cycle": pa.array(np.full(n, NEVER, dtype=np.int32)),
            "oracle": pa.nulls(n, pa.string()),
            "dice": pa.nulls(n, pa.float64()),
            "annotation_cost": pa.array(np.zeros(n)),
            "times_returned": pa.array(np.zeros(n, dtype=np.int32)),
            "quarantine_reason": pa.nulls(n, pa.string()),
            "label_source": pc.if_else(is_labelled, labels, pa.scalar(None, pa.string())),
        }
        table = pa.Table.from_arrays([columns[f.name] for f in POOL_SCHEMA], schema=POOL_SCHEMA)
        if not pc.all(
            pc.less(ids.slice(0, n - 1), ids.slice(1))
        ).as_py():  # manifests usually come sorted
            table = table.take(pc.sort_indices(ids))
        schema = POOL_SCHEMA.with_metadata(
            {
                _META_FORMAT: FORMAT_VERSION.encode(),
                _META_COUNT: str(n).encode(),
                _META_IDS: ids_fingerprint(_column(table, "sample_id")).encode(),
                b"segxal.pool_state.seed": str(seed).encode(),
                b"segxal.pool_state.initial_labelled": str(initial_labelled).encode(),
            }
        )
        return cls._write(Path(path), schema, [table])  # the caller holds the manifest whole anyway

    @classmethod
    def _write(cls, path: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> PoolState:
        """Write ``tables`` as the new state at ``path``, checking every batch; nothing is published if a
        check (or anything else) fails."""
        checker = _Checker(schema)

        def write(handle: BinaryIO) -> _Summary:
            write_tables(handle, schema, (checker.check(table) for table in tables))
            return checker.finish()

        return cls(path, _publish(path, write), schema)

    @classmethod
    def load(cls, path: str | Path, *, fallback: bool = False) -> PoolState:
        """Open a saved state after verifying its checksum and invariants. A missing, truncated or
        corrupted file raises PoolStateFileError naming it; with ``fallback=True`` the previous good
        state (``previous_path(path)``) is loaded instead, with a warning."""
        path = Path(path)
        try:
            return cls._load_verified(path)
        except PoolStateFileError as error:
            previous = previous_path(path)
            if not fallback or previous == path:
                raise
            try:
                state = cls._load_verified(previous)
            except PoolStateFileError as previous_error:
                raise PoolStateFileError(
                    path, f"{error.reason}; previous state unusable too: {previous_error}"
                ) from error
            warnings.warn(
                f"{path}: {error.reason}; loaded the previous good state {previous}", stacklevel=2
            )
            return state

    @classmethod
    def _load_verified(cls, path: Path) -> PoolState:
        if not path.is_file():
            raise PoolStateFileError(path, "pool state file not found")
        expected = _read_checksum(path)
        actual = _sha256_file(path)
        if actual != expected:
            raise PoolStateFileError(
                path,
                f"checksum mismatch (sha256 {actual}, expected {expected}): the file is truncated or corrupted",
            )
        try:
            schema = pq.read_schema(path)
            checker = _Checker(schema)
            for table in read_batches(path):
                checker.check(table)
            summary = checker.finish()
        except (pa.ArrowException, OSError) as error:
            raise PoolStateFileError(path, f"cannot read Parquet ({error})") from error
        except PoolStateError as error:
            raise PoolStateFileError(path, f"invalid pool state ({error})") from error
        return cls(path, summary, schema)

    def copy_to(self, path: str | Path) -> PoolState:
        """This state, byte for byte, at ``path`` (a snapshot, or a run's live state taken from one),
        written like every other state; returns the handle on the copy."""
        path = Path(path)
        if path.absolute() == self.path.absolute():
            return self
        expected = _read_checksum(self.path)

        def write(handle: BinaryIO) -> _Summary:
            with open(self.path, "rb") as source:
                shutil.copyfileobj(source, handle, 1 << 20)
            return self._summary

        return PoolState(path, _publish(path, write, expected_digest=expected), self._schema)

    # ---- queries ------------------------------------------------------------------------------

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The rows in ``sample_id`` order, a bounded batch at a time."""
        return read_batches(self.path, columns)

    @property
    def table(self) -> pa.Table:
        """The whole table in memory, with its metadata: for inspection and tests, not for large pools."""
        return pq.read_table(self.path)

    def __len__(self) -> int:
        return sum(self._summary.counts.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolState) and self.table.equals(other.table, check_metadata=True)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PoolState({self.path}, {', '.join(f'{k}={v}' for k, v in self.counts().items())})"

    def ids(self, role: str) -> pa.StringArray:
        """Sample ids with ``role``, sorted (materialised: one string per sample of that role)."""
        _check_role(role)
        parts = [
            pc.filter(_column(t, "sample_id"), pc.equal(_column(t, "role"), role))
            for t in self.batches(["sample_id", "role"])
        ]
        return pa.concat_arrays(parts) if parts else pa.array([], pa.string())

    def count(self, role: str) -> int:
        _check_role(role)
        return self._summary.counts[role]

    def counts(self) -> dict[str, int]:
        return dict(self._summary.counts)

    @property
    def training_pool_size(self) -> int:
        """Labelled + unlabelled: the set budgets and labelled fractions refer to."""
        return self.count(LABELLED) + self.count(UNLABELLED)

    @property
    def labelled_fraction(self) -> float:
        size = self.training_pool_size
        return self.count(LABELLED) / size if size else 0.0

    @property
    def total_annotation_cost(self) -> float:
        return self._summary.annotation_cost

    def record(self, sample_id: str) -> dict[str, Any]:
        """One row as a dict (for inspection and tests); reads only the row group that holds it."""
        rows = pq.read_table(self.path, filters=[("sample_id", "=", sample_id)])
        if rows.num_rows == 0:
            raise KeyError(f"unknown sample id {sample_id!r}")
        return rows.to_pylist()[0]

    def check_invariants(self) -> None:
        """Verify the file again (checksum and every invariant); raises PoolStateFileError if broken."""
        PoolState._load_verified(self.path)

    # ---- transitions --------------------------------------------------------------------------

    def _ids(self, ids: IdsLike, action: str) -> pa.StringArray:
        try:
            return as_ids(ids)
        except ValueError as error:
            raise PoolStateError(f"{action}: {error}") from None

    def _transition(
        self,
        action: str,
        ids: pa.StringArray,
        allowed: tuple[str, ...],
        change: Callable[[pa.Table, np.ndarray, np.ndarray], Mapping[str, pa.Array]],
    ) -> None:
        """Rewrite the file with ``change(batch, rows, at)`` applied to each batch holding some of ``ids``
        (``rows``: their rows in the batch, ``at``: their positions in ``ids``). Unknown ids or ids in a
        role other than ``allowed`` are errors, and then the file is left as it was."""
        found = np.zeros(len(ids), dtype=bool)

        def updated() -> Iterator[pa.Table]:
            for table in self.batches():
                where = pc.index_in(_column(table, "sample_id"), value_set=ids)
                hit = pc.is_valid(where)
                if not pc.any(hit).as_py():
                    yield table
                    continue
                rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
                at = pc.filter(where, hit).to_numpy().astype(np.int64)
                roles = _column(table, "role").take(pa.array(rows))
                wrong = pc.invert(pc.is_in(roles, value_set=pa.array(allowed)))
                if pc.any(wrong).as_py():
                    found_roles = sorted(set(pc.filter(roles, wrong).to_pylist()))
                    raise PoolStateError(
                        f"{action}: sample ids {_examples(ids.take(pa.array(at)), wrong)} have role"
                        f" {found_roles}, expected one of {list(allowed)}"
                    )
                found[at] = True
                updates = change(table, rows, at)
                yield pa.Table.from_arrays(
                    [updates.get(f.name, _column(table, f.name)) for f in POOL_SCHEMA],
                    schema=table.schema,
                )
            if not found.all():
                raise PoolStateError(
                    f"{action}: unknown sample ids {_examples(ids, pa.array(~found))}"
                )

        self._summary = PoolState._write(self.path, self._schema, updated())._summary

    def accept(self, ids: IdsLike, cycle: int, oracle: str, dice, cost, label_paths) -> None:
        """Unlabelled ``ids`` join the labelled pool in ``cycle`` with the re-annotations at
        ``label_paths`` as labels. ``dice`` and ``cost``: one value per id, or one for all."""
        ids = self._ids(ids, "accept")
        if len(ids) == 0:
            return
        cycle, oracle = _check_cycle(cycle), _check_text(oracle, "oracle")
        dice, costs = _check_dice(dice, len(ids)), _check_costs(cost, len(ids))
        if isinstance(label_paths, (pa.Array, pa.ChunkedArray)):
            paths = pc.cast(label_paths, pa.string())
            paths = paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths
        else:
            paths = pa.array(list(label_paths), type=pa.string())
        if len(paths) != len(ids) or paths.null_count or pc.any(pc.equal(paths, "")).as_py():
            raise PoolStateError(
                f"label_paths: expected {len(ids)} non-empty paths (one per id), got {paths.to_pylist()[:5]}"
            )

        def change(t: pa.Table, rows: np.ndarray, at: np.ndarray) -> dict[str, pa.Array]:
            mask = _mask(t.num_rows, rows)
            return {
                "role": pc.if_else(mask, LABELLED, _column(t, "role")),
                "cycle_labelled": _set_numbers(_column(t, "cycle_labelled"), rows, cycle),
                "last_cycle": _set_numbers(_column(t, "last_cycle"), rows, cycle),
                "oracle": pc.if_else(mask, oracle, _column(t, "oracle")),
                "dice": _set_numbers(_column(t, "dice"), rows, dice[at]),
                "annotation_cost": _set_numbers(
                    _column(t, "annotation_cost"), rows, costs[at], add=True
                ),
                "label_source": _scatter_strings(
                    _column(t, "label_source"), rows, paths.take(pa.array(at))
                ),
            }

        self._transition("accept", ids, (UNLABELLED,), change)

    def return_to_pool(self, ids: IdsLike, cycle: int, oracle: str, dice, cost=0.0) -> None:
        """The gate sent unlabelled ``ids`` back: they stay unlabelled, their Dice, oracle, cycle and
        cost are recorded and ``times_returned`` goes up by one."""
        ids = self._ids(ids, "return_to_pool")
        if len(ids) == 0:
            return
        cycle, oracle = _check_cycle(cycle), _check_text(oracle, "oracle")
        dice, costs = _check_dice(dice, len(ids)), _check_costs(cost, len(ids))

        def change(t: pa.Table, rows: np.ndarray, at: np.ndarray) -> dict[str, pa.Array]:
            return {
                "last_cycle": _set_numbers(_column(t, "last_cycle"), rows, cycle),
                "oracle": pc.if_else(_mask(t.num_rows, rows), oracle, _column(t, "oracle")),
                "dice": _set_numbers(_column(t, "dice"), rows, dice[at]),
                "annotation_cost": _set_numbers(
                    _column(t, "annotation_cost"), rows, costs[at], add=True
                ),
                "times_returned": _set_numbers(_column(t, "times_returned"), rows, 1, add=True),
            }

        self._transition("return_to_pool", ids, (UNLABELLED,), change)

    def quarantine(self, ids: IdsLike | str, reasons: str | Sequence[str]) -> None:
        """Take ``ids`` (one id or several) out of every pool, e.g. unreadable images, with one reason for
        all or one per id; the rows and their history stay for the audit trail."""
        ids = self._ids([ids] if isinstance(ids, str) else ids, "quarantine")
        if len(ids) == 0:
            return
        reasons = [reasons] * len(ids) if isinstance(reasons, str) else list(reasons)
        if len(reasons) != len(ids):
            raise PoolStateError(
                f"reasons: expected {len(ids)} (one per id) or one for all, got {len(reasons)}"
            )
        reasons = pa.array([_check_text(reason, "reason") for reason in reasons], pa.string())

        def change(t: pa.Table, rows: np.ndarray, at: np.ndarray) -> dict[str, pa.Array]:
            return {
                "role": pc.if_else(_mask(t.num_rows, rows), QUARANTINED, _column(t, "role")),
                "quarantine_reason": _scatter_strings(
                    _column(t, "quarantine_reason"), rows, reasons.take(pa.array(at))
                ),
            }

        self._transition("quarantine", ids, (LABELLED, UNLABELLED, VALIDATION), change)


def _check_role(role: str) -> None:
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
            f"column 'sample_id': duplicate sample ids {_examples(later, duplicate)}"
        )
    raise PoolStateError(
        f"column 'sample_id': not sorted, first out of order at {_examples(later, pc.invert(ascending))}"
    )


def _created_with(metadata: Mapping[bytes, bytes]) -> tuple[int, str]:
    """The sample count and ids fingerprint the pool was created with."""
    if metadata.get(_META_FORMAT) != FORMAT_VERSION.encode():
        raise PoolStateError(
            f"pool table metadata {_META_FORMAT.decode()} is {metadata.get(_META_FORMAT)!r}, expected {FORMAT_VERSION!r}"
            " (build pool states with PoolState.create)"
        )
    try:
        return int(metadata[_META_COUNT]), metadata[_META_IDS].decode()
    except (KeyError, ValueError) as error:
        raise PoolStateError(f"pool table metadata lacks a valid {error}") from None


def _publish(
    path: Path, write: Callable[[BinaryIO], Any], expected_digest: str | None = None
) -> Any:
    """Write a new version of ``path`` through ``write(handle)`` in the crash-safe order of the module doc;
    returns what ``write`` returns. With ``expected_digest``, the written file must have that SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        result = write_synced(tmp, write)
        digest = _sha256_file(tmp)
        if expected_digest is not None and digest != expected_digest:
            raise PoolStateFileError(
                path, f"copy has sha256 {digest}, expected {expected_digest}: the source changed"
            )
        current = _verified_digest(path)
        if current is not None:
            # Order matters: each window between these steps leaves one file that verifies.
            _write_checksum(previous_path(path), current)
            os.replace(path, previous_path(path))
            _fsync_dir(path.parent)
        elif path.exists():
            warnings.warn(
                f"{path}: failed verification; overwriting it and keeping {previous_path(path)}",
                stacklevel=2,
            )
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _write_checksum(path, digest)
    finally:
        tmp.unlink(missing_ok=True)
    return result


# ---- files ------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_checksum(path: Path, digest: str) -> None:
    """Atomically write ``path``'s sidecar in ``sha256sum`` format."""
    target = checksum_path(path)
    write_atomically(
        target, lambda handle: handle.write(f"{digest}  {path.name}\n".encode("ascii"))
    )
    _fsync_dir(target.parent)


def _read_checksum(path: Path) -> str:
    sidecar = checksum_path(path)
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError:
        raise PoolStateFileError(
            path, f"checksum file {sidecar.name} not found, cannot verify the state"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PoolStateFileError(
            path, f"cannot read checksum file {sidecar.name} ({error})"
        ) from None
    digest = text.split(maxsplit=1)[0] if text.strip() else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise PoolStateFileError(path, f"checksum file {sidecar.name} is malformed")
    return digest


def _verified_digest(path: Path) -> str | None:
    """``path``'s digest if the file and its sidecar exist and agree, else None."""
    if not path.is_file():
        return None
    try:
        expected = _read_checksum(path)
    except PoolStateFileError:
        return None
    return expected if _sha256_file(path) == expected else None
