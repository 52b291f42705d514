"""Where a cycle's time goes: jobs.al on the demo configuration, stage by stage, and a Cityscapes-size
cycle projected from the measured per-image costs.

    PYTHONPATH=. python bench/cycle_profile.py [--cycles 2] [--out bench/out/cycle_profile] [--set k=v ...]

Runs ``jobs.al --config jobs/configs/demo.yaml`` (synthetic data generated first, outside the timing) and
reads back what the run logs: ``time/ray_start_s`` and ``time/actors_start_s`` (once), and per cycle
``time/score_s``, ``time/explain_s``, ``time/annotate_s`` and ``time/train_s`` (epochs and their set-up:
in the driver with the demo's ``scaling.num_workers: 0``). "Other" is the rest of the job's wall time:
input checks, pool-state writes, MLflow logging. Ray's share is its start-up and the actors' over the
whole job (dispatch inside scoring is part of ``score_s``; ``bench/scoring_throughput.py`` measures it).

The projection scales each stage's per-image cost by the pixel ratio to 256x512 and the image counts of
a Cityscapes cycle (2975 training images; ``al.subset`` of the unlabelled pool scored; ``al.budget``
explained; training on the labelled pool), keeping Ray's start-up as measured. It is an estimate for
this CPU, not a measurement. Prints Markdown tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from mlflow import MlflowClient

from jobs import al as al_job
from orchestrator.config import load_experiment
from orchestrator.datasets import manifest_for
from segxal.markdown import markdown_table

STAGES = ("score", "explain", "annotate", "train")
CITYSCAPES_TRAIN, CITYSCAPES_SIZE = 2975, (256, 512)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else "?"
            return f"{line.split(':', 1)[1].strip()} ({kind})"
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/out/cycle_profile"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = args.out.absolute()
    name = f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = [
        f"name={name}",
        f"output_dir={out / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        f"data.root={out / 'synthetic'}",
        f"al.cycles={args.cycles}",
        *args.overrides,
    ]
    config = load_experiment("jobs/configs/demo.yaml", settings)
    manifest_for(config.data, "train")  # generates the synthetic scenes, outside the timing
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    al_job.main(
        [
            "--config",
            "jobs/configs/demo.yaml",
            "--quiet",
            *(a for s in settings for a in ("--set", s)),
        ]
    )
    wall = time.perf_counter() - start
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], f"params.name = '{name}'")

    def history(key: str) -> dict[int, float]:
        return {
            m.step: m.value for m in client.get_metric_history(run.info.run_id, f"time/{key}_s")
        }

    per_stage = {stage: history(stage) for stage in STAGES}
    start_up = {key: sum(history(key).values()) for key in ("ray_start", "actors_start")}
    cycles = sorted(per_stage["train"])
    rows, totals = [], {stage: 0.0 for stage in STAGES}
    for cycle in cycles:
        cells = [str(cycle)]
        for stage in STAGES:
            seconds = per_stage[stage].get(cycle, 0.0)
            totals[stage] += seconds
            cells.append(f"{seconds:.1f}")
        rows.append(cells)
    other = wall - sum(totals.values()) - sum(start_up.values())
    ray_share = sum(start_up.values()) / wall
    print(markdown_table(["cycle", *(f"{s} s" for s in STAGES)], rows))
    summary = [
        ["Ray start", f"{start_up['ray_start']:.1f}", f"{100 * start_up['ray_start'] / wall:.1f}"],
        [
            "scoring actors start",
            f"{start_up['actors_start']:.1f}",
            f"{100 * start_up['actors_start'] / wall:.1f}",
        ],
        *([s, f"{totals[s]:.1f}", f"{100 * totals[s] / wall:.1f}"] for s in STAGES),
        ["other (checks, pool state, MLflow)", f"{other:.1f}", f"{100 * other / wall:.1f}"],
        ["job wall", f"{wall:.1f}", "100"],
    ]
    print(markdown_table(["stage", "s", "% of wall"], summary))

    labelled = [config.al.initial_labelled]
    train_images = len(manifest_for(config.data, "train"))
    pixel_ratio = (CITYSCAPES_SIZE[0] * CITYSCAPES_SIZE[1]) / (
        config.data.image_size[0] * config.data.image_size[1]
    )

    def count(value, pool: int) -> int:
        return round(value * pool) if isinstance(value, float) else int(value)

    initial = count(labelled[0], train_images)
    budget = count(config.al.budget, train_images)
    scored_demo = [
        count(config.al.subset, train_images - initial - budget * (c - 1)) for c in cycles if c > 0
    ]
    per_image = {
        "score": totals["score"] / max(sum(scored_demo), 1),
        "explain": totals["explain"] / max(budget * len(scored_demo), 1),
        "train": totals["train"]
        / sum((initial + budget * c) * config.train.epochs for c in cycles),
    }
    city_initial = count(labelled[0], CITYSCAPES_TRAIN)
    city_budget = count(config.al.budget, CITYSCAPES_TRAIN)
    city_scored = count(config.al.subset, CITYSCAPES_TRAIN - city_initial)
    projected = {
        "score": per_image["score"] * pixel_ratio * city_scored,
        "explain": per_image["explain"] * pixel_ratio * city_budget,
        "train": per_image["train"]
        * pixel_ratio
        * (city_initial + city_budget)
        * config.train.epochs,
    }
    projected_wall = sum(projected.values()) + sum(start_up.values())
    print(
        markdown_table(
            ["stage (projected Cityscapes cycle 1, 256x512)", "s", "% of the cycle"],
            [[s, f"{v:.0f}", f"{100 * v / projected_wall:.1f}"] for s, v in projected.items()]
            + [
                [
                    "Ray and actors start (as measured)",
                    f"{sum(start_up.values()):.0f}",
                    f"{100 * sum(start_up.values()) / projected_wall:.1f}",
                ]
            ],
        )
    )
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg()[0],
                "wall_s": round(wall, 1),
                "ray_share": round(ray_share, 3),
                "start_up_s": start_up,
                "stage_totals_s": totals,
                "per_image_s": per_image,
                "projected_cityscapes_cycle_s": projected,
            }
        )
    )


if __name__ == "__main__":
    main()
