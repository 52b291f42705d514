"""PEBAL losses (Tian et al., ECCV 2022, eqs. 2-8), in the paper's form and the authors' code's form.

Notation. ``logits`` (B, Y+1, H, W): inlier logits f_1..f_Y, the abstention logit f_{Y+1} last.
``target`` (B, H, W): inlier classes 0..Y-1, the anomaly index Y, or 255 (void).
E = -logsumexp(f_1..f_Y) (abstention excluded); p = softmax over all Y+1 channels; a is the abstention
penalty (per variant, below). :func:`pebal_loss` returns every term already weighted, and ``total`` = their sum.

``variant="paper"`` — eq. (2) with each per-pixel sum divided by N, the number of non-void pixels of the
batch (one constant factor, so the weights keep their meaning whatever the crop and batch size):

- a              = max(E², penalty_min)
- pal_inlier     = Σ_inlier -log(p_y + p_{Y+1}/a) / N                          (eq. 3)
- pal_anomaly    = Σ_anomaly -log(p_{Y+1} + p_{Y+1}/a) / N                     (eq. 3 with y = Y+1)
- energy_inlier  = λ Σ_inlier max(0, E - m_in)² / N                            (eq. 6)
- energy_anomaly = λ Σ_anomaly max(0, m_out - E)² / N                          (eq. 7)
- smoothness     = β_smooth Σ_{pairs} |E_ω - E_ω'| / N, over horizontally and vertically adjacent
  non-void pixel pairs, each pair once                                           (eq. 8, β1 = 5e-4)
- sparsity       = β_sparse Σ_anomaly |E| / N                                   (eq. 8, β2 = 3e-6)

Eq. (8) literally sums |E| over every pixel; the paper's text ("anomalous pixels are sparse"), DESIGN.md
and the authors' code apply sparsity to anomaly pixels only, and on inlier pixels it would fight the m_in
margin, so both variants apply it to anomaly pixels.

``variant="reference"`` — tianyu0207/PEBAL ``code/losses.py`` (Gambler, energy_loss) as combined in
``code/engine/trainer.py`` (``loss = gambler(clean) + gambler(mixed) + 0.1 * energy_loss``), term for term:

- a = blur(E²): Gaussian (kernel 7, σ 1, reflect padding) per image over every pixel, void included, and
  no floor (``penalty_min`` is the paper variant's; here a is only kept above the smallest positive
  float, which changes nothing but an exact 0);
- pal_inlier  = mean of -log(p_y + p_{Y+1}/a) over the inlier pixels of the images without anomaly pixels,
  plus the same mean over the inlier pixels of the images with anomaly pixels (two calls of Gambler);
- pal_anomaly = ood_weight · mean over (anomaly pixels × inlier classes c) of -log(max(p_c + p_{Y+1}/a, 1e-7))
  (every inlier class gets an abstention term; one log after the clamp, as at the authors' HEAD);
- energy_inlier, energy_anomaly = λ·½·mean_inlier max(0, E - m_in)², λ·½·mean_anomaly max(0, m_out - E)²
  when the batch has anomaly pixels, else λ·mean_inlier and 0;
- sparsity   = λ β_sparse ||E_anomaly||₂ (an L2 norm over the batch's anomaly pixels; only with anomalies);
- smoothness = λ β_smooth · ½ Σ_{pairs} (E_ω - E_ω')² over every adjacent pair, void included (a sum of
  squares over the batch);
- β defaults swap relative to the paper: smoothness 3e-6, sparsity 5e-4 (see ``PebalConfig``); λ scales
  the regulariser too.

Guards where the code has none (tested): a mean over an empty set is 0, where the code gives NaN (a
batch whose images all hold anomaly pixels has no clean image for the first Gambler call; a mixed image
may have no inlier pixel); a side of 3 pixels or fewer is blurred with replicate padding, where the
code's reflect padding fails.

Default: ``paper``. It is the method as published and as DESIGN.md specifies it; its terms share one
normalisation, so β and λ mean the same thing for any crop or batch size, whereas the code's smoothness
is a raw batch sum that grows with H·W·B and its margin weights halve whenever a batch happens to contain
an anomaly. Its own choices, kept there: void pixels take no part in any term, and the penalty has the
floor ``penalty_min`` (default 1), so that p_{Y+1}/a cannot exceed p_{Y+1} where E² < 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from segxal.data.labels import IGNORE_INDEX
from segxal.pebal.config import PebalConfig
from segxal.pebal.scores import free_energy, gaussian_blur

TERMS = ("pal_inlier", "pal_anomaly", "energy_inlier", "energy_anomaly", "smoothness", "sparsity")
REFERENCE_PENALTY_BLUR = (7, 1.0)  # kernel, sigma of the code's transforms.GaussianBlur(7, sigma=1)
REFERENCE_PROB_FLOOR = 1e-7


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN or Inf; the message names the step, the batch and the offending terms."""


def check_finite(loss_terms: Mapping[str, torch.Tensor], step: int, batch: int | str) -> None:
    """Raise :class:`NonFiniteLossError` naming ``step``, ``batch`` and every non-finite term."""
    bad = {
        name: value for name, value in loss_terms.items() if not bool(torch.isfinite(value).all())
    }
    if bad:
        listed = ", ".join(f"{name}={value.detach().cpu().tolist()}" for name, value in bad.items())
        raise NonFiniteLossError(f"non-finite PEBAL loss at step {step}, batch {batch}: {listed}")


