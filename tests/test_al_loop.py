"""The active-learning loop against a fake backend: selection, gate, pool updates, resume."""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SIZE, FakeBackend, fake_run, ids_with_role, loop_pool

from orchestrator import parquet_io
from orchestrator.config import ActiveLearningConfig
from orchestrator.pool_state import LABELLED, QUARANTINED, UNLABELLED, PoolState
from orchestrator.records import UNREADABLE
from orchestrator.run import ActiveLearningRun, Explained, Progress
from orchestrator.run_layout import RunLayout
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.metrics import mean_dice


class DamagedPoolBackend(FakeBackend):
    """``unreadable`` ids fail to load: scoring returns them with a reason, explaining leaves them out."""

    def __init__(self, truth, tmp: Path, unreadable: set[str]):
        super().__init__(truth, tmp)
        self.unreadable = unreadable

    def score(self, cycle, checkpoint, rows, kind):
        for table in super().score(cycle, checkpoint, rows, kind):
            broken = [i in self.unreadable for i in table["sample_id"].to_pylist()]
            reasons = [
                f"{i}.png: truncated" if b else None
                for i, b in zip(table["sample_id"].to_pylist(), broken, strict=True)
            ]
            yield table.set_column(
                1,
                "score",
                pa.array(
                    [
                        None if b else v
                        for v, b in zip(table["score"].to_pylist(), broken, strict=True)
                    ],
                    pa.float64(),
                ),
            ).set_column(2, UNREADABLE, pa.array(reasons, pa.string()))

    def explain(self, cycle, checkpoint, selected, kind, panel_dir, panels):
        explained = super().explain(cycle, checkpoint, selected, kind, panel_dir, panels)
        return Explained(
            [r for r in explained.requests if r.sample_id not in self.unreadable],
            {
                i: f"{i}.png: truncated"
                for i in selected["sample_id"].to_pylist()
                if i in self.unreadable
            },
        )


@pytest.fixture
def pool(synthetic_root, tmp_path):
    return loop_pool(synthetic_root, tmp_path)


def run(run_dir, state, truth, cycles, al, progress=None, backend=None):
    return fake_run(run_dir, state, truth, cycles, al, progress=progress, backend=backend)


def test_cycles_select_top_n_and_gate_by_dice(pool, tmp_path):
    state, truth = pool
    al = ActiveLearningConfig(strategy="entropy", budget=3, subset=1.0, theta=0.9)
    owner, backend, history = run(tmp_path, state, truth, 2, al)
    final = owner.state
    PoolState.load(final.path)
    for cycle in (1, 2):
        scores = pq.read_table(
            tmp_path / "cycles" / f"cycle_{cycle:02d}" / "scores.parquet"
        ).to_pylist()
        expected = [
            r["sample_id"] for r in sorted(scores, key=lambda r: (-r["score"], r["sample_id"]))[:3]
        ]
        decisions = pq.read_table(
            tmp_path / "cycles" / f"cycle_{cycle:02d}" / "decisions.parquet"
        ).to_pylist()
        assert [d["sample_id"] for d in decisions] == expected
        before = PoolState.load(RunLayout(tmp_path).snapshot(cycle - 1))
        after = PoolState.load(RunLayout(tmp_path).snapshot(cycle))
        assert set(expected) <= set(ids_with_role(before, UNLABELLED).to_pylist())
        for decision in decisions:
            sample_id = decision["sample_id"]
            dice = mean_dice(
                torch.from_numpy(backend.prediction(sample_id)),
                torch.from_numpy(truth(sample_id)),
                19,
            )
            assert decision["dice"] == pytest.approx(dice)
            assert decision["accepted"] == (dice > 0.9)
            record = after.record(sample_id)
            assert record["role"] == (LABELLED if dice > 0.9 else UNLABELLED)
            if record["role"] == LABELLED:
                assert record["cycle_labelled"] == cycle
                relabel = np.asarray(
                    SegmentationDataset(
                        pa.table(
                            {
                                "sample_id": [sample_id],
                                "image_path": [record["image_path"]],
                                "label_path": [record["label_source"]],
                                "depth_path": [None],
                            }
                        ),
                        CITYSCAPES,
                        SampleTransform(size=SIZE),
                    )[0]["label"]
                )
                assert (
                    relabel == truth(sample_id)
                ).all()  # the accepted re-annotation is what training reads
            else:
                assert record["times_returned"] >= 1
    accepted = sum(h["gate/accepted"] for h in history[1:])
    assert 0 < accepted < 6  # the fixture's Dice values straddle theta
    assert history[-1]["pool/labelled"] == 4 + accepted
    assert backend.trained_on[-1] == sorted(ids_with_role(final, LABELLED).to_pylist())


def test_theta_zero_accepts_everything(pool, tmp_path):
    state, truth = pool
    owner, _, history = run(
        tmp_path, state, truth, 1, ActiveLearningConfig(strategy="entropy", budget=3, theta=0.0)
    )
    assert history[1]["gate/accepted"] == 3 and owner.state.count(LABELLED) == 7


class RegionlessBackend(FakeBackend):
    """Every selected image's EEM holds no region (an EEM below eem.region_threshold everywhere)."""

    def explain(self, cycle, checkpoint, selected, kind, panel_dir, panels):
        explained = super().explain(cycle, checkpoint, selected, kind, panel_dir, panels)
        blank = [
            dataclasses.replace(r, regions=[], region_map=np.zeros_like(r.region_map))
            for r in explained.requests
        ]
        return Explained(blank, explained.unreadable)


