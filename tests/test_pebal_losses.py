"""PEBAL loss terms against values computed by hand (plain Python math on a few pixels)."""

import math

import pytest
import torch

from segxal.pebal.config import PebalConfig
from segxal.pebal.losses import TERMS, NonFiniteLossError, check_finite, pebal_loss

# --- plain-Python helpers: the formulas written out, independent of the library code -----------------


def lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def softmax(values):
    total = lse(values)
    return [math.exp(v - total) for v in values]


def gauss_taps(kernel=7, sigma=1.0):
    raw = [math.exp(-0.5 * ((i - kernel // 2) / sigma) ** 2) for i in range(kernel)]
    return [r / sum(raw) for r in raw]


def pad_index(i, size, half=3):
    if size > half:  # reflect without repeating the edge
        if i < 0:
            return -i
        if i >= size:
            return 2 * (size - 1) - i
        return i
    return min(max(i, 0), size - 1)  # too small to reflect: replicate


def blur_by_hand(grid):
    """Direct 2-D 7x7 Gaussian sum (σ 1) over a list-of-rows grid."""
    taps = gauss_taps()
    h, w = len(grid), len(grid[0])
    return [
        [
            sum(
                taps[di] * taps[dj] * grid[pad_index(r + di - 3, h)][pad_index(c + dj - 3, w)]
                for di in range(7)
                for dj in range(7)
            )
            for c in range(w)
        ]
        for r in range(h)
    ]


# 2x2 image, 2 inlier classes + abstention. Pixels: (0,0) class 0, (0,1) class 1, (1,0) anomaly, (1,1) void.
LOGITS = [
    [[3.0, 1.0, 0.5], [0.5, 2.5, 1.0]],
    [[0.2, 0.4, 2.0], [50.0, -50.0, 9.0]],
]
TARGET = [[0, 1], [2, 255]]
CONFIG = dict(m_in=-2.8, m_out=-0.3, lam=0.5, beta_smooth=0.1, beta_sparse=0.2, ood_weight=0.3)


def as_tensors(logits_rows, target_rows):
    logits = torch.tensor(logits_rows, dtype=torch.float64).permute(2, 0, 1)[None]
    return logits, torch.tensor(target_rows)[None]


def relu(x):
    return max(0.0, x)


def test_paper_terms_match_hand_values():
    config = PebalConfig(variant="paper", **CONFIG)
    energy = [[-lse(px[:2]) for px in row] for row in LOGITS]
    e00, e01, e10 = energy[0][0], energy[0][1], energy[1][0]
    penalty = {k: max(v**2, 1.0) for k, v in {"00": e00, "01": e01, "10": e10}.items()}
    p00, p01, p10 = softmax(LOGITS[0][0]), softmax(LOGITS[0][1]), softmax(LOGITS[1][0])
    n = 3  # non-void pixels
    expected = {
        "pal_inlier": (
            -math.log(p00[0] + p00[2] / penalty["00"]) - math.log(p01[1] + p01[2] / penalty["01"])
        )
        / n,
        "pal_anomaly": -math.log(p10[2] + p10[2] / penalty["10"]) / n,
        "energy_inlier": 0.5 * (relu(e00 + 2.8) ** 2 + relu(e01 + 2.8) ** 2) / n,
        "energy_anomaly": 0.5 * relu(-0.3 - e10) ** 2 / n,
        # valid pairs: (0,0)-(0,1) horizontally and (0,0)-(1,0) vertically; both others touch the void pixel
        "smoothness": 0.1 * (abs(e01 - e00) + abs(e10 - e00)) / n,
        "sparsity": 0.2 * abs(e10) / n,
    }
    # the chosen logits put one inlier margin on each side of its hinge and the anomaly margin active
    assert (
        e00 + 2.8 < 0 < e01 + 2.8
        and -0.3 - e10 > 0
        and penalty["10"] == 1.0
        and penalty["00"] > 1.0
    )
    terms = pebal_loss(*as_tensors(LOGITS, TARGET), config)
    assert set(terms) == set(TERMS) | {"total"}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-10, abs=1e-14), name
    assert terms["total"].item() == pytest.approx(sum(expected.values()), rel=1e-10)


def test_reference_terms_match_hand_values():
    # Two images: the first has no anomaly pixel (its own PAL mean), the second is LOGITS/TARGET.
    clean_logits = [[[1.0, 4.0, 0.0], [2.0, 2.0, 2.0]], [[0.0, 3.0, -1.0], [1.5, -0.5, 0.5]]]
    clean_target = [[1, 255], [1, 0]]
    config = PebalConfig(variant="reference", **CONFIG)
    images = [(clean_logits, clean_target), (LOGITS, TARGET)]
    energies = [[[-lse(px[:2]) for px in row] for row in logits] for logits, _ in images]
    penalties = []
    for (_, target), energy in zip(images, energies, strict=True):
        valid = [[float(t != 255) for t in row] for row in target]
        numerator = blur_by_hand(
            [
                [e**2 * v for e, v in zip(er, vr, strict=True)]
                for er, vr in zip(energy, valid, strict=True)
            ]
        )
        denominator = blur_by_hand(valid)
        penalties.append(
            [
                [max(n / d, 1.0) for n, d in zip(nr, dr, strict=True)]
                for nr, dr in zip(numerator, denominator, strict=True)
            ]
        )
    group_means, margins_in, anomaly_energies, anomaly_pal = [], [], [], []
    squares = 0.0
    for (logits, target), energy, penalty in zip(images, energies, penalties, strict=True):
        pal = []
        for r in range(2):
            for c in range(2):
                p, t, e, a = softmax(logits[r][c]), target[r][c], energy[r][c], penalty[r][c]
                if t in (0, 1):
                    pal.append(-math.log(p[t] + p[2] / a))
                    margins_in.append(relu(e + 2.8) ** 2)
                elif t == 2:
                    anomaly_energies.append(e)
                    anomaly_pal += [-math.log(max(p[k] + p[2] / a, 1e-7)) for k in (0, 1)]
        group_means.append(sum(pal) / len(pal))
        valid = [[t != 255 for t in row] for row in target]
        pairs = [((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 0), (1, 0)), ((0, 1), (1, 1))]
        squares += sum(
            (energy[a[0]][a[1]] - energy[b[0]][b[1]]) ** 2
            for a, b in pairs
            if valid[a[0]][a[1]] and valid[b[0]][b[1]]
        )
    expected = {
        "pal_inlier": group_means[0] + group_means[1],
        "pal_anomaly": 0.3 * sum(anomaly_pal) / len(anomaly_pal),
        "energy_inlier": 0.5 * 0.5 * sum(margins_in) / len(margins_in),
        "energy_anomaly": 0.5
        * 0.5
        * sum(relu(-0.3 - e) ** 2 for e in anomaly_energies)
        / len(anomaly_energies),
        "sparsity": 0.5 * 0.2 * math.sqrt(sum(e * e for e in anomaly_energies)),
        "smoothness": 0.5 * 0.1 * 0.5 * squares,
    }
    logits = torch.cat([as_tensors(*image)[0] for image in images])
    target = torch.cat([as_tensors(*image)[1] for image in images])
    terms = pebal_loss(logits, target, config)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-10, abs=1e-14), name
    assert terms["total"].item() == pytest.approx(sum(expected.values()), rel=1e-10)


def test_reference_without_anomaly_uses_full_inlier_margin_and_no_sparsity():
    logits = [[[3.0, 1.0, 0.5], [0.5, 2.5, 1.0]]]
    config = PebalConfig(variant="reference", **CONFIG)
    terms = pebal_loss(*as_tensors(logits, [[0, 1]]), config)
    energies = [-lse(px[:2]) for px in logits[0]]
    assert terms["energy_inlier"].item() == pytest.approx(
        0.5 * sum(relu(e + 2.8) ** 2 for e in energies) / 2, rel=1e-10
    )
    assert (
        terms["energy_anomaly"].item() == 0.0
        and terms["sparsity"].item() == 0.0
        and terms["pal_anomaly"].item() == 0.0
    )


def test_reference_penalty_is_blurred_with_reflect_padding():
    """A 1x5 row: reflect padding horizontally (5 > 3), replicate vertically (1 row)."""
    logits = [[[4.0, 3.0, 0.0], [1.0, 0.5, 0.0], [6.0, 6.0, 1.0], [2.0, 0.0, 0.0], [3.0, 3.5, 0.5]]]
    target = [[0, 1, 0, 1, 0]]
    config = PebalConfig(variant="reference", **CONFIG)
    energy = [-lse(px[:2]) for px in logits[0]]
    penalty = [max(v, 1.0) for v in blur_by_hand([[e**2 for e in energy]])[0]]
    pal = [
        -math.log(softmax(px)[t] + softmax(px)[2] / a)
        for px, t, a in zip(logits[0], target[0], penalty, strict=True)
    ]
    terms = pebal_loss(*as_tensors(logits, target), config)
    assert terms["pal_inlier"].item() == pytest.approx(sum(pal) / 5, rel=1e-10)
    unblurred = [
        -math.log(softmax(px)[t] + softmax(px)[2] / max(e**2, 1.0))
        for px, t, e in zip(logits[0], target[0], energy, strict=True)
    ]
    assert abs(sum(unblurred) / 5 - sum(pal) / 5) > 1e-3  # the blur matters on this row


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_void_pixels_change_nothing(variant):
    config = PebalConfig(variant=variant, **CONFIG)
    logits, target = as_tensors(LOGITS, TARGET)
    other = logits.clone()
    other[0, :, 1, 1] = torch.tensor([-30.0, 40.0, 7.0], dtype=torch.float64)
    first, second = pebal_loss(logits, target, config), pebal_loss(other, target, config)
    for name in first:
        assert first[name].item() == pytest.approx(second[name].item(), rel=1e-12, abs=1e-15), name


def test_penalty_floor_and_disabled_floor():
    logits, target = as_tensors([[[-1.0, -1.0, 0.0]]], [[0]])  # E = 1 - log 2, E² < 1
    e = -lse([-1.0, -1.0])
    p = softmax([-1.0, -1.0, 0.0])
    floored = pebal_loss(logits, target, PebalConfig(**CONFIG))["pal_inlier"].item()
    raw = pebal_loss(logits, target, PebalConfig(penalty_min=0.0, **CONFIG))["pal_inlier"].item()
    assert floored == pytest.approx(-math.log(p[0] + p[2]), rel=1e-12)
    assert raw == pytest.approx(-math.log(p[0] + p[2] / e**2), rel=1e-12)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_gradcheck_total_and_terms(variant):
    generator = torch.Generator().manual_seed(0)
    logits = (
        torch.randn(2, 4, 4, 4, generator=generator, dtype=torch.float64) + 2.0
    ).requires_grad_()
    target = torch.randint(0, 4, (2, 4, 4), generator=generator)
    target[0, 0, :2] = 255
    assert (target == 3).any() and (target < 3).any()
    config = PebalConfig(variant=variant, m_in=-5.0, m_out=-2.0, beta_smooth=0.05, beta_sparse=0.05)
    names = (*TERMS, "total")

    def all_terms(x):
        terms = pebal_loss(x, target, config)
        return torch.stack([terms[name] for name in names])

    values = all_terms(logits)
    assert (
        values[:-1] != 0
    ).all()  # every term is active at this point, so every gradient is checked
    assert torch.autograd.gradcheck(all_terms, (logits,))


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_gradients_flow_only_from_non_void_pixels(variant):
    logits, target = as_tensors(LOGITS, TARGET)
    logits.requires_grad_()
    pebal_loss(logits, target, PebalConfig(variant=variant, **CONFIG))["total"].backward()
    assert torch.all(logits.grad[0, :, 1, 1] == 0)
    assert torch.all(logits.grad[0, :, 0, 0].abs().sum() > 0)


def test_inputs_not_modified_and_dtype_device_followed():
    logits, target = as_tensors(LOGITS, TARGET)
    before_logits, before_target = logits.clone(), target.clone()
    terms = pebal_loss(logits, target, PebalConfig(variant="reference"))
    assert torch.equal(logits, before_logits) and torch.equal(target, before_target)
    assert all(
        v.dtype == torch.float64 and v.device == logits.device and v.dim() == 0
        for v in terms.values()
    )


def test_bad_targets_and_shapes_are_errors():
    logits, target = as_tensors(LOGITS, TARGET)
    with pytest.raises(ValueError, match=r"target values \[3\]"):
        pebal_loss(logits, torch.where(target == 2, 3, target))
    with pytest.raises(ValueError, match="does not match"):
        pebal_loss(logits, target[:, :1])
    with pytest.raises(ValueError, match=r"\(B, Y\+1, H, W\)"):
        pebal_loss(logits[0], target)


def test_all_void_batch_gives_zero_loss_with_graph():
    logits, _ = as_tensors(LOGITS, TARGET)
    logits.requires_grad_()
    for variant in ("paper", "reference"):
        terms = pebal_loss(logits, torch.full((1, 2, 2), 255), PebalConfig(variant=variant))
        assert terms["total"].item() == 0.0
        terms["total"].backward()


def test_check_finite_names_step_batch_and_term():
    good = {"pal_inlier": torch.tensor(1.0), "total": torch.tensor(1.0)}
    check_finite(good, step=3, batch=1)
    bad = {
        "pal_inlier": torch.tensor(float("nan")),
        "sparsity": torch.tensor(float("inf")),
        "total": torch.tensor(1.0),
    }
    with pytest.raises(NonFiniteLossError, match=r"step 7, batch 2: pal_inlier=nan, sparsity=inf"):
        check_finite(bad, step=7, batch=2)


def test_zero_penalty_floor_can_blow_up_and_is_caught():
    logits, target = as_tensors([[[0.0, 0.0, 0.0]]], [[0]])
    logits = logits - math.log(2.0)  # logsumexp of the inlier logits = 0, so E = 0 and a = 0
    terms = pebal_loss(logits, target, PebalConfig(penalty_min=0.0))
    with pytest.raises(NonFiniteLossError, match="step 0, batch 5"):
        check_finite(terms, step=0, batch=5)
