"""A PNG panel per image: image, prediction, entropy, proximity, ProxGradCAM and EEM with prompts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from segxal.data.labels import LabelSet
from segxal.data.transforms import denormalize

PROMPT_COLOUR = "#ff00ff"  # magenta, as in Label Studio and the paper's Fig. 3: it reads on the EEM


OVERLAY_OPACITY = 0.75  # the heat map's opacity where the EEM is at its maximum


def _numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def heat_overlay(rgb: np.ndarray, heat: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """``rgb`` (H, W, 3) in [0, 1] under the colour-mapped ``heat`` (H, W), blended per pixel with
    opacity ``OVERLAY_OPACITY x heat / max(heat)``: the image shows where the map is low."""
    from matplotlib import colormaps

    scale = max(float(heat.max()), 1e-12)
    level = np.clip(heat / scale, 0.0, 1.0)
    colours = colormaps[cmap](level)[..., :3]
    opacity = (OVERLAY_OPACITY * level)[..., None]
    return (1 - opacity) * rgb + opacity * colours


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

    The prediction has a legend of the classes it holds (with ``label_set``); the last tile is the EEM
    over the image (:func:`heat_overlay`) with the prompt points of ``regions``, numbered by rank, and a
    legend saying so. Uses matplotlib's Agg canvas directly, so no global backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

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
        ("EEM over the image + prompts", heat_overlay(rgb, eem_np), None, None),
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
    eem_scale = ScalarMappable(Normalize(0, max(float(eem_np.max()), 1e-6)), "inferno")
    figure.colorbar(eem_scale, ax=eem_axis, fraction=0.046, pad=0.02)
    if label_set is not None:
        present = np.unique(pred[(pred >= 0) & (pred < label_set.num_classes)])
        patches = [
            Patch(color=hex_colour(label_set.colors[c]), label=label_set.class_names[c])
            for c in present
        ]
        axes.flat[1].legend(handles=patches, fontsize=6, loc="lower left", framealpha=0.7, ncols=2)
    if regions:
        marker = Line2D([], [], marker="o", linestyle="", markerfacecolor=PROMPT_COLOUR,
                        markeredgecolor="black", label="prompt k: region k by EEM rank")  # fmt: skip
        eem_axis.legend(handles=[marker], fontsize=7, loc="lower left", framealpha=0.7)
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
