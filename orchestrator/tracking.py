"""MLflow tracking: one run per experiment, flattened config as params, names stable across runs.

A store that cannot be reached is found at start (:func:`check_tracking_reachable`, seconds rather than
MLflow's minutes of HTTP retries); a transient failure while logging is retried with backoff and the
run goes on (:func:`retrying`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from orchestrator.typed_config import flatten

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PROBE_TIMEOUT_S = 5.0
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0)  # waits between attempts of a logging call
# The experiment tag the MLflow 3.17 UI reads to pick its view (its JavaScript bundle's ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
T = TypeVar("T")


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or written; the message names the tracking URI."""


def check_tracking_reachable(tracking_uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` unless the store really opens: an ``http(s)`` server must answer
    within ``timeout_s`` (and then answer MLflow's API), a ``sqlite`` store's file must be creatable
    and writable (and then open as an MLflow database), and any other URI must open as a store."""
    scheme = urlparse(tracking_uri).scheme
    if scheme == "sqlite":
        _check_sqlite_file(tracking_uri)  # opens it as SQLite; a new store is not created yet
        return
    if scheme in ("http", "https"):
        _probe_server(tracking_uri, timeout_s)
    _open_store(tracking_uri, timeout_s)


def _open_store(tracking_uri: str, timeout_s: float) -> None:
    """One cheap query of the store, with MLflow's HTTP retries off: what a run does first."""
    quick = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s))),
    }
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrackingError(
            f"MLflow tracking URI {tracking_uri}: the store does not open ({reason}); set "
            "tracking.tracking_uri to sqlite:///FILE.db or to a running server's http://HOST:PORT"
        ) from error
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _probe_server(tracking_uri: str, timeout_s: float) -> None:
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered: credentials and the like are MLflow's to report
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"MLflow tracking server {tracking_uri} is unreachable ({reason}); start it or "
            "set tracking.tracking_uri"
        ) from error


def _check_sqlite_file(tracking_uri: str) -> None:
    database = make_url(tracking_uri).database
    if database in (None, "", ":memory:"):
        return
    path = Path(database).absolute()
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
            raise TrackingError(
                f"MLflow tracking URI {tracking_uri}: {path} is not a writable file"
            )
        probe = path
    else:
        folder = next(p for p in path.parents if p.exists())  # MLflow creates the missing folders
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingError(
                f"MLflow tracking URI {tracking_uri}: cannot create {path} ({folder} is not a "
                "writable folder)"
            )
        probe = folder / f".segxal-probe-{os.getpid()}.db"  # a database there, removed at once
    try:  # at once, where MLflow's own engine would retry for minutes
        with contextlib.closing(sqlite3.connect(probe)) as connection:
            connection.execute("pragma schema_version").fetchone()
    except sqlite3.Error as error:
        where = path if probe == path else f"{path} (a database cannot be made in {probe.parent})"
        raise TrackingError(
            f"MLflow tracking URI {tracking_uri}: {where} does not open as an SQLite database ({error})"
        ) from error
    finally:
        if probe != path:
            probe.unlink(missing_ok=True)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: a connection or server-side failure, not a request MLflow refused as invalid."""
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, (OSError, OperationalError))


def retrying(call: Callable[[], T], what: str, tracking_uri: str | None = None) -> T:
    """``call()``, retried after each of :data:`RETRY_DELAYS_S` seconds while it fails transiently, with a
    warning each time; gives up with a :class:`TrackingError` naming ``tracking_uri`` (default: the
    active one)."""
    delays = RETRY_DELAYS_S
    for attempt, delay in enumerate([*delays, None], start=1):
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            if delay is None:
                uri = tracking_uri or mlflow.get_tracking_uri()
                raise TrackingError(
                    f"MLflow {what} at {uri} failed {attempt} times; last error: {error}"
                ) from error
            log.warning(
                "MLflow %s failed (%s); retry %d of %d in %.0f s",
                what,
                error,
                attempt,
                len(delays),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


@contextlib.contextmanager
def experiment_run(
    tracking_uri: str, experiment: str, run_name: str | None, config: Any, run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start (and always end) an MLflow run with the flattened ``config`` logged as params and system
    metrics (CPU, memory, GPU: psutil) sampled while it runs; with ``run_id``, continue that run (a
    resumed experiment) instead."""
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.set_experiment(experiment)
    if (
        found.tags.get(EXPERIMENT_KIND_TAG) is None
    ):  # the UI opens on training runs, not GenAI traces
        retrying(
            lambda: mlflow.MlflowClient().set_experiment_tag(
                found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
            ),
            "set_experiment_tag",
        )
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=True
    ) as run:
        if run_id is None:
            log_params(flatten(config))
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, experiment, tracking_uri)
        yield run


class RetryingClient:
    """An ``MlflowClient`` whose every call is :func:`retrying` (for code that logs to runs other than
    the active one, such as a sweep's trials)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        return lambda *args, **kwargs: retrying(
            lambda: method(*args, **kwargs), f"client.{name}", self.tracking_uri
        )


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite metrics; metric names are used as given (``val/miou``, ``val/iou/<class>``)."""
    values = {k: float(v) for k, v in metrics.items()}
    retrying(lambda: mlflow.log_metrics(values, step=step), "log_metrics")


def log_params(params: dict[str, Any]) -> None:
    """Log params as text (cut to MLflow's limit on a value)."""
    values = {key: str(value)[:MAX_PARAM_LENGTH] for key, value in params.items()}
    retrying(lambda: mlflow.log_params(values), "log_params")


def set_tags(tags: dict[str, Any]) -> None:
    retrying(lambda: mlflow.set_tags(tags), "set_tags")


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    retrying(
        lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path),
        f"log_artifact {Path(path).name}",
    )


def log_image(path: str | Path, key: str, step: int) -> None:
    """A PNG as an MLflow image under ``key`` at ``step``: the UI shows a step slider per key."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
    retrying(lambda: mlflow.log_image(image, key=key, step=step, synchronous=True), "log_image")


def log_table(path: str | Path, artifact_file: str) -> None:
    """A Parquet file as an MLflow table (the UI's artifact view shows and filters its rows)."""
    import pyarrow.parquet as pq

    frame = pq.read_table(path).to_pandas()
    retrying(lambda: mlflow.log_table(frame, artifact_file=artifact_file), "log_table")


def log_dataset(path: str | Path, name: str, context: str, columns: list[str]) -> None:
    """``columns`` of a Parquet manifest as an MLflow dataset input (name, digest, schema, row count)."""
    import pyarrow.parquet as pq
    from mlflow.data.pandas_dataset import from_pandas

    frame = pq.read_table(path, columns=columns).to_pandas()
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source class twice and warns that a path matches both
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        dataset = from_pandas(frame, source=str(Path(path).absolute()), name=name)
    retrying(lambda: mlflow.log_input(dataset, context=context), "log_input")


def log_segmenter(model, name: str = "segmenter") -> None:
    """``model`` (images (N, 3, H, W) float32 -> logits (N, C, H, W)) with MLflow's PyTorch flavour,
    a signature of any batch and image size and a small input example, so that it is listed under
    Logged models and can be registered. Saved as the module itself (``pickle``): ``torch.export``
    would fix the example's batch and image size."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = np.zeros((1, 3, 16, 16), dtype=np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.num_classes, -1, -1))]),
    )
    model = model.cpu().eval()
    # mlflow.pytorch warns on every pickled save that loading an untrusted pickle runs its code; this
    # is the job's own model, and the warning would be the one line of noise in each run's output
    pickle_warning = logging.getLogger("mlflow.pytorch")
    level = pickle_warning.level
    pickle_warning.setLevel(logging.ERROR)
    try:
        retrying(
            lambda: mlflow.pytorch.log_model(
                model,
                name=name,
                signature=signature,
                input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                serialization_format="pickle",
            ),
            "log_model",
        )
    finally:
        pickle_warning.setLevel(level)
