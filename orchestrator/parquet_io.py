"""Parquet read and written a bounded batch at a time, so that memory does not grow with the pool.

Pool-sized tables (the pool state, D^S, its scores, the per-cycle manifests) live in Parquet files
written in row groups of ``ROWS_PER_BATCH`` rows; readers stream them back in batches of that size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segxal.files import naming, tmp_name, write_atomically

ROWS_PER_BATCH = 4096


def read_batches(path: str | Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The file's rows in order, a row group at a time (``ROWS_PER_BATCH`` rows in the files written
    here). One thread and no read-ahead: the row group being read is all that is held."""
    with pq.ParquetFile(path, pre_buffer=False) as file:
        for index in range(file.num_row_groups):
            yield file.read_row_group(index, columns=columns, use_threads=False)


def row_count(path: str | Path) -> int:
    with pq.ParquetFile(path) as file:
        return file.metadata.num_rows


def write_tables(handle, schema: pa.Schema, tables: Iterable[pa.Table]) -> int:
    """Write ``tables`` (cast to ``schema``) to an open binary file in row groups; returns the rows written."""
    rows = 0
    with pq.ParquetWriter(handle, schema) as writer:
        for table in tables:
            writer.write_table(table.cast(schema), row_group_size=ROWS_PER_BATCH)
            rows += table.num_rows
    return rows


def write_parquet(path: str | Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> Path:
    """Write ``tables`` to ``path`` atomically: a reader sees the old file or the complete new one."""
    write_atomically(path, lambda handle: write_tables(handle, schema, tables))
    return Path(path)


def take_positions(tables: Iterable[pa.Table], positions: np.ndarray) -> Iterator[pa.Table]:
    """The rows at sorted ``positions`` of the concatenated ``tables``, streamed."""
    offset = 0
    for table in tables:
        lo, hi = np.searchsorted(positions, [offset, offset + table.num_rows])
        if hi > lo:
            yield table.take(pa.array(positions[lo:hi] - offset, type=pa.int64()))
        offset += table.num_rows


def tee_parquet(
    path: str | Path, schema: pa.Schema, tables: Iterable[pa.Table]
) -> Iterator[pa.Table]:
    """``tables`` passed through, each also written (cast to ``schema``) to ``path``, which appears
    atomically once the last one has gone through; a pass stopped early leaves no file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with naming(path):
            handle = open(tmp, "wb")
        with handle:
            with pq.ParquetWriter(handle, schema) as writer:
                for table in tables:  # an error of the source is its own, not this file's
                    with naming(path):
                        writer.write_table(table.cast(schema), row_group_size=ROWS_PER_BATCH)
                    yield table
            with naming(path):
                handle.flush()
                os.fsync(handle.fileno())
        with naming(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
