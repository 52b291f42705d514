"""Explaining the selected images on 1 actor against n actors (shards on demand, as scoring).

    PYTHONPATH=. .venv/bin/python bench/explain_spread.py --images 16 --rounds 2 --actors 2

The workload of ``bench/scoring_throughput.py``: synthetic scenes at ``--size``, the demo's U-Net. One
Ray of ``--actors`` CPUs; a pool of 1 one-CPU actor and a pool of ``--actors`` explain the same rows in
turn, best of ``--rounds``. The target: the n-actor wall time close to 1/n of the one-actor time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on loopback only

import ray  # noqa: E402
from scoring_throughput import add_workload_arguments, workload  # noqa: E402  (bench/, next to this script)

from actors.scoring import ScorerPool  # noqa: E402
from orchestrator.strategies import ScoreKind  # noqa: E402


def best_wall_s(pool: ScorerPool, rows, rounds: int) -> float:
    pool.explain(rows.slice(0, len(pool.actors)), ScoreKind.EEM, None, 0)  # warm-up: models loaded
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        pool.explain(rows, ScoreKind.EEM, None, 0)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    rows, scorer_args, checkpoint = workload(args)
    ray.init(num_cpus=args.actors, include_dashboard=False, configure_logging=False)
    walls = {}
    for actors in (1, args.actors):
        pool = ScorerPool(actors, scorer_args, cpus=1.0)
        pool.load_model(checkpoint)
        walls[actors] = best_wall_s(pool, rows, args.rounds)
        pool.shutdown()
    ray.shutdown()
    one, many = walls[1], walls[args.actors]
    print(json.dumps({
        "images": len(rows), "size": list(args.size), "actors": args.actors,
        "one_actor_s": round(one, 2), "n_actors_s": round(many, 2),
        "fraction_of_one": round(many / one, 3), "ideal": round(1 / args.actors, 3),
        "load_average": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
