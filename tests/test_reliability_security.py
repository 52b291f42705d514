"""What the project starts listens on loopback only: the jobs' embedded Ray (dashboard included) and the
MLflow servers it starts or suggests. (Checkpoints refusing pickles: test_training; token authentication:
test_cluster_yaml and test_job_submit; annotation paths: test_labelstudio.)"""

import os
import random
import socket
from contextlib import ExitStack

import pytest
import ray
import yaml
from helpers import CLUSTER_YAML
from procfs import descendants, listening_sockets, socket_inodes

from jobs import common
from jobs.common import free_loopback_port, init_ray, print_results_hint


@pytest.mark.slow
def test_the_jobs_embedded_ray_listens_on_loopback_only(own_ray, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "")  # init_ray sets it: restored afterwards
    constants = ray._private.ray_constants
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    init_ray(num_cpus=1)
    try:
        dashboard_port = int(os.environ["RAY_API_SERVER_ADDRESS"].rsplit(":", 1)[1])
        (node,) = ray.nodes()
        assert node["NodeManagerAddress"] == "127.0.0.1"
        ours = socket_inodes([os.getpid(), *descendants(os.getpid())])
        listening = {
            (address, port) for address, port, inode in listening_sockets() if inode in ours
        }
        ports = {port for _, port in listening}
        assert {
            dashboard_port,
            node["NodeManagerPort"],
            node["ObjectManagerPort"],
            node["MetricsExportPort"],
            int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]),
        } <= ports
        assert {address for address, _ in listening} == {"127.0.0.1"}, listening
    finally:
        ray.shutdown()


def test_the_ray_token_file_is_made_private(tmp_path, monkeypatch):
    token = tmp_path / "auth_token"
    token.write_text("0" * 64)
    token.chmod(0o644)  # as Ray writes it under the usual umask
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert common.private_ray_token() == token and token.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / ".ray").mkdir()
    default = tmp_path / ".ray" / "auth_token"
    default.write_text("1" * 64)
    default.chmod(0o664)
    assert common.private_ray_token() == default and default.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("RAY_AUTH_TOKEN", "2" * 64)
    assert common.private_ray_token() is None


def test_a_free_loopback_port_lies_below_the_ephemeral_range_whatever_the_random_seed():
    ephemeral_start = int(common.EPHEMERAL_PORTS_FILE.read_text().split()[0])
    ports = set()
    for _ in range(4):
        random.seed(
            0
        )  # jobs seed random: two drivers with one seed must not share a dashboard port
        ports.add(free_loopback_port())
    assert len(ports) > 1
    assert all(common.QUIET_PORTS_START <= port < ephemeral_start for port in ports)


def test_a_free_loopback_port_skips_ports_in_use(monkeypatch, tmp_path):
    start = common.QUIET_PORTS_START
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text(f"{start + 8}\t60999\n")
    monkeypatch.setattr(common, "EPHEMERAL_PORTS_FILE", range_file)
    with ExitStack() as held:
        taken_by_us = []
        for port in range(start, start + 8):
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
                taken_by_us.append(sock)
            except OSError:
                pass  # in use already
        assert taken_by_us, "every test port is in use on this machine"
        free = taken_by_us[-1].getsockname()[1]
        taken_by_us[-1].close()
        assert free_loopback_port() == free
        held.enter_context(socket.socket()).bind(("127.0.0.1", free))
        with pytest.raises(RuntimeError, match=f"between {start} and {start + 8}"):
            free_loopback_port()


def test_mlflow_servers_bind_loopback(capsys):
    commands = [
        c
        for c in yaml.safe_load(CLUSTER_YAML.read_text())["head_start_ray_commands"]
        if "mlflow server" in c
    ]
    assert len(commands) == 1 and "mlflow server --host 127.0.0.1 " in commands[0]
    print_results_hint("sqlite:///mlflow.db")
    assert (
        "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"
        in capsys.readouterr().out
    )


def test_a_ray_node_start_timeout_is_retried_once_then_a_clean_error(own_ray, monkeypatch, caplog):
    calls = []

    def slow_node(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1 or fail_always:
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "init", slow_node)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fail_always = False
    common.init_ray(num_cpus=1)
    assert len(calls) == 2 and calls[0] == calls[1] and calls[0]["address"] == "local"
    assert "trying once more" in caplog.text
    fail_always, calls[:] = True, []
    with pytest.raises(SystemExit, match="did not come up within Ray's 30 s, twice"):
        common.init_ray(num_cpus=1)
    assert len(calls) == 2
