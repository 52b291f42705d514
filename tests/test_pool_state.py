import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from orchestrator import pool_state as ps
from orchestrator.pool_state import (
    LABELLED,
    QUARANTINED,
    UNLABELLED,
    VALIDATION,
    PoolState,
    PoolStateError,
    PoolStateFileError,
    checksum_path,
    previous_path,
)
from segxal.data.manifest import MANIFEST_SCHEMA


def make_manifest(n: int, split: str = "train", prefix: str = "s", with_labels: bool = True) -> pa.Table:
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
def pool() -> PoolState:
    return PoolState.from_manifest(make_manifest(20), 0.25, seed=0, validation=make_manifest(4, "val", prefix="v"))


def first_unlabelled(state: PoolState, k: int) -> list[str]:
    return state.ids(UNLABELLED)[:k].to_pylist()


# ---- construction ------------------------------------------------------------------------------------


def test_initial_split_is_deterministic_from_the_seed_and_input_order(pool):
    assert pool.counts() == {LABELLED: 5, UNLABELLED: 15, VALIDATION: 4, QUARANTINED: 0}
    manifest = make_manifest(20)
    shuffled = manifest.take(np.random.default_rng(3).permutation(20))
    again = PoolState.from_manifest(shuffled, 0.25, seed=0, validation=make_manifest(4, "val", prefix="v"))
    assert again == pool
    other = PoolState.from_manifest(make_manifest(20), 0.25, seed=1, validation=make_manifest(4, "val", prefix="v"))
    assert other.ids(LABELLED).to_pylist() != pool.ids(LABELLED).to_pylist()
    assert PoolState.from_manifest(make_manifest(20), 5, seed=0).ids(LABELLED) == pool.ids(LABELLED)


def test_initial_rows_and_queries(pool):
    table = pool.table
    assert table.column("sample_id").to_pylist() == sorted(table.column("sample_id").to_pylist())
    assert pool.ids(VALIDATION).to_pylist() == ["v000", "v001", "v002", "v003"]
    labelled = pool.record(pool.ids(LABELLED)[0].as_py())
    assert labelled["cycle_labelled"] == 0 and labelled["label_source"] == labelled["label_path"]
    assert labelled["oracle"] is None and labelled["times_returned"] == 0 and labelled["annotation_cost"] == 0.0
    unlabelled = pool.record(pool.ids(UNLABELLED)[0].as_py())
    assert unlabelled["cycle_labelled"] == -1 and unlabelled["label_source"] is None and unlabelled["dice"] is None
    assert pool.training_pool_size == 20 and pool.labelled_fraction == 0.25
    with pytest.raises(ValueError, match="unknown role 'train'"):
        pool.ids("train")


def test_validation_by_split_column():
    manifest = pa.concat_tables([make_manifest(10), make_manifest(3, "val", prefix="v")])
    state = PoolState.from_manifest(manifest, 2, seed=0, validation_split="val")
    assert state.counts() == {LABELLED: 2, UNLABELLED: 8, VALIDATION: 3, QUARANTINED: 0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial_labelled=21), r"initial_labelled 21 is larger than the pool \(20 samples\)"),
        (dict(initial_labelled=0), "initial_labelled must be positive"),
        (dict(initial_labelled=1.5), r"initial_labelled fraction must be in \(0, 1\]"),
        (dict(initial_labelled=2, validation=make_manifest(2, "val", prefix="s")), r"duplicate sample ids \['s000', 's001'\]"),
        (dict(initial_labelled=2, validation=make_manifest(2, "val", prefix="v", with_labels=False)), r"need a label_path; missing for \['v000', 'v001'\]"),
        (dict(initial_labelled=2, validation_split="val"), "the training pool is empty"),
    ],
)
def test_construction_errors(kwargs, match):
    manifest = make_manifest(20, split="val" if kwargs.get("validation_split") else "train")
    with pytest.raises(ValueError, match=match):
        PoolState.from_manifest(manifest, seed=0, **kwargs)


def test_construction_needs_labels_for_the_initial_pool_and_manifest_columns():
    with pytest.raises(PoolStateError, match="need a label_path"):
        PoolState.from_manifest(make_manifest(5, with_labels=False), 2, seed=0)
    with pytest.raises(PoolStateError, match=r"manifest: missing columns \['image_path'\]"):
        PoolState.from_manifest(make_manifest(5).drop_columns(["image_path"]), 2, seed=0)


