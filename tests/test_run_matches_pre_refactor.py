"""The same seed picks the same images as before the architecture change.

``data/pre_refactor_selections.json`` was written by the pre-change loop (``orchestrator.loop.run_cycles``
with the ``Coordinator``, commit e79fa53) on this setup: the tiny synthetic set, 3 initial labelled images
(seed 5), D^S of 6, a budget of 2, theta 0.72, 3 cycles, the simulated oracle, and a fake backend whose
scores, embeddings and predictions are fixed functions of the sample id. Every strategy must end with the
same pool state rows (roles, cycles, Dice, times returned) and accept as many images per cycle.
"""

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from orchestrator.config import ActiveLearningConfig
from orchestrator.oracles import AnnotationRequest, DatasetGroundTruth, SimulatedOracle
from orchestrator.pool_state import PoolState
from orchestrator.records import UNREADABLE
from orchestrator.run import ActiveLearningRun, Explained, TrainOutcome
from orchestrator.run_layout import RunLayout
from orchestrator.strategies import ScoreKind
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.labels import CITYSCAPES

RECORD = json.loads((Path(__file__).parent / "data" / "pre_refactor_selections.json").read_text())
SIZE = (16, 32)


def crc(sample_id: str, salt: str = "") -> int:
    return zlib.crc32((salt + sample_id).encode())


class RecordedBackend:
    """The fake backend the record was made with."""

    def __init__(self, folder: Path, truth: DatasetGroundTruth) -> None:
        self.folder, self.truth = folder, truth

    def train(self, cycle, train, val, init_checkpoint):
        ids = [i for table in train for i in table["sample_id"].to_pylist()]
        list(val)
        path = self.folder / f"m{cycle}.pt"
        torch.save({}, path)
        return TrainOutcome(path, {"val/miou": len(ids) / 100})

    def score(self, cycle, checkpoint, rows, kind):
        for table in rows:
            ids = table["sample_id"].to_pylist()
            if kind is ScoreKind.EMBEDDING:
                values = [[crc(i, str(k)) % 97 / 97 for k in range(4)] for i in ids]
            else:
                values = [(crc(i) % 5) / 5 for i in ids]
            yield pa.table(
                {"sample_id": ids, kind.column: values, UNREADABLE: [None] * len(ids)},
                schema=kind.schema,
            )

    def explain(self, cycle, checkpoint, selected, kind, panel_dir, panels):
        requests = []
        for i, image, label in zip(
            *(selected[c].to_pylist() for c in ("sample_id", "image_path", "label_path")),
            strict=True,
        ):
            zeros = np.zeros(SIZE, np.uint8)
            ask = AnnotationRequest(i, image, zeros, zeros, np.ones(SIZE, np.float32),
                                    np.ones(SIZE, np.int32), [{"id": 1}], label_path=label)  # fmt: skip
            prediction = self.truth(ask).copy()
            prediction[: crc(i) % 9] = (prediction[: crc(i) % 9] + 1) % 19
            requests.append(AnnotationRequest(i, image, prediction, prediction,
                                              np.ones(SIZE, np.float32), np.ones(SIZE, np.int32),
                                              [{"id": 1}], label_path=label))  # fmt: skip
        return Explained(requests)


@pytest.mark.parametrize("strategy", sorted(RECORD))  # the strategies the pre-change loop had
def test_every_strategy_selects_and_gates_as_before_the_change(strategy, synthetic_root, tmp_path):
    train = cityscapes_manifest(synthetic_root, "train")
    val = cityscapes_manifest(synthetic_root, "val")
    truth = DatasetGroundTruth(CITYSCAPES, SIZE)
    state = PoolState.create(tmp_path / "initial.parquet", train, 3, seed=5, validation=val)
    al = ActiveLearningConfig(strategy=strategy, budget=2, subset=6, theta=0.72, cycles=3)
    run = ActiveLearningRun(RunLayout(tmp_path), state, al, CITYSCAPES, 5, SimulatedOracle(truth))
    history = run.run(RecordedBackend(tmp_path, truth), 3)
    columns = ["sample_id", "role", "cycle_labelled", "last_cycle", "dice", "times_returned"]
    rows = PoolState.load(tmp_path / "pool_state.parquet").table.select(columns).to_pylist()
    expected = RECORD[strategy]
    assert [h.get("gate/accepted") for h in history] == expected["accepted"]
    assert len(rows) == len(expected["rows"])
    for row, old in zip(rows, expected["rows"], strict=True):
        assert {k: v for k, v in row.items() if k != "dice"} == {
            k: v for k, v in old.items() if k != "dice"
        }
        assert row["dice"] == (
            None if old["dice"] is None else pytest.approx(old["dice"], rel=1e-12)
        )
