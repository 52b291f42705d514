"""Class-balanced acquisition (al.class_balance): the class weights by hand, scores weighted by the
predicted classes' weights at image and region level, and the run handing the last training's counts to
the scorers."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import FakeBackend, fake_run, loop_pool

from actors.scoring import PoolScorer
from orchestrator.class_balance import class_weights
from orchestrator.config import ActiveLearningConfig, load_experiment
from orchestrator.run import TrainOutcome
from orchestrator.strategies import RegionSpec, ScoreKind
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.eem.config import EEMConfig
from segxal.eem.entropy import normalized_entropy
from segxal.models.unet import UNet, UNetConfig


def test_class_weights_by_hand():
    assert class_weights([0, 50, 50]) == pytest.approx((1.0, 1 / 2.5, 1 / 2.5))  # C=3: 1/(3f+1)
    assert class_weights([10, 10]) == pytest.approx((0.5, 0.5))
    assert class_weights([0, 0, 0]) == (1.0, 1.0, 1.0)  # nothing counted: no preference


def test_class_balance_needs_a_score():
    with pytest.raises(ValueError, match="strategy random ranks without one"):
        load_experiment(None, ["al.class_balance=true", "al.strategy=random"])
    with pytest.raises(ValueError, match="strategy coreset ranks without one"):
        load_experiment(None, ["al.class_balance=true", "al.strategy=coreset"])


SCORE_SIZE = (32, 64)


@pytest.fixture(scope="module")
def scorer_and_rows(synthetic_root):
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=4, depth=2)).eval()
    scorer = PoolScorer(EEMConfig(), "cityscapes", SCORE_SIZE, batch_size=4, device="cpu")
    scorer.load_model(model.to_checkpoint())
    rows = cityscapes_manifest(synthetic_root, "train").slice(0, 5)
    dataset = SegmentationDataset(rows, CITYSCAPES, SampleTransform(size=SCORE_SIZE))
    with torch.no_grad():
        logits = model(torch.stack([dataset[i]["image"] for i in range(len(rows))]))
    return scorer, rows, logits


WEIGHTS = tuple(np.linspace(0.1, 1.0, CITYSCAPES.num_classes))


def test_image_scores_are_weighted_by_the_mean_weight_of_the_predicted_pixels(scorer_and_rows):
    scorer, rows, logits = scorer_and_rows
    plain = scorer.score(rows, ScoreKind.ENTROPY)["score"].to_numpy()
    weighted = scorer.score(rows, ScoreKind.ENTROPY, WEIGHTS)["score"].to_numpy()
    mean_weight = np.asarray(WEIGHTS)[logits.argmax(1).numpy()].mean(axis=(1, 2))
    np.testing.assert_allclose(weighted, plain * mean_weight, rtol=1e-5)
    eem_plain = scorer.score(rows, ScoreKind.EBU)["score"].to_numpy()
    eem_weighted = scorer.score(rows, ScoreKind.EBU, WEIGHTS)["score"].to_numpy()
    np.testing.assert_allclose(eem_weighted, eem_plain * mean_weight, rtol=1e-5)


def test_cell_scores_are_weighted_by_their_own_pixels(scorer_and_rows):
    scorer, rows, logits = scorer_and_rows
    rows = rows.slice(0, 1).append_column("mask_path", pa.nulls(1, pa.string()))
    table = scorer.score_regions(rows, RegionSpec("cells", ScoreKind.ENTROPY, 16), WEIGHTS)
    entropy = normalized_entropy(logits[:1])[0].numpy()
    pixel_weight = np.asarray(WEIGHTS)[logits[0].argmax(0).numpy()]
    for row in table.to_pylist():
        top, left = (row["region"] - 1) // 4 * 16, (row["region"] - 1) % 4 * 16
        window = (slice(top, top + 16), slice(left, left + 16))
        expected = entropy[window].mean() * pixel_weight[window].mean()
        assert row["score"] == pytest.approx(expected, rel=1e-5)


class CountingBackend(FakeBackend):
    """Reports fixed class pixel counts from training and records the weights scoring is given."""

    def __init__(self, truth, tmp):
        super().__init__(truth, tmp)
        self.weights = []

    def train(self, cycle, train, val, init_checkpoint):
        outcome = super().train(cycle, train, val, init_checkpoint)
        counts = {"train/class_pixels/0": 300.0, "train/class_pixels/1": 100.0 * (cycle + 1)}
        return TrainOutcome(outcome.checkpoint, {**outcome.metrics, **counts})

    def score(self, cycle, checkpoint, rows, kind, class_weights=None):
        self.weights.append(class_weights)
        yield from super().score(cycle, checkpoint, rows, kind)


def test_the_run_weighs_by_the_last_trainings_class_counts(synthetic_root, tmp_path):
    state, truth = loop_pool(synthetic_root, tmp_path)
    al = ActiveLearningConfig(strategy="entropy", budget=2, theta=0.0, class_balance=True)
    backend = CountingBackend(truth, tmp_path)
    run, _, _ = fake_run(tmp_path / "run", state, truth, 2, al, backend=backend)
    rest = [0.0] * (CITYSCAPES.num_classes - 2)
    # cycle 1 scores with cycle 0's training counts, cycle 2 with cycle 1's
    assert backend.weights == [class_weights([300.0, 100.0, *rest]), class_weights([300.0, 200.0, *rest])]  # fmt: skip
    assert backend.weights[0][0] == pytest.approx(1 / (19 * 0.75 + 1))
    assert run.progress.class_pixels == [300.0, 300.0, *rest]


def test_runs_are_tagged_with_what_they_rank_by():
    def label(*overrides):
        return load_experiment(None, list(overrides)).acquisition

    assert label("al.strategy=entropy") == "entropy"
    assert label("al.strategy=entropy", "al.class_balance=true") == "entropy+cb"
    assert label("al.strategy=eem", "eem.uncertainty=bald", "model.dropout=0.2") == "eem+bald"
    assert label("al.strategy=bald", "model.dropout=0.2", "al.class_balance=true") == "bald+cb"
    otsu = ("eem.region_threshold=otsu", "model.dropout=0.2")
    assert label("al.strategy=eem", *otsu, "eem.uncertainty=bald") == "eem+bald+otsu"
    assert label("al.strategy=entropy", *otsu, "al.class_balance=true") == "entropy+otsu+cb"
    assert label("al.strategy=eem", "eem.target=max") == "eem+max"
    assert label("al.strategy=entropy", "eem.target=max") == "entropy"  # no Grad-CAM in its score
