"""Where the EEM's prompt points land, against chance: at the near band's edge, at the image border, on
void ground truth (e.g. the ego vehicle), and how often near a real error of the model.

Two placements in the same regions: the prompt (the region's uncertainty peak) and the region's EEM peak
(where prompts were before). Each place is reported as the share of prompts there beside the share of the
image it covers; a share far above the area says the prompts are drawn to that place. The run's EEM config
applies, with ``--set`` overrides of ``eem`` keys (``--set target=max``).

    PYTHONPATH=. .venv/bin/python bench/prompt_placement.py --run runs/<demo>-eem --cycle 3 --images 48
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from orchestrator.config import load_experiment
from orchestrator.datasets import label_set_for, manifest_for
from segxal.checkpoint import load_segmenter
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import IGNORE_INDEX
from segxal.eem.pipeline import EEMScorer
from segxal.eem.regions import extract_regions, region_map
from segxal.models.unet import UNet

BAND = 3  # pixels: how close to an edge counts as at it
ERROR_REACH = 2  # pixels: how close to a wrong pixel a prompt may be to point at it


def places(near: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean maps of the places prompts are counted at."""
    height, width = near.shape
    rows, cols = np.mgrid[:height, :width]
    border = (rows < BAND) | (cols < BAND) | (rows >= height - BAND) | (cols >= width - BAND)
    inner_edge = near & ~ndimage.binary_erosion(near, iterations=BAND, border_value=1)
    window = 2 * BAND + 1
    one_class = ndimage.maximum_filter(label, window) == ndimage.minimum_filter(label, window)
    void = ndimage.binary_dilation(label == IGNORE_INDEX, iterations=BAND)
    return {
        "near band's edge, at a class boundary": inner_edge & ~one_class,
        "near band's edge, inside one class (the band's own edge)": inner_edge & one_class,
        "image border": border,
        "void (or near it)": void,
    }


def parse_overrides(config, pairs: list[str]):
    for pair in pairs:
        key, _, text = pair.partition("=")
        current = getattr(config, key)
        value = text in ("1", "true", "True") if isinstance(current, bool) else type(current)(text)
        config = dataclasses.replace(config, **{key: value})
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a jobs.al run folder")
    parser.add_argument("--cycle", type=int, required=True, help="whose model scores")
    parser.add_argument("--images", type=int, default=48, help="the first N training images")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=V")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_experiment(str(args.run / "config.yaml"))
    eem = parse_overrides(config.eem, args.overrides)
    label_set = label_set_for(config.data)
    model = UNet.from_checkpoint(
        load_segmenter(args.run / "cycles" / f"cycle_{args.cycle:02d}" / "model.pt")
    )
    manifest = manifest_for(config.data, config.data.train_split, args.images)
    dataset = SegmentationDataset(
        manifest,
        label_set,
        SampleTransform(size=tuple(config.data.image_size)),
        load_depth=eem.depth.backend == "dataset",
    )
    scorer = EEMScorer(model, eem)
    at: dict[str, dict[str, list[bool]]] = {"prompt": {}, "EEM peak": {}}
    area: dict[str, list[float]] = {}
    for batch in DataLoader(dataset, batch_size=8):
        maps = scorer(batch, return_maps=True).maps
        for i in range(maps.eem.shape[0]):
            label = batch["label"][i].numpy()
            prediction = maps.prediction[i].numpy()
            wrong = (prediction != label) & (label != IGNORE_INDEX)
            reach = ndimage.binary_dilation(wrong, iterations=ERROR_REACH)
            where = places(maps.near[i].numpy(), label)
            where[f"within {ERROR_REACH} px of a wrong pixel"] = reach
            where["image border, near a wrong pixel"] = where["image border"] & reach
            for name, mask in where.items():
                area.setdefault(name, []).append(float(mask.mean()))
            eem_map = maps.eem[i].numpy()
            regions = extract_regions(
                eem_map, prediction, eem.region_threshold, eem.min_region_area, eem.max_regions,
                uncertainty=maps.entropy[i].numpy(),
            )  # fmt: skip
            ids = region_map(eem_map, regions)
            for region in regions:
                peak = np.unravel_index(
                    np.argmax(np.where(ids == region["id"], eem_map, -np.inf)), ids.shape
                )
                points = {
                    "prompt": (region["prompt"]["y"], region["prompt"]["x"]),
                    "EEM peak": peak,
                }
                for placement, (y, x) in points.items():
                    for name, mask in where.items():
                        at[placement].setdefault(name, []).append(bool(mask[y, x]))
    count = len(next(iter(at["prompt"].values()), []))
    print(
        f"{count} regions on {len(area[next(iter(area))])} images ({args.run}, cycle {args.cycle}, {eem})"
    )
    print(
        "| place | prompts there | EEM peaks there | share of the image |\n| --- | --- | --- | --- |"
    )
    for name in area:
        prompt, peak = (np.mean(at[p].get(name, [np.nan])) for p in ("prompt", "EEM peak"))
        print(f"| {name} | {prompt:.2f} | {peak:.2f} | {np.mean(area[name]):.3f} |")


if __name__ == "__main__":
    main()
