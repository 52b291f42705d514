import pickle

import numpy as np
import pytest

from orchestrator.oracles import (
    AnnotationRequest,
    DatasetGroundTruth,
    PseudoLabelOracle,
    SimulatedOracle,
    objects_touching,
)
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES


def request(
    prediction,
    region_map,
    tta_prediction=None,
    confidence=None,
    sample_id="s",
    image_path="s.png",
    label_path=None,
):
    shape = prediction.shape
    return AnnotationRequest(
        sample_id=sample_id,
        image_path=image_path,
        prediction=prediction.astype(np.uint8),
        tta_prediction=(prediction if tta_prediction is None else tta_prediction).astype(np.uint8),
        tta_confidence=np.ones(shape, np.float32) if confidence is None else confidence,
        region_map=region_map.astype(np.int32),
        regions=[],
        label_path=label_path,
    )


def test_simulated_oracle_corrects_whole_objects_under_regions():
    truth = np.array(
        [
            [1, 1, 0, 0, 2, 2],
            [1, 1, 0, 0, 2, 2],
            [0, 0, 0, 0, 0, 0],
            [3, 0, 0, 0, 0, 3],
        ]
    )
    prediction = np.zeros_like(truth)  # the model sees only class 0
    region = np.zeros_like(truth)
    region[0, 0] = 1  # a prompt on the class-1 object only
    region[3, 5] = 2  # and one on the right class-3 object (the left one is a separate object)
    oracle = SimulatedOracle(lambda request: truth)
    (annotation,) = oracle.annotate([request(prediction, region)])
    expected = prediction.copy()
    expected[:2, :2] = 1
    expected[3, 5] = 3
    assert annotation.label.tolist() == expected.tolist()
    assert annotation.cost == 2.0  # two objects corrected
    assert annotation.pixels == 5


def test_objects_touching_ignores_void_and_counts_objects_per_class():
    truth = np.array([[1, 255, 1], [1, 255, 1]])
    touched, count = objects_touching(truth, np.ones_like(truth, dtype=bool))
    assert count == 2 and touched.tolist() == [[True, False, True], [True, False, True]]


def test_simulated_oracle_without_regions_returns_the_prediction():
    truth = np.ones((3, 3), int)
    prediction = np.zeros((3, 3), int)
    (annotation,) = SimulatedOracle(lambda _: truth).annotate(
        [request(prediction, np.zeros((3, 3)))]
    )
    assert (annotation.label == 0).all() and annotation.cost == 0 and annotation.pixels == 0


def test_pseudo_oracle_ignores_low_confidence_pixels():
    tta = np.array([[1, 2], [3, 4]])
    confidence = np.array([[0.95, 0.5], [0.9, 0.89]], np.float32)
    (annotation,) = PseudoLabelOracle(0.9).annotate(
        [request(np.zeros((2, 2)), np.zeros((2, 2)), tta, confidence)]
    )
    assert annotation.label.tolist() == [[1, 255], [3, 255]]
    assert annotation.cost == 0.0 and annotation.pixels == 2
    with pytest.raises(ValueError, match="pseudo_confidence"):
        PseudoLabelOracle(1.5)


def test_shape_mismatch_names_the_sample():
    oracle = SimulatedOracle(lambda _: np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="^s: ground truth"):
        oracle.annotate([request(np.zeros((3, 3)), np.zeros((3, 3)))])


def test_dataset_ground_truth_reads_the_requests_label_file_at_the_scoring_size(
    synthetic_root, monkeypatch
):
    manifest = cityscapes_manifest(synthetic_root, "train")
    size = (32, 64)
    expected = SegmentationDataset(manifest, CITYSCAPES, SampleTransform(size=size))
    expected_labels = [expected[i]["label"].numpy() for i in range(2)]

    def no_decoding(path):
        raise AssertionError(f"{path}: the ground truth decoded the image")

    # the image's pixels are never decoded: a selected image is decoded to score and to explain only
    monkeypatch.setattr("segxal.data.dataset.open_rgb", no_decoding)
    truth = DatasetGroundTruth(CITYSCAPES, size)
    first, second = manifest.slice(0, 2).to_pylist()
    blank = np.zeros(size)
    got = truth(
        request(
            blank,
            blank,
            sample_id=first["sample_id"],
            image_path=first["image_path"],
            label_path=first["label_path"],
        )
    )
    assert got.dtype == np.uint8 and np.array_equal(got, expected_labels[0])
    # the path decides, not the id: nothing is looked up in a pool-wide index
    other = truth(
        request(
            blank,
            blank,
            sample_id=first["sample_id"],
            image_path=second["image_path"],
            label_path=second["label_path"],
        )
    )
    assert np.array_equal(other, expected_labels[1]) and not np.array_equal(other, got)


def test_the_simulated_oracle_holds_nothing_pool_sized():
    # a closure over the manifest would make the oracle grow with the pool
    assert len(pickle.dumps(SimulatedOracle(DatasetGroundTruth(CITYSCAPES, (256, 512))))) < 4096


def test_dataset_ground_truth_without_a_label_names_the_sample():
    blank = np.zeros((2, 2))
    with pytest.raises(ValueError, match="^s: the simulated oracle needs ground truth"):
        DatasetGroundTruth(CITYSCAPES, None)(request(blank, blank))
