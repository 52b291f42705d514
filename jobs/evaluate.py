"""Score an existing checkpoint, with no training and no Ray, logged to MLflow.

    python -m jobs.evaluate --config CONFIG --checkpoint MODEL.pt [--split val] [--set data.root=DIR ...]
    python -m jobs.evaluate --config CONFIG --checkpoint MODEL.pt --anomaly [--set pebal.benchmarks=[DIR]]

Segmentation (the default): a segmenter checkpoint (``jobs.train``'s ``best.pt``, an active-learning
cycle's ``model.pt``) on a split (``--split``, default ``data.val_split``) of the configured dataset
(``data.dataset``, ``data.root``) at ``data.image_size``: mIoU, pixel accuracy and per-class IoU, printed
as a table and written to ``<output_dir>/<name>/evaluate/<split>.json``.

Anomaly (``--anomaly``): on every ``pebal.benchmarks`` entry, under ``pebal.evaluation``'s protocol, the
anomaly table (AP, FPR95, AUROC, sIoU, PPV, mean F1), ROC / PR curves and panels, as ``jobs.pebal`` writes
them, under ``<output_dir>/<name>/evaluate/``. A segmenter checkpoint gives the baselines (energy,
smoothed energy, MSP, max-logit, entropy); a PEBAL checkpoint (one class more: the abstention channel)
gives PEBAL's score, and with ``pebal.pretrained`` the baselines of that segmenter beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from jobs.common import check_tracking_or_exit, parse_job_args, print_results_hint, show_progress
from jobs.pebal import evaluate_models, evaluation_sets, inputs_or_exit, write_report
from orchestrator.config import ExperimentConfig
from orchestrator.datasets import datasets_for, label_set_for, manifest_for
from orchestrator.tracking import experiment_run, log_artifact, log_metrics, set_tags
from segxal.checkpoint import CheckpointError, load_segmenter
from segxal.data.dataset import SegmentationDataset
from segxal.data.io import DataError
from segxal.markdown import markdown_table
from segxal.models.unet import UNet
from segxal.pebal.evaluate import ORIGINAL, PEBAL, DatasetResult, flat_metrics, table_markdown
from segxal.training import resolve_device, validation_metrics

log = logging.getLogger("jobs.evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="segmenter or PEBAL checkpoint file")
    parser.add_argument("--split", help="dataset split to score (default: data.val_split)")
    parser.add_argument(
        "--anomaly", action="store_true", help="anomaly benchmarks (pebal.benchmarks) instead"
    )


def load_model(path: str | Path, num_classes: int) -> tuple[UNet, bool]:
    """(model, is_pebal): a segmenter of ``num_classes`` classes or a PEBAL one with the abstention
    class; anything else is a :class:`CheckpointError` naming the file."""
    model = UNet.from_checkpoint(load_segmenter(path)).eval()
    if model.num_classes not in (num_classes, num_classes + 1):
        raise CheckpointError(
            f"{path}: the model has {model.num_classes} classes; the dataset's label set has "
            f"{num_classes} (a PEBAL model {num_classes + 1})"
        )
    return model, model.num_classes == num_classes + 1


def segmentation_loader(config: ExperimentConfig, split: str, progress: bool) -> DataLoader:
    """The split at the evaluation transform of ``data.image_size``; an empty split is a DataError."""
    manifest = manifest_for(config.data, split, progress=progress)
    if manifest.num_rows == 0:
        raise DataError(f"{config.data.root}: split {split!r} holds no image")
    _, val = datasets_for(config.data)
    dataset = SegmentationDataset(manifest, label_set_for(config.data), val.transform)
    return DataLoader(
        dataset, batch_size=config.train.batch_size, num_workers=config.data.loader_workers
    )


def segmentation_table(metrics: dict[str, float]) -> str:
    rows = [["mIoU", f"{100 * metrics['val/miou']:.2f}"]]
    rows.append(["pixel accuracy", f"{100 * metrics['val/pixel_accuracy']:.2f}"])
    rows += [
        [k.removeprefix("val/iou/"), f"{100 * v:.2f}"] for k, v in metrics.items() if "/iou/" in k
    ]
    return markdown_table(["", "%"], rows)


def main(argv: list[str] | None = None) -> dict[str, float] | list[DatasetResult]:
    args, config = parse_job_args(__doc__, add_arguments, argv)
    check_tracking_or_exit(config.tracking.tracking_uri)
    progress = show_progress(config, args)
    split = args.split or config.data.val_split
    label_set = label_set_for(config.data)
    try:  # every input is checked before the MLflow run starts
        model, is_pebal = load_model(args.checkpoint, label_set.num_classes)
        if is_pebal and not args.anomaly:
            raise CheckpointError(
                f"{args.checkpoint}: a PEBAL checkpoint has no segmentation metrics; add --anomaly"
            )
        if args.anomaly and not config.pebal.benchmarks:
            raise DataError("pebal.benchmarks is empty: name the anomaly dataset folders to score")
        loader = None if args.anomaly else segmentation_loader(config, split, progress)
    except (CheckpointError, DataError) as error:
        sys.exit(f"input error: {error}")
    inputs = inputs_or_exit(config, progress) if args.anomaly else None
    folder = Path(config.output_dir) / config.name / "evaluate"
    folder.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.train.device)
    torch.manual_seed(config.seed)
    with experiment_run(
        config.tracking.tracking_uri,
        config.tracking.experiment,
        config.tracking.run_name or f"evaluate-{config.name}",
        config,
    ):
        set_tags({"job": "evaluate", "checkpoint": str(Path(args.checkpoint).absolute())})
        if inputs is not None:
            models = {PEBAL: model} if is_pebal else {ORIGINAL: model}
            if is_pebal and inputs.pretrained is not None:
                models[ORIGINAL] = UNet.from_checkpoint(inputs.pretrained)
            sets = evaluation_sets(config, inputs.benchmarks)
            results = evaluate_models(config, models, sets, progress)
            log_metrics(flat_metrics(results))
            for path, artifact_path in write_report(results, folder):
                log_artifact(path, artifact_path)
            print(table_markdown(results), end="")
            print_results_hint(config.tracking.tracking_uri, folder)
            return results
        assert loader is not None
        metrics = validation_metrics(model.to(device), loader, label_set.class_names, device)
        scored = {f"eval/{split}/{k.removeprefix('val/')}": v for k, v in metrics.items()}
        log_metrics(scored)
        (folder / f"{split}.json").write_text(json.dumps(scored, indent=2))
        log_artifact(folder / f"{split}.json", "evaluation")
    print(f"{args.checkpoint} on {config.data.dataset} {split} ({config.data.root}):")
    print(segmentation_table(metrics), end="")
    print_results_hint(config.tracking.tracking_uri, folder)
    return scored


if __name__ == "__main__":
    main()