def _validate(logits: torch.Tensor, target: torch.Tensor) -> int:
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must be (B, Y+1, H, W) with Y >= 1, got shape {tuple(logits.shape)}"
        )
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    if target.dtype.is_floating_point:
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    anomaly_index = logits.shape[1] - 1
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target > anomaly_index))
    if bool(bad.any()):
        values = sorted(set(target[bad].unique().tolist()))[:10]
        raise ValueError(
            f"target values {values} are neither classes 0..{anomaly_index - 1}, the anomaly index "
            f"{anomaly_index}, nor void {IGNORE_INDEX}"
        )
    return anomaly_index


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (still on the autograd graph) when the mask is empty."""
    return values[mask].sum() / mask.sum().clamp(min=1)


def _neighbour_differences(energy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """E_ω - E_ω' for every horizontally or vertically adjacent pair of non-void pixels (flattened)."""
    horizontal = (energy[..., 1:] - energy[..., :-1])[valid[..., 1:] & valid[..., :-1]]
    vertical = (energy[..., 1:, :] - energy[..., :-1, :])[valid[..., 1:, :] & valid[..., :-1, :]]
    return torch.cat([horizontal, vertical])


def _log_class_or_abstain(log_p: torch.Tensor, log_penalty: torch.Tensor) -> torch.Tensor:
    """log(p_c + p_{Y+1}/a) for every inlier class c: (B, Y, H, W), computed in log space."""
    log_abstain = (log_p[:, -1] - log_penalty)[:, None]
    return torch.logaddexp(log_p[:, :-1], log_abstain)


def _paper_terms(log_p, log_class_or_abstain, pal_in, energy, penalty, inlier, anomaly, config):
    count = (inlier | anomaly).sum().clamp(min=1)
    pal_out = -(log_p[:, -1] + torch.log1p(1.0 / penalty))
    margin_in = torch.relu(energy - config.m_in) ** 2
    margin_out = torch.relu(config.m_out - energy) ** 2
    return {
        "pal_inlier": pal_in[inlier].sum() / count,
        "pal_anomaly": pal_out[anomaly].sum() / count,
        "energy_inlier": config.lam * margin_in[inlier].sum() / count,
        "energy_anomaly": config.lam * margin_out[anomaly].sum() / count,
        "smoothness": config.smoothness_weight
        * _neighbour_differences(energy, inlier | anomaly).abs().sum()
        / count,
        "sparsity": config.sparsity_weight * energy[anomaly].abs().sum() / count,
    }


def _reference_terms(log_p, log_class_or_abstain, pal_in, energy, penalty, inlier, anomaly, config):
    mixed = anomaly.flatten(1).any(dim=1)[:, None, None]
    pal_inlier = _masked_mean(pal_in, inlier & ~mixed) + _masked_mean(pal_in, inlier & mixed)
    pal_out = -log_class_or_abstain.clamp(min=math.log(REFERENCE_PROB_FLOOR))
    pal_anomaly = config.ood_weight * _masked_mean(pal_out, anomaly[:, None].expand_as(pal_out))
    margin_in = _masked_mean(torch.relu(energy - config.m_in) ** 2, inlier)
    if bool(anomaly.any()):
        energy_inlier = config.lam * 0.5 * margin_in
        energy_anomaly = (
            config.lam * 0.5 * _masked_mean(torch.relu(config.m_out - energy) ** 2, anomaly)
        )
        sparsity = config.lam * config.sparsity_weight * torch.linalg.vector_norm(energy[anomaly])
    else:
        energy_inlier = config.lam * margin_in
        energy_anomaly = sparsity = energy[anomaly].sum()  # no anomaly pixel: 0, on the graph
    squares = _neighbour_differences(energy, torch.ones_like(inlier)).pow(2).sum()
    return {
        "pal_inlier": pal_inlier,
        "pal_anomaly": pal_anomaly,
        "energy_inlier": energy_inlier,
        "energy_anomaly": energy_anomaly,
        "smoothness": config.lam * config.smoothness_weight * 0.5 * squares,
        "sparsity": sparsity,
    }


def pebal_loss(
    logits: torch.Tensor, target: torch.Tensor, config: PebalConfig = PebalConfig()
) -> dict[str, torch.Tensor]:
    """PEBAL loss terms for (B, Y+1, H, W) ``logits`` and (B, H, W) ``target`` (see the module docstring).

    Returns the weighted terms named in :data:`TERMS` and ``total``, their sum; all are scalars on the
    logits' device. Inputs are not modified.
    """
    anomaly_index = _validate(logits, target)
    valid = target != IGNORE_INDEX
    inlier = valid & (target < anomaly_index)
    anomaly = target == anomaly_index
    log_p = torch.log_softmax(logits, dim=1)
    energy = free_energy(logits[:, :-1])
    if config.variant == "reference":
        penalty = gaussian_blur(energy.pow(2), *REFERENCE_PENALTY_BLUR)
        floor = torch.finfo(energy.dtype).tiny
    else:
        penalty, floor = energy.pow(2), config.penalty_min
    # void pixels get a = 1 so their (unused) values stay finite and pass no NaN back
    penalty = torch.where(valid, penalty.clamp(min=floor), torch.ones_like(penalty))
    log_class_or_abstain = _log_class_or_abstain(log_p, penalty.log())
    safe_target = torch.where(inlier, target, torch.zeros_like(target))
    pal_in = -log_class_or_abstain.gather(1, safe_target[:, None])[:, 0]  # -log(p_y + p_{Y+1}/a)
    build = _reference_terms if config.variant == "reference" else _paper_terms
    terms = build(log_p, log_class_or_abstain, pal_in, energy, penalty, inlier, anomaly, config)
    terms["total"] = torch.stack(list(terms.values())).sum()
    return terms
