"""Active-learning curves on CamVid: eem, entropy, random and core-set from 10 % to 40 % labelled in 5
cycles, over seeds, against full supervision; the real jobs (jobs.al on Ray, jobs.train), one MLflow
experiment, and jobs.compare's tables and plots (mIoU against labelled images, pixels and clicks).

    python bench/al_curves_camvid.py --root ../shared/data/camvid [--seeds 0 1] [--epochs 8] [--size 72 96]
        [--region-strategies eem entropy random]

``--region-strategies`` adds region-level runs (al.unit region, runs ``<strategy>-region-s<seed>``) that
spend, per cycle, as many pixels as an image-level cycle labels (al.budget images x H x W).

Resumable: a finished run is skipped, an interrupted one continues with ``jobs.al --resume``. Run it
from a checkout nobody edits meanwhile (e.g. ``git worktree add``): Ray starts its workers from the
files as they are when they start. Writes
``--out`` (default bench/out/al_curves): runs/, mlflow.db, compare/ (CSV, Markdown, miou_vs_labelled.png)
and timing.json (wall and CPU seconds of each run).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

from jobs import al as al_job
from jobs import compare as compare_job
from jobs import train as train_job
from orchestrator.run import Progress
from orchestrator.run_layout import RunLayout

EXPERIMENT = "bench-al-camvid"
# a run name -> the settings that make it; bald and the EEM on BALD need model.dropout (--dropout)
VARIANTS = {
    "eem": ["al.strategy=eem"],
    "entropy": ["al.strategy=entropy"],
    "random": ["al.strategy=random"],
    "coreset": ["al.strategy=coreset"],
    "bald": ["al.strategy=bald"],
    # BALD's scale is far below the entropy's: no pixel reaches the absolute region threshold (tagged
    # eem+bald+otsu)
    "eem+bald": ["al.strategy=eem", "eem.uncertainty=bald", "eem.region_threshold=otsu"],
    "entropy+cb": ["al.strategy=entropy", "al.class_balance=true"],
    # region mode: regions above each image's Otsu edge, so the supply of regions does not dry up as
    # the model grows confident and its EEM falls below the absolute threshold
    "eem+otsu": ["al.strategy=eem", "eem.region_threshold=otsu"],
    # the EEM's Grad-CAM per class (each class map scaled to 1): with the summed target it sits on the
    # bottom border rows and few regions pass the threshold (bench/RESULTS.md, where the prompts point)
    "eem+max": ["al.strategy=eem", "eem.target=max"],
}
STRATEGIES = ("eem", "entropy", "random", "coreset")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (Ray's workers are not children
    of the driver, so this undercounts the distributed part: wall time is the figure to read)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def settings(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    values = {
        "name": name,
        "seed": seed,
        "output_dir": args.out / "runs",
        "data.root": args.root,
        "data.image_size": f"[{args.size[0]}, {args.size[1]}]",
        "model.width": args.width,
        "model.depth": 4,
        "model.dropout": args.dropout,
        "train.epochs": args.epochs,
        "train.min_steps": args.min_steps,
        "train.batch_size": 8,
        # training in the driver (both cores, the scorers idle meanwhile): no Ray Train start-up per cycle
        "scaling.num_workers": 0,
        "tracking.tracking_uri": f"sqlite:///{(args.out / 'mlflow.db').absolute()}",
        "tracking.experiment": EXPERIMENT,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


TRAIN_IMAGES = 367  # CamVid's training split


def region_settings(args: argparse.Namespace) -> list[str]:
    pixels = round(args.budget * TRAIN_IMAGES) * args.size[0] * args.size[1]
    values = {
        "al.unit": "region",
        "al.budget_unit": "pixels",
        "al.budget": pixels,
        "al.region_cell": args.region_cell,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def run_active_learning(
    args: argparse.Namespace, strategy: str, seed: int, unit: str = "image"
) -> bool:
    name = f"{strategy}-s{seed}" if unit == "image" else f"{strategy}-{unit}-s{seed}"
    run_dir = (args.out / "runs" / name).absolute()
    if Progress.load(RunLayout(run_dir)).completed_cycle == args.cycles:
        print(f"{name}: done already")
        return False
    common = [
        "--quiet",
        *settings(args, name, seed),
        *(arg for setting in VARIANTS[strategy] for arg in ("--set", setting)),
        "--set",
        f"al.cycles={args.cycles}",
        "--set",
        f"al.theta={args.theta}",
        "--set",
        f"al.initial_labelled={args.initial_labelled}",
        "--set",
        f"al.budget={args.budget}",
        "--set",
        "al.panels=2",
        *(region_settings(args) if unit == "region" else []),
    ]
    if (run_dir / "progress.json").is_file():  # a resume keeps the run's own config
        al_job.main(["--resume", str(run_dir), "--quiet", "--set", f"al.cycles={args.cycles}"])
    else:
        al_job.main(["--config", "jobs/configs/camvid.yaml", *common])
    return True


def run_full_supervision(args: argparse.Namespace, seed: int) -> bool:
    name = f"full-s{seed}"
    if (args.out / "runs" / name / "metrics.json").is_file():
        print(f"{name}: done already")
        return False
    epochs = ["--set", f"train.epochs={args.full_epochs or args.epochs}"]
    train_job.main(
        ["--config", "jobs/configs/camvid.yaml", *settings(args, name, seed), *epochs, "--quiet"]
    )
    return True


def timed(timing: dict, path: Path, name: str, work: Callable[[], bool]) -> None:
    wall, cpu = time.perf_counter(), cpu_seconds()
    if not work():  # done already: its timing stays as it was recorded
        return
    timing[name] = {
        "wall_s": round(time.perf_counter() - wall, 1),
        "driver_cpu_s": round(cpu_seconds() - cpu, 1),
    }
    path.write_text(json.dumps(timing, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="CamVid (SegNet release) folder")
    parser.add_argument("--out", type=Path, default=Path("bench/out/al_curves"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=VARIANTS)
    parser.add_argument(
        "--region-strategies",
        nargs="*",
        default=[],
        choices=[v for v in VARIANTS if v != "coreset"],
    )
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="model.dropout of every run (BALD needs > 0)"
    )
    parser.add_argument("--region-cell", type=int, default=12, help="cell side for entropy, random")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--initial-labelled", type=float, default=0.1, help="al.initial_labelled")
    parser.add_argument(
        "--budget", type=float, default=0.06, help="al.budget: images per cycle, a fraction"
    )
    parser.add_argument(
        "--full-epochs",
        type=int,
        help="epochs of full supervision (default: --epochs; 0: no full-supervision run)",
    )
    parser.add_argument(
        "--epochs", type=int, default=8, help="epochs per cycle (warm start from the last model)"
    )
    parser.add_argument(
        "--min-steps",
        type=int,
        default=0,
        help="train.min_steps: optimiser steps per cycle for every strategy, whatever its pool holds",
    )
    parser.add_argument("--size", type=int, nargs=2, default=(72, 96), metavar=("H", "W"))
    parser.add_argument("--width", type=int, default=8, help="U-Net base width")
    parser.add_argument(
        "--theta",
        type=float,
        default=0.0,
        help="Dice gate; 0 (off) so every strategy labels the same fraction each cycle",
    )
    args = parser.parse_args()
    args.root, args.out = args.root.absolute(), args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    timing_path = args.out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    start = time.perf_counter()
    for seed in args.seeds:
        if args.full_epochs != 0:
            timed(
                timing,
                timing_path,
                f"full-s{seed}",
                lambda seed=seed: run_full_supervision(args, seed),
            )
        for strategy in args.strategies:
            timed(
                timing,
                timing_path,
                f"{strategy}-s{seed}",
                lambda strategy=strategy, seed=seed: run_active_learning(args, strategy, seed),
            )
        for strategy in args.region_strategies:
            timed(
                timing,
                timing_path,
                f"{strategy}-region-s{seed}",
                lambda strategy=strategy, seed=seed: run_active_learning(
                    args, strategy, seed, "region"
                ),
            )
    timing["total_wall_s"] = round(time.perf_counter() - start, 1)
    timing_path.write_text(json.dumps(timing, indent=2))
    compare_job.main(
        [
            "--experiment",
            EXPERIMENT,
            "--tracking-uri",
            f"sqlite:///{args.out / 'mlflow.db'}",
            "--out",
            str(args.out / "compare"),
            "--no-log",
            "--quiet",
        ]
    )
    print(
        f"wall time of this invocation: {timing['total_wall_s'] / 60:.1f} min; per run: {timing_path}"
    )


if __name__ == "__main__":
    main()
