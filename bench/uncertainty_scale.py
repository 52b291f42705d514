"""The scale of the EEM's uncertainty term under a trained segmenter: normalised entropy against normalised
MC-dropout BALD, per pixel, on the first images of a CamVid split.

Why ``eem.region_threshold: otsu`` exists: with ``eem.uncertainty: bald`` the EEM's uncertainty term can lie
orders of magnitude below the entropy, so no pixel reaches an absolute region threshold such as 0.5.

    PYTHONPATH=. .venv/bin/python bench/uncertainty_scale.py --checkpoint runs/<run>/cycles/cycle_03/model.pt \
        --root ../shared/data/camvid --size 48 64 --images 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from segxal.checkpoint import load_segmenter
from segxal.data.camvid import camvid_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import LABEL_SETS
from segxal.eem.bald import mc_probabilities, normalized_bald
from segxal.eem.entropy import normalized_entropy
from segxal.models.unet import UNet

QUANTILES = (0.5, 0.9, 0.99, 1.0)


def describe(name: str, values: torch.Tensor) -> str:
    quantiles = torch.quantile(values.flatten().double(), torch.tensor(QUANTILES).double())
    shown = "  ".join(
        f"q{round(100 * q)} {v:.4f}" for q, v in zip(QUANTILES, quantiles.tolist(), strict=True)
    )
    return f"{name:>8}: mean {values.mean():.4f}  {shown}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="CamVid (SegNet release) folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--size", type=int, nargs=2, default=(48, 64), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--mc-samples", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet.from_checkpoint(load_segmenter(args.checkpoint)).eval()
    if model.config.dropout <= 0:
        raise SystemExit(f"{args.checkpoint}: the model has no dropout, so BALD is 0 everywhere")
    manifest = camvid_manifest(args.root, args.split).slice(0, args.images)
    dataset = SegmentationDataset(
        manifest, LABEL_SETS["camvid"], SampleTransform(size=tuple(args.size)), load_label=False
    )
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        entropy = normalized_entropy(model(images))
        bald = normalized_bald(mc_probabilities(model, images, args.mc_samples))
    print(f"{args.checkpoint}: {len(dataset)} images at {args.size[0]}x{args.size[1]}")
    print(describe("entropy", entropy))
    print(describe("BALD", bald))


if __name__ == "__main__":
    main()
