"""jobs.al refuses bad input with a clear message before any work (Ray never starts)."""

import shutil

import numpy as np
import pytest
import ray
from conftest import TINY_SYNTHETIC
from PIL import Image

from jobs import al as al_job


@pytest.fixture(autouse=True)
def no_ray_left(own_ray):
    yield
    if (
        ray.is_initialized()
    ):  # a case that wrongly got as far as starting Ray must not leak into the next
        ray.shutdown()


def run(synthetic_root, tmp_path, *overrides):
    data = [f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.__dict__.items()]
    argv = [
        "--config",
        "jobs/configs/demo.yaml",
        "--quiet",
        "--set",
        f"data.root={synthetic_root}",
        "--set",
        f"output_dir={tmp_path}",
    ]
    for item in data + list(overrides):
        argv += ["--set", item]
    al_job.main(argv)


@pytest.mark.parametrize(
    "override, message",
    [
        ("al.budget=100", "al.budget 100 is larger than the pool (12 samples)"),
        ("al.budget=11", "al.budget: 11 images per cycle but the unlabelled pool has 10"),
        ("al.theta=1.5", "al: theta must be in [0, 1]"),
        ("al.strategy=bold", "al: unknown strategy 'bold'; valid strategies: bald, coreset, eem"),
        ("al.oracle=crowd", "al.oracle: 'crowd' is not one of"),
        ("eem.depth.backend=zoe", "eem.depth.backend: 'zoe' is not one of"),
        ("al.initial_labelled=50", "initial_labelled"),
    ],
)
def test_bad_settings_fail_before_ray(synthetic_root, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        run(synthetic_root, tmp_path, override)
    assert exit_info.value.code != 0
    assert message in f"{exit_info.value.code} {capsys.readouterr().err}"
    assert not ray.is_initialized()


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty" / "leftImg8bit" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "synthetic.json").write_text("{}")
    with pytest.raises(SystemExit, match="leftImg8bit/train: no images found"):
        al_job.main(
            [
                "--quiet",
                "--set",
                "data.dataset=cityscapes",
                "--set",
                f"data.root={tmp_path / 'empty'}",
                "--set",
                f"output_dir={tmp_path / 'runs'}",
            ]
        )
    assert not ray.is_initialized()


@pytest.mark.parametrize("split", ["train", "val"])
def test_label_ids_outside_the_table_in_the_first_pools_fail_before_ray(
    synthetic_root, tmp_path, capsys, split
):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    labels = sorted((data / "gtFine" / split).rglob("*_labelIds.png"))
    for path in labels:  # every one, so whichever the initial draw labels is broken
        Image.fromarray(np.full((64, 128), 250, np.uint8)).save(path)
    with pytest.raises(SystemExit) as exit_info:
        run(data, tmp_path, f"data.root={data}")
    message = str(exit_info.value.code)
    assert "label ids [250] are not in the cityscapes label table" in message
    assert any(str(path) in message for path in labels)
    assert not ray.is_initialized()


def test_the_cycle_line_says_miou_labelled_share_verdicts_cost_and_time():
    first = {"val/miou": 0.05291, "pool/labelled_fraction": 0.2, "time/train_s": 12.4}
    assert al_job.cycle_summary(0, first) == "cycle 0: mIoU 5.29 %  labelled 20.0 %  (12 s)"
    later = {
        "val/miou": 0.2735,
        "pool/labelled_fraction": 0.35,
        "gate/accepted": 7.0,
        "gate/returned": 1.0,
        "oracle/cost": 8.0,
        "time/score_s": 3.2,
        "time/explain_s": 1.1,
        "time/train_s": 20.0,
    }
    assert al_job.cycle_summary(3, later) == (
        "cycle 3: mIoU 27.35 %  labelled 35.0 %  accepted 7 / returned 1  cost 8  (24 s)"
    )
