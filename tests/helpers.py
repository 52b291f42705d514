"""Helpers shared by test modules (no test module imports another)."""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.autoscaler
import torch
import yaml
from conftest import TINY_SYNTHETIC
from procfs import cpu_ticks

from actors.ray_train import TrainingJob
from actors.scoring import ScorerPool
from orchestrator.oracles import AnnotationRequest, DatasetGroundTruth, SimulatedOracle
from orchestrator.pool_state import PoolState
from orchestrator.records import UNREADABLE
from orchestrator.run import ActiveLearningRun, Explained, TrainOutcome
from orchestrator.run_layout import RunLayout
from orchestrator.strategies import RegionSpec, ScoreKind
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES, IGNORE_INDEX
from segxal.data.region_labels import labelled_mask, read_region_labels
from segxal.eem.config import EEMConfig
from segxal.eem.regions import cell_regions, extract_regions, queried_region_map
from segxal.models.unet import UNet, UNetConfig
from segxal.training import TrainConfig

SCORER_ARGS = {
    "eem": EEMConfig(min_region_area=2),
    "label_set": "cityscapes",
    "size": None,
    "batch_size": 1,
    "device": "cpu",
}

# How long a test waits for a service it started (an MLflow server, a Ray head and its job agent) to
# be ready before it fails saying what it waited for: generous, as a loaded 2-core machine is slow.
SERVICE_WAIT_S = float(os.environ.get("SEGXAL_TEST_SERVICE_WAIT_S", "300"))
SIZE = (16, 32)  # the loop tests' scoring resolution
FAKE_THRESHOLD = 0.5  # the fake backend's EEM region threshold
THETA = 0.3  # the tiny job's Dice gate


def pool_rows(synthetic_root, copies: int) -> pa.Table:
    """The training images ``copies`` times over, each copy under its own ids: a pass long enough to
    be interrupted."""
    manifest = cityscapes_manifest(synthetic_root, "train")
    column = manifest.schema.get_field_index("sample_id")
    ids = manifest["sample_id"].to_pylist()
    return pa.concat_tables(
        [
            manifest.set_column(column, "sample_id", pa.array([f"{i}#{k}" for i in ids]))
            for k in range(copies)
        ]
    )


def tiny_checkpoint() -> dict:
    torch.manual_seed(0)
    return UNet(UNetConfig(num_classes=19, width=4, depth=2)).to_checkpoint()


def actor_pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda scorer: os.getpid()))


def model_version(actor) -> int | None:
    """The model version the actor's current process loaded (None: it has scored nothing)."""
    return ray.get(actor.__ray_call__.remote(lambda scorer: scorer.version))


def pass_under_way(pool: ScorerPool, rows: pa.Table, pid: int) -> tuple[threading.Thread, dict]:
    """A pass started in the background (its thread, and its outcome once done: ``table`` or ``error``),
    returned as soon as the actor process ``pid`` works on it (0.05 s of CPU) while it still runs."""
    idle = cpu_ticks(pid)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["table"] = pool.score(rows, ScoreKind.EEM)
        except BaseException as error:  # reported by the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while cpu_ticks(pid) < idle + 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive(), "the pass ended before the fault"
    return thread, outcome


def assert_scored_once_like(result: pa.Table, reference: pa.Table, rows: pa.Table) -> None:
    ids = result["sample_id"].to_pylist()
    assert Counter(ids) == Counter(rows["sample_id"].to_pylist())  # every id, exactly once
    assert ids == reference["sample_id"].to_pylist()
    np.testing.assert_allclose(
        result["score"].to_numpy(), reference["score"].to_numpy(), rtol=1e-6, atol=1e-9
    )


CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def score_of(sample_id: str) -> float:
    return (zlib.crc32(sample_id.encode()) % 4) / 4  # few distinct values: ties are common


