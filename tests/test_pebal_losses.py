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


# --- the authors' code (tianyu0207/PEBAL code/losses.py and code/engine/trainer.py), written out here in
# float64 for Y inlier classes, with their constants taken from the config: Gambler(reward=E² blurred by
# transforms.GaussianBlur(7, sigma=1), reflect padding) on the clean images and, with wrong_sample, on the
# mixed ones, plus 0.1 * energy_loss (margins, sparsity ||E_out||₂, smoothness ½ Σ (ΔE)² over the whole map).
def authors_blur(maps):
    x = torch.arange(7, dtype=torch.float64) - 3
    taps = torch.exp(-0.5 * x**2)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps)[None, None]
    padded = torch.nn.functional.pad(maps[:, None], (3, 3, 3, 3), mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel)[:, 0]


def authors_gambler(pred, targets, wrong_sample, ood_reg, ood_ind):
    targets = targets.clone()
    pred_prob = torch.softmax(pred, dim=1)
    true_pred, reservation = pred_prob[:, :-1, :, :], pred_prob[:, -1, :, :]
    reward = authors_blur(torch.logsumexp(pred[:, :-1, :, :], dim=1).pow(2))
    classes = true_pred.shape[1]
    if wrong_sample:
        in_reservation = torch.div(reservation, reward)
        reservation = torch.div(reservation, reward)
        mask = targets == ood_ind
        boosting = torch.add(true_pred, reservation.unsqueeze(1))[
            mask.unsqueeze(1).repeat(1, classes, 1, 1)
        ]
        ood_loss = -ood_reg * torch.clamp(boosting, min=1e-7).log()
        void_mask = targets == 255
        targets[void_mask] = 0
        targets[mask] = 0
        gambler = torch.gather(true_pred, index=targets.unsqueeze(1), dim=1).squeeze(1)
        gambler = torch.add(gambler, in_reservation)[(~mask) & (~void_mask)].log()
        return -gambler.mean(), ood_loss.mean()
    mask = targets == 255
    targets[mask] = 0
    reservation = torch.div(reservation, reward)
    gambler = torch.gather(true_pred, index=targets.unsqueeze(1), dim=1).squeeze(1)
    return -torch.add(gambler, reservation)[~mask].log().mean(), None


def authors_energy_loss(logits, targets, m_in, m_out, sparsity_weight, smooth_weight, ood_ind):
    energy = -torch.logsumexp(logits[:, :ood_ind, :, :], dim=1)
    ec_out = energy[targets == ood_ind]
    ec_in = energy[(targets != ood_ind) & (targets != 255)]
    parts = {}
    if ec_out.shape[0] == 0:
        parts["energy_inlier"] = torch.pow(torch.relu(ec_in - m_in), 2).mean()
    else:
        parts["energy_inlier"] = 0.5 * torch.pow(torch.relu(ec_in - m_in), 2).mean()
        parts["energy_anomaly"] = 0.5 * torch.pow(torch.relu(m_out - ec_out), 2).mean()
        parts["sparsity"] = sparsity_weight * torch.mean(torch.norm(ec_out, dim=0))
    below = torch.zeros_like(energy)
    below[:, :-1, :] = energy[:, 1:, :]
    below[:, -1, :] = energy[:, -1, :]
    right = torch.zeros_like(energy)
    right[:, :, :-1] = energy[:, :, 1:]
    right[:, :, -1] = energy[:, :, -1]
    squares = torch.sum((below - energy) ** 2) + torch.sum((right - energy) ** 2)
    parts["smoothness"] = smooth_weight * squares / 2
    return parts


def authors_terms(logits, target, config):
    """Their loss, split into our term names (NaN where their code gives NaN)."""
    ood_ind = logits.shape[1] - 1
    is_ood = (target == ood_ind).flatten(1).any(dim=1)
    clean, _ = authors_gambler(logits[~is_ood], target[~is_ood], False, config.ood_weight, ood_ind)
    terms = {"pal_inlier": clean, "pal_anomaly": torch.tensor(0.0, dtype=torch.float64)}
    if torch.any(is_ood):
        mixed, ood = authors_gambler(
            logits[is_ood], target[is_ood], True, config.ood_weight, ood_ind
        )
        terms["pal_inlier"] = terms["pal_inlier"] + mixed
        terms["pal_anomaly"] = ood
    energy = authors_energy_loss(
        logits, target, config.m_in, config.m_out, config.sparsity_weight,
        config.smoothness_weight, ood_ind,
    )  # fmt: skip
    for name in ("energy_inlier", "energy_anomaly", "smoothness", "sparsity"):
        terms[name] = config.lam * energy.get(name, torch.tensor(0.0, dtype=torch.float64))
    terms["total"] = sum(terms.values())
    return terms


