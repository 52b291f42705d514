import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from segxal.metrics import ConfusionMatrix, anomaly_metrics, dice_per_class, mean_dice


def test_confusion_matrix_known_answer():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred[:1], target[:1])  # streaming: two updates equal one
    cm.update(pred[1:], target[1:])
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    # IoU: class0 1/(2+2-1)=1/3, class1 3/(3+4-3)=3/4, class2 1/(2+1-1)=1/2
    assert cm.iou().tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)


def test_a_predicted_id_outside_the_classes_is_named():
    cm = ConfusionMatrix(3)
    prediction, target = torch.tensor([[0, 255], [4, 1]]), torch.tensor([[0, 1], [2, 255]])
    with pytest.raises(
        ValueError, match=r"predicted ids must be in \[0, 3\) at labelled pixels, got \[4, 255\]"
    ):
        cm.update(prediction, target)
    cm.update(
        torch.tensor([0, 7]), torch.tensor([1, 255])
    )  # at a void pixel any prediction is fine
    assert cm.matrix[1, 0] == 1 and cm.matrix.sum() == 1


def test_confusion_matrix_matches_sklearn_and_skips_absent_classes():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 500)  # class 4 never appears
    pred = rng.integers(0, 4, 500)
    cm = ConfusionMatrix(5)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert np.array_equal(cm.matrix.numpy(), skm.confusion_matrix(target, pred, labels=range(5)))
    expected = skm.jaccard_score(target, pred, labels=range(4), average=None)
    assert cm.iou()[:4].numpy() == pytest.approx(expected)
    assert math.isnan(cm.iou()[4])
    assert cm.miou() == pytest.approx(expected.mean())
    summary = cm.summary(("a", "b", "c", "d", "e"))
    assert "iou/e" not in summary and summary["iou/a"] == pytest.approx(expected[0])


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="target ids"):
        cm.update(torch.zeros(2), torch.tensor([0, 5]))


def test_dice_known_masks():
    a = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 255]])
    b = torch.tensor([[1, 0, 0, 0], [1, 1, 2, 1]])
    # void in a at (1,3) is ignored. class1: |A|=4, |B|=3, ∩=3 -> 6/7; class0: |A|=3,|B|=3, ∩=2 -> 4/6;
    # class2: |A|=0,|B|=1 -> 0; class3 absent -> NaN
    per_class = dice_per_class(a, b, 4)
    assert per_class[:3].tolist() == pytest.approx([4 / 6, 6 / 7, 0.0])
    assert math.isnan(per_class[3])
    assert mean_dice(a, b, 4) == pytest.approx((4 / 6 + 6 / 7 + 0) / 3)
    assert mean_dice(a, a, 4) == 1.0


def test_dice_matches_sklearn_f1_per_class():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    expected = skm.f1_score(a, b, labels=[0, 1, 2], average=None)
    assert dice_per_class(torch.from_numpy(a), torch.from_numpy(b), 3).numpy() == pytest.approx(
        expected
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anomaly_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 2000)
    labels[rng.random(2000) < 0.1] = 255  # void
    scores = np.round(rng.normal(labels == 1, 1.0), 1)  # rounding creates ties
    valid = labels != 255
    y, s = labels[valid], scores[valid]
    result = anomaly_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert result["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert result["ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert result["fpr95"] == pytest.approx(hendrycks_fpr95(y, s), abs=1e-12)


def hendrycks_fpr95(y, s):
    """FPR95 written out from Hendrycks et al.'s fpr_and_fdr_at_recall (the anomaly papers' code)."""
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order].astype(bool)
    ends = np.r_[np.where(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[ends]
    fps = 1 + ends - tps
    recall = tps / tps[-1]
    last = tps.searchsorted(tps[-1])
    recall, fps = np.r_[recall[last::-1], 1], np.r_[fps[last::-1], 0]
    return fps[np.argmin(np.abs(recall - 0.95))] / np.sum(~y)


@pytest.mark.parametrize(
    "y, s, expected",
    [
        # 9 anomalies and 5 inliers tie at 2, 1 anomaly and 5 inliers at 1: recall 0.9 (FPR 0.5) lies
        # nearer 0.95 in float64 than recall 1.0 (FPR 1.0); the first threshold reaching 95 % gives 1.0
        ([1] * 9 + [0] * 5 + [1] + [0] * 5, [2] * 14 + [1] * 6, 0.5),
        # 19 of 20 anomalies above every inlier, the last tied with half the 10 inliers: recall 0.95
        # exactly at FPR 0 (the first threshold reaching 95 % gives the same)
        ([1] * 19 + [1] + [0] * 5 + [0] * 5, [3] * 19 + [2] * 6 + [1] * 5, 0.0),
        # recall 0.5 at FPR 0, then everything tied: recall 1.0 at FPR 1
        ([1, 1, 0, 0, 1, 1], [2, 2, 1, 1, 1, 1], 1.0),
    ],
)
def test_fpr95_on_tied_scores_follows_the_papers_convention(y, s, expected):
    y, s = np.array(y), np.array(s, dtype=np.float64)
    assert anomaly_metrics(s, y)["fpr95"] == pytest.approx(expected, abs=1e-12)
    assert hendrycks_fpr95(y, s) == pytest.approx(expected, abs=1e-12)


def test_anomaly_metrics_perfect_and_hand_computed():
    perfect = anomaly_metrics(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1]))
    assert perfect == {"auroc": 1.0, "ap": 1.0, "fpr95": 0.0}
    # scores 0.9(+) 0.8(-) 0.7(+) 0.1(-): AP = 1/2*1 + 1/2*2/3; AUROC = 3/4; 95 % TPR needs both
    # positives, reached at threshold 0.7 where FPR = 1/2
    result = anomaly_metrics(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    assert result["ap"] == pytest.approx(0.5 + 1 / 3)
    assert result["auroc"] == pytest.approx(0.75)
    assert result["fpr95"] == pytest.approx(0.5)


def test_anomaly_metrics_bad_input():
    with pytest.raises(ValueError, match="both anomaly and inlier"):
        anomaly_metrics(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="NaN"):
        anomaly_metrics(np.array([np.nan, 0.2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        anomaly_metrics(np.array([0.1, 0.2]), np.array([0, 3]))
