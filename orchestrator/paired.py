"""Paired differences to a baseline strategy, with bootstrap confidence intervals.

Runs of one seed share their initial pool and their D^S draws (every draw is a function of (seed,
cycle)), so strategies are compared pairwise: at each cycle (each strategy spends the same budget per
cycle, so a cycle is an equal cost), the difference in mIoU to the baseline run of the same seed, unit
and oracle. The interval is a percentile bootstrap over the seeds (resampled with replacement), with a
fixed generator so a report is reproducible.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from segxal.markdown import markdown_table

BASELINE = "random"
CONFIDENCE = 0.95
RESAMPLES = 10_000
PAIR_KEYS = ["unit", "oracle"]  # what a strategy and its baseline share


def bootstrap_interval(
    differences: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (one per seed); NaN with fewer than
    two seeds, where resampling says nothing about the spread."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size < 2:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_differences(
    curves: pd.DataFrame, baseline: str = BASELINE, baseline_unit: str | None = None
) -> pd.DataFrame:
    """One row per (strategy, unit, oracle, depth backend, cycle) other than the baseline, from cycle 1
    (cycle 0 trains on the shared initial pool): the seeds paired with a baseline run, the mean costs of
    both, the mean mIoU difference and its interval. The baseline runs are those of the row's own unit,
    or, with ``baseline_unit``, of that unit (the rows then are the other units' strategies, random
    included: region labels against whole images at the same labelled pixels per cycle)."""
    rows = []
    if baseline_unit is None:
        base = curves[curves["strategy"] == baseline]
        others = curves[(curves["strategy"] != baseline) & (curves["cycle"] > 0)]
    else:
        base = curves[(curves["strategy"] == baseline) & (curves["unit"] == baseline_unit)]
        others = curves[(curves["unit"] != baseline_unit) & (curves["cycle"] > 0)]
    columns = ["strategy", *PAIR_KEYS, "depth_backend", "cycle"]
    for key, group in others.groupby(columns, sort=True):
        strategy, unit, oracle, depth, cycle = key
        partner = base[
            (base["unit"] == (baseline_unit or unit))
            & (base["oracle"] == oracle)
            & (base["cycle"] == cycle)
        ]
        paired = group.merge(partner, on="seed", suffixes=("", "_base"))
        if paired.empty:
            continue
        differences = (paired["miou"] - paired["miou_base"]).to_numpy()
        low, high = bootstrap_interval(differences)
        rows.append(
            {
                **dict(zip(columns, key, strict=True)),
                "seeds": len(paired),
                "labelled_pixel_fraction": paired["labelled_pixel_fraction"].mean(),
                "baseline_labelled_pixel_fraction": paired["labelled_pixel_fraction_base"].mean(),
                "clicks": paired["clicks"].mean(),
                "difference": differences.mean(),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[*columns, "seeds", "labelled_pixel_fraction", "baseline_labelled_pixel_fraction",
                 "clicks", "difference", "ci_low", "ci_high"],
    )  # fmt: skip


def verdict(row) -> str:
    if row["seeds"] < 2:
        return "one seed: no interval"
    if row["ci_low"] > 0:
        return "better"
    if row["ci_high"] < 0:
        return "worse"
    return "undecided"


def differences_markdown(differences: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The table of differences to the baseline, in mIoU points, with the interval and its verdict."""
    header = [
        "strategy", "unit", "oracle", "cycle", "seeds", "labelled pixels (%)",
        "baseline's pixels (%)", f"mIoU - {baseline} (points)", f"{CONFIDENCE:.0%} interval", "verdict",
    ]  # fmt: skip
    rows = [
        [
            row["strategy"],
            row["unit"],
            row["oracle"],
            str(row["cycle"]),
            str(row["seeds"]),
            f"{100 * row['labelled_pixel_fraction']:.2f}",
            f"{100 * row['baseline_labelled_pixel_fraction']:.2f}",
            f"{100 * row['difference']:+.2f}",
            "-"
            if np.isnan(row["ci_low"])
            else f"[{100 * row['ci_low']:+.2f}, {100 * row['ci_high']:+.2f}]",
            verdict(row),
        ]
        for _, row in differences.iterrows()
    ]
    return (
        f"## SegXAL: paired difference to {baseline} at each cycle, {CONFIDENCE:.0%} bootstrap "
        "interval over seeds\n\n" + markdown_table(header, rows)
    )
