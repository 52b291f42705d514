import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import accept, ids_with_role, return_to_pool

from orchestrator import parquet_io
from orchestrator import pool_state as ps
from orchestrator.pool_state import (
    LABELLED,
    QUARANTINED,
    UNLABELLED,
    VALIDATION,
    PoolState,
    PoolStateError,
    PoolStateFileError,
)
from segxal import verified_files as vf
from segxal.data.manifest import MANIFEST_SCHEMA
from segxal.verified_files import checksum_path, previous_path


def make_manifest(
    n: int, split: str = "train", prefix: str = "s", with_labels: bool = True
) -> pa.Table:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    return pa.Table.from_pylist(
        [
            {
                "sample_id": i,
                "split": split,
                "image_path": f"/data/img/{i}.png",
                "label_path": f"/data/gt/{i}.png" if with_labels else None,
                "depth_path": None,
                "height": 8,
                "width": 16,
            }
            for i in ids
        ],
        schema=MANIFEST_SCHEMA,
    )


@pytest.fixture
def pool(tmp_path) -> PoolState:
    return PoolState.create(
        tmp_path / "pool" / "state.parquet",
        make_manifest(20),
        0.25,
        seed=0,
        validation=make_manifest(4, "val", prefix="v"),
    )


def first_unlabelled(state: PoolState, k: int) -> list[str]:
    return ids_with_role(state, UNLABELLED)[:k].to_pylist()


def frozen(state: PoolState, tmp_path, name: str = "frozen.parquet") -> PoolState:
    """A copy of ``state`` as it is now (transitions rewrite a state's own file)."""
    return state.copy_to(tmp_path / "copies" / name)


# ---- construction ------------------------------------------------------------------------------------


def test_initial_split_is_deterministic_from_the_seed_and_input_order(pool, tmp_path):
    assert pool.counts() == {LABELLED: 5, UNLABELLED: 15, VALIDATION: 4, QUARANTINED: 0}
    manifest = make_manifest(20)
    shuffled = manifest.take(np.random.default_rng(3).permutation(20))
    again = PoolState.create(
        tmp_path / "again.parquet",
        shuffled,
        0.25,
        seed=0,
        validation=make_manifest(4, "val", prefix="v"),
    )
    assert again == pool
    other = PoolState.create(
        tmp_path / "other.parquet",
        make_manifest(20),
        0.25,
        seed=1,
        validation=make_manifest(4, "val", prefix="v"),
    )
    assert ids_with_role(other, LABELLED).to_pylist() != ids_with_role(pool, LABELLED).to_pylist()
    counted = PoolState.create(tmp_path / "count.parquet", make_manifest(20), 5, seed=0)
    assert ids_with_role(counted, LABELLED) == ids_with_role(pool, LABELLED)


def test_initial_rows_and_queries(pool):
    table = pool.table
    assert table.column("sample_id").to_pylist() == sorted(table.column("sample_id").to_pylist())
    assert ids_with_role(pool, VALIDATION).to_pylist() == ["v000", "v001", "v002", "v003"]
    labelled = pool.record(ids_with_role(pool, LABELLED)[0].as_py())
    assert labelled["cycle_labelled"] == 0 and labelled["label_source"] == labelled["label_path"]
    assert (
        labelled["oracle"] is None
        and labelled["times_returned"] == 0
        and labelled["annotation_cost"] == 0.0
    )
    unlabelled = pool.record(ids_with_role(pool, UNLABELLED)[0].as_py())
    assert (
        unlabelled["cycle_labelled"] == -1
        and unlabelled["label_source"] is None
        and unlabelled["dice"] is None
    )
    assert pool.training_pool_size == 20 and pool.labelled_fraction == 0.25 and len(pool) == 24
    with pytest.raises(ValueError, match="unknown role 'train'"):
        pool.count("train")
    with pytest.raises(KeyError, match="unknown sample id 'nope'"):
        pool.record("nope")


