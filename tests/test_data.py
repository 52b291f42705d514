import numpy as np
import pytest
import torch
from PIL import Image

from segxal.data.camvid import camvid_manifest
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.io import DataError, read_disparity, read_rgb, write_disparity
from segxal.data.labels import CAMVID, CITYSCAPES, IGNORE_INDEX
from segxal.data.manifest import MANIFEST_SCHEMA
from segxal.data.transforms import denormalize, random_crop_flip

RNG = np.random.default_rng(0)


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def cityscapes_sample(root, split, city, stem, label, image_hw=None, disparity=None):
    hw = image_hw or label.shape
    png(
        root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
        RNG.integers(0, 255, (*hw, 3), dtype=np.uint8),
    )
    png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label.astype(np.uint8))
    if disparity is not None:
        (root / "disparity" / split / city).mkdir(parents=True, exist_ok=True)
        write_disparity(root / "disparity" / split / city / f"{stem}_disparity.png", disparity)


def test_cityscapes_label_ids_map_to_official_train_ids():
    raw = np.array(
        [
            0,
            1,
            6,
            7,
            8,
            11,
            12,
            13,
            17,
            19,
            20,
            21,
            22,
            23,
            24,
            25,
            26,
            27,
            28,
            31,
            32,
            33,
            29,
            30,
            9,
            10,
            14,
            15,
            16,
            18,
        ]
    )
    expected = [
        255,
        255,
        255,
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
        255,
        255,
        255,
        255,
        255,
        255,
        255,
        255,
    ]
    assert CITYSCAPES.to_train_ids(raw, "x").tolist() == expected
    assert CITYSCAPES.num_classes == 19
    assert CITYSCAPES.class_names[13] == "car"
    with pytest.raises(ValueError, match=r"f\.png: label ids \[34, 200\]"):
        CITYSCAPES.to_train_ids(np.array([7, 34, 200]), "f.png")


def test_camvid_label_table():
    assert CAMVID.to_train_ids(np.arange(12), "x").tolist() == list(range(11)) + [255]
    with pytest.raises(ValueError, match="label ids \\[12\\]"):
        CAMVID.to_train_ids(np.array([12]), "x")


def test_cityscapes_manifest_and_dataset(tmp_path):
    label = np.full((6, 10), 7, np.uint8)
    label[:2] = 23  # sky
    label[5, :] = 1  # ego vehicle -> ignore
    disparity = np.linspace(1, 50, 60, dtype=np.float32).reshape(6, 10)
    cityscapes_sample(tmp_path, "train", "bonn", "bonn_000001_000019", label, disparity=disparity)
    cityscapes_sample(tmp_path, "train", "aachen", "aachen_000000_000019", label)
    manifest = cityscapes_manifest(tmp_path, "train")
    assert manifest.schema.equals(MANIFEST_SCHEMA)
    assert manifest["sample_id"].to_pylist() == [
        "train/aachen_000000_000019",
        "train/bonn_000001_000019",
    ]
    assert manifest["depth_path"].to_pylist()[0] is None and manifest["depth_path"].to_pylist()[
        1
    ].endswith("_disparity.png")
    assert manifest["height"].to_pylist() == [6, 6] and manifest["width"].to_pylist() == [10, 10]
    item = SegmentationDataset(manifest, CITYSCAPES, load_depth=True)[1]
    assert item["label"].dtype == torch.int64
    assert (
        item["label"][0, 0] == 10
        and item["label"][3, 3] == 0
        and item["label"][5, 0] == IGNORE_INDEX
    )
    assert torch.allclose(item["depth"], torch.from_numpy(disparity), atol=1 / 256)
    assert item["image"].shape == (3, 6, 10)
    raw = np.array(Image.open(manifest["image_path"][1].as_py()))
    assert torch.allclose(
        denormalize(item["image"]).permute(1, 2, 0) * 255, torch.from_numpy(raw).float(), atol=1e-3
    )


