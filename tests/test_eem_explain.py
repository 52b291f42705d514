import json

import pytest
import torch
import yaml
from PIL import Image

from jobs.explain import main
from segxal.checkpoint import save_checkpoint
from segxal.data.labels import CITYSCAPES
from segxal.models.unet import UNet, UNetConfig


@pytest.fixture()
def experiment(tmp_path):
    config = {
        "name": "explain-test",
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        "data": {
            "dataset": "synthetic",
            "root": str(tmp_path / "data"),
            "image_size": [64, 128],
            "synthetic": {
                "num_train": 2,
                "num_val": 3,
                "num_anomaly": 0,
                "height": 64,
                "width": 128,
                "workers": 1,
            },
        },
        "model": {"width": 4, "depth": 2},
        "train": {"device": "cpu"},
        "eem": {"min_region_area": 4, "region_threshold": 0.3},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=4, depth=2))
    save_checkpoint(
        tmp_path / "runs" / "explain-test" / "checkpoints" / "best.pt",
        {"model": model.to_checkpoint()},
    )
    return path, tmp_path


def test_explain_writes_panels_and_regions(experiment):
    path, tmp_path = experiment
    out = tmp_path / "explain"
    records = main(
        ["--config", str(path), "--images", "2", "--out", str(out), "--batch-size", "2", "--quiet"]
    )
    summary = json.loads((out / "regions.json").read_text())
    assert [r["sample_id"] for r in summary["images"]] == [r["sample_id"] for r in records]
    assert len(records) == 2 and all(r["sample_id"].startswith("val/") for r in records)
    assert (
        summary["eem"]["region_threshold"] == 0.3
        and summary["eem"]["depth"]["backend"] == "dataset"
    )
    for record in summary["images"]:
        assert 0 <= record["score"] <= 1 and 0 < record["near_fraction"] < 1
        with Image.open(out / record["panel"]) as png:
            assert png.format == "PNG"
        for region in record["regions"]:
            assert region["area"] >= 4 and region["class_name"] in CITYSCAPES.class_names
            assert 0 <= region["prompt"]["x"] < 128 and 0 <= region["prompt"]["y"] < 64
    assert any(record["regions"] for record in summary["images"])


def test_explain_without_checkpoint_says_how_to_get_one(experiment, tmp_path):
    path, _ = experiment
    with pytest.raises(SystemExit, match="jobs.train"):
        main(
            [
                "--config",
                str(path),
                "--images",
                "1",
                "--out",
                str(tmp_path / "o"),
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--quiet",
            ]
        )
