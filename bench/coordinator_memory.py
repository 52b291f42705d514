"""Peak memory of the coordinator's work for one cycle, for pools of different sizes.

    python bench/coordinator_memory.py [--sizes 10000 1000000]

Each size runs in a fresh process: build the pool state from a manifest, draw D^S, select the top n
of random scores, apply a gate decision to them and save the state (Parquet + checksum). Reports the
process's peak RSS per size and the ratio to the smallest (target: within 10 %).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_cycle(size: int) -> dict:
    import numpy as np
    import pyarrow as pa

    from orchestrator.pool_state import UNLABELLED, PoolState
    from orchestrator.strategies import draw_subset, top_n

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    ids = [f"train/img_{i:08d}" for i in range(size)]
    manifest = pa.table({
        "sample_id": ids, "split": ["train"] * size,
        "image_path": [f"/data/leftImg8bit/train/c/{i}_leftImg8bit.png" for i in ids],
        "label_path": [f"/data/gtFine/train/c/{i}_gtFine_labelIds.png" for i in ids],
        "depth_path": pa.nulls(size, pa.string()),
    })
    del ids
    state = PoolState.from_manifest(manifest, 0.4, seed=0)
    del manifest
    rng = np.random.default_rng(0)
    subset = draw_subset(state.ids(UNLABELLED), 0.5, rng)
    n = max(1, size // 20)
    chosen = top_n(subset, rng.random(len(subset)), n)
    accepted, returned = chosen[: n // 2].to_pylist(), chosen[n // 2:].to_pylist()
    state = state.accept(accepted, 1, "simulated", 0.9, 1.0, [f"/run/annotations/{i}.png" for i in accepted])
    state = state.return_to_pool(returned, 1, "simulated", 0.2, 1.0)
    with tempfile.TemporaryDirectory() as folder:
        state.save(Path(folder) / "pool_state.parquet")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"size": size, "peak_rss_mib": round(peak / 1024, 1), "baseline_rss_mib": round(baseline / 1024, 1),
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_cycle(args.child)))
        return
    results = [json.loads(subprocess.run([sys.executable, __file__, "--child", str(size)], check=True,
                                         capture_output=True, text=True).stdout) for size in args.sizes]
    smallest = results[0]["peak_rss_mib"]
    for result in results:
        result["ratio_to_smallest"] = round(result["peak_rss_mib"] / smallest, 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