def test_validation_by_split_column(tmp_path):
    manifest = pa.concat_tables([make_manifest(10), make_manifest(3, "val", prefix="v")])
    state = PoolState.create(
        tmp_path / "state.parquet", manifest, 2, seed=0, validation_split="val"
    )
    assert state.counts() == {LABELLED: 2, UNLABELLED: 8, VALIDATION: 3, QUARANTINED: 0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial_labelled=21), r"initial_labelled 21 is larger than the pool \(20 samples\)"),
        (dict(initial_labelled=0), "initial_labelled must be positive"),
        (dict(initial_labelled=1.5), r"initial_labelled fraction must be in \(0, 1\]"),
        (
            dict(initial_labelled=2, validation=make_manifest(2, "val", prefix="s")),
            r"duplicate sample ids \['s000', 's001'\]",
        ),
        (
            dict(
                initial_labelled=2,
                validation=make_manifest(2, "val", prefix="v", with_labels=False),
            ),
            r"need a label_path; missing for \['v000', 'v001'\]",
        ),
        (dict(initial_labelled=2, validation_split="val"), "the training pool is empty"),
    ],
)
def test_construction_errors(kwargs, match, tmp_path):
    manifest = make_manifest(20, split="val" if kwargs.get("validation_split") else "train")
    with pytest.raises(ValueError, match=match):
        PoolState.create(tmp_path / "state.parquet", manifest, seed=0, **kwargs)
    assert os.listdir(tmp_path) == []  # nothing written


def test_construction_needs_labels_for_the_initial_pool_and_manifest_columns(tmp_path):
    with pytest.raises(PoolStateError, match="need a label_path"):
        PoolState.create(tmp_path / "a.parquet", make_manifest(5, with_labels=False), 2, seed=0)
    with pytest.raises(PoolStateError, match=r"manifest: missing columns \['image_path'\]"):
        PoolState.create(
            tmp_path / "b.parquet", make_manifest(5).drop_columns(["image_path"]), 2, seed=0
        )


# ---- transitions ------------------------------------------------------------------------------------


def test_accept_return_and_quarantine_rewrite_the_file_and_keep_invariants(pool, tmp_path):
    a, b, c = first_unlabelled(pool, 3)
    before = frozen(pool, tmp_path)
    accept(
        pool,
        [a, b],
        cycle=1,
        oracle="pseudo",
        dice=[0.8, 0.9],
        cost=[3.0, 4.0],
        label_paths=["/r/a.png", "/r/b.png"],
    )
    assert PoolState.load(previous_path(pool.path)) == before  # the previous good state is kept
    assert PoolState.load(pool.path) == pool and before.count(LABELLED) == 5
    assert pool.counts() == {LABELLED: 7, UNLABELLED: 13, VALIDATION: 4, QUARANTINED: 0}
    row = pool.record(a)
    assert (row["role"], row["cycle_labelled"], row["last_cycle"], row["oracle"]) == (
        LABELLED,
        1,
        1,
        "pseudo",
    )
    assert (row["dice"], row["annotation_cost"], row["label_source"]) == (0.8, 3.0, "/r/a.png")
    assert pool.labelled_fraction == 7 / 20 and pool.total_annotation_cost == 7.0

    return_to_pool(pool, [c], cycle=1, oracle="simulated", dice=[0.2], cost=1.5)
    return_to_pool(pool, [c], cycle=2, oracle="simulated", dice=[0.3], cost=1.0)
    row = pool.record(c)
    assert (
        row["role"],
        row["times_returned"],
        row["annotation_cost"],
        row["dice"],
        row["last_cycle"],
    ) == (UNLABELLED, 2, 2.5, 0.3, 2)
    assert row["cycle_labelled"] == -1 and row["label_source"] is None
    assert pool.total_annotation_cost == 9.5

    pool.quarantine(a, "label file unreadable")
    row = pool.record(a)
    assert row["role"] == QUARANTINED and row["quarantine_reason"] == "label file unreadable"
    assert pool.counts()[LABELLED] == 6 and len(pool) == 24
    assert pool.training_pool_size == 19
    pool.quarantine([b, c], ["unreadable image", "truncated"])
    assert [pool.record(i)["quarantine_reason"] for i in (b, c)] == [
        "unreadable image",
        "truncated",
    ]
    PoolState.load(pool.path)
    assert PoolState.load(pool.path).counts() == pool.counts()

    content = pool.path.read_bytes()
    accept(pool, [], 1, "pseudo", [], 0.0, [])  # nothing to do: nothing rewritten
    assert (
        pool.path.read_bytes() == content
        and PoolState.load(previous_path(pool.path)).count(QUARANTINED) == 1
    )


