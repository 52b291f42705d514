"""jobs.al end to end on a real local Ray: 2 scoring actors, training in the driver (the demo's
``scaling.num_workers: 0``; one test on Ray Train with 1 worker), SQLite MLflow."""

import json
import os
import shutil
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SERVICE_WAIT_S, THETA, comparable_pool_state, ids_with_role, tiny

from jobs import al as al_job
from jobs import explain as explain_job
from orchestrator.pool_state import LABELLED, QUARANTINED, UNLABELLED, PoolState
from orchestrator.run_layout import RunLayout
from segxal.data.cityscapes import cityscapes_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight_run(local_ray, synthetic_root, tmp_path_factory):
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a sample within this short run
    root = tmp_path_factory.mktemp("al")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    history = al_job.main(tiny(synthetic_root, root / "runs", uri, "straight", 2))
    return root / "runs" / "straight", uri, history


def test_two_cycles_on_ray(straight_run):
    run_dir, uri, history = straight_run
    assert len(history) == 3
    state = PoolState.load(run_dir / "pool_state.parquet")
    PoolState.load(state.path)
    labelled_before = 4
    for cycle in (1, 2):
        scores = pq.read_table(
            run_dir / "cycles" / f"cycle_{cycle:02d}" / "scores.parquet"
        ).to_pylist()
        unlabelled = set(
            ids_with_role(
                PoolState.load(RunLayout(run_dir).snapshot(cycle - 1)), UNLABELLED
            ).to_pylist()
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
        after = PoolState.load(RunLayout(run_dir).snapshot(cycle))
        moved = {i for i in top if after.record(i)["role"] == LABELLED}
        assert moved == {d["sample_id"] for d in decisions if d["dice"] > THETA}
        assert all(d["accepted"] == (d["dice"] > THETA) for d in decisions)
        assert after.count(LABELLED) == labelled_before + len(moved)
        labelled_before = after.count(LABELLED)
        assert history[cycle]["gate/accepted"] == len(moved)
    assert (run_dir / "cycles" / "cycle_02" / "model.pt").is_file()
    trained_in_driver = {p.name for p in RunLayout(run_dir).ray_cycle(2).iterdir()}
    assert trained_in_driver == {"best.pt", "last.pt"}  # no Ray Train run folder

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
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]


def test_mlflow_has_panels_by_step_decision_tables_datasets_a_logged_model_and_system_metrics(
    straight_run,
):
    run_dir, uri, _ = straight_run
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    # one image per cycle for the first query (al.panels 1): the UI's step slider
    steps = [
        i.split("+")[2] for i in images if i.startswith("images/panel_1+") and i.endswith(".png")
    ]
    assert sorted(steps) == ["1", "2"]
    decisions = mlflow.load_table("cycle_01/decisions.json", run_ids=[run.info.run_id])
    on_disk = pq.read_table(run_dir / "cycles" / "cycle_01" / "decisions.parquet").to_pandas()
    assert decisions["sample_id"].tolist() == on_disk["sample_id"].tolist()
    assert decisions["dice"].tolist() == pytest.approx(on_disk["dice"].tolist())
    names = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {
        "labelled@cycle_00",
        "labelled@cycle_02",
        "candidates@cycle_01",
        "validation@cycle_00",
    } <= set(names)
    assert json.loads(names["labelled@cycle_00"].dataset.profile)["num_rows"] == 4
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert model.source_run_id == run.info.run_id and model.name == "segmenter"
    loaded = mlflow.pytorch.load_model(model.model_uri)
    assert loaded(torch.zeros(1, 3, 32, 64)).shape == (1, 19, 32, 64)
    assert any(key.startswith("system/") for key in run.data.metrics)


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
    victim = ids_with_role(pool, UNLABELLED)[0].as_py()
    image = Path(pool.record(victim)["image_path"])
    image.write_bytes(
        image.read_bytes()[: image.stat().st_size // 2]
    )  # the header survives: only decoding fails
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    history = al_job.main(tiny(root, tmp_path / "runs", uri, "damaged", 1))
    state = PoolState.load(tmp_path / "runs" / "damaged" / "pool_state.parquet")
    PoolState.load(state.path)
    record = state.record(victim)
    assert record["role"] == QUARANTINED and str(image) in record["quarantine_reason"]
    assert ids_with_role(state, QUARANTINED).to_pylist() == [victim]
    assert [h["pool/quarantined"] for h in history] == [0, 1] and history[1]["gate/selected"] == 2
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    assert run.info.status == "FINISHED"
    logged = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "pool/quarantined")
    assert [(m.step, m.value) for m in logged] == [(0, 0.0), (1, 1.0)]


def test_the_default_output_has_no_ray_train_reports_and_verbose_does(
    local_ray, synthetic_root, tmp_path, capfd, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    on_ray_train = ["--set", "scaling.num_workers=1"]  # the demo trains in the driver
    al_job.main(tiny(synthetic_root, tmp_path / "runs", uri, "quiet", 0) + on_ray_train)
    time.sleep(5)  # worker logs reach the driver asynchronously: give late lines time to come
    quiet = capfd.readouterr()
    assert "TrainingReport(" not in quiet.out + quiet.err
    monkeypatch.delenv("SEGXAL_VERBOSE", raising=False)
    al_job.main(
        tiny(synthetic_root, tmp_path / "runs", uri, "loud", 0) + on_ray_train + ["--verbose"]
    )
    loud = ""
    deadline = time.monotonic() + SERVICE_WAIT_S  # worker logs reach the driver asynchronously
    while "TrainingReport(" not in loud and time.monotonic() < deadline:
        time.sleep(0.5)
        captured = capfd.readouterr()
        loud += captured.out + captured.err
    assert "TrainingReport(" in loud


def test_jobs_explain_takes_a_runs_config_and_last_model(straight_run):
    run_dir, _, _ = straight_run
    records = explain_job.main(["--run", str(run_dir), "--images", "2", "--quiet"])
    summary = json.loads((run_dir / "explain" / "regions.json").read_text())
    assert len(records) == 2 and summary["checkpoint"] == str(
        run_dir / "cycles" / "cycle_02" / "model.pt"
    )
    assert all((run_dir / "explain" / r["panel"]).is_file() for r in records)
    with pytest.raises(SystemExit, match="drop --config"):
        explain_job.main(
            ["--run", str(run_dir), "--images", "1", "--config", "jobs/configs/demo.yaml"]
        )
    with pytest.raises(SystemExit, match="not a jobs.al run folder"):
        explain_job.main(["--run", str(run_dir / "cycles"), "--images", "1"])