class FakeBackend:
    """Predictions are the truth with a stripe of rows wrong, wider for some ids, so Dice varies."""

    def __init__(self, truth, tmp: Path):
        self.truth, self.tmp = truth, tmp
        self.trained_on = []

    def train(self, cycle, train, val, init_checkpoint):
        path = self.tmp / f"fake_{cycle}.pt"
        model = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=4, depth=2))
        torch.save(
            {"cycle": cycle, "model": model.to_checkpoint()}, path
        )  # a real one: jobs log it
        ids = [i for table in train for i in table["sample_id"].to_pylist()]
        list(val)
        self.trained_on.append(sorted(ids))
        return TrainOutcome(path, {"val/miou": len(ids) / 100})

    def score(self, cycle, checkpoint, rows, kind):
        if isinstance(kind, RegionSpec):
            yield from (self.region_scores(table, kind) for table in rows)
            return
        for table in rows:
            ids = table["sample_id"].to_pylist()
            values = [self.value(i, kind) for i in ids]
            yield pa.table(
                {"sample_id": ids, kind.column: values, UNREADABLE: [None] * len(ids)},
                schema=kind.schema,
            )

    def value(self, sample_id, kind):
        if kind is ScoreKind.EMBEDDING:
            return [zlib.crc32((str(k) + sample_id).encode()) % 97 / 97 for k in range(4)]
        return score_of(sample_id)

    def prediction(self, sample_id):
        truth = self.truth(sample_id)
        wrong = truth.copy()
        rows = zlib.crc32(sample_id.encode()) % 5
        wrong[:rows] = (wrong[:rows] + 1) % 19
        return wrong

    def values(self, sample_id):
        """A fixed smooth map in [0, 1] (the fake EEM / entropy), blobs placed by the id."""
        rows, columns = np.mgrid[: SIZE[0], : SIZE[1]]
        phase = zlib.crc32(sample_id.encode()) % 628 / 100
        return (np.sin(rows / 2.5 + phase) * np.cos(columns / 4 + phase) + 1) / 2

    def region_records(self, sample_id, mask_path, spec):
        labelled = labelled_mask(read_region_labels(mask_path, SIZE))
        if spec.source == "cells":
            return cell_regions(
                self.values(sample_id), self.prediction(sample_id), labelled, spec.cell
            )
        masked = np.where(labelled, -np.inf, self.values(sample_id))
        return extract_regions(masked, self.prediction(sample_id), FAKE_THRESHOLD, 2, 10)

    def region_scores(self, table, spec):
        rows = []
        for sample_id, mask_path in zip(
            table["sample_id"].to_pylist(), table["mask_path"].to_pylist(), strict=True
        ):
            records = self.region_records(sample_id, mask_path, spec)
            rows += [
                {
                    "sample_id": sample_id,
                    "region": r["id"],
                    "score": None if spec.kind is None else r["mean_eem"],
                    "pixels": r["area"],
                    "record": json.dumps(r),
                }
                for r in records
            ] or [{"sample_id": sample_id}]
        return pa.Table.from_pylist(rows, schema=spec.schema)

    def explain(self, cycle, checkpoint, selected, kind, panel_dir, panels, queried=None):
        requests = []
        for i, p, label, mask_path in zip(
            *(
                selected[c].to_pylist()
                for c in ("sample_id", "image_path", "label_path", "mask_path")
            ),
            strict=True,
        ):
            if queried is None:
                regions, area = [{"id": 1}], np.ones(SIZE, np.int32)
            else:
                labelled = labelled_mask(read_region_labels(mask_path, SIZE))
                regions = queried[i]
                area = queried_region_map(self.values(i), labelled, regions)
            requests.append(
                AnnotationRequest(
                    i,
                    p,
                    self.prediction(i),
                    self.prediction(i),
                    np.ones(SIZE, np.float32),
                    area,
                    regions,
                    label_path=label,
                    queried_regions_only=queried is not None,
                )
            )
        return Explained(requests)


def loop_pool(synthetic_root, folder: Path) -> tuple[PoolState, Callable[[str], np.ndarray]]:
    """The loop tests' initial pool (4 of 12 labelled, seed 3) and its ground truth at ``SIZE``."""
    train = cityscapes_manifest(synthetic_root, "train")
    val = cityscapes_manifest(synthetic_root, "val")
    state = PoolState.create(
        folder / "initial" / "pool_state.parquet", train, 4, seed=3, validation=val
    )
    return state, ground_truth(train, SIZE)


