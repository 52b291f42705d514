import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import parquet_io
from orchestrator.parquet_io import read_batches, row_count, take_positions, write_parquet

SCHEMA = pa.schema([("sample_id", pa.string()), ("value", pa.int64())])


def numbered(n: int) -> pa.Table:
    return pa.table(
        {"sample_id": [f"s{i:03d}" for i in range(n)], "value": list(range(n))}, schema=SCHEMA
    )


def test_written_in_row_groups_and_read_back_a_group_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet_io, "ROWS_PER_BATCH", 4)
    path = write_parquet(tmp_path / "t.parquet", SCHEMA, [numbered(6), numbered(10).slice(6)])
    assert row_count(path) == 10
    batches = list(read_batches(path, ["value"]))
    assert [b.num_rows for b in batches] == [
        4,
        2,
        4,
    ]  # each written table cut into groups of at most 4
    assert pa.concat_tables(batches)["value"].to_pylist() == list(range(10))
    assert all(b.column_names == ["value"] for b in batches)


def test_take_positions_across_batches():
    batches = [
        numbered(10).slice(0, 3),
        numbered(10).slice(3, 0),
        numbered(10).slice(3, 4),
        numbered(10).slice(7),
    ]
    taken = pa.concat_tables(take_positions(batches, np.array([0, 2, 3, 6, 9])))
    assert taken["value"].to_pylist() == [0, 2, 3, 6, 9]
    assert list(take_positions(batches, np.array([], dtype=np.int64))) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", SCHEMA, [numbered(3)])

    def failing():
        yield numbered(2)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_parquet(path, SCHEMA, failing())
    assert os.listdir(tmp_path) == ["t.parquet"] and pq.read_table(path)["value"].to_pylist() == [
        0,
        1,
        2,
    ]
