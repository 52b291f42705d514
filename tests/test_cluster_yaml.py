"""cluster.yaml against Ray's own autoscaler schema and checks (no cloud call), and the project's needs:
GPU workers, the project installed, token authentication on every node, the dashboard kept on loopback."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from helpers import CLUSTER_YAML
from ray.autoscaler._private.util import prepare_config, validate_config

RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
PROJECT_ON_NODES = "/home/ray/segxal"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: merge the provider's defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def start_commands(config: dict) -> list[str]:
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in commands if "ray start" in c]


def test_valid_for_ray(config):
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_gpu_workers(config):
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker type with a GPU"
    for node_type in gpu:
        assert node_type["resources"]["CPU"] >= 1
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0


def test_installs_the_project(config):
    assert config["file_mounts"][PROJECT_ON_NODES] == "."
    assert f"pip install --quiet -e {PROJECT_ON_NODES}" in config["setup_commands"]
    assert ".gitignore" in config["rsync_filter"]  # neither .venv nor data/ are copied to the nodes


def test_token_auth_on_every_node(config):
    starts = start_commands(config)
    assert len(starts) == 2 and any("--head" in c for c in starts)
    for command in starts:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert (
        config["file_mounts"]["/home/ray/.ray"] == "~/.ray"
    )  # where `ray get-auth-token --generate` writes
    assert "disabled" not in CLUSTER_YAML.read_text()


def test_dashboard_on_loopback(config):
    (head,) = [c for c in start_commands(config) if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(unknown_key=1),
        lambda c: c.update(max_workers="8"),
        lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU=0.5),
        lambda c: c["available_node_types"]["gpu"].pop("node_config"),
        lambda c: c["available_node_types"]["gpu"].update(
            min_workers=9
        ),  # more than max_workers in all
    ],
    ids=[
        "unknown key",
        "max_workers as string",
        "fractional GPU resource",
        "no node_config",
        "min over max",
    ],
)
def test_ray_rejects_broken_copies(config, break_it):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(broken)
