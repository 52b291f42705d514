"""PEBAL anomaly segmentation: fine-tune the segmenter's last block, evaluate, log to MLflow.

    python -m jobs.pebal --config jobs/configs/pebal_demo.yaml [--set pebal.finetune.epochs=3 ...]

Starts from ``pebal.pretrained`` (a segxal checkpoint of the trained segmenter); without it, the
segmenter is first trained with the ``train`` section. The anomaly datasets (``pebal.benchmarks``;
two with one name are an input error), the COCO outliers and the checkpoint are checked before any
training. After fine-tuning, PEBAL's smoothed energy and the baselines of the original model (energy,
smoothed energy, MSP, max-logit, entropy) are scored on every benchmark (``pebal.evaluation``: by
default at the label resolution, with SegmentMeIfYouCan's component metrics) and on the AnomalyMix'd
validation split, with the fine-tuned checkpoint of the best validation AP (the epoch objective); the
table, with each dataset's protocol, is printed and logged with ROC / PR curves, anomaly-map panels, the
per-epoch metrics and that checkpoint. A non-finite loss ends the run FAILED with the step and batch,
the last good checkpoint logged. Training runs on Ray Train, connecting to the cluster in
``RAY_ADDRESS`` (as ``ray job submit`` sets it) or starting a local Ray; with ``scaling.num_workers: 0``
it runs in this process and the job needs no Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from actors.pebal_train import (
    PebalTrainingError,
    finetune,
    load_finetuned,
    prepare_pebal_job,
)
from actors.ray_train import TrainingJob, train_segmenter_job
from jobs.common import check_tracking_or_exit, init_ray, parse_job_args, show_progress
from orchestrator.config import ExperimentConfig
from orchestrator.datasets import datasets_for, label_set_for, manifest_for
from orchestrator.tracking import (
    experiment_run,
    log_artifact,
    log_metrics,
    log_params,
    log_segmenter,
    set_tags,
)
from segxal.checkpoint import CheckpointError, load_checkpoint, load_segmenter, save_checkpoint
from segxal.data.anomaly import AnomalyBenchmark, anomaly_benchmark, check_unique_names
from segxal.data.io import DataError
from segxal.data.synthetic import generate_synthetic
from segxal.models.unet import UNet
from segxal.pebal.config import BenchmarkConfig
from segxal.pebal.evaluate import (
    ORIGINAL,
    PEBAL,
    DatasetResult,
    EvaluationSet,
    benchmark_set,
    default_methods,
    evaluate_anomaly,
    flat_metrics,
    mixed_validation_name,
    plot_curves,
    plot_panels,
    split_outliers,
    table_csv,
    table_markdown,
)
from segxal.pebal.model import parameter_counts, prepare_pebal_model
from segxal.training import resolve_device

log = logging.getLogger("jobs.pebal")


@dataclass(frozen=True)
class Inputs:
    """What the config points at, loaded and checked before any training."""

    benchmarks: tuple[tuple[AnomalyBenchmark, BenchmarkConfig], ...]  # each with its config entry
    outliers: tuple  # (training, validation) outlier sources, see split_outliers
    pretrained: dict | None  # UNet.to_checkpoint() of pebal.pretrained, None to train one


def check_inputs(config: ExperimentConfig, progress: bool = False) -> Inputs:
    """Load the anomaly benchmarks, the COCO outliers and the pre-trained checkpoint; errors name the file.

    Synthetic data is generated first (if not on disk yet): its anomaly split may be a benchmark.
    """
    if config.data.dataset == "synthetic":
        generate_synthetic(config.data.root, config.data.synthetic, progress=progress)
    benchmarks = tuple(
        (anomaly_benchmark(entry.path, entry.split, entry.name, entry.layout), entry)
        for entry in config.pebal.benchmark_entries
    )
    label_set = label_set_for(config.data)
    check_unique_names((b for b, _ in benchmarks), taken=[mixed_validation_name(label_set)])
    outliers = split_outliers(config.pebal.anomalymix)
    pretrained = None
    if config.pebal.pretrained is not None:
        pretrained = load_segmenter(config.pebal.pretrained)
        model = UNet.from_checkpoint(pretrained)
        expected = label_set.num_classes
        if model.num_classes != expected:
            raise CheckpointError(
                f"{config.pebal.pretrained}: the segmenter has {model.num_classes} classes, "
                f"data.dataset {config.data.dataset!r} has {expected}"
            )
        prepare_pebal_model(
            model, config.pebal.trainable
        )  # pebal.trainable must name modules of this model
    return Inputs(benchmarks, outliers, pretrained)


def inputs_or_exit(config: ExperimentConfig, progress: bool = False) -> Inputs:
    try:
        return check_inputs(config, progress)
    except (DataError, CheckpointError, ValueError) as error:
        sys.exit(f"input error: {error}")
    except KeyError as error:  # a pebal.trainable module the segmenter lacks
        sys.exit(f"config error: pebal.trainable: {error.args[0]}")


def train_segmenter(
    config: ExperimentConfig, storage: Path, name: str, progress: bool = False
) -> tuple[dict, dict]:
    """Train the segmenter with the ``train`` section (on Ray Train, or here with ``scaling.num_workers: 0``):
    (UNet.to_checkpoint(), best metrics)."""
    data, label_set = config.data, label_set_for(config.data)
    train_set, val_set = datasets_for(data, progress=progress)
    job = TrainingJob(
        train_manifest=manifest_for(data, data.train_split, data.max_train_images),
        val_manifest=manifest_for(data, data.val_split, data.max_val_images),
        label_set=label_set.name,
        unet=config.model.unet(label_set.num_classes),
        train=config.train,
        train_transform=train_set.transform,
        val_transform=val_set.transform,
        seed=config.seed,
    )
    result = train_segmenter_job(job, config.scaling, storage, name, progress)
    return load_checkpoint(result.best_checkpoint)["model"], result.best_metrics


def pretrained_segmenter(
    config: ExperimentConfig, inputs: Inputs, run_dir: Path, progress: bool = False
) -> dict:
    """The configured segmenter, or one trained now (saved to ``run_dir/pretrained.pt`` and logged)."""
    if inputs.pretrained is not None:
        return inputs.pretrained
    log.info(
        "pebal.pretrained is not set: training the segmenter first (%d epochs)", config.train.epochs
    )
    model, metrics = train_segmenter(
        config, run_dir / "ray", f"pretrain-{mlflow.active_run().info.run_id[:8]}", progress
    )
    log_metrics({f"pretrain/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    save_checkpoint(run_dir / "pretrained.pt", {"model": model, "metrics": metrics})
    log_artifact(run_dir / "pretrained.pt", "model")
    return model


def evaluation_sets(
    config: ExperimentConfig,
    benchmarks: tuple[tuple[AnomalyBenchmark, BenchmarkConfig], ...],
    mixed_val=None,
) -> list[EvaluationSet]:
    """Every benchmark under ``pebal.evaluation``'s protocol, then the mixed validation split (if given)
    at the training size."""
    size = None if config.data.image_size is None else tuple(config.data.image_size)
    batch_size = config.pebal.finetune.batch_size
    sets = [
        benchmark_set(benchmark, entry, config.pebal.evaluation, size, batch_size)
        for benchmark, entry in benchmarks
    ]
    if mixed_val is not None:
        where = "the file size" if size is None else f"{size[0]}x{size[1]}"
        protocol = f"AnomalyMix'd validation split at the training size ({where})"
        sets.append(EvaluationSet(mixed_val.name, mixed_val, protocol, batch_size))
    return sets


def evaluate_models(
    config: ExperimentConfig,
    models: dict[str, UNet],
    sets: list[EvaluationSet],
    progress: bool = False,
) -> list[DatasetResult]:
    """The methods whose model is in ``models`` (:data:`ORIGINAL`: the segmenter's baselines, :data:`PEBAL`:
    the fine-tuned score) on every set, in this process (``pebal.finetune.device``)."""
    device = resolve_device(config.pebal.finetune.device)
    models = {key: model.to(device).eval() for key, model in models.items()}
    methods = tuple(m for m in default_methods() if m.model in models)
    smoothing = (config.pebal.smoothing_kernel, config.pebal.smoothing_sigma)
    if progress:
        from tqdm import tqdm

        sets = tqdm(sets, desc="anomaly evaluation", unit="dataset")
    return [
        evaluate_anomaly(
            models,
            evaluation_set.dataset,
            evaluation_set.name,
            methods,
            smoothing=smoothing,
            device=device,
            batch_size=evaluation_set.batch_size,
            panel_images=config.pebal.panel_images,
            components=evaluation_set.components,
            protocol=evaluation_set.protocol,
        )
        for evaluation_set in sets
    ]


def write_report(results: list[DatasetResult], folder: Path) -> list[tuple[Path, str]]:
    """Table (Markdown, CSV), curves and panels under ``folder``: (file, MLflow artifact folder) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "anomaly_table.md").write_text(table_markdown(results))
    (folder / "anomaly_table.csv").write_text(table_csv(results))
    files = [
        (folder / "anomaly_table.md", "evaluation"),
        (folder / "anomaly_table.csv", "evaluation"),
    ]
    for result in results:
        files.append(
            (plot_curves(result, folder / "curves" / f"{result.name}.png"), "evaluation/curves")
        )
        panels = plot_panels(result, folder / "panels" / f"{result.name}.png")
        if panels is not None:
            files.append((panels, "evaluation/panels"))
    return files


