"""Train the U-Net on CamVid and report validation mIoU and training throughput.

    python bench/train_camvid.py --root ../shared/data/camvid [--epochs 20] [--size 180 240] [--width 16]

Prints a JSON line with the figures; bench/RESULTS.md records them with the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch.utils.data import DataLoader

from orchestrator.config import DataConfig
from orchestrator.datasets import datasets_for
from segxal.data.labels import CAMVID
from segxal.models.unet import UNet, UNetConfig
from segxal.training import TrainConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", required=True, help="CamVid folder with train/, trainannot/, val/, valannot/"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, nargs=2, default=(180, 240), metavar=("H", "W"))
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_set, val_set = datasets_for(
        DataConfig(dataset="camvid", root=args.root, image_size=tuple(args.size))
    )
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader = DataLoader(val_set, batch_size=args.batch_size)
    model = UNet(UNetConfig(num_classes=CAMVID.num_classes, width=args.width, depth=4))
    history = []
    start = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device="auto")
    metrics = fit(
        model,
        train_loader,
        val_loader,
        config,
        CAMVID.class_names,
        on_epoch=lambda epoch, m: history.append(m),
        progress=True,
    )
    result = {
        "val_miou": round(metrics["val/miou"], 4),
        "val_pixel_accuracy": round(metrics["val/pixel_accuracy"], 4),
        "best_val_miou": round(max(m["val/miou"] for m in history), 4),
        "train_images_per_s": round(
            sum(m["train/images_per_s"] for m in history) / len(history), 2
        ),
        "wall_s": round(time.perf_counter() - start, 1),
        "epochs": args.epochs,
        "size": list(args.size),
        "width": args.width,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": "cuda"
        if torch.cuda.is_available()
        else f"cpu x{torch.get_num_threads()} ({platform.machine()})",
        "train_images": len(train_set),
        "val_images": len(val_set),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
