import math

import numpy as np
import pytest
import torch

from orchestrator.gate import check_theta, dice_gate, dice_per_image, gate_summary, image_dice
from segxal.data.labels import IGNORE_INDEX


def test_dice_strictly_above_theta_is_accepted():
    ids = ["a", "b", "c", "d", "e"]
    decision = dice_gate(ids, [0.49, 0.5, 0.51, float("nan"), 1.0], theta=0.5)
    assert decision.accepted == ("c", "e")
    assert decision.returned == ("a", "b", "d")  # exactly theta is not "above"; NaN never is
    assert decision.accepted_dice == (0.51, 1.0)
    assert decision.returned_dice[:2] == (0.49, 0.5) and math.isnan(decision.returned_dice[2])
    assert decision.enabled


def test_theta_zero_turns_the_gate_off():
    decision = dice_gate(["a", "b", "c"], [0.0, float("nan"), 0.7], theta=0)
    assert decision.accepted == ("a", "b", "c") and decision.returned == ()
    assert not decision.enabled


def test_theta_one_accepts_nothing_and_empty_input_is_fine():
    assert dice_gate(["a"], [1.0], 1.0).accepted == ()
    empty = dice_gate([], [], 0.5)
    assert empty.accepted == () and empty.returned == ()


@pytest.mark.parametrize("theta", [-0.1, 1.01, float("nan"), float("inf"), "0.5", None, True])
def test_bad_theta_is_an_error_naming_theta(theta):
    with pytest.raises(ValueError, match="theta"):
        check_theta(theta)
    with pytest.raises(ValueError, match="theta"):
        dice_gate(["a"], [0.9], theta)


def test_gate_input_errors():
    with pytest.raises(ValueError, match="expected 2 values"):
        dice_gate(["a", "b"], [0.5], 0.5)
    with pytest.raises(ValueError, match=r"dice must be in \[0, 1\].*'b', 1.5"):
        dice_gate(["a", "b"], [0.5, 1.5], 0.5)
    with pytest.raises(ValueError, match="duplicate"):
        dice_gate(["a", "a"], [0.5, 0.6], 0.5)


def test_image_dice_known_value_and_void_pixels():
    prediction = torch.tensor([[0, 0], [1, 1]])
    annotation = torch.tensor([[0, 1], [1, 1]])
    # class 0: 2*1/(2+1); class 1: 2*2/(2+3)
    assert image_dice(prediction, annotation, num_classes=3) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert image_dice(prediction.numpy(), annotation.numpy(), num_classes=3) == pytest.approx(
        (2 / 3 + 4 / 5) / 2
    )
    voided = torch.tensor(
        [[0, IGNORE_INDEX], [1, 1]]
    )  # the disagreeing pixel is void: perfect agreement
    assert image_dice(prediction, voided, num_classes=3) == pytest.approx(1.0)
    assert math.isnan(image_dice(prediction, torch.full((2, 2), IGNORE_INDEX), num_classes=3))
    with pytest.raises(ValueError, match=r"prediction shape \(2, 2\) != annotation shape \(1, 4\)"):
        image_dice(prediction, annotation.reshape(1, 4), num_classes=3)


def test_dice_per_image_feeds_the_gate():
    perfect = torch.tensor([[0, 1], [2, 2]])
    half = torch.tensor([[0, 0], [0, 0]])
    ids = ["good", "bad"]
    dice = dice_per_image(ids, [perfect, perfect], [perfect.clone(), half], num_classes=3)
    assert dice[0] == 1.0 and dice[1] == pytest.approx(
        (2 * 1 / 5) / 3
    )  # class 0 only: 2/5, classes 1, 2: 0
    decision = dice_gate(ids, dice, theta=0.5)
    assert decision.accepted == ("good",) and decision.returned == ("bad",)
    summary = gate_summary(decision)
    assert (
        summary["gate/accepted"] == 1
        and summary["gate/returned"] == 1
        and summary["gate/accepted_dice_mean"] == 1.0
    )
    with pytest.raises(ValueError, match=r"^bad: prediction shape"):
        dice_per_image(ids, [perfect, perfect], [perfect, torch.zeros(3, 3, dtype=torch.long)], 3)
    with pytest.raises(ValueError, match="2 ids, 1 predictions"):
        dice_per_image(ids, [perfect], [perfect, perfect], 3)


def test_gate_does_not_mutate_its_inputs():
    dice = np.array([0.2, 0.9])
    ids = ["a", "b"]
    dice_gate(ids, dice, 0.5)
    assert dice.tolist() == [0.2, 0.9] and ids == ["a", "b"]