def reference_batch(seed, scale=3.0, shift=4.0, classes=3, size=(6, 7)):
    """Two clean and two mixed images with void pixels, of Y = ``classes`` inlier classes."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, classes + 1, *size, generator=generator, dtype=torch.float64)
    logits = logits * scale + shift
    target = torch.randint(0, classes, (4, *size), generator=generator)
    target[2:, 1:3, 2:5] = classes  # anomaly pixels in images 2 and 3
    target[:, 0, :3] = 255  # void in every image
    target[1, 4:, 4:] = 255
    return logits, target


REFERENCE = PebalConfig(variant="reference", m_in=-5.0, m_out=-2.0)


@pytest.mark.parametrize(
    "batch",
    [
        reference_batch(0),  # void pixels, clean and mixed images
        reference_batch(1, scale=0.3, shift=-1.5),  # low energy: E² < 1 everywhere
        reference_batch(2, classes=19, size=(8, 9)),  # 19 classes, as the authors train
    ],
)
def test_reference_terms_equal_the_authors_code(batch):
    logits, target = batch
    ours, theirs = pebal_loss(logits, target, REFERENCE), authors_terms(logits, target, REFERENCE)
    energy = -torch.logsumexp(logits[:, :-1], dim=1)
    for name in (*TERMS, "total"):
        assert ours[name].item() == pytest.approx(theirs[name].item(), rel=1e-12, abs=1e-12), name
    if float(energy.abs().max()) < 1:
        assert float(authors_blur(energy.pow(2)).max()) < 1  # the case a floor would change


def test_reference_gradients_equal_the_authors_code():
    logits, target = reference_batch(3)
    ours_input = logits.clone().requires_grad_()
    theirs_input = logits.clone().requires_grad_()
    pebal_loss(ours_input, target, REFERENCE)["total"].backward()
    authors_terms(theirs_input, target, REFERENCE)["total"].backward()
    assert theirs_input.grad.abs().max() > 1e-3
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=1e-10, atol=1e-13)


def test_reference_guards_where_the_authors_code_gives_nan():
    """Every image mixed: the authors' clean-image Gambler call averages an empty set (NaN); the reference
    takes that mean as 0, and equals their code term for term otherwise."""
    logits, target = reference_batch(4)
    target[:2, 1:3, 2:5] = logits.shape[1] - 1  # now all four images hold anomaly pixels
    theirs = authors_terms(logits, target, REFERENCE)
    assert math.isnan(theirs["pal_inlier"].item()) and math.isnan(theirs["total"].item())
    ours = pebal_loss(logits, target, REFERENCE)
    mixed_inlier, _ = authors_gambler(logits, target, True, 0.1, logits.shape[1] - 1)
    assert ours["pal_inlier"].item() == pytest.approx(mixed_inlier.item(), rel=1e-12)
    for name in ("pal_anomaly", "energy_inlier", "energy_anomaly", "smoothness", "sparsity"):
        assert ours[name].item() == pytest.approx(theirs[name].item(), rel=1e-12), name
    assert math.isfinite(ours["total"].item())


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
    penalty = blur_by_hand([[e**2 for e in energy]])[0]  # no floor in the reference
    pal = [
        -math.log(softmax(px)[t] + softmax(px)[2] / a)
        for px, t, a in zip(logits[0], target[0], penalty, strict=True)
    ]
    terms = pebal_loss(*as_tensors(logits, target), config)
    assert terms["pal_inlier"].item() == pytest.approx(sum(pal) / 5, rel=1e-10)
    unblurred = [
        -math.log(softmax(px)[t] + softmax(px)[2] / e**2)
        for px, t, e in zip(logits[0], target[0], energy, strict=True)
    ]
    assert abs(sum(unblurred) / 5 - sum(pal) / 5) > 1e-3  # the blur matters on this row


def test_void_pixels_change_nothing_in_the_paper_variant_and_count_in_the_reference():
    logits, target = reference_batch(5)
    other = logits.clone()
    other[0, :, 0, 0] += torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64)  # a void pixel
    for variant, changes in (
        ("paper", False),
        ("reference", True),
    ):  # the authors blur and smooth it
        config = PebalConfig(variant=variant, m_in=-5.0, m_out=-2.0)
        first, second = pebal_loss(logits, target, config), pebal_loss(other, target, config)
        assert (abs(first["total"].item() - second["total"].item()) > 1e-9) == changes, variant


def test_void_pixels_change_nothing_on_the_hand_example():
    config = PebalConfig(variant="paper", **CONFIG)
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


def test_gradients_flow_only_from_non_void_pixels_in_the_paper_variant():
    logits, target = as_tensors(LOGITS, TARGET)
    logits.requires_grad_()
    pebal_loss(logits, target, PebalConfig(variant="paper", **CONFIG))["total"].backward()
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
        # the reference smooths the energy over void pixels too, as the authors' code does
        others = {k: v for k, v in terms.items() if k not in ("smoothness", "total")}
        assert all(v.item() == 0.0 for v in others.values())
        assert terms["total"].item() == terms["smoothness"].item()
        assert (terms["smoothness"].item() > 0) == (variant == "reference")
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
