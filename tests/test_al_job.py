"""jobs.al end to end on a real local Ray: 2 scoring actors, Ray Train with 1 worker, SQLite MLflow."""

import shutil
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import TINY_SYNTHETIC

from jobs import al as al_job
from orchestrator.coordinator import snapshot_path
from orchestrator.pool_state import LABELLED, QUARANTINED, UNLABELLED, PoolState
from segxal.data.cityscapes import cityscapes_manifest

pytestmark = pytest.mark.slow
THETA = 0.3


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


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def straight_run(local_ray, synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("al")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    history = al_job.main(tiny(synthetic_root, root / "runs", uri, "straight", 2))
    return root / "runs" / "straight", uri, history


def test_two_cycles_on_ray(straight_run):
    run_dir, uri, history = straight_run
    assert len(history) == 3
    state = PoolState.load(run_dir / "pool_state.parquet")
    state.check_invariants()
    labelled_before = 4
    for cycle in (1, 2):
        scores = pq.read_table(
            run_dir / "cycles" / f"cycle_{cycle:02d}" / "scores.parquet"
        ).to_pylist()
        unlabelled = set(
            PoolState.load(snapshot_path(run_dir, cycle - 1)).ids(UNLABELLED).to_pylist()
        )
        assert {
            s["sample_id"] for s in scores
        } == unlabelled  # subset 1.0: every unlabelled image scored once
        top = [
            s["sample_id"] for s in sorted(scores, key=lambda s: (-s["score"], s["sample_id"]))[:2]
        ]
        decisions = pq.read_table(
            run_dir / "cycles" / f"cycle_{cycle:02d}" / "decisions.parquet"
        ).to_pylist()
        assert [d["sample_id"] for d in decisions] == top
        after = PoolState.load(snapshot_path(run_dir, cycle))
        moved = {i for i in top if after.record(i)["role"] == LABELLED}
        assert moved == {d["sample_id"] for d in decisions if d["dice"] > THETA}
        assert all(d["accepted"] == (d["dice"] > THETA) for d in decisions)
        assert after.count(LABELLED) == labelled_before + len(moved)
        labelled_before = after.count(LABELLED)
        assert history[cycle]["gate/accepted"] == len(moved)
    assert (run_dir / "cycles" / "cycle_02" / "model.pt").is_file()

    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(
        experiment_names=["al-test"], output_format="list", filter_string="tags.strategy = 'eem'"
    )
    assert run.info.status == "FINISHED" and run.data.params["al.strategy"] == "eem"
    for metric in ("val/miou", "pool/labelled_fraction", "time/train_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1, 2]
    for metric in ("gate/accepted", "gate/returned", "oracle/cost", "time/score_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2]
    assert client.get_metric_history(run.info.run_id, "val/miou")[-1].value == pytest.approx(
        history[-1]["val/miou"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "cycle_01")}
    assert (
        "cycle_01/pool_state.parquet" in artifacts and "cycle_01/cycle_01_regions.json" in artifacts
    )
    assert any(
        a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "cycle_01/panels")
    )
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]


def test_resume_after_cycle_one_matches_uninterrupted(straight_run, synthetic_root, tmp_path):
    straight_dir, _, _ = straight_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    al_job.main(tiny(synthetic_root, tmp_path / "runs", uri, "stopped", 1))
    run_dir = tmp_path / "runs" / "stopped"
    with pytest.raises(SystemExit, match="--resume"):
        al_job.main(tiny(synthetic_root, tmp_path / "runs", uri, "stopped", 2))
    al_job.main(["--resume", str(run_dir), "--quiet", "--set", "al.cycles=2"])
    assert comparable_pool_state(run_dir).equals(comparable_pool_state(straight_dir))
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val/miou")
    assert [m.step for m in history] == [0, 1, 2]  # the resumed run continued the same MLflow run


def test_a_corrupt_unlabelled_image_is_quarantined_and_the_run_goes_on(
    local_ray, synthetic_root, tmp_path
):
    root = shutil.copytree(synthetic_root, tmp_path / "data")
    pool = PoolState.create(
        tmp_path / "initial.parquet",
        cityscapes_manifest(root, "train"),
        4,
        seed=0,  # as jobs.al
        validation=cityscapes_manifest(root, "val"),
    )  # draws it (seed 0)
    victim = pool.ids(UNLABELLED)[0].as_py()
    image = Path(pool.record(victim)["image_path"])
    image.write_bytes(
        image.read_bytes()[: image.stat().st_size // 2]
    )  # the header survives: only decoding fails
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    history = al_job.main(tiny(root, tmp_path / "runs", uri, "damaged", 1))
    state = PoolState.load(tmp_path / "runs" / "damaged" / "pool_state.parquet")
    state.check_invariants()
    record = state.record(victim)
    assert record["role"] == QUARANTINED and str(image) in record["quarantine_reason"]
    assert state.ids(QUARANTINED).to_pylist() == [victim]
    assert [h["pool/quarantined"] for h in history] == [0, 1] and history[1]["gate/selected"] == 2
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    assert run.info.status == "FINISHED"
    logged = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "pool/quarantined")
    assert [(m.step, m.value) for m in logged] == [(0, 0.0), (1, 1.0)]
