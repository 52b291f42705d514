"""COCO instances: validation, polygon / RLE masks against hand-made masks, crops, class exclusion."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segxal.data.io import DataError
from segxal.data.transforms import denormalize
from segxal.pebal.anomalymix import AnomalyMix, CocoOutliers
from segxal.pebal.coco import (
    coco_instances,
    crop_instance,
    decode_rle_string,
    instance_mask,
    load_instances_json,
    polygons_to_mask,
    rle_to_mask,
)
from segxal.pebal.config import AnomalyMixConfig

GREEN, RED, YELLOW, BLUE = (0, 255, 0), (255, 0, 0), (255, 255, 0), (0, 0, 255)


def encode_rle_string(runs):
    """COCO's rleToString, written out for the test."""
    out = []
    for i, value in enumerate(runs):
        x = value - runs[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def runs_column_major(mask):
    flat = mask.T.ravel().astype(int)
    runs, current, length = [], 0, 0
    for v in flat:
        if v == current:
            length += 1
        else:
            runs.append(length)
            current, length = v, 1
    return runs + [length]


def write_tiny_coco(root, name="instances_train2017.json"):
    """Image 1 (20x30): person (green, polygon), kite (red, list RLE), crowd kite; image 2 (12x10): zebra
    (yellow, compressed RLE). Background blue."""
    images_dir = root / "images" / "train2017"
    images_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    one = np.zeros((20, 30, 3), np.uint8)
    one[:] = BLUE
    one[2:8, 2:9] = GREEN
    kite = np.zeros((20, 30), bool)
    kite[10:16, 15:26] = True
    kite[10, 15] = False  # not a plain rectangle
    one[kite] = RED
    Image.fromarray(one).save(images_dir / "one.png")
    two = np.zeros((12, 10, 3), np.uint8)
    two[:] = BLUE
    zebra = np.zeros((12, 10), bool)
    zebra[3:9, 2:5] = True
    two[zebra] = YELLOW
    Image.fromarray(two).save(images_dir / "two.png")
    data = {
        "images": [
            {"id": 1, "file_name": "one.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "two.png", "height": 12, "width": 10},
        ],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 38, "name": "kite"},
            {"id": 24, "name": "zebra"},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": 42.0,
                "segmentation": [[2, 2, 8, 2, 8, 7, 2, 7]],
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 38,
                "iscrowd": 0,
                "area": 65.0,
                "segmentation": {"counts": runs_column_major(kite), "size": [20, 30]},
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 38,
                "iscrowd": 1,
                "area": 600.0,
                "segmentation": {"counts": [0, 600], "size": [20, 30]},
            },
            {
                "id": 13,
                "image_id": 2,
                "category_id": 24,
                "iscrowd": 0,
                "area": 18.0,
                "segmentation": {
                    "counts": encode_rle_string(runs_column_major(zebra)),
                    "size": [12, 10],
                },
            },
        ],
    }
    path = root / "annotations" / name
    path.write_text(json.dumps(data))
    return path, {"kite": kite, "zebra": zebra}


def test_polygon_mask_matches_hand_made_mask():
    mask = polygons_to_mask([[1, 1, 3, 1, 3, 2, 1, 2], [0, 4, 0, 4, 0, 4]], height=5, width=5)
    expected = np.zeros((5, 5), bool)
    expected[1:3, 1:4] = True  # the rectangle, edges included
    expected[4, 0] = True  # a degenerate polygon still marks its point
    assert np.array_equal(mask, expected)


def test_uncompressed_rle_is_column_major():
    # mask [[0,1],[1,1],[0,0]] read down the columns: 0,1,0 | 1,1,0 -> runs 1 zero, 1 one, 1 zero, 2 ones, 1 zero
    expected = np.array([[0, 1], [1, 1], [0, 0]], bool)
    assert np.array_equal(rle_to_mask([1, 1, 1, 2, 1], 3, 2), expected)
    assert np.array_equal(
        rle_to_mask([0, 6], 3, 2), np.ones((3, 2), bool)
    )  # leading zero-length run


