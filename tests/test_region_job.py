"""jobs.al in region mode end to end on a real local Ray, with each oracle: simulated, pseudo, and
Label Studio's export and import."""

import json

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from helpers import tiny
from PIL import Image

from jobs import al as al_job
from orchestrator.labelstudio.handoff import export_dir
from orchestrator.labelstudio.tasks import QUERY
from orchestrator.pool_state import LABELLED, PoolState
from orchestrator.run_layout import RunLayout
from segxal.data.region_labels import UNLABELLED

pytestmark = pytest.mark.slow

REGION = ["al.unit=region", "al.budget=6", "al.region_cell=16", "al.theta=0.0"]


def region_job(synthetic_root, tmp_path, name, cycles, *settings):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = tiny(synthetic_root, tmp_path / "runs", uri, name, cycles)
    for setting in (*REGION, *settings):
        args += ["--set", setting]
    return tmp_path / "runs" / name, uri, args


def decisions(run_dir, cycle):
    return pq.read_table(RunLayout(run_dir).decisions(cycle)).to_pylist()


def test_a_simulated_region_run_on_ray(local_ray, synthetic_root, tmp_path):
    run_dir, uri, args = region_job(synthetic_root, tmp_path, "cells", 2, "al.strategy=entropy")
    history = al_job.main(args)
    state = PoolState.load(run_dir / "pool_state.parquet")
    for cycle in (1, 2):
        rows = decisions(run_dir, cycle)
        assert len(rows) == 6 and all(r["cost"] == 1.0 for r in rows)  # six cells, a click each
        assert all(r["pixels"] == 16 * 16 for r in rows)  # whole cells of unlabelled images
        assert history[cycle]["oracle/clicks"] == 6
        assert all(r["accepted"] for r in rows)  # the gate is off
        assert history[cycle]["gate/returned_cost"] == 0
    labelled = [r for r in state.table.to_pylist() if r["mask_path"] is not None]
    assert labelled and all(r["role"] == LABELLED for r in labelled)
    for record in labelled:
        labels = np.asarray(Image.open(record["mask_path"]))
        assert (
            labels.shape == (32, 64) and (labels != UNLABELLED).sum() == record["labelled_pixels"]
        )
    fraction = history[2]["pool/labelled_pixel_fraction"]
    expected = (4 * 32 * 64 + sum(r["labelled_pixels"] for r in labelled)) / (12 * 32 * 64)
    assert fraction == pytest.approx(expected)
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    assert run.data.tags["unit"] == "region" and run.info.status == "FINISHED"
    client = mlflow.MlflowClient(uri)
    for metric in ("oracle/clicks", "gate/returned_cost", "oracle/pixels"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2]
    clicks = client.get_metric_history(run.info.run_id, "oracle/total_cost")
    assert [m.value for m in clicks] == [0.0, 6.0, 12.0]


def test_eem_regions_with_the_pseudo_oracle_on_ray(local_ray, synthetic_root, tmp_path):
    run_dir, _, args = region_job(
        synthetic_root,
        tmp_path,
        "pseudo",
        1,
        "al.strategy=eem",
        "al.oracle=pseudo",
        "al.pseudo_confidence=0.0",
        "eem.region_threshold=0.05",  # a one-epoch model's EEM is low everywhere
    )
    history = al_job.main(args)
    rows = decisions(run_dir, 1)
    assert 0 < len(rows) <= 6 and history[1]["oracle/clicks"] == len(rows)
    scores = {
        (r["sample_id"], r["region"]): json.loads(r["record"])
        for r in pq.read_table(RunLayout(run_dir).scores(1)).to_pylist()
        if r["region"] is not None
    }
    state = PoolState.load(run_dir / "pool_state.parquet")
    for sample_id in {r["sample_id"] for r in rows}:
        labels = np.asarray(Image.open(state.record(sample_id)["mask_path"]))
        areas = sum(scores[(sample_id, r["region"])]["area"] for r in rows if r["sample_id"] == sample_id)  # fmt: skip
        assert (labels != UNLABELLED).sum() == areas  # confidence 0: every queried pixel, no other


def test_a_region_cycle_through_label_studio_export_and_import(
    own_ray, synthetic_root, tmp_path, capsys
):
    run_dir, _, args = region_job(
        synthetic_root, tmp_path, "people", 1, "al.strategy=random", "al.oracle=labelstudio"
    )
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        al_job.main(args)
        folder = export_dir(run_dir, 1)
        tasks = json.loads((folder / "tasks.json").read_text())
        assert "Region 1" in (folder / "labelling_config.xml").read_text()
        queried = 0
        for task in tasks:
            results = task["predictions"][0]["result"]
            shown = [r for r in results if r["from_name"] == QUERY]
            assert shown and task["data"]["note"].startswith(f"Label these {len(shown)} regions")
            queried += len(shown)
        assert queried == 6
        state_file = run_dir / "pool_state.parquet"
        before = state_file.read_bytes()

        def export(results_of):
            path = tmp_path / f"export_{results_of.__name__}.json"
            path.write_text(json.dumps([
                {"id": 100 + n, "data": t["data"],
                 "annotations": [{"id": 1, "was_cancelled": False, "result": results_of(t)}]}
                for n, t in enumerate(tasks)
            ]))  # fmt: skip
            return path

        def nothing(task):
            return []

        with pytest.raises(SystemExit, match=r"leaves queried region \d+ .* unlabelled"):
            al_job.main(["--resume", str(run_dir), "--quiet", "--stage", "import", str(export(nothing))])  # fmt: skip
        assert state_file.read_bytes() == before  # the pool is not touched

        def accepted(task):
            return task["predictions"][0]["result"]

        history = al_job.main(
            ["--resume", str(run_dir), "--quiet", "--stage", "import", str(export(accepted))]
        )
    finally:
        ray.shutdown()
    rows = decisions(run_dir, 1)
    assert len(rows) == 6 and all(r["dice"] == 1.0 for r in rows)  # the model's own labels
    assert history[0]["oracle/clicks"] == 6
    state = PoolState.load(run_dir / "pool_state.parquet")
    assert {state.record(r["sample_id"])["oracle"] for r in rows} == {"labelstudio"}


def test_bald_class_balance_and_a_stopping_rule_through_jobs_al_on_ray(
    local_ray, synthetic_root, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = tiny(synthetic_root, tmp_path / "runs", uri, "bald", 3)
    for setting in (
        "al.strategy=bald", "model.dropout=0.2", "eem.mc_samples=3", "al.class_balance=true",
        "al.theta=0.0", "al.stop.plateau=mean_score", "al.stop.epsilon=1.0", "al.stop.patience=1",
    ):  # fmt: skip
        args += ["--set", setting]
    history = al_job.main(args)
    run_dir = tmp_path / "runs" / "bald"
    scores = pq.read_table(RunLayout(run_dir).scores(1)).to_pylist()
    assert scores and all(s["score"] > 0 for s in scores)  # MC dropout disagrees somewhere
    # normalised BALD lies in [0, 1]: from cycle 2 on, a move <= 1 always counts as a plateau
    assert len(history) == 3 and history[2]["query/mean_score"] >= 0
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    assert run.data.tags["strategy"] == "bald+cb"
    assert run.data.tags["stop/reason"].startswith("plateau: the mean acquisition score")
    class_pixels = mlflow.MlflowClient(uri).get_metric_history(
        run.info.run_id, "train/class_pixels/0"
    )
    assert class_pixels and class_pixels[0].value > 0
