import numpy as np
import pytest

from orchestrator.oracles import AnnotationRequest, PseudoLabelOracle, SimulatedOracle, objects_touching


def request(prediction, region_map, tta_prediction=None, confidence=None):
    shape = prediction.shape
    return AnnotationRequest(
        sample_id="s", image_path="s.png", prediction=prediction.astype(np.uint8),
        tta_prediction=(prediction if tta_prediction is None else tta_prediction).astype(np.uint8),
        tta_confidence=np.ones(shape, np.float32) if confidence is None else confidence,
        region_map=region_map.astype(np.int32), regions=[],
    )


def test_simulated_oracle_corrects_whole_objects_under_regions():
    truth = np.array([
        [1, 1, 0, 0, 2, 2],
        [1, 1, 0, 0, 2, 2],
        [0, 0, 0, 0, 0, 0],
        [3, 0, 0, 0, 0, 3],
    ])
    prediction = np.zeros_like(truth)  # the model sees only class 0
    region = np.zeros_like(truth)
    region[0, 0] = 1  # a prompt on the class-1 object only
    region[3, 5] = 2  # and one on the right class-3 object (the left one is a separate object)
    oracle = SimulatedOracle(lambda sample_id: truth)
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
    (annotation,) = SimulatedOracle(lambda _: truth).annotate([request(prediction, np.zeros((3, 3)))])
    assert (annotation.label == 0).all() and annotation.cost == 0 and annotation.pixels == 0


def test_pseudo_oracle_ignores_low_confidence_pixels():
    tta = np.array([[1, 2], [3, 4]])
    confidence = np.array([[0.95, 0.5], [0.9, 0.89]], np.float32)
    (annotation,) = PseudoLabelOracle(0.9).annotate([request(np.zeros((2, 2)), np.zeros((2, 2)), tta, confidence)])
    assert annotation.label.tolist() == [[1, 255], [3, 255]]
    assert annotation.cost == 0.0 and annotation.pixels == 2
    with pytest.raises(ValueError, match="pseudo_confidence"):
        PseudoLabelOracle(1.5)


def test_shape_mismatch_names_the_sample():
    oracle = SimulatedOracle(lambda _: np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="^s: ground truth"):
        oracle.annotate([request(np.zeros((3, 3)), np.zeros((3, 3)))])
