"""Pool scoring with one slow actor: shards handed out on demand against a fixed round-robin split.

    python bench/scoring_balance.py [--images 48] [--size 128 256] [--slowdown 2] [--shards-per-actor 8] [--rounds 2]

Two scoring actors (one core each); the second stands for a device ``--slowdown`` times slower (after each
shard it sleeps (slowdown - 1) times the shard's scoring time, leaving its core idle). "On demand" is
``ScorerPool.score`` (``actors.dispatch.map_on_idle_actors``: each actor gets its next shard when one of its
own finishes). "Fixed" sends shard i to actor i mod 2 up front, as the pool did before. Both score the
same rows with the same shards; rounds alternate them and the best of each is reported. With a slowdown s
the fixed split waits for the slow actor's half (n/2 shards at s times the time of one), while on demand
the actors share the shards in proportion to their speeds (n s / (1 + s) shard times): the ideal speedup
is (1 + s) / 2, 1.5 for s = 2.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
from scoring_throughput import add_workload_arguments, workload  # noqa: E402  (bench/, next to this script)

from actors.scoring import ScorerPool, ScoringActor, shards  # noqa: E402
from orchestrator.strategies import ScoreKind, get_strategy  # noqa: E402


class SlowScoringActor(ScoringActor):
    """A scoring actor on a device ``slowdown`` times slower."""

    def __init__(self, slowdown: float, **scorer_args) -> None:
        super().__init__(**scorer_args)
        self.slowdown = slowdown

    def score_with(self, *args) -> pa.Table:
        start = time.perf_counter()
        result = super().score_with(*args)
        time.sleep((self.slowdown - 1) * (time.perf_counter() - start))
        return result


def fixed_split(pool: ScorerPool, rows: pa.Table, kind: ScoreKind) -> pa.Table:
    """Shard i to actor i mod n, all submitted at once (the pool's former assignment)."""
    parts = shards(rows, len(pool.actors) * pool.shards_per_actor)
    refs = [
        pool.actors[i % len(pool.actors)].score_with.remote(
            pool.version, pool.model_box, part, kind
        )
        for i, part in enumerate(parts)
    ]
    return pa.concat_tables(ray.get(refs))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument("--slowdown", type=float, default=2.0)
    parser.add_argument("--shards-per-actor", type=int, default=8)
    args = parser.parse_args()
    kind = get_strategy(args.strategy).score_kind
    rows, scorer_args, checkpoint = workload(args)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    pool = ScorerPool(2, scorer_args, cpus=1.0, shards_per_actor=args.shards_per_actor)
    slow = ray.remote(SlowScoringActor).options(num_cpus=1.0)
    ray.kill(pool.actors[1])
    pool.actors[1] = slow.remote(args.slowdown, **scorer_args)
    pool.load_model(checkpoint)
    pool.score(rows.slice(0, 2), kind)  # warm-up: actors built, model loaded

    passes = {
        "fixed": lambda: fixed_split(pool, rows, kind),
        "on_demand": lambda: pool.score(rows, kind),
    }
    best, results = {name: float("inf") for name in passes}, {}
    for _ in range(args.rounds):
        for name, run in passes.items():
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    assert (
        results["fixed"]["sample_id"].to_pylist() == results["on_demand"]["sample_id"].to_pylist()
    )
    print(
        json.dumps(
            {
                "images": len(rows),
                "size": list(args.size),
                "slowdown": args.slowdown,
                "shards": len(shards(rows, 2 * args.shards_per_actor)),
                "fixed_img_s": round(len(rows) / best["fixed"], 2),
                "on_demand_img_s": round(len(rows) / best["on_demand"], 2),
                "speedup": round(best["fixed"] / best["on_demand"], 3),
                "ideal_speedup": round((1 + args.slowdown) / 2, 3),
            }
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