def test_accept_with_nan_dice_stores_null(pool):
    (a,) = first_unlabelled(pool, 1)
    accept(pool, [a], 1, "pseudo", float("nan"), 0.0, ["/r/a.png"])
    assert pool.record(a)["dice"] is None


def test_transition_errors_name_the_ids_and_leave_the_file_alone(pool):
    labelled = ids_with_role(pool, LABELLED)[0].as_py()
    (a,) = first_unlabelled(pool, 1)
    content = pool.path.read_bytes()
    with pytest.raises(
        PoolStateError,
        match=rf"record_decisions: sample ids \['{labelled}'\] have role \['labelled'\], expected one of \['unlabelled'\]",
    ):
        accept(pool, [a, labelled], 1, "pseudo", [0.9, 0.9], 0.0, ["/r.png", "/s.png"])
    with pytest.raises(PoolStateError, match=r"unknown sample ids \['nope'\]"):
        return_to_pool(pool, [a, "nope"], 1, "pseudo", [0.1, 0.1])
    with pytest.raises(PoolStateError, match="duplicate sample ids"):
        accept(pool, [a, a], 1, "pseudo", [0.9, 0.9], 0.0, ["/r.png", "/r.png"])
    with pytest.raises(PoolStateError, match="cycle must be an int >= 1"):
        accept(pool, [a], 0, "pseudo", [0.9], 0.0, ["/r.png"])
    with pytest.raises(PoolStateError, match=r"dice must be in \[0, 1\]"):
        accept(pool, [a], 1, "pseudo", [1.2], 0.0, ["/r.png"])
    with pytest.raises(
        PoolStateError, match="label_paths: expected a non-empty path for each accepted id"
    ):
        accept(pool, [a], 1, "pseudo", [0.9], 0.0, [])
    with pytest.raises(PoolStateError, match="cost must be finite and >= 0"):
        return_to_pool(pool, [a], 1, "pseudo", [0.1], -1.0)
    with pytest.raises(PoolStateError, match="dice: expected 1 values"):
        return_to_pool(pool, [a], 1, "pseudo", [0.1, 0.2])
    with pytest.raises(PoolStateError, match="oracle must be a non-empty string"):
        return_to_pool(pool, [a], 1, "", [0.1])
    with pytest.raises(PoolStateError, match="reason must be a non-empty string"):
        pool.quarantine(a, "")
    with pytest.raises(PoolStateError, match="reasons: expected 1"):
        pool.quarantine([a], ["x", "y"])
    assert pool.path.read_bytes() == content and not previous_path(pool.path).exists()
    pool.quarantine(a, "broken")
    with pytest.raises(PoolStateError, match=r"quarantine: .* have role \['quarantined'\]"):
        pool.quarantine(a, "again")


def test_a_state_in_many_row_groups_is_checked_and_updated_across_them(tmp_path, monkeypatch):
    whole = PoolState.create(tmp_path / "whole.parquet", make_manifest(30), 6, seed=0)
    monkeypatch.setattr(parquet_io, "ROWS_PER_BATCH", 4)  # 30 rows in 8 row groups
    state = PoolState.create(tmp_path / "groups.parquet", make_manifest(30), 6, seed=0)
    assert pq.ParquetFile(state.path).num_row_groups == 8
    assert state.table.equals(whole.table, check_metadata=True)  # same rows, same ids fingerprint
    chosen = first_unlabelled(state, 24)[::5]  # spread over several row groups
    accept(state, chosen, 1, "pseudo", 0.9, 1.0, [f"/r/{i}.png" for i in chosen])
    assert [PoolState.load(state.path).record(i)["role"] for i in chosen] == [LABELLED] * len(
        chosen
    )
    assert state.count(LABELLED) == 6 + len(chosen)
    ids = state.table["sample_id"].to_pylist()
    with pytest.raises(
        PoolStateError, match=rf"duplicate sample ids \['{ids[3]}'\]"
    ):  # row 4 opens group 2
        check_whole(
            replace_column(state.table, "sample_id", ids[:4] + [ids[3]] + ids[5:]), tmp_path
        )