# ---- transitions ------------------------------------------------------------------------------------


def test_accept_return_and_quarantine_are_pure_and_keep_invariants(pool):
    a, b, c = first_unlabelled(pool, 3)
    before = pool.table
    after = pool.accept([a, b], cycle=1, oracle="pseudo", dice=[0.8, 0.9], cost=[3.0, 4.0], label_paths=["/r/a.png", "/r/b.png"])
    assert pool.table.equals(before, check_metadata=True) and pool.count(LABELLED) == 5  # input untouched
    assert after.counts() == {LABELLED: 7, UNLABELLED: 13, VALIDATION: 4, QUARANTINED: 0}
    row = after.record(a)
    assert (row["role"], row["cycle_labelled"], row["last_cycle"], row["oracle"]) == (LABELLED, 1, 1, "pseudo")
    assert (row["dice"], row["annotation_cost"], row["label_source"]) == (0.8, 3.0, "/r/a.png")
    assert after.labelled_fraction == 7 / 20

    returned = after.return_to_pool([c], cycle=1, oracle="simulated", dice=[0.2], cost=1.5)
    returned = returned.return_to_pool([c], cycle=2, oracle="simulated", dice=[0.3], cost=1.0)
    row = returned.record(c)
    assert (row["role"], row["times_returned"], row["annotation_cost"], row["dice"], row["last_cycle"]) == (UNLABELLED, 2, 2.5, 0.3, 2)
    assert row["cycle_labelled"] == -1 and row["label_source"] is None

    quarantined = returned.quarantine(a, "label file unreadable")
    row = quarantined.record(a)
    assert row["role"] == QUARANTINED and row["quarantine_reason"] == "label file unreadable"
    assert quarantined.counts()[LABELLED] == 6 and len(quarantined) == len(pool) == 24
    assert quarantined.training_pool_size == 19
    quarantined.check_invariants()
    assert pool.accept([], 1, "pseudo", [], 0.0, []) is pool


def test_accept_with_nan_dice_stores_null(pool):
    (a,) = first_unlabelled(pool, 1)
    assert pool.accept([a], 1, "pseudo", float("nan"), 0.0, ["/r/a.png"]).record(a)["dice"] is None


def test_transition_errors_name_the_ids(pool):
    labelled = pool.ids(LABELLED)[0].as_py()
    (a,) = first_unlabelled(pool, 1)
    with pytest.raises(PoolStateError, match=rf"accept: sample ids \['{labelled}'\] have role \['labelled'\], expected one of \['unlabelled'\]"):
        pool.accept([labelled], 1, "pseudo", [0.9], 0.0, ["/r.png"])
    with pytest.raises(PoolStateError, match=r"unknown sample ids \['nope'\]"):
        pool.return_to_pool(["nope"], 1, "pseudo", [0.1])
    with pytest.raises(PoolStateError, match="duplicate sample ids"):
        pool.accept([a, a], 1, "pseudo", [0.9, 0.9], 0.0, ["/r.png", "/r.png"])
    with pytest.raises(PoolStateError, match="cycle must be an int >= 1"):
        pool.accept([a], 0, "pseudo", [0.9], 0.0, ["/r.png"])
    with pytest.raises(PoolStateError, match=r"dice must be in \[0, 1\]"):
        pool.accept([a], 1, "pseudo", [1.2], 0.0, ["/r.png"])
    with pytest.raises(PoolStateError, match="label_paths: expected 1 non-empty paths"):
        pool.accept([a], 1, "pseudo", [0.9], 0.0, [])
    with pytest.raises(PoolStateError, match="cost must be finite and >= 0"):
        pool.return_to_pool([a], 1, "pseudo", [0.1], -1.0)
    with pytest.raises(PoolStateError, match="dice: expected 1 values"):
        pool.return_to_pool([a], 1, "pseudo", [0.1, 0.2])
    with pytest.raises(PoolStateError, match="oracle must be a non-empty string"):
        pool.return_to_pool([a], 1, "", [0.1])
    state = pool.quarantine(a, "broken")
    with pytest.raises(PoolStateError, match=r"quarantine: .* have role \['quarantined'\]"):
        state.quarantine(a, "again")
    with pytest.raises(PoolStateError, match="reason must be a non-empty string"):
        pool.quarantine(a, "")


