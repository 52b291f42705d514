"""MLflow tracking: one run per experiment, flattened config as params, names stable across runs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

from orchestrator.typed_config import flatten

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


@contextlib.contextmanager
def experiment_run(tracking_uri: str, experiment: str, run_name: str | None, config: Any,
                   run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (and always end) an MLflow run with the flattened ``config`` logged as params; with
    ``run_id``, continue that run (a resumed experiment) instead."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        if run_id is None:
            mlflow.log_params({key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(config).items()})
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, experiment, tracking_uri)
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite metrics; metric names are used as given (``val/miou``, ``val/iou/<class>``)."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)