# ---- invariants --------------------------------------------------------------------------------------


def check_whole(table: pa.Table, tmp_path) -> None:
    """Write ``table`` as a state file around PoolState (with a valid checksum) and load it."""
    path = tmp_path / "raw" / "state.parquet"
    path.parent.mkdir(exist_ok=True)
    nullable = pa.schema(
        [field.with_nullable(True) for field in table.schema], metadata=table.schema.metadata
    )
    pq.write_table(
        table.cast(nullable), path, row_group_size=parquet_io.ROWS_PER_BATCH
    )  # nulls anywhere
    vf.write_checksum(path, vf.sha256_file(path))
    try:
        PoolState.load(path)
    except PoolStateFileError as error:
        raise PoolStateError(error.reason) from error


def replace_column(table: pa.Table, name: str, values) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(
        index, table.schema.field(name), pa.array(values, type=table.schema.field(name).type)
    )


def test_broken_tables_are_rejected(pool, tmp_path):
    table = pool.table
    ids = table.column("sample_id").to_pylist()
    roles = table.column("role").to_pylist()
    labelled_row = roles.index(LABELLED)
    unlabelled_row = roles.index(UNLABELLED)

    duplicated = list(ids)
    duplicated[1] = ids[0]
    with pytest.raises(PoolStateError, match=rf"duplicate sample ids \['{ids[0]}'\]"):
        check_whole(replace_column(table, "sample_id", duplicated), tmp_path)
    with pytest.raises(PoolStateError, match="not sorted"):
        check_whole(replace_column(table, "sample_id", ids[::-1]), tmp_path)
    with pytest.raises(PoolStateError, match="has 23 samples but was created with 24"):
        check_whole(table.slice(1), tmp_path)
    with pytest.raises(PoolStateError, match="sample ids differ from those it was created with"):
        check_whole(replace_column(table, "sample_id", ids[:-1] + ["zzz"]), tmp_path)
    bad_role = list(roles)
    bad_role[0] = "train"
    with pytest.raises(PoolStateError, match=r"column 'role': values \['train'\]"):
        check_whole(replace_column(table, "role", bad_role), tmp_path)
    label_source = table.column("label_source").to_pylist()
    label_source[labelled_row] = None
    with pytest.raises(
        PoolStateError,
        match=rf"labelled samples need a label_source; broken for sample ids \['{ids[labelled_row]}'\]",
    ):
        check_whole(replace_column(table, "label_source", label_source), tmp_path)
    cycles = table.column("cycle_labelled").to_pylist()
    cycles[unlabelled_row] = 2
    with pytest.raises(
        PoolStateError, match="unlabelled and validation samples need cycle_labelled = -1"
    ):
        check_whole(replace_column(table, "cycle_labelled", cycles), tmp_path)
    quarantined_role = list(roles)
    quarantined_role[unlabelled_row] = QUARANTINED
    with pytest.raises(
        PoolStateError, match="quarantine_reason must be set exactly for quarantined samples"
    ):
        check_whole(replace_column(table, "role", quarantined_role), tmp_path)
    with pytest.raises(PoolStateError, match="annotation_cost must be finite and >= 0"):
        check_whole(replace_column(table, "annotation_cost", [-1.0] + [0.0] * 23), tmp_path)
    with pytest.raises(PoolStateError, match=r"dice must be in \[0, 1\] or null"):
        check_whole(replace_column(table, "dice", [1.5] + [None] * 23), tmp_path)
    with pytest.raises(PoolStateError, match="column 'role': 1 nulls"):
        check_whole(replace_column(table, "role", [None] + roles[1:]), tmp_path)
    with pytest.raises(PoolStateError, match="pool table is missing columns"):
        check_whole(table.drop_columns(["dice"]), tmp_path)
    with pytest.raises(PoolStateError, match="metadata segxal.pool_state.format"):
        check_whole(table.replace_schema_metadata(None), tmp_path)
    with pytest.raises(PoolStateError, match="column 'times_returned' has type int64"):
        check_whole(
            table.set_column(
                table.schema.get_field_index("times_returned"),
                "times_returned",
                pa.array([0] * 24, pa.int64()),
            ),
            tmp_path,
        )


