"""SegmentMeIfYouCan's component metrics on hand-made masks with answers worked out by hand, and the
best-F1 threshold against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from segxal.component_metrics import best_f1_threshold, image_components, summarize
from segxal.pebal.evaluate import ComponentSizes, Method, evaluate_anomaly


def two_objects_one_prediction():
    """Two 2x2 objects one column apart, one prediction over both and the gap (10 pixels), and a
    2x2 false positive."""
    label = np.zeros((10, 10), np.uint8)
    label[1:3, 1:3] = 1
    label[1:3, 4:6] = 1
    predicted = np.zeros((10, 10), bool)
    predicted[1:3, 1:6] = True
    predicted[7:9, 7:9] = True
    return predicted, label


def test_siou_does_not_charge_a_prediction_for_the_other_object():
    predicted, label = two_objects_one_prediction()
    result = image_components(predicted, label)
    # sIoU(k) = 4 / (10 - 4): the other object's 4 pixels leave the union; PPV = 8 / 10 and 0 / 4
    assert result.siou.tolist() == pytest.approx([4 / 6, 4 / 6])
    assert sorted(result.ppv.tolist()) == pytest.approx([0.0, 0.8])
    summary = summarize([result])
    # tau 0.25 .. 0.65 (9 values): TP 2, FN 0, FP 1 -> F1 0.8; tau 0.70, 0.75: TP 0, FN 2, FP 1 -> 0
    assert summary["mean_f1"] == pytest.approx(9 * 0.8 / 11)
    assert (summary["f1_25"], summary["f1_50"], summary["f1_75"]) == pytest.approx((0.8, 0.8, 0.0))
    assert (summary["siou"], summary["ppv"]) == pytest.approx((4 / 6, 0.4))


def test_void_splits_predictions_and_the_size_filters_drop_specks():
    predicted, label = two_objects_one_prediction()
    label[:, 3] = 255  # the gap column is void: the prediction falls apart into two components
    result = image_components(predicted, label)
    assert result.siou.tolist() == [1.0, 1.0] and sorted(result.ppv.tolist()) == [0.0, 1.0, 1.0]
    # the 4-pixel false positive is under min_predicted; a 1-pixel object under min_gt becomes void
    label[5, 0] = 1
    predicted[5, 0] = True
    filtered = image_components(predicted, label, min_predicted=5, min_gt=2)
    # every predicted part has 4 pixels: all dropped, both objects missed
    assert filtered.siou.tolist() == [0.0, 0.0] and filtered.ppv.tolist() == []
    kept = image_components(predicted, label, min_predicted=4, min_gt=2)
    assert kept.siou.tolist() == [1.0, 1.0] and kept.ppv.tolist() == [1.0, 1.0, 0.0]
    # an object nothing predicts: sIoU 0, a false negative at every tau
    predicted[:] = False
    empty = summarize([image_components(predicted, label, min_gt=2)])
    assert (empty["siou"], empty["mean_f1"]) == (0.0, 0.0)


def test_best_f1_threshold_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.3).astype(np.uint8)
    scores = np.round(rng.random(400) + 0.6 * labels, 2)  # ties on purpose
    labels[:20] = 255
    threshold = best_f1_threshold(scores, labels)
    keep = labels != 255
    best = max(f1_score(labels[keep], scores[keep] >= t) for t in np.unique(scores[keep]))
    assert f1_score(labels[keep], scores[keep] >= threshold) == pytest.approx(best)
    assert best_f1_threshold(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == 0.7


class Echo(torch.nn.Module):
    """Logits whose max-logit score is each image's stored map (upsampled later to the label)."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, image):
        index = int(image[0, 0, 0, 0])
        return torch.stack([-self.maps[index], torch.full_like(self.maps[index], -10.0)])[None]


def test_scores_are_upsampled_to_the_label_resolution_and_components_counted():
    low = torch.zeros(4, 4)
    low[0:2, 0:2] = 1.0  # a 2x2 score blob: bilinear to 8x8 covers the object's 4x4 corner
    label = torch.zeros(8, 8, dtype=torch.long)
    label[0:4, 0:4] = 1
    label[7, 7] = 255
    item = {"image": torch.zeros(3, 4, 4), "label": label, "sample_id": "a"}
    result = evaluate_anomaly(
        {"m": Echo([low])},
        [item],
        "toy",
        (Method("max_logit", "m", "max_logit"),),
        batch_size=1,
        components=ComponentSizes(min_predicted=0, min_gt=0),
        protocol="scored at 4x4, compared at 8x8",
    )
    assert result.labels.size == 63  # every non-void pixel of the 8x8 label
    upsampled = torch.nn.functional.interpolate(
        low[None, None], size=(8, 8), mode="bilinear", align_corners=False
    )[0, 0]
    keep = (label != 255).flatten()
    expected = upsampled.flatten()[keep].numpy()
    assert np.allclose(np.sort(result.scores["max_logit"]), np.sort(expected))
    metrics = result.metrics["max_logit"]
    assert metrics["auroc"] == 1.0  # the upsampled blob is highest exactly on the 4x4 object
    assert (metrics["siou"], metrics["ppv"], metrics["mean_f1"]) == (1.0, 1.0, 1.0)
    assert result.protocol == "scored at 4x4, compared at 8x8"
