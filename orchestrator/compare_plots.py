"""Plots of a run comparison (:mod:`orchestrator.compare`), written as PNG with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.compare import GROUP


def runs_count(count: int) -> str:
    return f"{count} run" if count == 1 else f"{count} runs"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


AXES = {  # cost column -> (axis label, scale)
    "labelled_fraction": ("labelled images, fraction of the training pool (%)", 100),
    "labelled_pixel_fraction": ("labelled pixels, fraction of the training pool (%)", 100),
    "clicks": ("annotation clicks so far (orchestrator.cost)", 1),
}


def plot_miou(
    curves: pd.DataFrame,
    path: Path,
    supervised: pd.DataFrame | None = None,
    cost: str = "labelled_fraction",
) -> Path:
    """mIoU against a cost (``AXES``): per (strategy, unit, oracle, depth backend) the mean over its runs
    (seeds) at every cycle, with the min-max band over those runs; the mean of the fully-supervised runs
    as a dashed line."""
    plt = _pyplot()
    label, scale = AXES[cost]
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for key, group in curves.dropna(subset=[cost]).groupby(GROUP, sort=True):
        by_cycle = group.groupby("cycle").agg(
            x=(cost, "mean"),
            mean=("miou", "mean"),
            low=("miou", "min"),
            high=("miou", "max"),
            runs=("run_id", "nunique"),
        )
        (line,) = axis.plot(
            scale * by_cycle["x"],
            100 * by_cycle["mean"],
            marker="o",
            label=f"{' / '.join(str(part) for part in key)} ({runs_count(by_cycle['runs'].max())})",
        )
        axis.fill_between(
            scale * by_cycle["x"],
            100 * by_cycle["low"],
            100 * by_cycle["high"],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    if supervised is not None and not supervised.empty:
        axis.axhline(
            100 * supervised["miou"].mean(),
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"full supervision ({runs_count(len(supervised))})",
        )
    axis.set(
        xlabel=label,
        ylabel="validation mIoU (%)",
        title="mIoU against annotation cost (mean, min-max band over seeds)",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(fig, path)


def plot_anomaly_ap(anomaly: pd.DataFrame, path: Path) -> Path:
    """AP per method, one panel per dataset, one bar per PEBAL run within each method."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(anomaly["dataset"]))
    runs = list(dict.fromkeys(anomaly["run"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 + 2 * len(datasets), 4.5), squeeze=False)
    width = 0.8 / len(runs)
    for axis, dataset in zip(axes[0], datasets, strict=False):
        rows = anomaly[anomaly["dataset"] == dataset]
        methods = list(dict.fromkeys(rows["method"]))
        positions = np.arange(len(methods))
        for i, run in enumerate(runs):
            ap = rows[rows["run"] == run].set_index("method")["ap"].reindex(methods)
            axis.bar(
                positions + (i - (len(runs) - 1) / 2) * width, 100 * ap.to_numpy(), width, label=run
            )
        axis.set_xticks(positions, methods, rotation=30, ha="right")
        axis.set(ylabel="AP (%)", title=dataset, ylim=(0, 100))
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_differences(differences: pd.DataFrame, path: Path) -> Path:
    """The paired mIoU difference to random against the labelled-pixel fraction, per strategy, unit and
    oracle, with its bootstrap interval as a band; 0 dashed."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for key, group in differences.groupby(["strategy", "unit", "oracle"], sort=True):
        group = group.sort_values("cycle")
        x = 100 * group["labelled_pixel_fraction"]
        (line,) = axis.plot(
            x,
            100 * group["difference"],
            marker="o",
            label=f"{' / '.join(str(part) for part in key)} ({group['seeds'].max()} seeds)",
        )
        axis.fill_between(
            x,
            100 * group["ci_low"],
            100 * group["ci_high"],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    axis.axhline(0, color="black", linestyle="--", linewidth=1)
    axis.set(
        xlabel="labelled pixels, fraction of the training pool (%)",
        ylabel="mIoU - random, paired by seed (points)",
        title="Difference to random at equal cost (95 % bootstrap interval)",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(fig, path)
