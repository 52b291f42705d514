"""A PNG panel per image: image, prediction, entropy, proximity, ProxGradCAM and EEM with prompts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from segxal.data.labels import LabelSet
from segxal.data.transforms import denormalize

PROMPT_COLOUR = "#ff00ff"  # magenta, as in Label Studio and the paper's Fig. 3: it reads on the EEM


def _numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def save_panel(
    path: str | Path,
    image: torch.Tensor,
    prediction: torch.Tensor,
    entropy: torch.Tensor,
    proximity: torch.Tensor,
    proxgradcam: torch.Tensor,
    eem: torch.Tensor,
    regions: Sequence[dict] = (),
    label_set: LabelSet | None = None,
    title: str | None = None,
) -> Path:
    """Write a 2x3 panel for one image: ``image`` ImageNet-normalised (3, H, W), the rest (H, W).

    Prompt points of ``regions`` are marked and numbered on the EEM. Uses matplotlib's Agg canvas
    directly, so no global backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    size = tuple(image.shape[-2:])
    maps = {
        "prediction": prediction,
        "entropy": entropy,
        "proximity": proximity,
        "proxgradcam": proxgradcam,
        "eem": eem,
    }
    for name, tensor in maps.items():
        if tuple(tensor.shape) != size:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} does not match image {size}")
    rgb = _numpy(denormalize(image.detach().float()).clamp(0, 1).permute(1, 2, 0))
    pred = _numpy(prediction).astype(np.int64)
    if label_set is not None:
        pred_view, pred_cmap = label_set.colorize(np.clip(pred, 0, 255).astype(np.uint8)), None
    else:
        pred_view, pred_cmap = pred, "tab20"
    height, width = size
    figure = Figure(figsize=(3 * 4.0, 2 * 4.0 * height / width + 0.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    eem_np = _numpy(eem)
    tiles = [
        ("image", rgb, None, None),
        ("prediction", pred_view, pred_cmap, None),
        ("entropy (normalised)", _numpy(entropy), "magma", (0, 1)),
        ("proximity (1 = near)", _numpy(proximity), "viridis", (0, 1)),
        ("ProxGradCAM", _numpy(proxgradcam), "jet", (0, 1)),
        ("EEM + prompts", eem_np, "inferno", (0, max(float(eem_np.max()), 1e-6))),
    ]
    for axis, (name, values, cmap, limits) in zip(axes.flat, tiles, strict=False):
        shown = axis.imshow(
            values,
            cmap=cmap,
            vmin=None if limits is None else limits[0],
            vmax=None if limits is None else limits[1],
            interpolation="nearest",
        )
        axis.set_title(name, fontsize=10)
        axis.set_axis_off()
        if limits is not None:
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
    eem_axis = axes.flat[-1]
    for region in regions:
        x, y = region["prompt"]["x"], region["prompt"]["y"]
        eem_axis.plot(
            x, y, marker="o", markersize=7, markerfacecolor=PROMPT_COLOUR, markeredgecolor="black"
        )
        eem_axis.annotate(
            str(region["id"]),
            (x, y),
            xytext=(4, -4),
            textcoords="offset points",
            color=PROMPT_COLOUR,
            fontsize=9,
            fontweight="bold",
        )
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
