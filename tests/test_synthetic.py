import hashlib

import numpy as np
import pytest
from conftest import TINY_SYNTHETIC

from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SegmentationDataset
from segxal.data.io import read_disparity, read_label
from segxal.data.labels import ANOMALY, CITYSCAPES
from segxal.data.synthetic import SyntheticConfig, generate_synthetic, render_scene


def digest(root):
    files = sorted(p for p in root.rglob("*.png"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_generation_is_deterministic_and_parallel_safe(tmp_path, synthetic_root):
    config = SyntheticConfig(**{**TINY_SYNTHETIC.__dict__, "workers": 2})
    again = generate_synthetic(tmp_path / "again", config)
    assert digest(again) == digest(synthetic_root)
    other_seed = render_scene(8, "train", 0, 64, 128).image
    assert not np.array_equal(other_seed, render_scene(7, "train", 0, 64, 128).image)


def test_layout_counts_and_marker_skips_regeneration(synthetic_root):
    assert len(cityscapes_manifest(synthetic_root, "train")) == 12
    assert len(cityscapes_manifest(synthetic_root, "val")) == 4
    assert len(list((synthetic_root / "anomaly" / "original").glob("*.png"))) == 4
    image = next((synthetic_root / "leftImg8bit" / "train").rglob("*.png"))
    mtime = image.stat().st_mtime_ns
    generate_synthetic(synthetic_root, TINY_SYNTHETIC)
    assert image.stat().st_mtime_ns == mtime


def test_scenes_have_driving_classes_and_consistent_depth(synthetic_root):
    manifest = cityscapes_manifest(synthetic_root, "train")
    dataset = SegmentationDataset(manifest, CITYSCAPES, load_depth=True)
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        label, disparity = item["label"].numpy(), item["depth"].numpy()
        seen |= set(np.unique(label).tolist())
        sky, road = label == 10, label == 0
        assert (disparity[sky] == 0).all()  # infinitely far
        assert road.any() and (disparity[road] > 0).all()
        rows = np.nonzero(road.any(axis=1))[0]
        near, far = (
            disparity[rows[-1]][road[rows[-1]]].mean(),
            disparity[rows[0]][road[rows[0]]].mean(),
        )
        assert near > far  # road gets nearer towards the bottom of the image
    names = {CITYSCAPES.class_names[i] for i in seen if i != 255}
    assert {"road", "sidewalk", "building", "sky", "pole", "car", "vegetation"} <= names


def test_anomaly_split_labels(synthetic_root):
    for path in sorted((synthetic_root / "anomaly" / "labels").glob("*.png")):
        raw = read_label(path)
        assert set(np.unique(raw).tolist()) <= {0, 1, 255}
        assert (ANOMALY.to_train_ids(raw, str(path)) == 1).sum() > 0


def test_bad_config():
    with pytest.raises(ValueError, match="at least 32x32"):
        SyntheticConfig(height=16)
    with pytest.raises(ValueError, match="num_val"):
        SyntheticConfig(num_val=-1)


def test_ego_vehicle_has_unknown_depth(synthetic_root):
    manifest = cityscapes_manifest(synthetic_root, "train")
    hoods = 0
    for label_path, depth_path in zip(
        manifest["label_path"].to_pylist(), manifest["depth_path"].to_pylist(), strict=False
    ):
        hood = read_label(label_path) == 1
        hoods += hood.any()
        assert (read_disparity(depth_path)[hood] == 0).all()
    assert hoods > 0