# ---- persistence -------------------------------------------------------------------------------------


def test_load_round_trip_and_copies(pool, tmp_path):
    a, b = first_unlabelled(pool, 2)
    accept(pool, [a], 1, "pseudo", [0.7], 2.0, ["/r/a.png"])
    return_to_pool(pool, [b], 1, "pseudo", [0.1], 1.0)
    loaded = PoolState.load(pool.path)
    assert loaded == pool and loaded.table.schema.metadata == pool.table.schema.metadata
    assert loaded.counts() == pool.counts() and loaded.total_annotation_cost == 3.0
    digest, name = checksum_path(pool.path).read_text().split()
    assert name == "state.parquet" and len(digest) == 64
    copy = pool.copy_to(tmp_path / "run" / "snapshot.parquet")
    assert (
        copy.path.read_bytes() == pool.path.read_bytes()
        and checksum_path(copy.path).read_text().split()[0] == digest
    )
    assert sorted(os.listdir(copy.path.parent)) == ["snapshot.parquet", "snapshot.parquet.sha256"]
    assert pool.copy_to(pool.path) is pool


def written_twice(pool: PoolState, tmp_path) -> tuple[PoolState, PoolState]:
    """(a copy of the first state, the state) after a second write to ``pool.path``."""
    first = frozen(pool, tmp_path, "first.parquet")
    (a,) = first_unlabelled(pool, 1)
    accept(pool, [a], 1, "pseudo", [0.9], 1.0, ["/r/a.png"])
    assert PoolState.load(pool.path) == pool and PoolState.load(previous_path(pool.path)) == first
    return first, pool


def test_truncated_file_is_detected_and_the_previous_state_kept(pool, tmp_path):
    path = pool.path
    first, second = written_twice(pool, tmp_path)
    second_copy = frozen(second, tmp_path, "second.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        PoolStateFileError,
        match=r"state\.parquet: checksum mismatch .* truncated or corrupted; a previous state is kept at .*state\.prev\.parquet",
    ):
        PoolState.load(path)
    with pytest.warns(UserWarning, match="loaded the previous good state"):
        assert PoolState.load(path, fallback=True) == first
    # a later write must not rotate the corrupt file over the good previous one
    with pytest.warns(UserWarning, match="failed verification"):
        second_copy.copy_to(path)
    assert PoolState.load(path) == second_copy and PoolState.load(previous_path(path)) == first


@pytest.mark.parametrize("where", [0, 0.5, -10, -1])
def test_flipped_byte_is_detected(pool, tmp_path, where):
    path = pool.path
    first, _ = written_twice(pool, tmp_path)
    data = bytearray(path.read_bytes())
    position = int(where * len(data)) if isinstance(where, float) else where
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PoolStateFileError, match="checksum mismatch"):
        PoolState.load(path)
    with pytest.warns(UserWarning):
        assert PoolState.load(path, fallback=True) == first


def test_missing_files_are_clear_errors(pool, tmp_path):
    path = tmp_path / "state.parquet"
    with pytest.raises(PoolStateFileError, match=r"state\.parquet: pool state file not found"):
        PoolState.load(path)
    with pytest.raises(PoolStateFileError, match="previous state unusable too"):
        PoolState.load(path, fallback=True)
    pool.copy_to(path)
    checksum_path(path).unlink()
    with pytest.raises(PoolStateFileError, match="checksum file state.parquet.sha256 not found"):
        PoolState.load(path)


