"""MLflow faults: an unreachable store stops a job within seconds, naming the URI, before Ray starts; a
transient failure while logging is retried and the run goes on (faked, and with a real `mlflow server`
stopped and restarted mid-run)."""

import http.server
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import mlflow
import pytest
import ray
from conftest import TINY_SYNTHETIC
from helpers import SERVICE_WAIT_S
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from procfs import listening_addresses

from jobs import al, pebal, sweep, train
from jobs.common import free_loopback_port
from orchestrator import tracking
from orchestrator.config import ExperimentConfig
from orchestrator.tracking import (
    RetryingClient,
    TrackingError,
    check_tracking_reachable,
    experiment_run,
    log_artifact,
    log_metrics,
    log_params,
    set_tags,
)


def test_a_closed_port_fails_within_seconds_naming_the_uri():
    uri = f"http://127.0.0.1:{free_loopback_port()}"
    start = time.monotonic()
    with pytest.raises(
        TrackingError, match=re.escape(f"MLflow tracking server {uri} is unreachable")
    ):
        check_tracking_reachable(uri)
    assert time.monotonic() - start < 3


def test_a_server_that_never_answers_fails_after_the_probe_timeout():
    with socket.socket() as silent:  # accepts connections (kernel backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingError, match=re.escape(uri)):
            check_tracking_reachable(uri, timeout_s=0.5)
        assert time.monotonic() - start < 3


def test_sqlite_store_that_cannot_be_created_names_the_uri(tmp_path):
    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match=re.escape(f"MLflow tracking URI {uri}: cannot create")):
        check_tracking_reachable(uri)
    (tmp_path / "a_folder.db").mkdir()
    with pytest.raises(TrackingError, match="is not a writable file"):
        check_tracking_reachable(f"sqlite:///{tmp_path / 'a_folder.db'}")
    check_tracking_reachable(
        f"sqlite:///{tmp_path / 'new' / 'folders' / 'mlflow.db'}"
    )  # MLflow creates them


@pytest.mark.parametrize(
    "uri, message",
    [
        ("sqlite:////proc/mlflow.db", "/proc/mlflow.db (a database cannot be made in /proc)"),
        ("file:///tmp/mlruns", "the store does not open (The filesystem tracking backend"),
        (
            "bogus://somewhere",
            "the store does not open (Model registry functionality is unavailable",
        ),
    ],
)
def test_a_store_that_does_not_open_is_refused_at_once(uri, message):
    start = time.monotonic()
    with pytest.raises(TrackingError, match=re.escape(f"MLflow tracking URI {uri}: {message}")):
        check_tracking_reachable(uri)
    assert time.monotonic() - start < 10