def fake_run(run_dir: Path, state, truth, cycles: int, al, *, progress=None, backend=None,
             oracle=None, image_size=None):  # fmt: skip
    """``al`` run for ``cycles`` on a fake backend (seed 3, the simulated oracle unless given):
    (the run, the backend, each cycle's metrics)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = ActiveLearningRun(
        RunLayout(run_dir),
        state,
        al,
        CITYSCAPES,
        seed=3,
        oracle=oracle or SimulatedOracle(DatasetGroundTruth(CITYSCAPES, SIZE)),
        progress=progress,
        image_size=image_size,
    )
    backend = backend or FakeBackend(truth, run_dir)
    return owner, backend, owner.run(backend, cycles)


def ground_truth(manifest: pa.Table, size: tuple[int, int]) -> Callable[[str], np.ndarray]:
    """sample id -> its label in train ids at ``size``: what the simulated annotator corrects with."""
    dataset = SegmentationDataset(manifest, CITYSCAPES, SampleTransform(size=size))
    index = {s: i for i, s in enumerate(manifest["sample_id"].to_pylist())}
    return lambda sample_id: dataset[index[sample_id]]["label"].numpy().astype(np.uint8)


def tiny_training_job(synthetic_root, epochs: int) -> TrainingJob:
    """A small U-Net on the tiny synthetic dataset at 32x64."""
    return TrainingJob(
        train_manifest=cityscapes_manifest(synthetic_root, "train"),
        val_manifest=cityscapes_manifest(synthetic_root, "val"),
        label_set="cityscapes",
        unet=UNetConfig(num_classes=19, width=4, depth=2),
        train=TrainConfig(epochs=epochs, batch_size=4, lr=0.01, device="cpu"),
        train_transform=SampleTransform(size=(32, 64), augment=True),
        val_transform=SampleTransform(size=(32, 64)),
    )


def write_config(tmp_path, synthetic_root, tracking_uri, **pebal):
    config = {
        "name": "pebal-test",
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        "data": {
            "dataset": "synthetic",
            "root": str(synthetic_root),
            "image_size": [64, 128],
            "synthetic": asdict(TINY_SYNTHETIC),
        },
        "model": {"width": 8, "depth": 3},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "device": "cpu"},
        "pebal": {
            "m_in": -4.0,
            "m_out": -2.0,
            "trainable": ["decoder.2", "head"],
            "benchmarks": [str(synthetic_root / "anomaly")],
            "panel_images": 2,
            "finetune": {"epochs": 2, "batch_size": 4, "device": "cpu"},
            **pebal,
        },
        "tracking": {"tracking_uri": tracking_uri, "experiment": "pebal-test"},
    }
    path = tmp_path / "pebal.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


REPO = Path(__file__).resolve().parents[1]


def tiny(synthetic_root, output_dir, tracking_uri, name, cycles):
    settings = {
        "name": name,
        "output_dir": output_dir,
        "tracking.tracking_uri": tracking_uri,
        "tracking.experiment": "al-test",
        "data.root": synthetic_root,
        "data.image_size": "[32, 64]",
        **{f"data.synthetic.{k}": v for k, v in TINY_SYNTHETIC.__dict__.items()},
        "model.width": 4,
        "model.depth": 2,
        "train.epochs": 1,
        "train.batch_size": 4,
        "al.cycles": cycles,
        "al.initial_labelled": 4,
        "al.budget": 2,
        "al.subset": 1.0,
        "al.theta": THETA,
        "al.num_scorers": 2,
        "al.panels": 1,
        "eem.min_region_area": 2,
    }
    return ["--config", "jobs/configs/demo.yaml", "--quiet"] + [
        a for k, v in settings.items() for a in ("--set", f"{k}={v}")
    ]


def comparable_pool_state(run_dir) -> pa.Table:
    """A run's final pool state with its run folder in paths (accepted labels) written as RUN."""
    table = PoolState.load(run_dir / "pool_state.parquet").table
    sources = [
        None if s is None else s.replace(str(run_dir), "RUN")
        for s in table["label_source"].to_pylist()
    ]
    return table.set_column(
        table.schema.get_field_index("label_source"), "label_source", pa.array(sources, pa.string())
    )


def ids_with_role(state, role: str) -> pa.StringArray:
    """The sorted sample ids of ``state`` (a PoolState) with ``role``."""
    table = state.table
    return pc.filter(table["sample_id"], pc.equal(table["role"], role)).combine_chunks()


def accept(pool, ids, cycle, oracle, dice, cost, label_paths):
    """The gate accepts every one of ``ids``: one transition of ``pool``."""
    pool.record_decisions(ids, cycle, oracle, dice, cost, [True] * len(ids), label_paths)


def return_to_pool(pool, ids, cycle, oracle, dice, cost=0.0):
    """The gate returns every one of ``ids``: one transition of ``pool``."""
    pool.record_decisions(ids, cycle, oracle, dice, cost, [False] * len(ids), [None] * len(ids))


def sklearn_miou(model, dataset, num_classes: int) -> float:
    """mIoU of ``model`` on ``dataset`` from scikit-learn's confusion matrix over the labelled pixels
    (the classes in the labels or the prediction, as mmsegmentation's nan-mean counts them)."""
    from sklearn.metrics import confusion_matrix
    from torch.utils.data import DataLoader

    truth, predicted = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=4):
            label = batch["label"].numpy().ravel()
            keep = label != IGNORE_INDEX
            truth.append(label[keep])
            predicted.append(model(batch["image"]).argmax(1).numpy().ravel()[keep])
    matrix = confusion_matrix(
        np.concatenate(truth), np.concatenate(predicted), labels=range(num_classes)
    )
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    present = union > 0
    return float((np.diag(matrix)[present] / union[present]).mean())
