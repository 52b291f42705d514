"""Shared fixtures: tiny synthetic datasets written once per test session."""

from __future__ import annotations

import os

import pytest

from segxal.data.synthetic import SyntheticConfig, generate_synthetic

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

TINY_SYNTHETIC = SyntheticConfig(
    num_train=12, num_val=4, num_anomaly=4, height=64, width=128, seed=7, workers=1
)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A 12/4/4-image synthetic dataset at 64x128 in the Cityscapes layout."""
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), TINY_SYNTHETIC)


@pytest.fixture
def tracking_uri(tmp_path):
    """A fresh SQLite MLflow store."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


LOCAL_RAY = {"num_cpus": 2, "include_dashboard": False, "configure_logging": False}


@pytest.fixture(scope="session")
def local_ray():
    """One embedded 2-CPU Ray for the whole session, started by the first test that asks for it."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def own_ray():
    """For a module whose tests start a Ray of their own (a cluster, a job's ``init_ray``): the shared
    one is stopped for it and started again after, for the modules that follow."""
    import ray

    running = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if running:
        ray.init(**LOCAL_RAY)