def test_a_valid_checksum_over_a_non_pool_file_is_rejected(pool, tmp_path):
    path = tmp_path / "state.parquet"
    pq.write_table(pool.table.slice(1), path)  # written around PoolState: a lost row
    vf.write_checksum(path, vf.sha256_file(path))
    with pytest.raises(PoolStateFileError, match="invalid pool state .*created with 24"):
        PoolState.load(path)
    path.write_bytes(b"not parquet at all")
    vf.write_checksum(path, vf.sha256_file(path))
    with pytest.raises(PoolStateFileError, match="cannot read Parquet"):
        PoolState.load(path)


def test_crash_while_writing_leaves_no_partial_file(pool, tmp_path, monkeypatch):
    first, second = written_twice(pool, tmp_path)
    listing = sorted(os.listdir(pool.path.parent))

    def crash(handle, schema, tables):
        handle.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ps, "write_tables", crash)
    with pytest.raises(OSError, match="disk full"):
        second.quarantine(first_unlabelled(second, 1)[0], "x")
    assert sorted(os.listdir(pool.path.parent)) == listing  # no temporary file left behind
    assert PoolState.load(pool.path) == second and PoolState.load(previous_path(pool.path)) == first


def test_crash_between_rotation_and_rename_keeps_the_last_good_state(pool, tmp_path, monkeypatch):
    path = pool.path
    first, second = written_twice(pool, tmp_path)
    second_copy = frozen(second, tmp_path, "second.parquet")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(path):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(vf.os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        second.quarantine(first_unlabelled(second, 1)[0], "x")
    monkeypatch.undo()
    assert not any(name.endswith(".tmp") for name in os.listdir(path.parent))
    with pytest.raises(PoolStateFileError, match="not found; a previous state is kept"):
        PoolState.load(path)
    with pytest.warns(UserWarning):
        assert PoolState.load(path, fallback=True) == second_copy


def test_crash_before_the_checksum_is_written_keeps_the_last_good_state(
    pool, tmp_path, monkeypatch
):
    path = pool.path
    first, second = written_twice(pool, tmp_path)
    second_copy = frozen(second, tmp_path, "second.parquet")
    real_write = vf.write_checksum

    def write_checksum(target, digest):
        if target == path:
            raise OSError("power cut")
        real_write(target, digest)

    monkeypatch.setattr(vf, "write_checksum", write_checksum)
    with pytest.raises(OSError, match="power cut"):
        second.quarantine(first_unlabelled(second, 1)[0], "x")
    monkeypatch.undo()
    with pytest.raises(PoolStateFileError, match="checksum mismatch"):
        PoolState.load(path)
    with pytest.warns(UserWarning):
        assert PoolState.load(path, fallback=True) == second_copy


# ---- scale and layering ------------------------------------------------------------------------------


def test_a_million_samples_build_transition_and_persist(tmp_path):
    n = 1_000_000
    ids = pa.array(np.char.add("img_", np.char.zfill(np.arange(n).astype(str), 7)))
    manifest = pa.table(
        {
            "sample_id": ids,
            "split": pa.array(np.full(n, "train")),
            "image_path": pc.binary_join_element_wise("/data/img/", ids, ".png", ""),
            "label_path": pc.binary_join_element_wise("/data/gt/", ids, ".png", ""),
            "depth_path": pa.nulls(n, pa.string()),
            "height": pa.array(np.full(n, 8, dtype=np.int32)),
            "width": pa.array(np.full(n, 8, dtype=np.int32)),
        }
    )
    state = PoolState.create(tmp_path / "state.parquet", manifest, 0.1, seed=0)
    assert state.count(LABELLED) == 100_000
    chosen = ids_with_role(state, UNLABELLED)[:1000]
    accept(
        state,
        chosen,
        1,
        "pseudo",
        np.full(1000, 0.9),
        1.0,
        pc.binary_join_element_wise("/r/", chosen, ".png", ""),
    )
    loaded = PoolState.load(state.path)
    assert loaded.count(LABELLED) == 101_000 and len(loaded) == n


def test_a_gate_decision_on_a_batch_is_one_rewrite(pool, tmp_path):
    a, b, c = first_unlabelled(pool, 3)
    before = frozen(pool, tmp_path)
    pool.record_decisions(
        [a, b, c],
        2,
        "simulated",
        [0.9, 0.1, 0.8],
        [1.0, 2.0, 3.0],
        [True, False, True],
        ["/r/a.png", None, "/r/c.png"],
    )
    assert (
        PoolState.load(previous_path(pool.path)) == before
    )  # one publish: the previous is the start
    rows = {i: pool.record(i) for i in (a, b, c)}
    assert [rows[i]["role"] for i in (a, b, c)] == [LABELLED, UNLABELLED, LABELLED]
    assert [rows[i]["label_source"] for i in (a, b, c)] == ["/r/a.png", None, "/r/c.png"]
    assert [rows[i]["times_returned"] for i in (a, b, c)] == [0, 1, 0]
    assert [rows[i]["cycle_labelled"] for i in (a, b, c)] == [2, -1, 2]
    assert [rows[i]["last_cycle"] for i in (a, b, c)] == [2, 2, 2]
    assert pool.total_annotation_cost == 6.0
    with pytest.raises(PoolStateError, match="label_paths: expected a non-empty path"):
        pool.record_decisions(first_unlabelled(pool, 1), 3, "pseudo", 0.5, 0.0, [False], ["/x.png"])


# ---- region mode -------------------------------------------------------------------------------------


def test_region_decisions_label_images_in_parts_and_keep_their_history(pool):
    first, second = first_unlabelled(pool, 2)
    pool.record_decisions(
        [first, second], 1, "simulated", [0.8, 0.2], [3.0, 2.0], [True, False],
        ["/a/1.png", None], masks=[("/m/1.png", 120), None], returned=[1, 2],
    )  # fmt: skip
    one, two = pool.record(first), pool.record(second)
    assert (one["role"], one["cycle_labelled"], one["mask_path"], one["labelled_pixels"]) == (
        LABELLED, 1, "/m/1.png", 120
    )  # fmt: skip
    assert (one["times_returned"], one["annotation_cost"]) == (1, 3.0)
    assert (two["role"], two["mask_path"], two["times_returned"]) == (UNLABELLED, None, 2)
    # cycle 2: more regions of the labelled image, a label and a mask that replace the old ones
    pool.record_decisions(
        [first], 2, "simulated", 0.9, 1.0, [True], ["/a/2.png"], masks=[("/m/2.png", 300)]
    )
    one = pool.record(first)
    assert (one["cycle_labelled"], one["last_cycle"], one["label_source"]) == (1, 2, "/a/2.png")
    assert (one["mask_path"], one["labelled_pixels"], one["annotation_cost"]) == (
        "/m/2.png", 300, 4.0
    )  # fmt: skip
    assert pool.total_annotation_cost == 6.0
    labelled = ids_with_role(pool, LABELLED).to_pylist()
    fully = next(i for i in labelled if i != first)
    with pytest.raises(PoolStateError, match="expected one of"):  # image level: unlabelled only
        pool.record_decisions([fully], 3, "simulated", 0.9, 1.0, [True], ["/a/3.png"])
    with pytest.raises(PoolStateError, match="masks: expected a non-empty path"):
        pool.record_decisions(
            [second], 3, "simulated", 0.9, 1.0, [True], ["/a/3.png"], masks=[None]
        )


def test_only_labelled_samples_have_a_mask(pool, tmp_path):
    table = pool.table
    unlabelled_row = table.column("role").to_pylist().index(UNLABELLED)
    masks = table.column("mask_path").to_pylist()
    masks[unlabelled_row] = "/m/x.png"
    with pytest.raises(PoolStateError, match="only labelled samples have a mask_path"):
        check_whole(replace_column(table, "mask_path", masks), tmp_path)
