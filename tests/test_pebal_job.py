"""jobs.pebal end to end on tiny synthetic data with a temporary MLflow store, and its input checks."""

import json

import mlflow
import pytest
from helpers import write_config

from jobs.pebal import main
from segxal.checkpoint import load_checkpoint, save_checkpoint
from segxal.models.unet import UNet, UNetConfig
from segxal.pebal.evaluate import default_methods

DATASETS = ("synthetic", "cityscapes_anomalymix_val")


def no_run_started(tmp_path, tracking_uri):
    """Neither the MLflow store nor the run folder was created."""
    return (
        not (tmp_path / "mlflow.db").exists()
        and not (tmp_path / "runs").exists()
        and tracking_uri.endswith("/mlflow.db")
    )


def test_margins_in_the_wrong_order_are_a_config_error(
    tmp_path, synthetic_root, tracking_uri, capsys
):
    with pytest.raises(SystemExit) as caught:
        main(
            [
                "--config",
                write_config(tmp_path, synthetic_root, tracking_uri),
                "--set",
                "pebal.m_in=-1",
            ]
        )
    assert caught.value.code == 2
    assert "m_in (-1.0) must be smaller than PebalConfig.m_out (-2.0)" in capsys.readouterr().err


def test_a_json_that_is_not_coco_instances_stops_before_training(
    tmp_path, synthetic_root, tracking_uri
):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    bad = tmp_path / "coco" / "annotations" / "captions.json"
    bad.write_text(
        json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": "a kite"}]})
    )
    config = write_config(
        tmp_path,
        synthetic_root,
        tracking_uri,
        anomalymix={"coco_root": str(tmp_path / "coco"), "coco_annotations": str(bad)},
    )
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "--quiet"])
    assert f"input error: {bad}: not a COCO instances JSON" in str(caught.value.code)
    assert no_run_started(tmp_path, tracking_uri)


def test_an_anomaly_folder_of_no_known_layout_stops_before_training(
    tmp_path, synthetic_root, tracking_uri
):
    folder = tmp_path / "fishy"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    config = write_config(tmp_path, synthetic_root, tracking_uri, benchmarks=[str(folder)])
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "--quiet"])
    assert f"input error: {folder}: not a known anomaly benchmark layout" in str(caught.value.code)
    assert no_run_started(tmp_path, tracking_uri)


def test_a_missing_pretrained_checkpoint_stops_before_training(
    tmp_path, synthetic_root, tracking_uri
):
    config = write_config(
        tmp_path, synthetic_root, tracking_uri, pretrained=str(tmp_path / "nope.pt")
    )
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "--quiet"])
    assert f"input error: {tmp_path / 'nope.pt'}: checkpoint not found" == caught.value.code
    assert no_run_started(tmp_path, tracking_uri)


def test_two_benchmarks_with_one_name_stop_before_training(tmp_path, synthetic_root, tracking_uri):
    folder = str(synthetic_root / "anomaly")
    config = write_config(
        tmp_path, synthetic_root, tracking_uri, benchmarks=[folder, {"path": folder}]
    )
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "--quiet"])
    assert "input error: two anomaly benchmarks are named 'synthetic'" in str(caught.value.code)
    assert no_run_started(tmp_path, tracking_uri)


@pytest.mark.slow
def test_job_pretrains_finetunes_evaluates_and_logs_without_ray(
    tmp_path, synthetic_root, tracking_uri, capsys, monkeypatch
):
    def no_ray():
        raise AssertionError("scaling.num_workers: 0 needs no Ray")

    monkeypatch.setattr("jobs.pebal.init_ray", no_ray)
    config = write_config(tmp_path, synthetic_root, tracking_uri)
    results = main(["--config", config, "--quiet", "--set", "scaling.num_workers=0"])
    methods = [m.name for m in default_methods()]
    assert [r.name for r in results] == list(DATASETS)
    table = capsys.readouterr().out
    assert (
        "| method | synthetic AP | synthetic FPR95 | synthetic AUROC | synthetic sIoU | synthetic PPV "
        "| synthetic mF1 | cityscapes_anomalymix_val AP |" in table
    )
    assert "- synthetic: label_resolution: scored at height 64 with the aspect kept" in table
    assert (
        "- cityscapes_anomalymix_val: AnomalyMix'd validation split at the training size (64x128)"
        in table
    )
    assert all(f"| {method} |" in table for method in methods)

    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pebal-test").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for result in results:
        for method in methods:
            for key in ("ap", "fpr95", "auroc"):
                assert metrics[f"anomaly/{result.name}/{method}/{key}"] == pytest.approx(
                    result.metrics[method][key]
                )
    assert 0.0 <= metrics["anomaly/synthetic/pebal/mean_f1"] <= 1.0
    assert 0.0 <= metrics["pretrain/val/miou"] <= 1.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ap")] == [0, 1]
    assert run.data.params["pebal.m_in_used"] == "-4.0" and run.data.params["pebal.benchmarks"]
    assert int(run.data.params["pebal.trainable_parameters"]) < int(
        run.data.params["pebal.total_parameters"]
    )

    def listed(path):
        return {item.path for item in client.list_artifacts(run.info.run_id, path)}

    assert {"evaluation/anomaly_table.md", "evaluation/anomaly_table.csv"} <= listed("evaluation")
    assert listed("evaluation/curves") == {f"evaluation/curves/{name}.png" for name in DATASETS}
    assert listed("evaluation/panels") == {f"evaluation/panels/{name}.png" for name in DATASETS}
    assert listed("model") == {"model/pebal_checkpoint.pt", "model/pretrained.pt"}
    checkpoint = load_checkpoint(tmp_path / "runs" / "pebal-test" / "pebal_checkpoint.pt")
    assert (
        checkpoint["model"]["unet_config"]["num_classes"] == 20
    )  # 19 Cityscapes classes + abstention
    assert checkpoint["pebal"]["m_in"] == -4.0


def test_a_trainable_module_the_checkpoint_lacks_stops_before_training(
    tmp_path, synthetic_root, tracking_uri
):
    save_checkpoint(
        tmp_path / "small.pt",
        {"model": UNet(UNetConfig(num_classes=19, width=4, depth=2)).to_checkpoint()},
    )
    config = write_config(
        tmp_path,
        synthetic_root,
        tracking_uri,
        pretrained=str(tmp_path / "small.pt"),
        trainable=["decoder.3", "head"],
    )
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "--quiet"])
    assert (
        "config error: pebal.trainable: trainable module 'decoder.3' not found" in caught.value.code
    )
    assert no_run_started(tmp_path, tracking_uri)
