"""Compare the MLflow runs of one experiment: SegXAL runs (mIoU per cycle against the labelled fraction)
and PEBAL runs (anomaly AP / FPR95 / AUROC per dataset and method).

A SegXAL run is one with a ``strategy`` tag and a ``val/miou`` history (``jobs.al``); a PEBAL run is one
with ``anomaly/<dataset>/<method>/<metric>`` metrics (``jobs.pebal``); a ``jobs.train`` run (tag
job=train) is the fully-supervised reference, its best epoch's ``val/miou``. Other runs (sweep trials,
earlier comparisons) are left out. Plots are in :mod:`orchestrator.compare_plots`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Experiment, Run
from mlflow.exceptions import MlflowException

from orchestrator.paired import differences_markdown, paired_differences
from segxal.markdown import markdown_table

log = logging.getLogger(__name__)

MIOU = "val/miou"
LABELLED = "pool/labelled_fraction"
LABELLED_PIXELS = "pool/labelled_pixel_fraction"
TOTAL_COST = "oracle/total_cost"  # cumulative clicks (orchestrator.cost)
ANOMALY_PREFIX = "anomaly/"
ANOMALY_METRICS = ("ap", "fpr95", "auroc")
GROUP = ["strategy", "unit", "oracle", "depth_backend"]  # a summary row and a plotted line each
JOB_TAG = "job"
COMPARE_JOB = "compare"  # the JOB_TAG of the runs this module logs; never part of a comparison
SUPERVISED_JOB = "train"  # the JOB_TAG of jobs.train: full supervision, the reference of the curves
PAGE_SIZE = 1000


COST_AXES = ("labelled_fraction", "labelled_pixel_fraction", "clicks")


PLOT_NAMES = ("miou_vs_labelled.png", "miou_vs_labelled_pixels.png", "miou_vs_clicks.png")


class CompareError(ValueError):
    """Nothing to compare: an unknown experiment, a bad filter or no matching run."""


@dataclass(frozen=True)
class Comparison:
    """``curves``: one row per (SegXAL run, cycle); ``al_runs``: one row per SegXAL run with its mIoU per
    cycle (``cycle_<k>``) and at its last cycle (``final``); ``anomaly``: one row per (PEBAL run, dataset,
    method); ``supervised``: one row per fully-supervised run with its best ``miou``."""

    experiment: str
    experiment_id: str
    curves: pd.DataFrame
    al_runs: pd.DataFrame
    anomaly: pd.DataFrame
    supervised: pd.DataFrame


def find_experiment(client: MlflowClient, name: str) -> Experiment:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(
            f"no MLflow experiment named {name!r} at {client.tracking_uri}; "
            f"experiments there: {', '.join(names) or 'none'}"
        )
    return experiment


def search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """Every active run of the experiment that matches ``filter_string``, page by page."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        try:
            page = client.search_runs(
                [experiment_id], filter_string, max_results=PAGE_SIZE, page_token=token
            )
        except MlflowException as error:
            raise CompareError(f"bad filter {filter_string!r}: {error.message}") from error
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def metric_by_step(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """step -> value of a metric's history; a step logged twice (a resumed run) keeps its latest value."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def _seed(run: Run) -> int | None:
    seed = run.data.params.get("seed")
    return int(seed) if seed is not None and seed.lstrip("-").isdigit() else None


def al_curves(client: MlflowClient, runs: list[Run]) -> pd.DataFrame:
    """One row per (SegXAL run, cycle): run identity, ``miou`` and the cost so far: ``labelled_fraction``
    (of images), ``labelled_pixel_fraction`` and ``clicks`` (NaN where not logged). A run from before
    region mode is at the image ``unit``."""
    rows = []
    for run in runs:
        tags, run_id = {"unit": "image", **run.data.tags}, run.info.run_id
        labelled = metric_by_step(client, run_id, LABELLED)
        pixels = metric_by_step(client, run_id, LABELLED_PIXELS)
        clicks = metric_by_step(client, run_id, TOTAL_COST)
        for cycle, miou in metric_by_step(client, run_id, MIOU).items():
            rows.append(
                {
                    "run": run.info.run_name,
                    "run_id": run_id,
                    "status": run.info.status,
                    **{key: tags.get(key, "") for key in GROUP},
                    "seed": _seed(run),
                    "cycle": cycle,
                    "miou": miou,
                    "labelled_fraction": labelled.get(cycle, math.nan),
                    # runs from before pixels were logged labelled whole images
                    "labelled_pixel_fraction": pixels.get(cycle, labelled.get(cycle, math.nan)),
                    "clicks": clicks.get(cycle, math.nan),
                }
            )
    columns = [
        "run",
        "run_id",
        "status",
        *GROUP,
        "seed",
        "cycle",
        "miou",
        *COST_AXES,
    ]
    return pd.DataFrame(rows, columns=columns).astype({"seed": "Int64"})


def supervised_table(client: MlflowClient, runs: list[Run]) -> pd.DataFrame:
    """One row per ``jobs.train`` run: its best epoch's validation mIoU (the checkpoint it keeps)."""
    rows = [
        {
            "run": run.info.run_name,
            "run_id": run.info.run_id,
            "seed": _seed(run),
            "miou": max(metric_by_step(client, run.info.run_id, MIOU).values()),
        }
        for run in runs
    ]
    table = pd.DataFrame(rows, columns=["run", "run_id", "seed", "miou"]).astype({"seed": "Int64"})
    return table.sort_values(["seed", "run"], ignore_index=True)


def al_run_table(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per SegXAL run: identity, ``cycle_<k>`` mIoU columns and ``final`` (the last cycle's mIoU)."""
    identity = ["run", "run_id", "status", *GROUP, "seed"]
    wide = curves.pivot(index="run_id", columns="cycle", values="miou").sort_index(axis=1)
    wide.columns = [f"cycle_{cycle}" for cycle in wide.columns]
    final = curves.sort_values("cycle").groupby("run_id")["miou"].last().rename("final")
    table = curves[identity].drop_duplicates("run_id").set_index("run_id").join(wide).join(final)
    return table.reset_index()[[*identity, *wide.columns, "final"]].sort_values(
        [*GROUP, "seed", "run"], ignore_index=True
    )


def miou_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("cycle_")] + ["final"]


def al_summary(al_runs: pd.DataFrame) -> pd.DataFrame:
    """Per (strategy, oracle, depth_backend): the number of runs and the mean and sample standard deviation
    (ddof 1: NaN for a single run) of every ``cycle_<k>`` and of ``final`` over its runs (seeds)."""
    columns = miou_columns(al_runs)
    grouped = al_runs.groupby(GROUP, sort=True)
    stats = grouped[columns].agg(["mean", "std"])
    pairs = cast(pd.MultiIndex, stats.columns)  # (column, stat); pandas-stubs says Index[str]
    stats.columns = [f"{column}_{stat}" for column, stat in pairs]
    return grouped.size().rename("runs").to_frame().join(stats).reset_index()


def anomaly_table(runs: list[Run]) -> pd.DataFrame:
    """One row per (PEBAL run, dataset, method) with ``ap``, ``fpr95``, ``auroc``; best AP first per run."""
    rows: dict[tuple[str, str, str], dict] = {}
    for run in runs:
        for key, value in run.data.metrics.items():
            parts = key.split("/")
            if (
                len(parts) != 4
                or parts[0] + "/" != ANOMALY_PREFIX
                or parts[3] not in ANOMALY_METRICS
            ):
                continue
            _, dataset, method, metric = parts
            row = rows.setdefault(
                (run.info.run_id, dataset, method),
                {
                    "run": run.info.run_name,
                    "run_id": run.info.run_id,
                    "variant": run.data.params.get("pebal.variant", ""),
                    "dataset": dataset,
                    "method": method,
                },
            )
            row[metric] = value
    columns = ["run", "run_id", "variant", "dataset", "method", *ANOMALY_METRICS]
    table = pd.DataFrame(list(rows.values()), columns=columns)
    return table.sort_values(
        ["dataset", "run", "ap"], ascending=[True, True, False], ignore_index=True
    )


def is_al_run(run: Run) -> bool:
    return "strategy" in run.data.tags and MIOU in run.data.metrics


def is_pebal_run(run: Run) -> bool:
    return any(key.startswith(ANOMALY_PREFIX) for key in run.data.metrics)


def is_supervised_run(run: Run) -> bool:
    return run.data.tags.get(JOB_TAG) == SUPERVISED_JOB and MIOU in run.data.metrics


def fetch(client: MlflowClient, experiment: str, filter_string: str = "") -> Comparison:
    """The SegXAL and PEBAL runs of ``experiment`` that match the MLflow ``filter_string``."""
    found = find_experiment(client, experiment)
    runs = [
        run
        for run in search_all_runs(client, found.experiment_id, filter_string)
        if run.data.tags.get(JOB_TAG) != COMPARE_JOB
    ]
    al, pebal = [r for r in runs if is_al_run(r)], [r for r in runs if is_pebal_run(r)]
    supervised = [r for r in runs if is_supervised_run(r)]
    if not al and not pebal and not supervised:
        raise CompareError(
            f"no SegXAL, PEBAL or jobs.train run in experiment {experiment!r} matches the filter "
            f"{filter_string!r}"
            if filter_string
            else f"experiment {experiment!r} holds no SegXAL, PEBAL or jobs.train run"
        )
    log.info(
        "%s: %d SegXAL, %d PEBAL and %d jobs.train runs of %d matched",
        experiment,
        len(al),
        len(pebal),
        len(supervised),
        len(runs),
    )
    curves = al_curves(client, al)
    return Comparison(
        experiment,
        found.experiment_id,
        curves,
        al_run_table(curves),
        anomaly_table(pebal),
        supervised_table(client, supervised),
    )


def percent(value: float, std: float = math.nan) -> str:
    """A fraction as a percentage with two decimals, ``± std`` where the std is known, ``-`` for NaN."""
    if pd.isna(value):
        return "-"
    return f"{100 * value:.2f}" + ("" if pd.isna(std) else f" ± {100 * std:.2f}")


def _text(value) -> str:
    return "-" if pd.isna(value) else str(value)


def report_markdown(comparison: Comparison, summary: pd.DataFrame | None) -> str:
    """The three tables (mIoU and anomaly metrics in %) under headings."""
    sections = [f"# Run comparison: {comparison.experiment}\n"]
    runs = comparison.al_runs
    if not runs.empty:
        if summary is None:
            raise ValueError(
                "report_markdown: SegXAL runs need their al_summary(comparison.al_runs)"
            )
        columns = miou_columns(runs)
        sections.append("## SegXAL: mIoU (%) over seeds, mean ± std\n")
        sections.append(
            markdown_table(
                [*GROUP, "runs", *columns],
                [
                    [
                        *(str(row[k]) for k in GROUP),
                        str(row["runs"]),
                        *(percent(row[f"{c}_mean"], row[f"{c}_std"]) for c in columns),
                    ]
                    for _, row in summary.iterrows()
                ],
            )
        )
        sections.append("## SegXAL runs: mIoU (%) per cycle\n")
        sections.append(
            markdown_table(
                ["run", *GROUP, "seed", "status", *columns],
                [
                    [
                        row["run"],
                        *(str(row[k]) for k in GROUP),
                        _text(row["seed"]),
                        row["status"],
                        *(percent(row[c]) for c in columns),
                    ]
                    for _, row in runs.iterrows()
                ],
            )
        )
    supervised = comparison.supervised
    if not supervised.empty:
        sections.append("## Full supervision (jobs.train): best validation mIoU (%)\n")
        rows = [
            [row["run"], _text(row["seed"]), percent(row["miou"])]
            for _, row in supervised.iterrows()
        ]
        rows.append(
            [
                f"mean of {len(supervised)}",
                "-",
                percent(supervised["miou"].mean(), supervised["miou"].std()),
            ]
        )
        sections.append(markdown_table(["run", "seed", "mIoU"], rows))
    if not comparison.anomaly.empty:
        sections.append("## PEBAL: anomaly segmentation (%)\n")
        sections.append(
            markdown_table(
                ["run", "variant", "dataset", "method", "AP", "FPR95", "AUROC"],
                [
                    [
                        row["run"],
                        row["variant"] or "-",
                        row["dataset"],
                        row["method"],
                        *(percent(row[m]) for m in ANOMALY_METRICS),
                    ]
                    for _, row in comparison.anomaly.iterrows()
                ],
            )
        )
    return "\n".join(sections)


def write_report(comparison: Comparison, out_dir: Path) -> tuple[str, list[Path]]:
    """CSVs, the Markdown report and the plots under ``out_dir``: (the Markdown, the files written)."""
    from orchestrator.compare_plots import (  # matplotlib only when writing
        plot_anomaly_ap,
        plot_differences,
        plot_miou,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    summary = al_summary(comparison.al_runs) if not comparison.al_runs.empty else None
    differences = paired_differences(comparison.curves) if summary is not None else None
    units = set(comparison.curves["unit"]) if not comparison.curves.empty else set()
    to_image_random = (
        paired_differences(comparison.curves, baseline_unit="image")
        if {"image", "region"} <= units
        else None
    )
    tables = {
        "al_runs.csv": comparison.al_runs,
        "al_summary.csv": summary,
        "differences.csv": differences,
        "differences_to_image_random.csv": to_image_random,
        "anomaly.csv": comparison.anomaly,
        "supervised.csv": comparison.supervised,
    }
    for name, frame in tables.items():
        if frame is not None and not frame.empty:
            frame.to_csv(out_dir / name, index=False)
            files.append(out_dir / name)
    markdown = report_markdown(comparison, summary)
    if differences is not None and not differences.empty:
        markdown += "\n" + differences_markdown(differences)
        files.append(plot_differences(differences, out_dir / "difference_to_random.png"))
    if to_image_random is not None and not to_image_random.empty:
        markdown += "\n" + differences_markdown(to_image_random, "random at image level")
    (out_dir / "comparison.md").write_text(markdown)
    files.append(out_dir / "comparison.md")
    if not comparison.curves.empty:
        for axis, name in zip(COST_AXES, PLOT_NAMES, strict=True):
            if comparison.curves[axis].notna().any():
                path = out_dir / name
                files.append(plot_miou(comparison.curves, path, comparison.supervised, axis))
    if not comparison.anomaly.empty:
        files.append(plot_anomaly_ap(comparison.anomaly, out_dir / "anomaly_ap.png"))
    return markdown, files


def log_comparison(
    client: MlflowClient, comparison: Comparison, files: list[Path], filter_string: str = ""
) -> str:
    """Log ``files`` as the artifacts (under ``compare/``) of a new run ``compare`` tagged job=compare in
    the compared experiment; returns its run id."""
    run = client.create_run(
        comparison.experiment_id, run_name=COMPARE_JOB, tags={JOB_TAG: COMPARE_JOB}
    )
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "compare.filter", filter_string)
        for path in files:
            client.log_artifact(run_id, str(path), "compare")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
