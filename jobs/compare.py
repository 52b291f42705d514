"""Compare the runs of an MLflow experiment: SegXAL strategies / oracles / depth backends (mIoU per cycle
and final, mean ± std over seeds) and PEBAL anomaly metrics (AP, FPR95, AUROC per dataset and method).

    python -m jobs.compare --experiment segxal-demo [--filter "tags.strategy = 'eem'"] [--out DIR] [--no-log]

Prints the tables as Markdown and writes them, with CSVs and plots (mIoU against the labelled fraction,
AP per method), to ``--out`` (default ``runs/compare/<experiment>``); unless ``--no-log``, logs them as
the artifacts of a new run ``compare`` (tag job=compare) in the same experiment.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from mlflow import MlflowClient

from jobs.common import print_results_hint, setup_logging
from orchestrator.compare import CompareError, Comparison, fetch, log_comparison, write_report
from orchestrator.config import TrackingConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--experiment", required=True, help="MLflow experiment name (tracking.experiment)"
    )
    parser.add_argument(
        "--filter",
        default="",
        metavar="FILTER",
        help="MLflow search filter, e.g. \"tags.strategy = 'eem'\" or \"params.seed = '0'\"",
    )
    parser.add_argument(
        "--tracking-uri",
        default=TrackingConfig.tracking_uri,
        help="MLflow tracking URI (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: runs/compare/<experiment>)"
    )
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    return parser.parse_args(argv)


def default_out(experiment: str) -> Path:
    return Path("runs") / "compare" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)


def main(argv: list[str] | None = None) -> Comparison:
    args = parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    client = MlflowClient(args.tracking_uri)
    out = args.out or default_out(args.experiment)
    try:
        comparison = fetch(client, args.experiment, args.filter)
    except CompareError as error:
        raise SystemExit(f"error: {error}") from error
    markdown, files = write_report(comparison, out)
    print(markdown, end="")
    print(f"\ntables and plots: {out}")
    if not args.no_log:
        run_id = log_comparison(client, comparison, files, args.filter)
        print(
            f"logged to MLflow run {run_id} (experiment {args.experiment!r}, artifacts under compare/)"
        )
    print_results_hint(args.tracking_uri)
    return comparison


if __name__ == "__main__":
    main()
