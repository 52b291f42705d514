"""Supervised training of the segmenter on the configured dataset, logged to MLflow.

    python -m jobs.train --config jobs/configs/demo.yaml [--set train.epochs=3 ...]

Also the fully-supervised upper bound of the active-learning benchmarks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from jobs.common import check_tracking_or_exit, parse_job_args, print_results_hint, show_progress
from orchestrator.datasets import datasets_for, label_set_for
from orchestrator.tracking import experiment_run, log_artifact, log_metrics, log_segmenter, set_tags
from segxal.checkpoint import load_checkpoint
from segxal.models.unet import UNet
from segxal.training import check_class_weights, fit

log = logging.getLogger("jobs.train")


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, config = parse_job_args(__doc__, argv=argv)
    check_tracking_or_exit(config.tracking.tracking_uri)
    progress = show_progress(config, args)
    torch.manual_seed(config.seed)
    label_set = label_set_for(config.data)
    check_class_weights(config.train, label_set.class_names)
    train_set, val_set = datasets_for(config.data, progress=progress)
    loader_args = {"batch_size": config.train.batch_size, "num_workers": config.data.loader_workers}
    train_loader = DataLoader(
        train_set,
        shuffle=True,
        drop_last=len(train_set) > config.train.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
        **loader_args,
    )
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    model = UNet(config.model.unet(label_set.num_classes))
    run_dir = Path(config.output_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "training on %d images, validating on %d (%s)",
        len(train_set),
        len(val_set),
        config.data.dataset,
    )
    with experiment_run(
        config.tracking.tracking_uri,
        config.tracking.experiment,
        config.tracking.run_name or f"train-{config.name}",
        config,
    ):
        set_tags({"job": "train"})  # jobs.compare: the fully-supervised reference
        metrics = fit(
            model,
            train_loader,
            val_loader,
            config.train,
            label_set.class_names,
            checkpoint_dir=run_dir / "checkpoints",
            on_epoch=lambda e, m: log_metrics(m, step=e),
            progress=progress,
        )
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log_artifact(run_dir / "checkpoints" / "best.pt", "model")
        log_segmenter(
            UNet.from_checkpoint(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
        )
        log_artifact(run_dir / "metrics.json")
    print(
        f"validation mIoU: {metrics['val/miou']:.4f}  (pixel accuracy {metrics['val/pixel_accuracy']:.4f})"
    )
    print_results_hint(config.tracking.tracking_uri, run_dir)
    return metrics


if __name__ == "__main__":
    main()