# ---- invariants --------------------------------------------------------------------------------------


def replace_column(table: pa.Table, name: str, values) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), pa.array(values, type=table.schema.field(name).type))


def test_broken_tables_are_rejected(pool):
    table = pool.table
    ids = table.column("sample_id").to_pylist()
    roles = table.column("role").to_pylist()
    labelled_row = roles.index(LABELLED)
    unlabelled_row = roles.index(UNLABELLED)

    duplicated = list(ids)
    duplicated[1] = ids[0]
    with pytest.raises(PoolStateError, match=rf"duplicate sample ids \['{ids[0]}'\]"):
        PoolState(replace_column(table, "sample_id", duplicated))
    with pytest.raises(PoolStateError, match="not sorted"):
        PoolState(replace_column(table, "sample_id", ids[::-1]))
    with pytest.raises(PoolStateError, match="has 23 samples but was created with 24"):
        PoolState(table.slice(1))
    with pytest.raises(PoolStateError, match="sample ids differ from those it was created with"):
        PoolState(replace_column(table, "sample_id", ids[:-1] + ["zzz"]))
    bad_role = list(roles)
    bad_role[0] = "train"
    with pytest.raises(PoolStateError, match=r"column 'role': values \['train'\]"):
        PoolState(replace_column(table, "role", bad_role))
    label_source = table.column("label_source").to_pylist()
    label_source[labelled_row] = None
    with pytest.raises(PoolStateError, match=rf"labelled samples need a label_source; broken for sample ids \['{ids[labelled_row]}'\]"):
        PoolState(replace_column(table, "label_source", label_source))
    cycles = table.column("cycle_labelled").to_pylist()
    cycles[unlabelled_row] = 2
    with pytest.raises(PoolStateError, match="unlabelled and validation samples need cycle_labelled = -1"):
        PoolState(replace_column(table, "cycle_labelled", cycles))
    quarantined_role = list(roles)
    quarantined_role[unlabelled_row] = QUARANTINED
    with pytest.raises(PoolStateError, match="quarantine_reason must be set exactly for quarantined samples"):
        PoolState(replace_column(table, "role", quarantined_role))
    with pytest.raises(PoolStateError, match="annotation_cost must be finite and >= 0"):
        PoolState(replace_column(table, "annotation_cost", [-1.0] + [0.0] * 23))
    with pytest.raises(PoolStateError, match=r"dice must be in \[0, 1\] or null"):
        PoolState(replace_column(table, "dice", [1.5] + [None] * 23))
    with pytest.raises(PoolStateError, match="column 'role': 1 nulls"):
        PoolState(replace_column(table, "role", [None] + roles[1:]))
    with pytest.raises(PoolStateError, match="pool table is missing columns"):
        PoolState(table.drop_columns(["dice"]))
    with pytest.raises(PoolStateError, match="metadata segxal.pool_state.format"):
        PoolState(table.replace_schema_metadata(None))
    with pytest.raises(PoolStateError, match="column 'times_returned' has type int64"):
        PoolState(table.set_column(table.schema.get_field_index("times_returned"), "times_returned", pa.array([0] * 24, pa.int64())))


# ---- persistence -------------------------------------------------------------------------------------


def test_save_load_round_trip(pool, tmp_path):
    a, b = first_unlabelled(pool, 2)
    state = pool.accept([a], 1, "pseudo", [0.7], 2.0, ["/r/a.png"]).return_to_pool([b], 1, "pseudo", [0.1], 1.0)
    path = state.save(tmp_path / "run" / "state.parquet")
    loaded = PoolState.load(path)
    assert loaded == state and loaded.table.schema.metadata == state.table.schema.metadata
    digest, name = checksum_path(path).read_text().split()
    assert name == "state.parquet" and len(digest) == 64
    assert sorted(os.listdir(path.parent)) == ["state.parquet", "state.parquet.sha256"]


