"""Pixel anomaly scores from segmentation logits, batched (B, H, W) and on the logits' device.

Every score is oriented so that **higher = more anomalous**, which is what
:func:`segxal.metrics.anomaly_metrics` expects:

- ``energy``: the inlier free energy E = -logsumexp(f_1..f_Y) itself. Inlier pixels are trained to
  E < m_in (e.g. -12) and anomalies to E > m_out (e.g. -6), so E rises with anomaly.
- ``smoothed_energy``: E after a Gaussian blur (PEBAL's inference score; kernel 7, σ 1, reflect pad).
- ``msp``: 1 - max softmax probability. ``max_logit``: -max logit. ``entropy``: -Σ p log p (nats).

Scores are computed over the inlier channels only: pass ``abstention=True`` for a PEBAL model so its
last (abstention) channel is dropped first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORE_METHODS = ("energy", "smoothed_energy", "msp", "max_logit", "entropy")


def _check_logits(logits: torch.Tensor, abstention: bool) -> torch.Tensor:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    minimum = 2 if abstention else 1
    if logits.shape[1] < minimum:
        raise ValueError(
            f"logits need at least {minimum} channels (abstention={abstention}), got {logits.shape[1]}"
        )
    return logits[:, :-1] if abstention else logits


def free_energy(inlier_logits: torch.Tensor) -> torch.Tensor:
    """E = -logsumexp over the channel dimension of (B, Y, H, W) inlier logits -> (B, H, W)."""
    return -torch.logsumexp(inlier_logits, dim=1)


def gaussian_kernel1d(
    kernel_size: int, sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Normalised 1-D Gaussian taps at offsets -(k-1)/2 .. (k-1)/2 (as torchvision's GaussianBlur)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, dtype=dtype, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(maps: torch.Tensor, kernel_size: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, each map on its own, with reflect padding.

    A side too short to reflect (<= kernel_size // 2 pixels) is padded by replication instead.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    taps = gaussian_kernel1d(kernel_size, sigma, maps.dtype, maps.device)
    pad = kernel_size // 2
    x = maps[:, None]
    for dim, weight in ((-1, taps.view(1, 1, 1, -1)), (-2, taps.view(1, 1, -1, 1))):
        padding = (pad, pad, 0, 0) if dim == -1 else (0, 0, pad, pad)
        mode = "reflect" if x.shape[dim] > pad else "replicate"
        x = F.conv2d(F.pad(x, padding, mode=mode), weight)
    return x[:, 0]


def energy_score(logits: torch.Tensor, abstention: bool = False) -> torch.Tensor:
    return free_energy(_check_logits(logits, abstention))


def smoothed_energy_score(
    logits: torch.Tensor, abstention: bool = False, kernel_size: int = 7, sigma: float = 1.0
) -> torch.Tensor:
    return gaussian_blur(energy_score(logits, abstention), kernel_size, sigma)


def msp_score(logits: torch.Tensor, abstention: bool = False) -> torch.Tensor:
    return 1.0 - torch.softmax(_check_logits(logits, abstention), dim=1).amax(dim=1)


def max_logit_score(logits: torch.Tensor, abstention: bool = False) -> torch.Tensor:
    return -_check_logits(logits, abstention).amax(dim=1)


def entropy_score(logits: torch.Tensor, abstention: bool = False) -> torch.Tensor:
    log_p = torch.log_softmax(_check_logits(logits, abstention), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def anomaly_score(
    logits: torch.Tensor,
    method: str,
    abstention: bool = False,
    kernel_size: int = 7,
    sigma: float = 1.0,
) -> torch.Tensor:
    """The score ``method`` (one of :data:`SCORE_METHODS`) of (B, C, H, W) logits -> (B, H, W)."""
    if method == "smoothed_energy":
        return smoothed_energy_score(logits, abstention, kernel_size, sigma)
    functions = {
        "energy": energy_score,
        "msp": msp_score,
        "max_logit": max_logit_score,
        "entropy": entropy_score,
    }
    if method not in functions:
        raise ValueError(f"unknown anomaly score {method!r}; choose one of {SCORE_METHODS}")
    return functions[method](logits, abstention)
