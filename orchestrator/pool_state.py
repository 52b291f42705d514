"""The active-learning pool state: one Arrow table, the audit trail and what a resumed run starts from.

One row per sample, sorted by ``sample_id``, with its role (labelled / unlabelled / validation /
quarantined) and annotation history. The set of ids never changes after creation: its size and a
SHA-256 fingerprint are stored in the schema metadata, and every ``PoolState`` checks its invariants
when built. Transitions (``accept``, ``return_to_pool``, ``quarantine``) return a new ``PoolState``.

Persistence (``save`` / ``load``): ``state.parquet`` with a ``state.parquet.sha256`` sidecar (the
whole file's SHA-256, ``sha256sum -c`` format), and the previous good state rotated to
``state.prev.parquet`` (+ its sidecar). Every file is written to a temporary file in the same folder,
fsynced and renamed into place, and the steps are ordered so that after a crash at any point at least
one of the two files verifies and holds the latest completed save; a truncated or corrupted file fails
verification and is never rotated over the previous good one.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.strategies import Budget, IdsLike, as_ids, budget_count, draw_subset

LABELLED, UNLABELLED, VALIDATION, QUARANTINED = "labelled", "unlabelled", "validation", "quarantined"
ROLES = (LABELLED, UNLABELLED, VALIDATION, QUARANTINED)
NEVER = -1  # cycle_labelled / last_cycle of a sample never labelled / never sent to an oracle
INITIAL_CYCLE = 0  # cycle_labelled of the initial labelled pool; active-learning cycles count from 1

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
        pa.field("label_source", pa.string()),  # the label training uses: ground truth or accepted re-annotation
    ]
)

FORMAT_VERSION = "1"
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
    return path.with_name(f"{path.stem}.prev{path.suffix}" if path.suffix == ".parquet" else f"{path.name}.prev")


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _column(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def ids_fingerprint(ids: pa.Array) -> str:
    """SHA-256 of a string array's contents (offsets and bytes), independent of its memory layout."""
    ids = ids.cast(pa.large_string())
    offsets_buffer, data_buffer = ids.buffers()[1], ids.buffers()[2]
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[ids.offset : ids.offset + len(ids) + 1]
    start, end = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
    digest = hashlib.sha256(str(len(ids)).encode())
    digest.update((offsets - start).tobytes())
    if data_buffer is not None:
        digest.update(memoryview(data_buffer)[start:end])
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
    spread = pa.concat_arrays([values.cast(pa.string()), pa.nulls(1, pa.string())]).take(pa.array(positions))
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
        raise PoolStateError(f"{name}: expected {count} values (one per id), got shape {array.shape}")
    return array


def _check_cycle(cycle: int) -> int:
    if isinstance(cycle, bool) or not isinstance(cycle, (int, np.integer)) or cycle < 1:
        raise PoolStateError(f"cycle must be an int >= 1 (cycle {INITIAL_CYCLE} is the initial pool), got {cycle!r}")
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
        raise PoolStateError(f"{name}: missing columns {missing} (expected segxal.data.manifest.MANIFEST_SCHEMA)")
    return manifest.select(list(_MANIFEST_COLUMNS)).cast(
        pa.schema([POOL_SCHEMA.field(c).with_nullable(True) for c in _MANIFEST_COLUMNS])
    )