def test_camvid_manifest_and_resize(tmp_path):
    for split in ("train", "val"):
        png(
            tmp_path / split / "0001TP_006690.png", RNG.integers(0, 255, (9, 12, 3), dtype=np.uint8)
        )
        png(
            tmp_path / f"{split}annot" / "0001TP_006690.png",
            np.tile(np.arange(12, dtype=np.uint8), (9, 1)),
        )
    manifest = camvid_manifest(tmp_path, "val")
    assert manifest["sample_id"].to_pylist() == ["val/0001TP_006690"]
    item = SegmentationDataset(manifest, CAMVID, SampleTransform(size=(18, 24)))[0]
    assert item["image"].shape == (3, 18, 24)
    assert item["label"][0].tolist() == [i // 2 for i in range(22)] + [255, 255]


def test_disparity_round_trip(tmp_path):
    disparity = np.array([[0.0, 1.5], [100.25, -3.0]], np.float32)
    write_disparity(tmp_path / "d.png", disparity)
    assert read_disparity(tmp_path / "d.png").tolist() == [[0.0, 1.5], [100.25, 0.0]]


class TestBadInput:
    def test_empty_folder(self, tmp_path):
        (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
        with pytest.raises(DataError, match="leftImg8bit/train: no images found"):
            cityscapes_manifest(tmp_path, "train")
        with pytest.raises(DataError, match="image folder not found"):
            camvid_manifest(tmp_path, "train")

    def test_missing_label(self, tmp_path):
        png(tmp_path / "train" / "a.png", np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(DataError, match="trainannot/a.png: label not found"):
            camvid_manifest(tmp_path, "train")

    def test_size_mismatch(self, tmp_path):
        cityscapes_sample(
            tmp_path, "train", "c", "c_0_0", np.zeros((4, 4), np.uint8), image_hw=(4, 5)
        )
        with pytest.raises(
            DataError, match="c_0_0_gtFine_labelIds.png: size 4x4 does not match image"
        ):
            cityscapes_manifest(tmp_path, "train")

    def test_corrupt_image(self, tmp_path):
        cityscapes_sample(tmp_path, "train", "c", "c_0_0", np.full((4, 4), 7, np.uint8))
        image = tmp_path / "leftImg8bit" / "train" / "c" / "c_0_0_leftImg8bit.png"
        manifest = cityscapes_manifest(tmp_path, "train")
        image.write_bytes(image.read_bytes()[:40])  # truncated after the manifest was built
        with pytest.raises(DataError, match="c_0_0_leftImg8bit.png: cannot decode image"):
            SegmentationDataset(manifest, CITYSCAPES)[0]
        image.write_bytes(b"not a png at all")
        with pytest.raises(DataError, match="c_0_0_leftImg8bit.png: cannot decode image"):
            cityscapes_manifest(tmp_path, "train")

    def test_unknown_label_ids_name_the_file(self, tmp_path):
        cityscapes_sample(tmp_path, "train", "c", "c_0_0", np.full((4, 4), 99, np.uint8))
        with pytest.raises(ValueError, match="c_0_0_gtFine_labelIds.png: label ids \\[99\\]"):
            SegmentationDataset(cityscapes_manifest(tmp_path, "train"), CITYSCAPES)[0]

    def test_rgb_label_rejected(self, tmp_path):
        png(tmp_path / "train" / "a.png", np.zeros((4, 4, 3), np.uint8))
        png(tmp_path / "trainannot" / "a.png", np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(DataError, match="trainannot/a.png: label must be a single-channel"):
            SegmentationDataset(camvid_manifest(tmp_path, "train"), CAMVID)[0]


def test_random_crop_flip_moves_image_label_and_depth_together():
    image = torch.arange(2 * 6 * 8, dtype=torch.float32).reshape(2, 6, 8)
    label = image[0].long()
    depth = image[1].clone()
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        out_image, out_label, out_depth = random_crop_flip(
            image, label, (4, 5), generator, extra=depth
        )
        assert out_image.shape == (2, 4, 5) and out_label.shape == (4, 5)
        assert torch.equal(out_image[0].long(), out_label) and torch.equal(out_image[1], out_depth)
    padded_image, padded_label, _ = random_crop_flip(
        image, label, (8, 8), torch.Generator().manual_seed(0)
    )
    assert (padded_label[6:] == IGNORE_INDEX).all() and (padded_image[:, 6:] == 0).all()


@pytest.mark.parametrize("label_set", [CITYSCAPES, CAMVID])
def test_raw_ids_round_trip(label_set):
    train_ids = np.array(list(range(label_set.num_classes)) + [IGNORE_INDEX], dtype=np.uint8)
    raw = label_set.to_raw_ids(train_ids)
    assert label_set.to_train_ids(raw, "x").tolist() == train_ids.tolist()
    with pytest.raises(ValueError, match="train ids \\[40\\]"):
        label_set.to_raw_ids(np.array([40], np.uint8))


def test_manifest_paths_are_absolute_for_relative_roots(tmp_path, monkeypatch):
    png(tmp_path / "cv" / "val" / "a.png", np.zeros((4, 4, 3), np.uint8))
    png(tmp_path / "cv" / "valannot" / "a.png", np.zeros((4, 4), np.uint8))
    monkeypatch.chdir(tmp_path)
    manifest = camvid_manifest("cv", "val")
    assert manifest["image_path"][0].as_py() == str(tmp_path / "cv" / "val" / "a.png")
    assert manifest["label_path"][0].as_py() == str(tmp_path / "cv" / "valannot" / "a.png")


def test_images_of_other_bit_depths_are_scaled_by_their_depth_or_refused(tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # the same, 16-bit
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    assert np.array_equal(read_rgb(tmp_path / "grey16.png"), np.repeat(eight[..., None], 3, axis=2))
    Image.fromarray(np.array([[0, 128, 65535]], np.uint16)).save(tmp_path / "ends.png")
    assert read_rgb(tmp_path / "ends.png")[0, :, 0].tolist() == [0, 0, 255]  # 128/257 rounds to 0
    colour = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    assert np.array_equal(read_rgb(tmp_path / "rgb.png"), colour)
    Image.fromarray(np.full((3, 3), 70000, np.int32)).save(tmp_path / "int32.tiff")
    with pytest.raises(
        DataError, match=r"int32\.tiff: a 32-bit integer image \(mode I\) has no defined range"
    ):
        read_rgb(tmp_path / "int32.tiff")
    Image.fromarray(np.full((3, 3), 0.5, np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(DataError, match=r"float\.tiff: a floating-point image"):
        read_rgb(tmp_path / "float.tiff")