def main(argv: list[str] | None = None) -> list[DatasetResult]:
    args, config = parse_job_args(__doc__, argv=argv)
    check_tracking_or_exit(config.tracking.tracking_uri)
    progress = show_progress(config, args)
    torch.manual_seed(config.seed)
    inputs = inputs_or_exit(config, progress)
    run_dir = (Path(config.output_dir) / config.name).absolute()
    if config.scaling.num_workers > 0:  # 0: training in this process, no Ray at all
        init_ray()
    with experiment_run(
        config.tracking.tracking_uri,
        config.tracking.experiment,
        config.tracking.run_name or f"pebal-{config.name}",
        config,
    ) as run:
        set_tags({"job": "pebal"})
        pretrained = pretrained_segmenter(config, inputs, run_dir, progress)
        job = prepare_pebal_job(config, pretrained, inputs.outliers, progress)
        trainable, total = parameter_counts(
            prepare_pebal_model(UNet.from_checkpoint(pretrained), job.pebal.trainable)
        )
        log_params(
            {
                "pebal.m_in_used": job.pebal.m_in,
                "pebal.m_out_used": job.pebal.m_out,
                "pebal.trainable_parameters": trainable,
                "pebal.total_parameters": total,
            }
        )
        log.info(
            "fine-tuning %s (%d of %d parameters), m_in %.3f, m_out %.3f",
            ", ".join(job.pebal.trainable),
            trainable,
            total,
            job.pebal.m_in,
            job.pebal.m_out,
        )
        try:
            result = finetune(
                job,
                config.scaling,
                run_dir / "ray",
                f"pebal-{run.info.run_id[:8]}",
                progress=progress,
            )
        except PebalTrainingError as error:
            if error.last_checkpoint is not None:
                log_artifact(error.last_checkpoint, "model/last_good")
            sys.exit(str(error))
        for metrics in result.history:
            log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=metrics["epoch"])
        checkpoint = run_dir / "pebal_checkpoint.pt"
        shutil.copyfile(result.best_checkpoint, checkpoint)
        log_artifact(checkpoint, "model")
        finetuned = load_finetuned(checkpoint)
        log_segmenter(finetuned, name="pebal_model")
        results = evaluate_models(
            config,
            {ORIGINAL: UNet.from_checkpoint(pretrained), PEBAL: finetuned},
            evaluation_sets(config, inputs.benchmarks, job.val_set),
            progress,
        )
        log_metrics(flat_metrics(results))
        for path, artifact_path in write_report(results, run_dir / "evaluation"):
            log_artifact(path, artifact_path)
        (run_dir / "history.json").write_text(json.dumps(result.history, indent=2))
        log_artifact(run_dir / "history.json")
    print(
        f"PEBAL fine-tuning: best epoch {result.best_metrics['epoch']} (val AP {result.best_metrics['val/ap']:.4f})"
    )
    print(table_markdown(results), end="")
    return results


if __name__ == "__main__":
    main()
