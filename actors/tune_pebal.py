"""Ray Tune sweep of PEBAL's margins and regulariser weights; every trial is a Ray Train fine-tuning run.

The Train V2 pattern (Ray 2.60, docs "Hyperparameter Tuning with Ray Tune"): the Tune trainable is a
function that builds and fits a ``TorchTrainer`` (:func:`actors.pebal_train.finetune`) and only
drives it, so it asks Tune for no CPU (``trial_cpus``); the workers take ``scaling``'s resources. The
Train run's reports reach Tune through ``ray.tune.integration.ray_train.TuneReportCallback``, one Tune
result per epoch, which ASHA schedules on (``training_iteration`` = epochs, metric ``val/ap``, max).
m_out is sampled as m_in plus a positive gap, so no trial has m_in >= m_out.

:class:`MlflowTrialCallback` runs in the driver: each trial becomes an MLflow run nested under the
sweep's parent run (tag ``mlflow.parentRunId``), with the trial's full flattened config as params and
its per-epoch metrics; a trial stopped by ASHA ends FINISHED, a failed one FAILED with its error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import ray.tune
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from actors.pebal_train import OBJECTIVE, PebalJob, finetune
from actors.ray_train import CHECKPOINT_FILE
from orchestrator.config import ExperimentConfig, ScalingConfig
from orchestrator.sweep_config import SweepConfig
from orchestrator.tracking import MAX_PARAM_LENGTH, RetryingClient
from orchestrator.typed_config import flatten
from segxal.pebal.config import PebalConfig

log = logging.getLogger(__name__)
SAMPLED = ("m_in", "margin_gap", "beta_smooth", "beta_sparse", "lam")
REPORTED = ("epoch", "val/ap", "val/fpr95", "val/auroc", "train/loss")
# A Tune placement group needs a non-zero bundle; a trial's driver function holds some memory but, with
# sweep.trial_cpus = 0, no CPU, so that the Train workers can use every CPU.
TRIAL_MEMORY_BYTES = 256 * 2**20


def search_space(sweep: SweepConfig) -> dict:
    return {
        "m_in": ray.tune.uniform(*sweep.m_in),
        "margin_gap": ray.tune.uniform(*sweep.margin_gap),
        "beta_smooth": ray.tune.loguniform(*sweep.beta_smooth),
        "beta_sparse": ray.tune.loguniform(*sweep.beta_sparse),
        "lam": ray.tune.loguniform(*sweep.lam),
    }


def trial_pebal_config(base: PebalConfig, params: dict) -> PebalConfig:
    """``base`` with a trial's sampled values (m_out = m_in + margin_gap)."""
    return replace(
        base,
        m_in=params["m_in"],
        m_out=params["m_in"] + params["margin_gap"],
        beta_smooth=params["beta_smooth"],
        beta_sparse=params["beta_sparse"],
        lam=params["lam"],
        margin_quantiles=None,
    )


def pebal_trial(params: dict, job: PebalJob, scaling: ScalingConfig, storage_path: str) -> None:
    """The Tune trainable: one Ray Train fine-tuning with the trial's PEBAL settings."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_job = replace(job, pebal=trial_pebal_config(job.pebal, params))
    name = f"finetune-{ray.tune.get_context().get_trial_id()}"
    finetune(trial_job, scaling, storage_path, name, callbacks=[TuneReportCallback()])


def trial_experiment(config: ExperimentConfig, params: dict) -> ExperimentConfig:
    """``config`` as a trial runs it: its pebal section with the trial's sampled values."""
    return replace(config, pebal=trial_pebal_config(config.pebal, params))


