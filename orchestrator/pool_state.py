"""The active-learning pool state: one Parquet file, the audit trail and what a resumed run starts from.

One row per sample (``orchestrator.records.POOL_SCHEMA``), sorted by ``sample_id``, with its role
(labelled / unlabelled / validation / quarantined) and annotation history; its invariants live in
``orchestrator.pool_schema`` and are checked whenever the file is read in full (``load``) or written.

The file is never held in memory whole: a ``PoolState`` is a handle on it (its path, the counts per role
and the total annotation cost), and every query and transition streams it in batches of
``parquet_io.ROWS_PER_BATCH`` rows, so the memory of the process holding it does not grow with the pool.
Each transition (``record_decisions``, ``quarantine``) rewrites the file once, published through
``segxal.verified_files`` (checksum sidecar, previous good version kept); one writer at a time.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.parquet_io import read_batches, write_tables
from orchestrator.pool_schema import (
    FORMAT_VERSION,
    META_COUNT,
    META_FORMAT,
    META_IDS,
    PoolChecker,
    PoolStateError,
    PoolSummary,
    check_role,
    column,
    examples,
    ids_fingerprint,
)
from orchestrator.records import (
    INITIAL_CYCLE,
    LABELLED,
    MANIFEST_COLUMNS,
    NEVER,
    POOL_SCHEMA,
    QUARANTINED,
    UNLABELLED,
    VALIDATION,
)
from orchestrator.selection import Budget, IdsLike, as_ids, budget_count, draw_subset
from segxal.verified_files import VerifiedFileError, previous_path, publish, read_checksum, verify


class PoolStateFileError(PoolStateError):
    """A saved pool state is missing, truncated or corrupted; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        message = f"{path}: {reason}"
        previous = previous_path(path)
        if previous != self.path and previous.exists():
            message += f"; a previous state is kept at {previous}: PoolState.load(..., fallback=True) loads it"
        super().__init__(message)


@contextmanager
def _as_pool_state_error():
    """A verified-file failure as the pool state's own error, with its fallback hint."""
    try:
        yield
    except VerifiedFileError as error:
        raise PoolStateFileError(error.path, error.reason) from None


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


def _paths_of_accepted(paths, keep: np.ndarray, name: str) -> pa.Array:
    """``paths`` as strings: a non-empty one for each accepted id, None for each returned one."""
    array = pa.array(list(paths), type=pa.string())
    given = pc.and_(pc.is_valid(array), pc.not_equal(pc.fill_null(array, ""), ""))
    if len(array) != len(keep) or given.to_numpy(zero_copy_only=False).tolist() != keep.tolist():
        raise PoolStateError(
            f"{name}: expected a non-empty path for each accepted id and None for each returned"
            f" one ({len(keep)} ids), got {array.to_pylist()[:5]}"
        )
    return array


def _manifest_part(manifest: pa.Table, name: str) -> pa.Table:
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.column_names]
    if missing:
        raise PoolStateError(
            f"{name}: missing columns {missing} (expected segxal.data.manifest.MANIFEST_SCHEMA)"
        )
    return manifest.select(list(MANIFEST_COLUMNS)).cast(
        pa.schema([POOL_SCHEMA.field(c).with_nullable(True) for c in MANIFEST_COLUMNS])
    )