def saved_twice(pool: PoolState, path) -> tuple[PoolState, PoolState]:
    (a,) = first_unlabelled(pool, 1)
    second = pool.accept([a], 1, "pseudo", [0.9], 1.0, ["/r/a.png"])
    pool.save(path)
    second.save(path)
    assert PoolState.load(path) == second and PoolState.load(previous_path(path)) == pool
    return pool, second


def test_truncated_file_is_detected_and_the_previous_state_kept(pool, tmp_path):
    path = tmp_path / "state.parquet"
    first, second = saved_twice(pool, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PoolStateFileError, match=r"state\.parquet: checksum mismatch .* truncated or corrupted; a previous state is kept at .*state\.prev\.parquet"):
        PoolState.load(path)
    with pytest.warns(UserWarning, match="loaded the previous good state"):
        assert PoolState.load(path, fallback=True) == first
    # a later save must not rotate the corrupt file over the good previous one
    third = second.quarantine(second.ids(UNLABELLED)[0].as_py(), "test")
    with pytest.warns(UserWarning, match="failed verification"):
        third.save(path)
    assert PoolState.load(path) == third and PoolState.load(previous_path(path)) == first


@pytest.mark.parametrize("where", [0, 0.5, -10, -1])
def test_flipped_byte_is_detected(pool, tmp_path, where):
    path = tmp_path / "state.parquet"
    first, _ = saved_twice(pool, path)
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
    pool.save(path)
    checksum_path(path).unlink()
    with pytest.raises(PoolStateFileError, match="checksum file state.parquet.sha256 not found"):
        PoolState.load(path)


def test_a_valid_checksum_over_a_non_pool_file_is_rejected(pool, tmp_path):
    path = tmp_path / "state.parquet"
    pq.write_table(pool.table.slice(1), path)  # written around save(): a lost row
    ps._write_checksum(path, ps._sha256_file(path))
    with pytest.raises(PoolStateFileError, match="invalid pool state .*created with 24"):
        PoolState.load(path)


def test_crash_while_writing_leaves_no_partial_file(pool, tmp_path, monkeypatch):
    path = tmp_path / "state.parquet"
    first, second = saved_twice(pool, path)
    listing = sorted(os.listdir(tmp_path))

    def crash(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ps.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        second.quarantine(first_unlabelled(second, 1)[0], "x").save(path)
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary file left behind
    assert PoolState.load(path) == second and PoolState.load(previous_path(path)) == first


def test_crash_between_rotation_and_rename_keeps_the_last_good_state(pool, tmp_path, monkeypatch):
    path = tmp_path / "state.parquet"
    first, second = saved_twice(pool, path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(path):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(ps.os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        second.quarantine(first_unlabelled(second, 1)[0], "x").save(path)
    monkeypatch.undo()
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    with pytest.raises(PoolStateFileError, match="not found; a previous state is kept"):
        PoolState.load(path)
    with pytest.warns(UserWarning):
        assert PoolState.load(path, fallback=True) == second


def test_crash_before_the_checksum_is_written_keeps_the_last_good_state(pool, tmp_path, monkeypatch):
    path = tmp_path / "state.parquet"
    first, second = saved_twice(pool, path)
    real_write = ps._write_checksum

    def write_checksum(target, digest):
        if target == path:
            raise OSError("power cut")
        real_write(target, digest)

    monkeypatch.setattr(ps, "_write_checksum", write_checksum)
    with pytest.raises(OSError, match="power cut"):
        second.quarantine(first_unlabelled(second, 1)[0], "x").save(path)
    monkeypatch.undo()
    with pytest.raises(PoolStateFileError, match="checksum mismatch"):
        PoolState.load(path)
    with pytest.warns(UserWarning):
        assert PoolState.load(path, fallback=True) == second


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
    state = PoolState.from_manifest(manifest, 0.1, seed=0)
    assert state.count(LABELLED) == 100_000
    chosen = state.ids(UNLABELLED)[:1000]
    state = state.accept(chosen, 1, "pseudo", np.full(1000, 0.9), 1.0, pc.binary_join_element_wise("/r/", chosen, ".png", ""))
    path = state.save(tmp_path / "state.parquet")
    loaded = PoolState.load(path)
    assert loaded.count(LABELLED) == 101_000 and len(loaded) == n


def test_orchestrator_core_does_not_import_ray():
    code = "import sys, orchestrator.pool_state, orchestrator.strategies, orchestrator.gate; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
