"""Anomaly benchmark layouts built with tiny files: detection, manifests and the 0/1/255 label mapping."""

import numpy as np
import pytest
from PIL import Image

from segxal.data.anomaly import anomaly_benchmark, check_unique_names, detect_anomaly_layout
from segxal.data.io import DataError

H, W = 6, 8


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(path)
    return path


def write_label(path, values):
    """A label whose first row holds ``values`` (repeated) and the rest ``values[0]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.full((H, W), values[0], np.uint8)
    label[0] = np.resize(np.asarray(values, np.uint8), W)
    Image.fromarray(label).save(path)


def mapped(benchmark, raw_values, index=0):
    """The train ids the benchmark's dataset gives the first row, cut to the raw values' length."""
    label = benchmark.dataset()[index]["label"]
    return label[0, : len(raw_values)].tolist()


def test_fishyscapes_validation_layouts(tmp_path):
    for split in ("LostAndFound", "Static"):
        for stem in ("0001", "0002"):
            write_image(tmp_path / split / "original" / f"{stem}.png")
            write_label(tmp_path / split / "labels" / f"{stem}.png", [0, 1, 255, 2])
    bench = anomaly_benchmark(tmp_path / "LostAndFound")
    assert (bench.name, bench.layout) == ("fishyscapes_lost_and_found", "original_labels")
    assert bench.manifest.column("sample_id").to_pylist() == [
        "fishyscapes_lost_and_found/0001",
        "fishyscapes_lost_and_found/0002",
    ]
    assert mapped(bench, [0, 1, 255, 2]) == [0, 1, 255, 255]
    assert anomaly_benchmark(tmp_path / "Static").name == "fishyscapes_static"
    assert anomaly_benchmark(tmp_path / "Static").manifest.num_rows == 2
    with pytest.raises(
        DataError, match="holds several anomaly benchmarks \\(LostAndFound, Static\\); pass one"
    ):
        anomaly_benchmark(tmp_path)


def test_preprocessed_road_anomaly_jpg_in_original_labels_layout(tmp_path):
    root = tmp_path / "road_anomaly"
    write_image(root / "original" / "animals01.jpg")
    write_label(root / "labels" / "animals01.png", [0, 1])
    bench = anomaly_benchmark(root)
    assert bench.name == "road_anomaly" and bench.layout == "original_labels"
    assert mapped(bench, [0, 1]) == [0, 1]


def test_synthetic_split_from_its_dataset_root(synthetic_root):
    layout, folder = detect_anomaly_layout(synthetic_root)
    assert layout == "original_labels" and folder == synthetic_root / "anomaly"
    bench = anomaly_benchmark(synthetic_root)
    assert bench.name == "synthetic" and bench.manifest.num_rows == 4
    labels = np.concatenate([bench.dataset()[i]["label"].numpy().ravel() for i in range(4)])
    assert set(np.unique(labels)) <= {0, 1, 255} and (labels == 1).any() and (labels == 0).any()


@pytest.mark.parametrize(
    "folder, suffix, name",
    [
        ("dataset_AnomalyTrack", ".jpg", "road_anomaly_21"),
        ("dataset_ObstacleTrack", ".webp", "road_obstacle_21"),
    ],
)
def test_segment_me_if_you_can(tmp_path, folder, suffix, name):
    root = tmp_path / folder
    write_image(root / "images" / f"validation_1{suffix}")
    write_image(root / "images" / f"test_7{suffix}")  # unlabelled test frame: left out
    write_label(root / "labels_masks" / "validation_1_labels_semantic.png", [0, 1, 255])
    write_image(root / "labels_masks" / "validation_1_labels_semantic_color.png")
    bench = anomaly_benchmark(root)
    assert (bench.name, bench.layout) == (name, "smiyc")
    assert bench.manifest.column("sample_id").to_pylist() == [f"{name}/validation_1"]
    assert mapped(bench, [0, 1, 255]) == [0, 1, 255]


def test_segment_me_if_you_can_without_labels_is_an_error(tmp_path):
    root = tmp_path / "dataset_AnomalyTrack"
    write_image(root / "images" / "test_1.jpg")
    (root / "labels_masks").mkdir()
    with pytest.raises(
        DataError,
        match="no label file for any image of images/ \\(for images/test_1.jpg looked for "
        "labels_masks/test_1.png and labels_masks/test_1_labels_semantic.png\\) .* withholds its test labels",
    ):
        anomaly_benchmark(root)


def write_pack(root, suffix=".webp"):
    """A validation-pack set: images/<i><suffix> with labels_masks/<i>.png (0 / 1 / 255)."""
    for stem in ("0", "1"):
        write_image(root / "images" / f"{stem}{suffix}")
        write_label(root / "labels_masks" / f"{stem}.png", [0, 1, 255])


def test_the_validation_pack_with_same_stem_labels(tmp_path):
    for folder in ("fs_lost_and_found", "RoadAnomaly21", "RoadObsticle21"):
        write_pack(tmp_path / "pack" / folder)
    names = {}
    for folder in ("fs_lost_and_found", "RoadAnomaly21", "RoadObsticle21"):
        bench = anomaly_benchmark(tmp_path / "pack" / folder)
        assert bench.layout == "same_stem" and bench.manifest.num_rows == 2
        assert mapped(bench, [0, 1, 255]) == [0, 1, 255]
        names[folder] = bench.name
    # the folder's own name: RoadObsticle21 (sic, as distributed) no longer becomes road_anomaly_21
    assert names == {
        "fs_lost_and_found": "fs_lost_and_found",
        "RoadAnomaly21": "roadanomaly21",
        "RoadObsticle21": "roadobsticle21",
    }
    named = anomaly_benchmark(tmp_path / "pack" / "RoadObsticle21", name="road_obstacle_21")
    assert named.manifest.column("sample_id").to_pylist() == [
        "road_obstacle_21/0",
        "road_obstacle_21/1",
    ]


def test_a_pack_folder_without_labels_names_the_files_it_looked_for(tmp_path):
    root = tmp_path / "fs_static"
    write_image(root / "images" / "7.png")
    (root / "labels_masks").mkdir()
    with pytest.raises(DataError) as error:
        anomaly_benchmark(root)
    assert (
        "for images/7.png looked for labels_masks/7.png and labels_masks/7_labels_semantic.png"
        in str(error.value)
    )
    assert "SegmentMeIfYouCan" not in str(error.value)


def test_both_label_namings_in_one_folder_is_an_error_unless_the_layout_is_given(tmp_path):
    root = tmp_path / "RoadAnomaly21"
    write_pack(root, ".jpg")
    write_label(root / "labels_masks" / "0_labels_semantic.png", [0, 1, 255])
    with pytest.raises(
        DataError, match="both label namings are there, 1 images with .* and 2 with"
    ):
        anomaly_benchmark(root)
    assert anomaly_benchmark(root, layout="same_stem").manifest.num_rows == 2
    assert anomaly_benchmark(root, layout="smiyc").manifest.num_rows == 1
    with pytest.raises(ValueError, match="unknown anomaly layout 'pack'"):
        anomaly_benchmark(root, layout="pack")


def test_two_benchmarks_with_one_name_are_an_input_error(tmp_path):
    write_pack(tmp_path / "a" / "RoadAnomaly21")
    write_pack(tmp_path / "b" / "RoadAnomaly21")
    first, second = (anomaly_benchmark(tmp_path / k / "RoadAnomaly21") for k in "ab")
    check_unique_names([first, anomaly_benchmark(tmp_path / "b" / "RoadAnomaly21", name="other")])
    with pytest.raises(
        DataError,
        match="two anomaly benchmarks are named 'roadanomaly21' \\(.*a/RoadAnomaly21 and .*b/RoadAnomaly21\\): give one a name",
    ):
        check_unique_names([first, second])
    with pytest.raises(DataError, match="named 'roadanomaly21' .* and another evaluation set"):
        check_unique_names([first], taken=["roadanomaly21"])


def test_road_anomaly_release(tmp_path):
    root = tmp_path / "RoadAnomaly_jpg"
    for stem in ("animals01_calves", "cones02_cones"):
        write_image(root / "frames" / f"{stem}.jpg")
        write_label(root / "frames" / f"{stem}.labels" / "labels_semantic.png", [0, 2])
    (root / "frame_list.json").write_text('["animals01_calves.jpg", "cones02_cones.jpg"]')
    bench = anomaly_benchmark(tmp_path)  # the wrapper folder holds one benchmark
    assert (bench.name, bench.layout, bench.root) == ("road_anomaly", "road_anomaly", root)
    assert mapped(bench, [0, 2], index=1) == [0, 1]
    write_label(root / "frames" / "cones02_cones.labels" / "labels_semantic.png", [0, 1])
    with pytest.raises(
        ValueError, match="cones02_cones.labels/labels_semantic.png: label ids \\[1\\]"
    ):
        bench.dataset()[1]


def test_lost_and_found_release(tmp_path):
    for split in ("train", "test"):
        fid = "04_Maurener_Weg_8_000000_000030"
        write_image(
            tmp_path / "leftImg8bit" / split / "04_Maurener_Weg_8" / f"{fid}_leftImg8bit.png"
        )
        write_label(
            tmp_path / "gtCoarse" / split / "04_Maurener_Weg_8" / f"{fid}_gtCoarse_labelIds.png",
            [1, 0, 2, 31, 43],
        )
    bench = anomaly_benchmark(tmp_path)
    assert (bench.name, bench.layout) == ("lost_and_found", "lost_and_found")
    assert bench.manifest.column("sample_id").to_pylist() == [
        "test/04_Maurener_Weg_8_000000_000030"
    ]
    assert mapped(bench, [1, 0, 2, 31, 43]) == [0, 255, 1, 1, 1]
    assert anomaly_benchmark(tmp_path, split="train").manifest.column("split").to_pylist() == [
        "train"
    ]
    with pytest.raises(
        DataError, match="split 'val' not found \\(splits there: \\['test', 'train'\\]\\)"
    ):
        anomaly_benchmark(tmp_path, split="val")


def test_missing_label_and_unknown_layout_are_errors_naming_the_folder(tmp_path):
    write_image(tmp_path / "Static" / "original" / "0001.png")
    (tmp_path / "Static" / "labels").mkdir()
    with pytest.raises(DataError, match="labels/0001.png: label not found for image"):
        anomaly_benchmark(tmp_path / "Static")
    (tmp_path / "empty" / "pictures").mkdir(parents=True)
    with pytest.raises(
        DataError, match=f"{tmp_path / 'empty'}: not a known anomaly benchmark layout"
    ):
        anomaly_benchmark(tmp_path / "empty")
    with pytest.raises(DataError, match="anomaly dataset folder not found"):
        anomaly_benchmark(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="only meaningful for LostAndFound"):
        anomaly_benchmark(tmp_path / "Static", split="test")
