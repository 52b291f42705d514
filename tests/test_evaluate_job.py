"""jobs.evaluate: a checkpoint scored with no training and no Ray, on a split or on anomaly benchmarks."""

import json

import mlflow
import pytest
from helpers import sklearn_miou, write_config

from jobs.evaluate import main
from orchestrator.config import load_experiment
from orchestrator.datasets import datasets_for
from segxal.checkpoint import load_checkpoint, save_checkpoint
from segxal.models.unet import UNet, UNetConfig


@pytest.fixture
def checkpoints(tmp_path, synthetic_root, tracking_uri):
    config = write_config(tmp_path, synthetic_root, tracking_uri)
    paths = {}
    for name, classes in (("segmenter", 19), ("pebal", 20), ("camvid", 11)):
        model = UNet(UNetConfig(num_classes=classes, width=8, depth=3))
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint(paths[name], {"model": model.to_checkpoint()})
    return config, paths


def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("jobs.evaluate needs no Ray")

    monkeypatch.setattr("ray.init", refuse)


def test_segmenter_on_a_split_gives_miou_and_per_class_iou(
    checkpoints, tmp_path, tracking_uri, capsys, monkeypatch
):
    no_ray(monkeypatch)
    config, paths = checkpoints
    scored = main(["--config", config, "--checkpoint", str(paths["segmenter"]), "--quiet"])
    experiment = load_experiment(config)
    _, val = datasets_for(experiment.data)
    model = UNet.from_checkpoint(load_checkpoint(paths["segmenter"])["model"])
    assert scored["eval/val/miou"] == pytest.approx(sklearn_miou(model.eval(), val, 19), abs=1e-6)
    assert any(key.startswith("eval/val/iou/") for key in scored)
    written = json.loads((tmp_path / "runs" / "pebal-test" / "evaluate" / "val.json").read_text())
    assert written == pytest.approx(scored)
    assert "| mIoU |" in capsys.readouterr().out
    mlflow.set_tracking_uri(tracking_uri)
    (run,) = mlflow.search_runs(experiment_names=["pebal-test"], output_format="list")
    assert run.data.tags["job"] == "evaluate"
    assert run.data.metrics["eval/val/miou"] == pytest.approx(scored["eval/val/miou"])


def test_segmenter_and_pebal_checkpoints_on_anomaly_benchmarks(
    checkpoints, tmp_path, tracking_uri, monkeypatch
):
    no_ray(monkeypatch)
    config, paths = checkpoints
    small = [
        "--set",
        "pebal.evaluation.min_predicted_component=4",
        "--set",
        "pebal.evaluation.min_gt_component=4",
    ]
    (baselines,) = main(
        [
            "--config",
            config,
            "--checkpoint",
            str(paths["segmenter"]),
            "--anomaly",
            "--quiet",
            *small,
        ]
    )
    assert baselines.name == "synthetic"
    assert set(baselines.metrics) == {"energy", "smoothed_energy", "msp", "max_logit", "entropy"}
    assert {"ap", "fpr95", "auroc", "siou", "ppv", "mean_f1"} <= set(baselines.metrics["energy"])
    assert baselines.protocol.startswith("label_resolution: scored at height 64")
    (pebal,) = main(
        ["--config", config, "--checkpoint", str(paths["pebal"]), "--anomaly", "--quiet", *small]
    )
    assert set(pebal.metrics) == {"pebal"}
    report = tmp_path / "runs" / "pebal-test" / "evaluate"
    assert (report / "anomaly_table.md").is_file() and (
        report / "curves" / "synthetic.png"
    ).is_file()
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["pebal-test"], output_format="list")
    assert any("anomaly/synthetic/pebal/mean_f1" in r.data.metrics for r in runs)


@pytest.mark.parametrize(
    "checkpoint, extra, message",
    [
        (
            "camvid",
            [],
            "the model has 11 classes; the dataset's label set has 19 (a PEBAL model 20)",
        ),
        ("pebal", [], "a PEBAL checkpoint has no segmentation metrics; add --anomaly"),
        ("segmenter", ["--anomaly", "--set", "pebal.benchmarks=[]"], "pebal.benchmarks is empty"),
        ("segmenter", ["--split", "test"], "leftImg8bit/test: Cityscapes image folder not found"),
    ],
)
def test_bad_inputs_stop_before_any_run(checkpoints, tmp_path, checkpoint, extra, message):
    config, paths = checkpoints
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "--checkpoint", str(paths[checkpoint]), "--quiet", *extra])
    assert "input error:" in str(caught.value.code) and message in str(caught.value.code)
    assert not (tmp_path / "mlflow.db").exists()