def test_selected_images_without_an_eem_region_are_reported(pool, tmp_path, caplog):
    state, truth = pool
    backend = RegionlessBackend(truth, tmp_path)
    al = ActiveLearningConfig(strategy="eem", budget=3, theta=0.0)
    with caplog.at_level(logging.WARNING, logger="orchestrator.run"):
        _, _, history = run(tmp_path, state, truth, 1, al, backend=backend)
    assert history[1]["oracle/pixels"] == 0  # the oracle corrected nothing
    assert (
        "cycle 1: no selected image has an EEM region (no pixel reaches eem.region_threshold"
        in (caplog.text)
    )


def test_resume_after_cycle_one_equals_uninterrupted(pool, tmp_path):
    state, truth = pool
    al = ActiveLearningConfig(strategy="random", budget=2, subset=0.75, theta=0.8)
    straight, _, _ = run(tmp_path / "a", state, truth, 3, al)
    run(tmp_path / "b", state, truth, 1, al)
    progress = Progress.load(RunLayout(tmp_path / "b"))
    assert progress.completed_cycle == 1
    resumed_state = PoolState.load(RunLayout(tmp_path / "b").snapshot(1))
    resumed, _, history = run(tmp_path / "b", resumed_state, truth, 3, al, progress)
    assert len(history) == 2  # only cycles 2 and 3 ran again

    def comparable(table, run_dir):
        paths = [
            None if p is None else p.replace(str(run_dir), "RUN")
            for p in table["label_source"].to_pylist()
        ]
        return table.set_column(
            table.schema.get_field_index("label_source"),
            "label_source",
            pa.array(paths, pa.string()),
        )

    assert comparable(resumed.state.table, tmp_path / "b").equals(
        comparable(straight.state.table, tmp_path / "a")
    )


def test_budget_larger_than_pool_is_refused_before_work(pool, tmp_path):
    state, truth = pool
    with pytest.raises(ValueError, match="al.budget"):
        ActiveLearningRun(
            RunLayout(tmp_path), state, ActiveLearningConfig(budget=50), CITYSCAPES, 0, None
        )
    assert not (tmp_path / "pool_state.parquet").exists()


@pytest.mark.parametrize(
    "strategy", ["entropy", "random"]
)  # found unreadable by scoring / by explaining
def test_unreadable_images_are_quarantined_and_the_run_goes_on(pool, tmp_path, strategy):
    state, truth = pool
    al = ActiveLearningConfig(strategy=strategy, budget=3, subset=1.0, theta=0.0)
    if strategy == "random":  # two of the images it picks in cycle 1, so that explaining meets them
        run(tmp_path / "clean", state, truth, 1, al)
        picked = pq.read_table(tmp_path / "clean" / "cycles" / "cycle_01" / "decisions.parquet")[
            "sample_id"
        ]
        broken = set(picked.to_pylist()[:2])
    else:  # every unlabelled image is a candidate (subset 1.0): scoring meets them
        broken = set(ids_with_role(state, UNLABELLED).to_pylist()[:2])
    owner, _, history = run(
        tmp_path / "run", state, truth, 2, al, backend=DamagedPoolBackend(truth, tmp_path, broken)
    )
    final = owner.state
    PoolState.load(final.path)
    assert set(ids_with_role(final, QUARANTINED).to_pylist()) == broken
    for sample_id in broken:
        assert (
            final.record(sample_id)["quarantine_reason"] == f"cycle 1: {sample_id}.png: truncated"
        )
    decisions = [
        d["sample_id"]
        for c in (1, 2)
        for d in pq.read_table(
            tmp_path / "run" / "cycles" / f"cycle_{c:02d}" / "decisions.parquet"
        ).to_pylist()
    ]
    assert not broken & set(decisions)
    assert history[1]["pool/quarantined"] == 2 and history[2]["pool/quarantined"] == 2
    assert history[1]["gate/selected"] == (
        1 if strategy == "random" else 3
    )  # explaining lost 2 of the 3
    assert PoolState.load(RunLayout(tmp_path / "run").snapshot(1)).count(QUARANTINED) == 2


@pytest.mark.parametrize("strategy", ["entropy", "random"])
def test_cycles_on_a_pool_streamed_in_small_row_groups_match_one_group(
    pool, tmp_path, monkeypatch, strategy
):
    """The run streams the pool state, D^S and its scores in row groups: cut into groups of 3 rows,
    a run selects, gates and writes exactly what it does when everything fits in one group."""
    state, truth = pool
    al = ActiveLearningConfig(strategy=strategy, budget=3, subset=0.75, theta=0.8)
    whole, _, _ = run(tmp_path / "whole", state, truth, 2, al)
    monkeypatch.setattr(parquet_io, "ROWS_PER_BATCH", 3)
    grouped, _, _ = run(tmp_path / "grouped", state, truth, 2, al)
    assert pq.ParquetFile(grouped.state.path).num_row_groups > 4
    for cycle in (1, 2):
        for name in ("candidates.parquet", "decisions.parquet", "train_manifest.parquet"):
            assert pq.read_table(
                RunLayout(tmp_path / "grouped").cycle_dir(cycle) / name
            ).to_pylist() == [
                {
                    k: v.replace(str(tmp_path / "whole"), str(tmp_path / "grouped"))
                    if isinstance(v, str)
                    else v
                    for k, v in row.items()
                }
                for row in pq.read_table(
                    RunLayout(tmp_path / "whole").cycle_dir(cycle) / name
                ).to_pylist()
            ]
