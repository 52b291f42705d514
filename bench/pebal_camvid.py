"""PEBAL on a CamVid-trained segmenter with COCO outliers, against the baselines, and the cost of
last-block against full fine-tuning.

    python bench/pebal_camvid.py --camvid ../shared/data/camvid --coco ../shared/data/coco128 \
        [--pretrained runs/camvid/checkpoints/best.pt] [--pretrain-epochs 8] [--epochs 4] [--size 180 240] \
        [--threads 1]

1. The segmenter: ``--pretrained`` (a segxal checkpoint, e.g. from ``jobs.train --config
   jobs/configs/camvid.yaml``), or trained here on CamVid train for ``--pretrain-epochs``.
2. The margins: m_in / m_out at the ``--margin-quantiles`` of its free energy on inlier training pixels.
3. PEBAL fine-tuning of the last block (``decoder.3`` + ``head``) with AnomalyMix on CamVid train, COCO
   instances of non-driving classes pasted (the images of a quarter of the COCO images held out).
4. The AnomalyMix validation set: CamVid val with held-out COCO instances pasted into every image, at a
   fixed seed. AUROC / AP / FPR95 of PEBAL and of the original model's energy, smoothed energy, MSP,
   max-logit and entropy.
5. Last block against full fine-tuning, in the same process on the same batches: trainable parameters
   and the mean forward-backward-update time of ``--timing-steps`` steps (after one warm-up step).

Prints the table and a JSON line; bench/RESULTS.md records them with the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from actors.pebal_train import pebal_train_epoch
from orchestrator.config import DataConfig
from orchestrator.datasets import datasets_for
from segxal.checkpoint import load_checkpoint
from segxal.data.camvid import camvid_manifest
from segxal.data.dataset import SegmentationDataset
from segxal.data.labels import CAMVID
from segxal.models.unet import UNet, UNetConfig
from segxal.pebal.anomalymix import AnomalyMix
from segxal.pebal.config import AnomalyMixConfig, FinetuneConfig, PebalConfig
from segxal.pebal.evaluate import (
    ORIGINAL,
    PEBAL,
    MixedValidationSet,
    calibrate_margins,
    evaluate_anomaly,
    split_outliers,
    table_markdown,
)
from segxal.pebal.model import parameter_counts, prepare_pebal_model
from segxal.training import TrainConfig, fit, make_optimizer, resolve_device

LAST_BLOCK = ("decoder.3", "head")
FULL = ("encoder", "bottleneck", "upsample", "decoder", "head")


def step_time(
    model: UNet, trainable: tuple[str, ...], loader, config: PebalConfig, mixer, device, steps: int
) -> dict:
    """Trainable parameters and mean step time of PEBAL fine-tuning with ``trainable`` modules."""
    pebal_model = prepare_pebal_model(model, trainable).to(device)
    optimizer = make_optimizer(pebal_model.parameters(), config.finetune)
    batches = list(loader)[: steps + 1]
    pebal_train_epoch(
        pebal_model, batches[:1], optimizer, mixer, config, np.random.default_rng(0), device
    )  # warm-up
    stats = pebal_train_epoch(
        pebal_model, batches[1:], optimizer, mixer, config, np.random.default_rng(1), device
    )
    trainable_params, total = parameter_counts(pebal_model)
    return {
        "trainable_parameters": trainable_params,
        "total_parameters": total,
        "step_s": round(stats["step_s"], 4),
        "steps": stats["steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--camvid", required=True, help="CamVid folder with train/, trainannot/, val/, valannot/"
    )
    parser.add_argument(
        "--coco",
        required=True,
        help="COCO folder with annotations/instances_train2017.json and images",
    )
    parser.add_argument(
        "--pretrained", help="segxal checkpoint of a CamVid segmenter (else trained here)"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=4, help="PEBAL fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument(
        "--margin-quantiles", type=float, nargs=2, default=(0.25, 0.9), metavar=("Q_IN", "Q_OUT")
    )
    # 0 by default: AnomalyMix crashes on a flipped object resized to one pixel column (torch refuses the
    # negative stride np.ascontiguousarray leaves on a (h, 1) view); fixed upstream, raise it again.
    parser.add_argument("--flip-probability", type=float, default=0.0)
    parser.add_argument("--size", type=int, nargs=2, default=(180, 240), metavar=("H", "W"))
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = resolve_device("auto")
    train_set, val_set = datasets_for(
        DataConfig(dataset="camvid", root=args.camvid, image_size=tuple(args.size))
    )
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if args.pretrained:
        model = UNet.from_checkpoint(load_checkpoint(args.pretrained)["model"])
        pretrain = {"checkpoint": args.pretrained}
    else:
        model = UNet(UNetConfig(num_classes=CAMVID.num_classes, width=args.width, depth=4))
        metrics = fit(
            model,
            train_loader,
            DataLoader(val_set, batch_size=args.batch_size),
            TrainConfig(
                epochs=args.pretrain_epochs, batch_size=args.batch_size, lr=args.pretrain_lr
            ),
            CAMVID.class_names,
            progress=True,
        )
        pretrain = {"epochs": args.pretrain_epochs, "val_miou": round(metrics["val/miou"], 4)}
    model.to(device).eval()
    pretrain_s = time.perf_counter() - start

    mix_config = AnomalyMixConfig(
        coco_root=args.coco, fraction=1.0, flip_probability=args.flip_probability
    )
    train_outliers, val_outliers = split_outliers(mix_config)
    plain_train = SegmentationDataset(
        camvid_manifest(args.camvid, "train"), CAMVID, val_set.transform
    )  # no crop, flip
    base = PebalConfig(
        m_in=-2.0,
        m_out=-1.0,
        lam=args.lam,
        trainable=LAST_BLOCK,
        anomalymix=mix_config,
        margin_quantiles=tuple(args.margin_quantiles),
        finetune=FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr),
    )
    config = calibrate_margins(
        base, model, DataLoader(plain_train, batch_size=args.batch_size), device
    )
    mixer = AnomalyMix(config.anomalymix, CAMVID.num_classes, train_outliers)
    mixed_val = MixedValidationSet(
        val_set,
        config.anomalymix,
        CAMVID.num_classes,
        seed=args.seed,
        outliers=val_outliers,
        name="camvid_val_coco",
    )

    finetune_start = time.perf_counter()
    pebal_model = prepare_pebal_model(model, config.trainable).to(device)
    optimizer = make_optimizer(pebal_model.parameters(), config.finetune)
    history, step = [], 0
    for epoch in range(args.epochs):
        stats = pebal_train_epoch(
            pebal_model,
            train_loader,
            optimizer,
            mixer,
            config,
            np.random.default_rng([args.seed, epoch]),
            device,
            epoch,
            step,
        )
        step += stats["steps"]
        history.append(
            {
                "epoch": epoch,
                "loss": round(stats["loss"], 4),
                "images_per_s": round(stats["images_per_s"], 2),
            }
        )
        print(json.dumps(history[-1]), flush=True)
    finetune_s = time.perf_counter() - finetune_start

    result = evaluate_anomaly(
        {PEBAL: pebal_model, ORIGINAL: model},
        mixed_val,
        mixed_val.name,
        smoothing=(config.smoothing_kernel, config.smoothing_sigma),
        device=device,
        batch_size=args.batch_size,
    )
    print(table_markdown([result]), end="")

    timing_loader = DataLoader(
        Subset(train_set, range(args.batch_size * (args.timing_steps + 1))),
        batch_size=args.batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    timing = {
        name: step_time(
            model,
            modules,
            timing_loader,
            replace(config, trainable=modules),
            mixer,
            device,
            args.timing_steps,
        )
        for name, modules in (("last_block", LAST_BLOCK), ("full", FULL))
    }
    summary = {
        "anomaly": {
            method: {k: round(v, 4) for k, v in values.items()}
            for method, values in result.metrics.items()
        },
        "margins": {
            "m_in": round(config.m_in, 3),
            "m_out": round(config.m_out, 3),
            "quantiles": list(args.margin_quantiles),
        },
        "timing": timing,
        "full_over_last_block": {
            "step_time": round(timing["full"]["step_s"] / timing["last_block"]["step_s"], 2),
            "trainable_parameters": round(
                timing["full"]["trainable_parameters"]
                / timing["last_block"]["trainable_parameters"],
                1,
            ),
        },
        "pretrain": pretrain,
        "finetune": {"epochs": args.epochs, "lr": args.lr, "lam": args.lam, "history": history},
        "seconds": {
            "pretrain": round(pretrain_s, 1),
            "finetune": round(finetune_s, 1),
            "total": round(time.perf_counter() - start, 1),
        },
        "size": list(args.size),
        "width": args.width,
        "batch_size": args.batch_size,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "coco_instances": {
            "train": len(train_outliers.instances),
            "val": len(val_outliers.instances),
        },
        "device": str(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} ({platform.machine()})",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