def test_compressed_rle_strings_by_hand():
    # 3, 2, 4: single 5-bit groups -> chr(48 + v)
    assert decode_rle_string("324") == [3, 2, 4]
    # 100 = 4 + 3*32 -> 'T' (4 | 0x20 continue, + 48) then '3'; the 4th run is stored as 90 - 100 = -10,
    # one group 22 (= -10 & 31, sign bit 0x10 set) -> 'F'
    assert decode_rle_string("5T33F") == [5, 100, 3, 90]
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (
            rng.uniform(size=(int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.uniform()
        )
        runs = runs_column_major(mask)
        assert decode_rle_string(encode_rle_string(runs)) == runs
        assert np.array_equal(rle_to_mask(encode_rle_string(runs), *mask.shape), mask)


def test_bad_rle_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="sum to 5"):
        rle_to_mask([2, 3], 2, 3)
    with pytest.raises(ValueError, match="ends inside a run"):
        decode_rle_string("T")


def test_instances_are_read_filtered_and_cropped(tmp_path):
    path, masks = write_tiny_coco(tmp_path)
    instances = coco_instances(path, tmp_path, excluded_classes=("person",))
    assert [(i.annotation_id, i.category) for i in instances] == [
        (11, "kite"),
        (13, "zebra"),
    ]  # crowd skipped
    assert instances[0].image_path == tmp_path / "images" / "train2017" / "one.png"
    assert np.array_equal(instance_mask(instances[0]), masks["kite"])
    image, mask = crop_instance(instances[0])
    assert mask.shape == (6, 11) and np.array_equal(mask, masks["kite"][10:16, 15:26])
    assert (image[mask] == RED).all() and (image[0, 0] == BLUE).all()
    image, mask = crop_instance(instances[1])
    assert mask.shape == (6, 3) and mask.all() and (image == YELLOW).all()
    everything = coco_instances(path, tmp_path)
    assert [i.category for i in everything] == ["person", "kite", "zebra"]
    assert np.array_equal(instance_mask(everything[0])[2:8, 2:9], np.ones((6, 7), bool))
    assert [i.annotation_id for i in coco_instances(path, tmp_path, min_area=40.0)] == [10, 11]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"images": [], "annotations": [', "not valid JSON, truncated or corrupt"),
        (
            '{"images": [], "annotations": []}',
            r"not a COCO instances JSON: missing or non-list keys \['categories'\]",
        ),
        ("[1, 2]", "top level is list"),
        (
            '{"images": [], "categories": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, '
            '"segments_info": []}]}',
            r"annotation #0 lacks \['segmentation'\]",
        ),
    ],
)
def test_not_an_instances_json_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "captions_train2017.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_instances_json(path)
    assert str(path) in str(info.value)


def test_missing_image_and_unknown_ids_are_errors(tmp_path):
    path, _ = write_tiny_coco(tmp_path)
    (tmp_path / "images" / "train2017" / "two.png").unlink()
    with pytest.raises(
        DataError, match=r"image 'two.png' not found \(tried .*images/train2017/two.png\)"
    ):
        coco_instances(path, tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation 10 has unknown category_id 99"):
        coco_instances(path, tmp_path)
    with pytest.raises(DataError, match="file not found"):
        coco_instances(tmp_path / "nope.json", tmp_path)


def test_excluded_classes_are_never_pasted(tmp_path):
    write_tiny_coco(tmp_path)
    config = AnomalyMixConfig(
        fraction=1.0,
        max_objects=3,
        coco_root=str(tmp_path),
        excluded_coco_classes=("person",),
        min_instance_area=0.0,
    )
    mix = AnomalyMix(config, anomaly_index=5)
    assert isinstance(mix.outliers, CocoOutliers)
    assert {i.category for i in mix.outliers.instances} == {"kite", "zebra"}
    rng = np.random.default_rng(0)
    images, labels = torch.zeros(4, 3, 40, 50), torch.zeros(4, 40, 50, dtype=torch.long)
    pasted_colours = []
    for _ in range(10):
        out, out_labels, mixed = mix(images, labels, rng)
        assert mixed.all()
        rgb = denormalize(out).permute(0, 2, 3, 1)[out_labels == 5]
        pasted_colours.append(rgb)
    rgb = torch.cat(pasted_colours)
    assert rgb.shape[0] > 200
    # kite is red and zebra yellow on blue: bilinear edges mix red, yellow and blue, but green only comes with
    # yellow (g <= r); the green person would give g > r
    assert (rgb[:, 1] <= rgb[:, 0] + 1e-5).all()
    assert ((rgb[:, 0] > 0.9) & (rgb[:, 1] < 0.1)).any() and (
        (rgb[:, 0] > 0.9) & (rgb[:, 1] > 0.9)
    ).any()


def test_excluding_every_class_is_an_error(tmp_path):
    write_tiny_coco(tmp_path)
    config = AnomalyMixConfig(
        coco_root=str(tmp_path), excluded_coco_classes=("person", "kite", "zebra")
    )
    with pytest.raises(
        DataError, match=r"instances_train2017.json: no instances left after excluding"
    ):
        AnomalyMix(config, anomaly_index=5)


def test_unknown_excluded_class_warns(tmp_path):
    path, _ = write_tiny_coco(tmp_path)
    with pytest.warns(UserWarning, match=r"excluded classes \['motorbike'\]"):
        coco_instances(path, tmp_path, excluded_classes=("motorbike",))