class PoolState:
    """An immutable view of the pool table; build with ``from_manifest`` or ``load``."""

    __slots__ = ("_table",)

    def __init__(self, table: pa.Table) -> None:
        self._table = table.combine_chunks()
        self.check_invariants()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_manifest(
        cls,
        manifest: pa.Table,
        initial_labelled: Budget,
        seed: int,
        *,
        validation: pa.Table | None = None,
        validation_split: str | None = None,
    ) -> "PoolState":
        """A new pool: validation rows come from the ``validation`` manifest and/or the rows of
        ``manifest`` whose ``split`` is ``validation_split``; the rest is the training pool, of which
        ``initial_labelled`` (a count or a fraction, rounded half up) is drawn with ``seed`` from the
        sorted ids. Initial labelled and validation samples need a ``label_path``."""
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

        table = pa.concat_tables([train, val]).combine_chunks() if val.num_rows else train.combine_chunks()
        ids = as_ids(_column(table, "sample_id"), "manifest sample_id")  # nulls and duplicates are errors
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
        role = pc.if_else(pa.array(is_val), VALIDATION, pc.if_else(is_labelled, LABELLED, UNLABELLED))
        columns = {
            **{c: _column(table, c) for c in _MANIFEST_COLUMNS},
            "role": role,
            "cycle_labelled": pc.if_else(is_labelled, pa.scalar(INITIAL_CYCLE, pa.int32()), pa.scalar(NEVER, pa.int32())),
            "last_cycle": pa.array(np.full(n, NEVER, dtype=np.int32)),
            "oracle": pa.nulls(n, pa.string()),
            "dice": pa.nulls(n, pa.float64()),
            "annotation_cost": pa.array(np.zeros(n)),
            "times_returned": pa.array(np.zeros(n, dtype=np.int32)),
            "quarantine_reason": pa.nulls(n, pa.string()),
            "label_source": pc.if_else(is_labelled, labels, pa.scalar(None, pa.string())),
        }
        table = pa.Table.from_arrays([columns[f.name] for f in POOL_SCHEMA], schema=POOL_SCHEMA)
        if not pc.all(pc.less(ids.slice(0, n - 1), ids.slice(1))).as_py():  # manifests usually come sorted
            table = table.take(pc.sort_indices(ids))
        metadata = {
            _META_FORMAT: FORMAT_VERSION.encode(),
            _META_COUNT: str(n).encode(),
            _META_IDS: ids_fingerprint(_column(table, "sample_id")).encode(),
            b"segxal.pool_state.seed": str(seed).encode(),
            b"segxal.pool_state.initial_labelled": str(initial_labelled).encode(),
        }
        return cls(table.replace_schema_metadata(metadata))

    # ---- queries ------------------------------------------------------------------------------

    @property
    def table(self) -> pa.Table:
        return self._table

    def __len__(self) -> int:
        return self._table.num_rows

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolState) and self._table.equals(other._table, check_metadata=True)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PoolState({', '.join(f'{k}={v}' for k, v in self.counts().items())})"

    def ids(self, role: str) -> pa.StringArray:
        """Sample ids with ``role``, sorted."""
        _check_role(role)
        return pc.filter(_column(self._table, "sample_id"), pc.equal(_column(self._table, "role"), role))

    def count(self, role: str) -> int:
        _check_role(role)
        return int(pc.sum(pc.equal(_column(self._table, "role"), role)).as_py() or 0)

    def counts(self) -> dict[str, int]:
        found = {row["values"]: row["counts"] for row in pc.value_counts(_column(self._table, "role")).to_pylist()}
        return {role: int(found.get(role, 0)) for role in ROLES}

    @property
    def training_pool_size(self) -> int:
        """Labelled + unlabelled: the set budgets and labelled fractions refer to."""
        counts = self.counts()
        return counts[LABELLED] + counts[UNLABELLED]

    @property
    def labelled_fraction(self) -> float:
        size = self.training_pool_size
        return self.count(LABELLED) / size if size else 0.0

    @property
    def total_annotation_cost(self) -> float:
        return float(pc.sum(_column(self._table, "annotation_cost")).as_py() or 0.0)

    def record(self, sample_id: str) -> dict[str, Any]:
        """One row as a dict (for inspection and tests)."""
        rows = self._table.filter(pc.equal(_column(self._table, "sample_id"), sample_id))
        if rows.num_rows == 0:
            raise KeyError(f"unknown sample id {sample_id!r}")
        return rows.to_pylist()[0]

    # ---- transitions --------------------------------------------------------------------------

    def _rows(self, ids: IdsLike, allowed: tuple[str, ...], action: str) -> tuple[np.ndarray, pa.StringArray]:
        """Row indices of ``ids``; unknown ids or ids in a role other than ``allowed`` are errors."""
        try:
            ids = as_ids(ids)
        except ValueError as error:
            raise PoolStateError(f"{action}: {error}") from None
        index = pc.index_in(ids, value_set=_column(self._table, "sample_id"))
        if index.null_count:
            raise PoolStateError(f"{action}: unknown sample ids {_examples(ids, pc.is_null(index))}")
        roles = _column(self._table, "role").take(index)
        wrong = pc.invert(pc.is_in(roles, value_set=pa.array(allowed)))
        if pc.any(wrong).as_py():
            found = sorted(set(pc.filter(roles, wrong).to_pylist()))
            raise PoolStateError(
                f"{action}: sample ids {_examples(ids, wrong)} have role {found}, expected one of {list(allowed)}"
            )
        return index.to_numpy().astype(np.int64), ids

    def _with(self, updates: Mapping[str, pa.Array]) -> "PoolState":
        arrays = [updates.get(f.name, _column(self._table, f.name)) for f in POOL_SCHEMA]
        return PoolState(pa.Table.from_arrays(arrays, schema=self._table.schema))

    def accept(self, ids: IdsLike, cycle: int, oracle: str, dice, cost, label_paths) -> "PoolState":
        """Unlabelled ``ids`` join the labelled pool in ``cycle`` with the re-annotations at
        ``label_paths`` as labels. ``dice`` and ``cost``: one value per id, or one for all."""
        rows, ids = self._rows(ids, (UNLABELLED,), "accept")
        if len(rows) == 0:
            return self
        cycle, oracle = _check_cycle(cycle), _check_text(oracle, "oracle")
        dice, costs = _check_dice(dice, len(rows)), _check_costs(cost, len(rows))
        if isinstance(label_paths, (pa.Array, pa.ChunkedArray)):
            paths = pc.cast(label_paths, pa.string())
            paths = paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths
        else:
            paths = pa.array(list(label_paths), type=pa.string())
        if len(paths) != len(rows) or paths.null_count or pc.any(pc.equal(paths, "")).as_py():
            raise PoolStateError(f"label_paths: expected {len(rows)} non-empty paths (one per id), got {paths.to_pylist()[:5]}")
        t, mask = self._table, _mask(len(self), rows)
        return self._with(
            {
                "role": pc.if_else(mask, LABELLED, _column(t, "role")),
                "cycle_labelled": _set_numbers(_column(t, "cycle_labelled"), rows, cycle),
                "last_cycle": _set_numbers(_column(t, "last_cycle"), rows, cycle),
                "oracle": pc.if_else(mask, oracle, _column(t, "oracle")),
                "dice": _set_numbers(_column(t, "dice"), rows, dice),
                "annotation_cost": _set_numbers(_column(t, "annotation_cost"), rows, costs, add=True),
                "label_source": _scatter_strings(_column(t, "label_source"), rows, paths),
            }
        )

    def return_to_pool(self, ids: IdsLike, cycle: int, oracle: str, dice, cost=0.0) -> "PoolState":
        """The gate sent unlabelled ``ids`` back: they stay unlabelled, their Dice, oracle, cycle and
        cost are recorded and ``times_returned`` goes up by one."""
        rows, ids = self._rows(ids, (UNLABELLED,), "return_to_pool")
        if len(rows) == 0:
            return self
        cycle, oracle = _check_cycle(cycle), _check_text(oracle, "oracle")
        dice, costs = _check_dice(dice, len(rows)), _check_costs(cost, len(rows))
        t, mask = self._table, _mask(len(self), rows)
        return self._with(
            {
                "last_cycle": _set_numbers(_column(t, "last_cycle"), rows, cycle),
                "oracle": pc.if_else(mask, oracle, _column(t, "oracle")),
                "dice": _set_numbers(_column(t, "dice"), rows, dice),
                "annotation_cost": _set_numbers(_column(t, "annotation_cost"), rows, costs, add=True),
                "times_returned": _set_numbers(_column(t, "times_returned"), rows, 1, add=True),
            }
        )

    def quarantine(self, ids: IdsLike | str, reason: str) -> "PoolState":
        """Take ``ids`` (one id or several) out of every pool, e.g. an unreadable image; the row and
        its history stay for the audit trail."""
        rows, _ = self._rows([ids] if isinstance(ids, str) else ids, (LABELLED, UNLABELLED, VALIDATION), "quarantine")
        if len(rows) == 0:
            return self
        reason = _check_text(reason, "reason")
        mask = _mask(len(self), rows)
        return self._with(
            {
                "role": pc.if_else(mask, QUARANTINED, _column(self._table, "role")),
                "quarantine_reason": pc.if_else(mask, reason, _column(self._table, "quarantine_reason")),
            }
        )

    # ---- invariants ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise PoolStateError naming the column and example ids if the table is inconsistent."""
        table = self._table
        _check_schema(table.schema)
        for field in POOL_SCHEMA:
            if not field.nullable and table.column(field.name).null_count:
                raise PoolStateError(f"column {field.name!r}: {table.column(field.name).null_count} nulls")
        ids = _column(table, "sample_id")
        _check_sorted_unique(ids)
        _check_fingerprint(table.schema.metadata or {}, ids)

        role = _column(table, "role")
        bad_role = pc.invert(pc.is_in(role, value_set=pa.array(ROLES)))
        if pc.any(bad_role).as_py():
            raise PoolStateError(
                f"column 'role': values {sorted(set(pc.filter(role, bad_role).to_pylist()))} are not in {list(ROLES)}"
                f" (sample ids {_examples(ids, bad_role)})"
            )
        is_ = {r: pc.equal(role, r) for r in ROLES}
        cycle, cost = _column(table, "cycle_labelled"), _column(table, "annotation_cost")
        checks = [
            ("labelled samples need cycle_labelled >= 0", pc.and_(is_[LABELLED], pc.less(cycle, 0))),
            ("labelled samples need a label_source", pc.and_(is_[LABELLED], pc.is_null(_column(table, "label_source")))),
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
                pc.fill_null(pc.or_(pc.less(_column(table, "dice"), 0), pc.greater(_column(table, "dice"), 1)), False),
            ),
        ]
        for message, broken in checks:
            if pc.any(broken).as_py():
                raise PoolStateError(f"{message}; broken for sample ids {_examples(ids, broken)}")

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the state to ``path`` atomically, keeping the previous good state (see module doc).

        One writer at a time (the coordinator). A process killed mid-write can leave a hidden
        ``.<name>.<pid>.<hex>.tmp`` file beside ``path``; it is never read and safe to delete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as handle:
                pq.write_table(self._table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            digest = _sha256_file(tmp)
            current = _verified_digest(path)
            if current is not None:
                # Order matters: each window between these steps leaves one file that verifies.
                _write_checksum(previous_path(path), current)
                os.replace(path, previous_path(path))
                _fsync_dir(path.parent)
            elif path.exists():
                warnings.warn(f"{path}: failed verification; overwriting it and keeping {previous_path(path)}")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            _write_checksum(path, digest)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, *, fallback: bool = False) -> "PoolState":
        """Read a saved state after verifying its checksum and invariants. A missing, truncated or
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
                raise PoolStateFileError(path, f"{error.reason}; previous state unusable too: {previous_error}") from error
            warnings.warn(f"{path}: {error.reason}; loaded the previous good state {previous}")
            return state

    @classmethod
    def _load_verified(cls, path: Path) -> "PoolState":
        if not path.is_file():
            raise PoolStateFileError(path, "pool state file not found")
        expected = _read_checksum(path)
        actual = _sha256_file(path)
        if actual != expected:
            raise PoolStateFileError(
                path, f"checksum mismatch (sha256 {actual}, expected {expected}): the file is truncated or corrupted"
            )
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise PoolStateFileError(path, f"cannot read Parquet ({error})") from error
        try:
            return cls(table)
        except PoolStateError as error:
            raise PoolStateFileError(path, f"invalid pool state ({error})") from error


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
            raise PoolStateError(f"column {field.name!r} has type {schema.field(field.name).type}, expected {field.type}")


def _check_sorted_unique(ids: pa.Array) -> None:
    if len(ids) == 0:
        raise PoolStateError("the pool is empty")
    if pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py():
        raise PoolStateError("column 'sample_id': empty sample ids")
    if len(ids) < 2:
        return
    ascending = pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))
    if pc.all(ascending).as_py():
        return
    later = ids.slice(1)
    duplicate = pc.and_(pc.invert(ascending), pc.equal(ids.slice(0, len(ids) - 1), later))
    if pc.any(duplicate).as_py():
        raise PoolStateError(f"column 'sample_id': duplicate sample ids {_examples(later, duplicate)}")
    raise PoolStateError(f"column 'sample_id': not sorted, first out of order at {_examples(later, pc.invert(ascending))}")


def _check_fingerprint(metadata: Mapping[bytes, bytes], ids: pa.Array) -> None:
    if metadata.get(_META_FORMAT) != FORMAT_VERSION.encode():
        raise PoolStateError(
            f"pool table metadata {_META_FORMAT.decode()} is {metadata.get(_META_FORMAT)!r}, expected {FORMAT_VERSION!r}"
            " (build pool states with PoolState.from_manifest)"
        )
    try:
        expected = int(metadata[_META_COUNT])
        fingerprint = metadata[_META_IDS].decode()
    except (KeyError, ValueError) as error:
        raise PoolStateError(f"pool table metadata lacks a valid {error}") from None
    if len(ids) != expected:
        raise PoolStateError(f"the pool has {len(ids)} samples but was created with {expected}: samples were added or lost")
    if ids_fingerprint(ids) != fingerprint:
        raise PoolStateError(f"the pool's sample ids differ from those it was created with ({expected} samples)")


# ---- files ------------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


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
    tmp = _tmp_name(target)
    try:
        with open(tmp, "w", encoding="ascii") as handle:
            handle.write(f"{digest}  {path.name}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _read_checksum(path: Path) -> str:
    sidecar = checksum_path(path)
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError:
        raise PoolStateFileError(path, f"checksum file {sidecar.name} not found, cannot verify the state") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PoolStateFileError(path, f"cannot read checksum file {sidecar.name} ({error})") from None
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
