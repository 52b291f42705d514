"""Distributed pool scoring against the same scorer in-process, on the same cores.

    python bench/scoring_throughput.py [--images 48] [--size 128 256] [--actors 2] [--rounds 2]

In-process: one PoolScorer with torch using all cores. Distributed: a ScorerPool of ``--actors`` Ray
actors (one core each) scoring the same rows in shards. Rounds alternate the two; the best of each is
reported, with the ratio distributed / in-process (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from actors.scoring import PoolScorer, ScorerPool  # noqa: E402
from orchestrator.strategies import get_strategy  # noqa: E402
from segxal.data.cityscapes import cityscapes_manifest  # noqa: E402
from segxal.data.synthetic import SyntheticConfig, generate_synthetic  # noqa: E402
from segxal.eem.config import EEMConfig  # noqa: E402
from segxal.models.unet import UNet, UNetConfig  # noqa: E402


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The scoring workload's options, shared with bench/scoring_balance.py."""
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 256))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--strategy", default="eem")


def workload(args: argparse.Namespace) -> tuple:
    """``--images`` synthetic scenes as pool rows, the arguments of a CPU scorer at ``--size`` (batch 2),
    and the checkpoint of a U-Net of width 16, depth 4 (the demo's)."""
    root = generate_synthetic(
        tempfile.mkdtemp(prefix="bench_scoring_"),
        SyntheticConfig(num_train=args.images, num_val=0, num_anomaly=0),
    )
    scorer_args = {
        "eem": EEMConfig(),
        "label_set": "cityscapes",
        "size": tuple(args.size),
        "batch_size": 2,
        "device": "cpu",
    }
    return (
        cityscapes_manifest(root, "train"),
        scorer_args,
        UNet(UNetConfig(num_classes=19, width=16, depth=4)).to_checkpoint(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    kind = get_strategy(args.strategy).score_kind
    rows, scorer_args, checkpoint = workload(args)

    local = PoolScorer(**scorer_args)
    local.load_model(checkpoint)
    ray.init(num_cpus=args.actors, include_dashboard=False, configure_logging=False)
    pool = ScorerPool(args.actors, scorer_args, cpus=1.0, shards_per_actor=2)
    pool.load_model(checkpoint)
    pool.score(rows.slice(0, args.actors), kind)  # warm-up: actors built, model loaded

    best = {"in_process": 0.0, "distributed": 0.0}
    for _ in range(args.rounds):
        start = time.perf_counter()
        local_scores = local.score(rows, kind)
        best["in_process"] = max(best["in_process"], len(rows) / (time.perf_counter() - start))
        start = time.perf_counter()
        remote_scores = pool.score(rows, kind)
        best["distributed"] = max(best["distributed"], len(rows) / (time.perf_counter() - start))
    differences = [
        abs(a - b)
        for a, b in zip(
            local_scores.sort_by("sample_id")["score"].to_pylist(),
            remote_scores.sort_by("sample_id")["score"].to_pylist(),
            strict=True,
        )
    ]
    print(
        json.dumps(
            {
                "images": len(rows),
                "size": list(args.size),
                "actors": args.actors,
                "strategy": args.strategy,
                "in_process_img_s": round(best["in_process"], 2),
                "distributed_img_s": round(best["distributed"], 2),
                "ratio": round(best["distributed"] / best["in_process"], 3),
                "max_score_difference": max(differences),
                "torch_threads_in_process": torch.get_num_threads(),
            }
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