def test_a_sqlite_store_is_checked_without_being_created(tmp_path):
    check_tracking_reachable(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert list(tmp_path.iterdir()) == []  # the probe database is gone, nothing else was made
    (tmp_path / "not_sqlite.db").write_text("plain text, long enough to have a header" * 10)
    with pytest.raises(TrackingError, match="not_sqlite.db does not open as an SQLite database"):
        check_tracking_reachable(f"sqlite:///{tmp_path / 'not_sqlite.db'}")


def test_a_server_that_is_not_mlflow_is_refused():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        start = time.monotonic()
        with pytest.raises(
            TrackingError, match=re.escape(f"MLflow tracking URI {uri}: the store does not open")
        ):
            check_tracking_reachable(uri)
        assert time.monotonic() - start < 10
        server.shutdown()


@pytest.mark.parametrize("job", [al, train, pebal, sweep], ids=lambda job: job.__name__)
def test_jobs_stop_before_ray_and_before_work(own_ray, job, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"
    )  # should the check be missed: fail, don't hang
    uri = f"http://127.0.0.1:{free_loopback_port()}"
    argv = [
        "--config",
        "jobs/configs/demo.yaml",
        "--quiet",
        "--set",
        f"tracking.tracking_uri={uri}",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        f"data.root={synthetic_root}",
    ]
    for key, value in TINY_SYNTHETIC.__dict__.items():
        argv += ["--set", f"data.synthetic.{key}={value}"]
    start = time.monotonic()
    with pytest.raises(
        SystemExit, match=re.escape(f"error: MLflow tracking server {uri} is unreachable")
    ):
        job.main(argv)
    assert time.monotonic() - start < 10
    assert not ray.is_initialized()
    assert (
        not (tmp_path / "demo" / "progress.json").exists()
        and not (tmp_path / "demo" / "checkpoints").exists()
    )


def failing(times: int, error: Exception, real):
    """``real``, failing ``times`` times first with ``error``; counts its calls."""

    def call(*args, **kwargs):
        call.count += 1
        if call.count <= times:
            raise error
        return real(*args, **kwargs)

    call.count = 0
    return call


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the faked failures (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def run(store, monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    with experiment_run(store, "faults", "run", ExperimentConfig()) as active:
        yield active


def test_transient_logging_failures_are_retried_and_the_run_goes_on(
    run, store, tmp_path, monkeypatch, caplog
):
    metrics = failing(
        2,
        MlflowException("API request to http://x failed with exception ConnectionError"),
        mlflow.log_metrics,
    )
    artifact = failing(1, ConnectionRefusedError("connection refused"), mlflow.log_artifact)
    monkeypatch.setattr(mlflow, "log_metrics", metrics)
    monkeypatch.setattr(mlflow, "log_artifact", artifact)
    (tmp_path / "note.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        log_metrics({"val/miou": 0.5}, step=3)
        log_artifact(tmp_path / "note.txt", "notes")
    assert metrics.count == 3 and artifact.count == 2
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "MLflow log_metrics failed"
    ] * 2 + ["MLflow log_artifact note.txt failed"]
    client = mlflow.MlflowClient(store)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/miou")] == [
        (3, 0.5)
    ]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/note.txt"]


def test_params_and_tags_are_retried_too(run, store, monkeypatch):
    params = failing(1, ConnectionResetError("reset by peer"), mlflow.log_params)
    tags = failing(
        2,
        MlflowException("API request failed", error_code=TEMPORARILY_UNAVAILABLE),
        mlflow.set_tags,
    )
    monkeypatch.setattr(mlflow, "log_params", params)
    monkeypatch.setattr(mlflow, "set_tags", tags)
    log_params({"pebal.m_in_used": -4.0, "long": "x" * (tracking.MAX_PARAM_LENGTH + 10)})
    set_tags({"job": "al"})
    assert params.count == 2 and tags.count == 3
    logged = mlflow.MlflowClient(store).get_run(run.info.run_id).data
    assert (
        logged.params["pebal.m_in_used"] == "-4.0"
        and len(logged.params["long"]) == tracking.MAX_PARAM_LENGTH
    )
    assert logged.tags["job"] == "al"


def test_a_retrying_client_retries_every_call(store, monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    client = RetryingClient(store)
    create_run = failing(2, ConnectionResetError("reset by peer"), client.client.create_run)
    monkeypatch.setattr(client.client, "create_run", create_run)
    experiment_id = client.create_experiment("retrying-client")
    run = client.create_run(experiment_id, run_name="trial-1")
    client.set_terminated(run.info.run_id, "FINISHED")
    assert create_run.count == 3
    assert mlflow.MlflowClient(store).get_run(run.info.run_id).info.status == "FINISHED"


def test_a_lasting_failure_gives_up_naming_the_uri(run, store, monkeypatch):
    metrics = failing(10, MlflowException("temporarily unavailable"), mlflow.log_metrics)
    monkeypatch.setattr(mlflow, "log_metrics", metrics)
    with pytest.raises(
        TrackingError, match=re.escape(f"MLflow log_metrics at {store} failed 4 times")
    ):
        log_metrics({"val/miou": 0.5})
    assert metrics.count == 4


def test_a_refused_request_is_not_retried(run, monkeypatch):
    metrics = failing(
        10, MlflowException.invalid_parameter_value("bad metric name"), mlflow.log_metrics
    )
    monkeypatch.setattr(mlflow, "log_metrics", metrics)
    with pytest.raises(MlflowException, match="bad metric name"):
        log_metrics({"val/miou": 0.5})
    assert metrics.count == 1


# -- a real MLflow server ---------------------------------------------------------------------------------


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own process group, so that stopping it stops its workers."""

    def __init__(self, root, port: int) -> None:
        self.root, self.port, self.process = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)

    def wait_healthy(self, timeout_s: float = SERVICE_WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(
            f"mlflow server at {self.uri} not healthy after {timeout_s} s "
            "(SEGXAL_TEST_SERVICE_WAIT_S sets the wait)"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path, free_loopback_port())
    try:
        server.start()
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_restarted_mid_run_loses_nothing(server, tmp_path, monkeypatch, caplog):
    assert listening_addresses(server.port) == {"127.0.0.1"}
    monkeypatch.setenv(
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"
    )  # MLflow's own retries would hide the outage
    monkeypatch.setattr(tracking, "RETRY_DELAYS_S", (1.0,) * 60)
    check_tracking_reachable(server.uri)
    with experiment_run(server.uri, "faults", "restarted", ExperimentConfig()) as run:
        log_metrics({"val/miou": 0.25}, step=0)
        server.stop()
        with pytest.raises(TrackingError):
            check_tracking_reachable(server.uri)
        server.start()  # comes up while log_metrics retries
        with caplog.at_level(logging.WARNING, logger=tracking.__name__):
            log_metrics({"val/miou": 0.5}, step=1)
        (tmp_path / "note.txt").write_text("x")
        log_artifact(tmp_path / "note.txt")
    assert any("MLflow log_metrics failed" in r.getMessage() for r in caplog.records)
    client = mlflow.MlflowClient(server.uri)
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/miou")] == [
        (0, 0.25),
        (1, 0.5),
    ]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]


def test_the_experiment_says_it_is_for_model_training(tracking_uri):
    with tracking.experiment_run(tracking_uri, "kind", "r", ExperimentConfig()):
        pass
    experiment = mlflow.MlflowClient(tracking_uri).get_experiment_by_name("kind")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
