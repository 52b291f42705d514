"""Explainable Error Mask panels and prompt regions for the first N images of a split.

    python -m jobs.explain --run runs/demo --images 8 [--out runs/demo/explain]
    python -m jobs.explain --config jobs/configs/demo.yaml --images 8 --out runs/demo/explain
        [--checkpoint runs/demo/checkpoints/best.pt] [--split val] [--batch-size 4] [--set eem.alpha=0.7 ...]

With ``--run`` the config and the model are an active-learning run's (``jobs.al``): its ``config.yaml`` and
its last cycle's model. Otherwise the segmenter is the one ``jobs.train`` saved
(``<output_dir>/<name>/checkpoints/best.pt`` unless ``--checkpoint`` says otherwise). The depth backend
and every EEM setting come from the config's ``eem`` section. Writes ``DIR/panels/<sample>.png`` and ``DIR/regions.json`` (scores and regions per image).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from torch.utils.data import DataLoader

from jobs.common import parse_job_args
from orchestrator.config import ExperimentConfig, load_experiment
from orchestrator.datasets import label_set_for, manifest_for
from orchestrator.run import Progress
from orchestrator.run_layout import RunLayout
from orchestrator.typed_config import to_dict
from segxal.checkpoint import load_checkpoint
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.eem.panels import save_panel
from segxal.eem.pipeline import EEMScorer
from segxal.models.unet import UNet
from segxal.training import resolve_device

log = logging.getLogger("jobs.explain")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", type=int, required=True, help="explain the first N images of the split"
    )
    parser.add_argument("--run", metavar="RUN_DIR", help="a jobs.al run: its config and last model")
    parser.add_argument(
        "--out", help="output folder for panels/ and regions.json (default: RUN_DIR/explain)"
    )
    parser.add_argument(
        "--checkpoint", help="segmenter checkpoint (default: the run's checkpoints/best.pt)"
    )
    parser.add_argument("--split", help="dataset split (default: data.val_split)")
    parser.add_argument("--batch-size", type=int, default=4)


def default_checkpoint(config: ExperimentConfig) -> Path:
    """Where ``jobs.train`` keeps the best model of this experiment."""
    return Path(config.output_dir) / config.name / "checkpoints" / "best.pt"


def _dataset(config: ExperimentConfig, split: str, images: int) -> SegmentationDataset:
    manifest = manifest_for(config.data, split, limit=images)
    needs_depth = config.eem.depth.backend == "dataset"
    if needs_depth:
        missing = [
            row["sample_id"]
            for row in manifest.select(["sample_id", "depth_path"]).to_pylist()
            if row["depth_path"] is None
        ]
        if missing:
            raise SystemExit(
                f"eem.depth.backend 'dataset' needs disparity files, but {len(missing)} images of "
                f"split {split!r} have none (e.g. {missing[0]}); choose midas, dinov2 or geometric"
            )
    size = None if config.data.image_size is None else tuple(config.data.image_size)
    return SegmentationDataset(
        manifest, label_set_for(config.data), SampleTransform(size=size), load_depth=needs_depth
    )


def of_run(run_dir: Path, overrides: list[str]) -> tuple[ExperimentConfig, Path]:
    """An active-learning run's config and the model of its last completed cycle."""
    layout = RunLayout(run_dir)
    if not layout.config_file.is_file():
        raise SystemExit(f"{run_dir}: not a jobs.al run folder (no config.yaml)")
    progress = Progress.load(layout)
    if progress.checkpoint is None:
        raise SystemExit(f"{run_dir}: the run has no trained model yet (no completed cycle)")
    return load_experiment(str(layout.config_file), overrides), Path(progress.checkpoint)


def main(argv: list[str] | None = None) -> list[dict]:
    args, config = parse_job_args(__doc__, _arguments, argv)
    if args.images < 1 or args.batch_size < 1:
        raise SystemExit("--images and --batch-size must be >= 1")
    if args.run is not None:
        if args.config is not None or args.checkpoint is not None:
            raise SystemExit(
                "--run takes the run's config and model: drop --config and --checkpoint"
            )
        config, checkpoint = of_run(Path(args.run), args.overrides)
    elif args.out is None:
        raise SystemExit("--out is needed without --run")
    else:
        checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(config)
    if not checkpoint.is_file():
        raise SystemExit(
            f"{checkpoint}: segmenter checkpoint not found; train one with "
            f"`python -m jobs.train --config ...` or pass --checkpoint"
        )
    device = resolve_device(config.train.device)
    model = UNet.from_checkpoint(load_checkpoint(checkpoint)["model"])
    label_set = label_set_for(config.data)
    dataset = _dataset(config, args.split or config.data.val_split, args.images)
    scorer = EEMScorer(model, config.eem, device=device)
    out = Path(args.out) if args.out is not None else Path(args.run) / "explain"
    records = []
    for batch in DataLoader(dataset, batch_size=args.batch_size, shuffle=False):
        result = scorer(batch, return_maps=True)
        maps = result.maps
        regions = maps.regions(config.eem, label_set.class_names)
        for i, record in enumerate(result.records(batch["sample_id"])):
            panel = out / "panels" / f"{record['sample_id'].replace('/', '__')}.png"
            save_panel(
                panel,
                batch["image"][i],
                maps.prediction[i],
                maps.entropy[i],
                maps.proximity[i],
                maps.proxgradcam[i],
                maps.eem[i],
                regions[i],
                label_set,
                title=f"{record['sample_id']}  EEM score {record['score']:.3f}",
            )
            records.append({**record, "panel": str(panel.relative_to(out)), "regions": regions[i]})
        log.info("explained %d/%d images", len(records), len(dataset))
    summary = {"checkpoint": str(checkpoint), "eem": to_dict(config.eem), "images": records}
    out.mkdir(parents=True, exist_ok=True)
    (out / "regions.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {len(records)} panels and regions.json to {out}")
    return records


if __name__ == "__main__":
    main()
