"""The round trip users make: ``ray start --head`` on 127.0.0.1 with token authentication, then
``ray job submit --working-dir . -- python -m jobs.<x>``; each job reaches SUCCEEDED and its run is in MLflow.

The head is started with ``--block`` in a session of its own, and stopped with SIGTERM (the way Ray's
node shuts down its own processes); anything of it still alive after that is killed, so the test never
touches another Ray on the machine (which ``ray stop`` would)."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from helpers import REPO, SERVICE_WAIT_S, tiny, write_config
from procfs import processes_mentioning

from jobs.common import free_loopback_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
JOB_TIMEOUT_S = 600


def wait_for_dashboard(
    url: str, head: subprocess.Popen, log: Path, timeout_s: float = SERVICE_WAIT_S
) -> None:
    """Up when the job API answers; with token auth on, an unauthenticated request gets 401."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(
        f"the Ray dashboard at {url} did not come up in {timeout_s} s (SEGXAL_TEST_SERVICE_WAIT_S "
        f"sets the wait):\n{log.read_text()}"
    )


@pytest.fixture(scope="module")
def head_node(own_ray, tmp_path_factory):
    """A ``ray start --head`` cluster on loopback with token authentication; yields (address, env)."""
    root = tmp_path_factory.mktemp("head")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    dashboard_port = free_loopback_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # with --node-ip-address 127.0.0.1: bind to loopback
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a single node has nowhere to drain to
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    temp_dir = root / "ray"
    log = root / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(free_loopback_port()),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard_port),
                "--num-cpus",
                "2",
                "--temp-dir",
                str(temp_dir),
                "--disable-usage-stats",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_dashboard(address, head, log)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in processes_mentioning(str(temp_dir)):
            os.kill(pid, signal.SIGKILL)


def ray_cli(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def plain(text: str) -> str:
    """The CLI's output without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


NO_AGENT = "No available agent to submit job"  # the head's job agent is not up yet


def submit(address: str, env: dict, entrypoint: list[str]) -> str:
    """``ray job submit`` from the repository root under a readable submission id (as the README does),
    once the head's job agent takes it; returns the job's output."""
    deadline = time.monotonic() + SERVICE_WAIT_S
    while True:
        submission_id = f"segxal-{entrypoint[1].removeprefix('jobs.')}-{secrets.token_hex(3)}"
        done = ray_cli(
            [
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                ".",
                "--submission-id",
                submission_id,
                "--",
                "python",
                *entrypoint,
            ],
            env,
            timeout=JOB_TIMEOUT_S,
        )
        output = done.stdout + done.stderr
        if NO_AGENT not in output:
            break
        assert time.monotonic() < deadline, (
            f"the Ray head's job agent took no job for {SERVICE_WAIT_S} s "
            f"(SEGXAL_TEST_SERVICE_WAIT_S sets the wait):\n{output}"
        )
        time.sleep(2)
    match = re.search(r"Job '(segxal-[\w-]+)'", output)
    assert match and match.group(1) == submission_id, output
    status = ray_cli(["job", "status", "--address", address, match.group(1)], env)
    assert re.search(rf"Job '{match.group(1)}' succeeded", plain(status.stdout + status.stderr)), (
        output
    )
    return output


def finished_run(tracking_uri: str, experiment: str) -> mlflow.entities.Run:
    mlflow.set_tracking_uri(tracking_uri)
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert run.info.status == "FINISHED"
    return run


def test_a_wrong_token_is_refused(head_node):
    address, env = head_node
    refused = ray_cli(
        ["job", "list", "--address", address], {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    )
    assert refused.returncode != 0
    assert "Invalid authentication token" in refused.stdout + refused.stderr
    assert ray_cli(["job", "list", "--address", address], env).returncode == 0


def test_active_learning_job_round_trip(head_node, synthetic_root, tmp_path):
    address, env = head_node
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = tiny(synthetic_root, tmp_path / "runs", uri, "submitted", 1) + [
        "--set",
        "al.num_scorers=1",
    ]
    output = submit(address, env, ["-m", "jobs.al", *args])
    assert "cycle 1: mIoU" in output
    run = finished_run(uri, "al-test")
    client = mlflow.MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [0, 1]
    assert (
        tmp_path / "runs" / "submitted" / "cycles" / "cycle_01" / "pool_state.parquet"
    ).is_file()


def test_pebal_job_round_trip(head_node, synthetic_root, tmp_path):
    address, env = head_node
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    submit(
        address,
        env,
        ["-m", "jobs.pebal", "--config", write_config(tmp_path, synthetic_root, uri), "--quiet"],
    )
    run = finished_run(uri, "pebal-test")
    ap = [
        value
        for key, value in run.data.metrics.items()
        if key.startswith("anomaly/") and key.endswith("/ap")
    ]
    assert ap and all(0.0 <= value <= 1.0 for value in ap), sorted(run.data.metrics)
