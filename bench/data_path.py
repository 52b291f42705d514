"""The data path at 256x512 from 1024x2048 PNGs: the project's Dataset against Pillow doing the same work
(decode, antialiased bilinear resize, float tensor, ImageNet normalisation), and EEM scoring fed by it
with and without DataLoader workers decoding ahead.

    PYTHONPATH=. python bench/data_path.py [--images 12] [--rounds 3] [--loader-workers 1]

The images are synthetic driving scenes generated at 1024x2048 (PNG, as Cityscapes ships them). Times are
the best of ``--rounds`` interleaved rounds, in CPU seconds of this process (decoding) and wall seconds
(scoring, whose DataLoader workers are other processes). Prints one JSON line with the CPU type and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from actors.scoring import PoolScorer
from orchestrator.strategies import ScoreKind
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.data.synthetic import SyntheticConfig, generate_synthetic
from segxal.data.transforms import normalize
from segxal.eem.config import DepthConfig, EEMConfig
from segxal.models.unet import UNet, UNetConfig

SIZE = (256, 512)


def cpu_kind() -> str:
    flags = open("/proc/cpuinfo").read()
    return "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else "other"


def pillow_same_work(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
    return normalize(torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255)


def best_of(rounds: int, functions: dict, clock) -> dict:
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = clock()
            function()
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        config = SyntheticConfig(
            num_train=args.images, num_val=0, num_anomaly=0, height=1024, width=2048, workers=1
        )
        generate_synthetic(root, config)
        rows = cityscapes_manifest(root, "train")
        paths = rows["image_path"].to_pylist()
        dataset = SegmentationDataset(
            rows, CITYSCAPES, SampleTransform(size=SIZE), load_label=False
        )
        for index in range(len(paths)):  # equal pixels, so equal work
            assert torch.allclose(
                dataset[index]["image"], pillow_same_work(paths[index]), atol=1e-6
            )
        decode = best_of(
            args.rounds,
            {
                "dataset": lambda: [dataset[i] for i in range(len(paths))],
                "pillow": lambda: [pillow_same_work(p) for p in paths],
            },
            time.process_time,
        )
        model = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=16, depth=4))
        scorers = {}
        for workers in (0, args.loader_workers):
            scorer = PoolScorer(
                EEMConfig(depth=DepthConfig(backend="geometric")),
                "cityscapes",
                SIZE,
                batch_size=4,
                device="cpu",
                loader_workers=workers,
            )
            scorer.load_model(model.to_checkpoint())
            scorers[f"scoring, {workers} loader workers"] = scorer
        scoring = best_of(
            args.rounds,
            {name: (lambda s=s: s.score(rows, ScoreKind.EEM)) for name, s in scorers.items()},
            time.perf_counter,
        )
    per_image = {name: seconds / len(paths) for name, seconds in decode.items()}
    print(
        json.dumps(
            {
                "cpu": cpu_kind(),
                "load_average": os.getloadavg()[0],
                "images": len(paths),
                "decode_cpu_s_per_image": per_image,
                "decode_images_per_s": {k: round(1 / v, 2) for k, v in per_image.items()},
                "dataset_vs_pillow": round(per_image["pillow"] / per_image["dataset"], 3),
                "scoring_images_per_s": {
                    name: round(len(paths) / seconds, 2) for name, seconds in scoring.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
