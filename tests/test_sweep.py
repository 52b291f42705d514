"""The PEBAL sweep: search space and config checks, then jobs.sweep with ASHA on a real local Ray and MLflow."""

import os
from dataclasses import asdict

import mlflow
import pytest
import ray
import torch
import yaml
from conftest import TINY_SYNTHETIC

from actors.tune_pebal import search_space, trial_pebal_config
from jobs.common import init_ray
from jobs.sweep import main
from orchestrator.config import load_experiment
from orchestrator.sweep_config import SweepConfig
from orchestrator.typed_config import ConfigError
from segxal.checkpoint import load_checkpoint, save_checkpoint
from segxal.models.unet import UNet, UNetConfig
from segxal.pebal.config import PebalConfig


def test_sweep_config_rejects_ranges_that_could_give_m_in_at_or_above_m_out():
    with pytest.raises(ValueError, match="margin_gap must be positive"):
        SweepConfig(margin_gap=(0.0, 2.0))
    with pytest.raises(ValueError, match="lam: a log-uniform range needs low > 0"):
        SweepConfig(lam=(0.0, 1.0))
    with pytest.raises(ConfigError, match="sweep: m_in: the range must be"):
        load_experiment(None, ["sweep.m_in=[-2, -3]"])


def test_sampled_trials_always_have_m_in_below_m_out():
    space = search_space(SweepConfig(m_in=(-5.0, -1.0), margin_gap=(0.01, 0.02)))
    for seed in range(200):
        params = {name: domain.sample(random_state=seed) for name, domain in space.items()}
        config = trial_pebal_config(
            PebalConfig(margin_quantiles=(0.1, 0.9)), params
        )  # validated on construction
        assert config.m_in < config.m_out <= config.m_in + 0.02 and config.margin_quantiles is None
        assert 1e-5 <= config.beta_smooth <= 1e-2 and 0.01 <= config.lam <= 1.0


@pytest.fixture(scope="module")
def sweep_ray(own_ray):
    """Ray as jobs.sweep starts it locally: with the State API that frees ASHA-stopped trials' workers."""
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = saved


@pytest.mark.slow
def test_sweep_runs_trials_under_one_parent_run_and_writes_the_best(
    sweep_ray, tmp_path, synthetic_root, tracking_uri
):
    torch.manual_seed(0)
    pretrained = tmp_path / "segmenter.pt"
    save_checkpoint(
        pretrained, {"model": UNet(UNetConfig(num_classes=19, width=4, depth=2)).to_checkpoint()}
    )
    config = {
        "name": "sweep-test",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        "data": {
            "dataset": "synthetic",
            "root": str(synthetic_root),
            "image_size": [32, 64],
            "synthetic": asdict(TINY_SYNTHETIC),
            "max_train_images": 8,
        },
        "pebal": {
            "pretrained": str(pretrained),
            "benchmarks": [str(synthetic_root / "anomaly")],
            "finetune": {"epochs": 2, "batch_size": 4, "device": "cpu"},
        },
        "sweep": {
            "num_samples": 4,
            "max_concurrent": 2,
            "m_in": [-3.0, -1.0],
            "margin_gap": [0.5, 2.0],
            "lam": [0.1, 1.0],
            "grace_period": 1,
            "reduction_factor": 2,
        },
        "tracking": {"tracking_uri": tracking_uri, "experiment": "sweep-test"},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    result = main(["--config", str(tmp_path / "sweep.yaml"), "--quiet"])
    assert len(result.trials) == 4 and all(
        t.error is None and t.best_metrics for t in result.trials
    )

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {
        r.data.tags["trial_id"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert parent.info.status == "FINISHED" and len(runs) == 5
    assert set(children) == {t.trial_id for t in result.trials}
    for trial in result.trials:
        child = children[trial.trial_id]
        params, sampled = child.data.params, trial.params
        assert child.info.status == "FINISHED" and child.data.tags["stopped_early"] in (
            "true",
            "false",
        )
        assert float(params["pebal.m_in"]) == pytest.approx(sampled["m_in"])
        assert float(params["pebal.m_out"]) == pytest.approx(
            sampled["m_in"] + sampled["margin_gap"]
        )
        assert float(params["pebal.m_in"]) < float(params["pebal.m_out"])
        for name in ("lam", "beta_smooth", "beta_sparse"):
            assert float(params[f"pebal.{name}"]) == pytest.approx(sampled[name])
        assert child.data.metrics["best/ap"] == pytest.approx(trial.best_metrics["val/ap"])
        assert 0.0 <= child.data.metrics["val/ap"] <= 1.0 and "val/fpr95" in child.data.metrics

    best = max(result.trials, key=lambda t: t.best_metrics["val/ap"])
    assert parent.data.tags["best_trial"] == best.trial_id
    assert parent.data.metrics["best/ap"] == pytest.approx(best.best_metrics["val/ap"])
    folder = tmp_path / "runs" / "sweep-test" / "sweep"
    best_config = load_experiment(str(folder / "best_config.yaml"))
    assert best_config.pebal.m_in == pytest.approx(best.params["m_in"])
    assert best_config.pebal.lam == pytest.approx(best.params["lam"])
    assert best_config.pebal.pretrained == str(pretrained)
    assert load_checkpoint(folder / "best_checkpoint.pt")["metrics"]["val/ap"] == pytest.approx(
        best.best_metrics["val/ap"]
    )
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/best_config.yaml",
        "sweep/best_checkpoint.pt",
        "sweep/trials.md",
    }
