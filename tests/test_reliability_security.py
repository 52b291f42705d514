"""What the project starts listens on loopback only: the jobs' embedded Ray (dashboard included) and the
MLflow servers it starts or suggests. (Checkpoints refusing pickles: test_training; token authentication:
test_cluster_yaml and test_job_submit; annotation paths: test_labelstudio.)"""

import os

import pytest
import ray
import yaml

from jobs.common import init_ray, print_results_hint

from procfs import descendants, listening_sockets, socket_inodes
from test_cluster_yaml import CLUSTER_YAML


@pytest.mark.slow
def test_the_jobs_embedded_ray_listens_on_loopback_only(monkeypatch):
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
        listening = {(address, port) for address, port, inode in listening_sockets() if inode in ours}
        ports = {port for _, port in listening}
        assert {dashboard_port, node["NodeManagerPort"], node["ObjectManagerPort"], node["MetricsExportPort"],
                int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])} <= ports
        assert {address for address, _ in listening} == {"127.0.0.1"}, listening
    finally:
        ray.shutdown()


def test_mlflow_servers_bind_loopback(capsys):
    commands = [c for c in yaml.safe_load(CLUSTER_YAML.read_text())["head_start_ray_commands"] if "mlflow server" in c]
    assert len(commands) == 1 and "mlflow server --host 127.0.0.1 " in commands[0]
    print_results_hint("sqlite:///mlflow.db")
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1" in capsys.readouterr().out