class MlflowTrialCallback(ray.tune.Callback):
    """One MLflow run per trial, nested under ``parent_run_id``, with the flattened experiment config of
    the trial (:func:`trial_experiment`) and the sampled ``margin_gap`` as params, ``val/*`` and
    ``train/loss`` per epoch, and at the end ``best/*`` (the epoch with the highest AP) and a
    ``stopped_early`` tag (ASHA stopped it before ``pebal.finetune.epochs``)."""

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str, config: ExperimentConfig
    ) -> None:
        self.client = RetryingClient(tracking_uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.config = config
        self.run_ids: dict[str, str] = {}
        self.best: dict[str, dict] = {}

    def trial_params(self, params: dict) -> dict:
        return {
            **flatten(trial_experiment(self.config, params)),
            "sweep.sampled.margin_gap": params["margin_gap"],
        }

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id in self.run_ids:
            return
        name = f"trial-{trial.trial_id}"
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                MLFLOW_RUN_NAME: name,
                "trial_id": trial.trial_id,
            },
        )
        self.run_ids[trial.trial_id] = run.info.run_id
        params = [
            Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in self.trial_params(trial.config).items()
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[start : start + 100])

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        values = {
            key: float(result[key])
            for key in REPORTED
            if isinstance(result.get(key), (int, float)) and math.isfinite(result[key])
        }
        step, timestamp = (
            int(values.pop("epoch", result.get("training_iteration", 0))),
            int(result.get("timestamp", 0) * 1000),
        )
        self.client.log_batch(
            self.run_ids[trial.trial_id],
            metrics=[Metric(key, value, timestamp, step) for key, value in values.items()],
        )
        if OBJECTIVE in values and values[OBJECTIVE] > self.best.get(trial.trial_id, {}).get(
            OBJECTIVE, -math.inf
        ):
            self.best[trial.trial_id] = {**values, "epoch": step}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id, best = self.run_ids[trial.trial_id], self.best.get(trial.trial_id, {})
        last_epoch = (trial.last_result or {}).get("epoch", -1)
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(f"best/{key.split('/')[-1]}", value, 0, 0) for key, value in best.items()
            ],
            tags=[
                RunTag(
                    "stopped_early", str(last_epoch < self.config.pebal.finetune.epochs - 1).lower()
                )
            ],
        )
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None:
            error_file = Path(trial.error_file) if trial.error_file else None
            error = (
                error_file.read_text()
                if error_file and error_file.is_file()
                else f"see {trial.local_path}"
            )
            self.client.log_batch(run_id, tags=[RunTag("error", error[:5000])])
            self.client.set_terminated(run_id, "FAILED")


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    params: dict
    best_metrics: dict | None  # the epoch with the highest val/ap, None if no epoch was reported
    checkpoint: Path | None  # that epoch's checkpoint.pt
    error: str | None


@dataclass(frozen=True)
class SweepResult:
    trials: list[TrialOutcome]

    @property
    def best(self) -> TrialOutcome:
        scored = [t for t in self.trials if t.best_metrics is not None]
        if not scored:
            errors = "; ".join(f"{t.trial_id}: {t.error}" for t in self.trials)
            raise RuntimeError(f"no sweep trial reported a result ({errors})")
        return max(scored, key=lambda t: t.best_metrics[OBJECTIVE])


def _outcome(result) -> TrialOutcome:
    frame, error = result.metrics_dataframe, None if result.error is None else str(result.error)
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    if frame is None or OBJECTIVE not in frame or frame[OBJECTIVE].isna().all():
        return TrialOutcome(trial_id, dict(result.config), None, None, error or "no epoch reported")
    row = frame.loc[frame[OBJECTIVE].idxmax()]
    metrics = {
        key: row[key].item() if hasattr(row[key], "item") else row[key]
        for key in REPORTED
        if key in row
    }
    checkpoint = (
        Path(row["checkpoint_path"]) / CHECKPOINT_FILE if "checkpoint_path" in row else None
    )
    return TrialOutcome(
        str(row.get("trial_id", trial_id)), dict(result.config), metrics, checkpoint, error
    )


def run_sweep(
    job: PebalJob,
    sweep: SweepConfig,
    scaling: ScalingConfig,
    storage_path: str | Path,
    name: str,
    seed: int = 0,
    callbacks: Sequence = (),
    verbose: int = 1,
) -> SweepResult:
    """Tune ``sweep.num_samples`` trials of ``job`` with ASHA on epochs; results stay under ``storage_path/name``."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    storage_path = Path(storage_path).resolve()
    epochs = job.pebal.finetune.epochs
    trainable = ray.tune.with_parameters(
        pebal_trial, job=job, scaling=scaling, storage_path=str(storage_path / name / "train")
    )
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"cpu": sweep.trial_cpus, "memory": TRIAL_MEMORY_BYTES}),
        param_space=search_space(sweep),
        tune_config=ray.tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=epochs,
                grace_period=min(sweep.grace_period, epochs),
                reduction_factor=sweep.reduction_factor,
            ),
            search_alg=BasicVariantGenerator(random_state=seed),
        ),
        run_config=ray.tune.RunConfig(
            name=name, storage_path=str(storage_path), callbacks=list(callbacks), verbose=verbose
        ),
    )
    grid = tuner.fit()
    return SweepResult([_outcome(result) for result in grid])