class PoolState:
    """A handle on a verified pool-state file; build with ``create`` or ``load``. Queries and
    transitions stream the file; ``table`` reads it whole (for inspection and tests)."""

    def __init__(self, path: Path, summary: PoolSummary, schema: pa.Schema) -> None:
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
            column(table, "sample_id"), "manifest sample_id"
        )  # nulls and duplicates are errors
        is_val = np.zeros(table.num_rows, dtype=bool)
        is_val[train.num_rows :] = True

        count = budget_count(initial_labelled, train.num_rows, name="initial_labelled")
        chosen = draw_subset(ids.slice(0, train.num_rows), count, seed)
        is_labelled = pc.is_in(ids, value_set=chosen)

        labels = column(table, "label_path")
        needs_label = pc.or_(is_labelled, pa.array(is_val))
        missing = pc.and_(needs_label, pc.is_null(labels))
        if pc.any(missing).as_py():
            raise PoolStateError(
                f"initial labelled and validation samples need a label_path; missing for {examples(ids, missing)}"
            )

        n = table.num_rows
        role = pc.if_else(
            pa.array(is_val), VALIDATION, pc.if_else(is_labelled, LABELLED, UNLABELLED)
        )
        columns = {
            **{c: column(table, c) for c in MANIFEST_COLUMNS},
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
            "mask_path": pa.nulls(n, pa.string()),
            "labelled_pixels": pa.array(np.zeros(n, dtype=np.int64)),
        }
        table = pa.Table.from_arrays([columns[f.name] for f in POOL_SCHEMA], schema=POOL_SCHEMA)
        if not pc.all(
            pc.less(ids.slice(0, n - 1), ids.slice(1))
        ).as_py():  # manifests usually come sorted
            table = table.take(pc.sort_indices(ids))
        schema = POOL_SCHEMA.with_metadata(
            {
                META_FORMAT: FORMAT_VERSION.encode(),
                META_COUNT: str(n).encode(),
                META_IDS: ids_fingerprint(column(table, "sample_id")).encode(),
                b"segxal.pool_state.seed": str(seed).encode(),
                b"segxal.pool_state.initial_labelled": str(initial_labelled).encode(),
            }
        )
        return cls._write(Path(path), schema, [table])  # the caller holds the manifest whole anyway

    @classmethod
    def _write(cls, path: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> PoolState:
        """Write ``tables`` as the new state at ``path``, checking every batch; nothing is published if a
        check (or anything else) fails."""
        checker = PoolChecker(schema)

        def write(handle: BinaryIO) -> PoolSummary:
            write_tables(handle, schema, (checker.check(table) for table in tables))
            return checker.finish()

        with _as_pool_state_error():
            return cls(path, publish(path, write), schema)

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
        with _as_pool_state_error():
            verify(path)
        try:
            schema = pq.read_schema(path)
            checker = PoolChecker(schema)
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
        with _as_pool_state_error():
            expected = read_checksum(self.path)

        def write(handle: BinaryIO) -> PoolSummary:
            with open(self.path, "rb") as source:
                shutil.copyfileobj(source, handle, 1 << 20)
            return self._summary

        with _as_pool_state_error():
            summary = publish(path, write, expected_digest=expected)
        return PoolState(path, summary, self._schema)

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

    def count(self, role: str) -> int:
        check_role(role)
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
                where = pc.index_in(column(table, "sample_id"), value_set=ids)
                hit = pc.is_valid(where)
                if not pc.any(hit).as_py():
                    yield table
                    continue
                rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
                at = pc.filter(where, hit).to_numpy().astype(np.int64)
                roles = column(table, "role").take(pa.array(rows))
                wrong = pc.invert(pc.is_in(roles, value_set=pa.array(allowed)))
                if pc.any(wrong).as_py():
                    found_roles = sorted(set(pc.filter(roles, wrong).to_pylist()))
                    raise PoolStateError(
                        f"{action}: sample ids {examples(ids.take(pa.array(at)), wrong)} have role"
                        f" {found_roles}, expected one of {list(allowed)}"
                    )
                found[at] = True
                updates = change(table, rows, at)
                yield pa.Table.from_arrays(
                    [updates.get(f.name, column(table, f.name)) for f in POOL_SCHEMA],
                    schema=table.schema,
                )
            if not found.all():
                raise PoolStateError(
                    f"{action}: unknown sample ids {examples(ids, pa.array(~found))}"
                )

        self._summary = PoolState._write(self.path, self._schema, updated())._summary

    def record_decisions(
        self,
        ids: IdsLike,
        cycle: int,
        oracle: str,
        dice,
        cost,
        accepted,
        label_paths,
        *,
        masks: Sequence[tuple[str, int] | None] | None = None,
        returned=None,
    ) -> None:
        """The Dice gate's decisions on a batch of ``ids``, in one rewrite of the file. Each gets its
        cycle, oracle, Dice and cost (added up over its annotations); an ``accepted`` one is in the
        labelled pool with the annotation at its ``label_paths`` entry as its label (``cycle_labelled``:
        the cycle it first got one), a returned one keeps its role and label. ``dice`` and ``cost``: one
        value per id or one for all; ``accepted``: one bool per id; ``label_paths``: one per id, None
        where returned; ``returned``: the times each id was sent back (default: 1 where not accepted).

        Image level (no ``masks``): the ids are unlabelled. Region level: ``masks`` gives each accepted
        id its region-label file and labelled-pixel count (None where returned), and the ids may
        already hold labelled regions."""
        ids = self._ids(ids, "record_decisions")
        if len(ids) == 0:
            return
        cycle, oracle = _check_cycle(cycle), _check_text(oracle, "oracle")
        dice, costs = _check_dice(dice, len(ids)), _check_costs(cost, len(ids))
        keep = np.asarray(accepted, dtype=bool).reshape(-1)
        if keep.shape != (len(ids),):
            raise PoolStateError(
                f"accepted: expected {len(ids)} flags (one per id), got {keep.shape}"
            )
        paths = _paths_of_accepted(label_paths, keep, "label_paths")
        sent_back = (
            (~keep).astype(np.int32)
            if returned is None
            else _per_row(returned, len(ids), "returned").astype(np.int32)
        )
        if masks is None:
            allowed: tuple[str, ...] = (UNLABELLED,)
            mask_paths, pixels = None, None
        else:
            allowed = (UNLABELLED, LABELLED)
            mask_paths = _paths_of_accepted(
                [None if m is None else m[0] for m in masks], keep, "masks"
            )
            pixels = np.array([0 if m is None else m[1] for m in masks], dtype=np.int64)

        def change(t: pa.Table, rows: np.ndarray, at: np.ndarray) -> dict[str, pa.Array]:
            joins = rows[keep[at]]
            first = joins[column(t, "cycle_labelled").to_numpy()[joins] == NEVER]
            updates = {
                "role": pc.if_else(_mask(t.num_rows, joins), LABELLED, column(t, "role")),
                "cycle_labelled": _set_numbers(column(t, "cycle_labelled"), first, cycle),
                "last_cycle": _set_numbers(column(t, "last_cycle"), rows, cycle),
                "oracle": pc.if_else(_mask(t.num_rows, rows), oracle, column(t, "oracle")),
                "dice": _set_numbers(column(t, "dice"), rows, dice[at]),
                "annotation_cost": _set_numbers(
                    column(t, "annotation_cost"), rows, costs[at], add=True
                ),
                "times_returned": _set_numbers(
                    column(t, "times_returned"), rows, sent_back[at], add=True
                ),
                "label_source": _scatter_strings(
                    column(t, "label_source"), joins, paths.take(pa.array(at[keep[at]]))
                ),
            }
            if mask_paths is not None and pixels is not None:
                updates["mask_path"] = _scatter_strings(
                    column(t, "mask_path"), joins, mask_paths.take(pa.array(at[keep[at]]))
                )
                updates["labelled_pixels"] = _set_numbers(
                    column(t, "labelled_pixels"), joins, pixels[at[keep[at]]]
                )
            return updates

        self._transition("record_decisions", ids, allowed, change)

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
        why = pa.array([_check_text(reason, "reason") for reason in reasons], pa.string())

        def change(t: pa.Table, rows: np.ndarray, at: np.ndarray) -> dict[str, pa.Array]:
            return {
                "role": pc.if_else(_mask(t.num_rows, rows), QUARANTINED, column(t, "role")),
                "quarantine_reason": _scatter_strings(
                    column(t, "quarantine_reason"), rows, why.take(pa.array(at))
                ),
            }

        self._transition("quarantine", ids, (LABELLED, UNLABELLED, VALIDATION), change)
