"""Peak memory of the coordinator over active-learning cycles, for pools of different sizes.

    python bench/coordinator_memory.py [--sizes 10000 1000000] [--cycles 2]

Each size runs in fresh processes. A "driver" process builds the manifest and the initial pool state
file (40 % labelled, as in the paper's protocol), as ``jobs.al`` does. Then a "coordinator" process runs
the real ``orchestrator.coordinator.Coordinator`` through each cycle: draw D^S (50 % of the unlabelled
pool, as in the shipped configs), select the top 200 of D^S by EEM scores written by a third "scorer"
process, have the simulated oracle re-annotate them, apply the Dice gate (theta 0.5), and write the
training and validation manifests and the end-of-cycle snapshot.

Reported per size: the coordinator process's peak resident memory (VmHWM, which, unlike ru_maxrss, is
not inherited across exec), its resident memory after its imports, and the ratio of peaks to the
smallest size (target: within 10 %). The budget is a count: what is sized by it (the requests and
annotations) is held whole by design, and a per-cycle budget of 5 % of a million images is not a batch
any oracle annotates at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

PATH_PREFIX = "/data/cityscapes/leftImg8bit/train/city/"  # a realistic path length per row
LABEL_SIZE = (8, 16)


def memory_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def prepare_pool(size: int, folder: Path) -> dict:
    """The driver's part: a manifest of ``size`` images and the initial pool state file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from orchestrator.pool_state import PoolState

    ids = pa.array(np.char.add("train/img_", np.char.zfill(np.arange(size).astype(str), 8)))
    manifest = pa.table(
        {
            "sample_id": ids,
            "image_path": pc.binary_join_element_wise(PATH_PREFIX, ids, "_leftImg8bit.png", ""),
            "label_path": pc.binary_join_element_wise(
                PATH_PREFIX.replace("leftImg8bit", "gtFine"), ids, "_gtFine_labelIds.png", ""
            ),
            "depth_path": pa.nulls(size, pa.string()),
        }
    )
    PoolState.create(folder / "initial.parquet", manifest, 0.4, seed=0)
    return {"driver_peak_mib": round(memory_mib("VmHWM"), 1)}


def write_scores(candidates: Path, out: Path) -> None:
    """The scorers' part: a pseudo-random EEM score per candidate, in id order."""
    import numpy as np
    import pyarrow as pa

    from orchestrator.parquet_io import read_batches, write_parquet

    def scored():
        for table in read_batches(candidates, ["sample_id"]):
            ids = table["sample_id"]
            yield pa.table(
                {
                    "sample_id": ids,
                    "score": np.array([zlib.crc32(i.encode()) for i in ids.to_pylist()]) / 2**32,
                }
            )

    write_parquet(out, pa.schema([("sample_id", pa.string()), ("score", pa.float64())]), scored())


def run_coordinator(folder: Path, cycles: int) -> dict:
    """The coordinator's part, measured: the real Coordinator through ``cycles`` cycles."""
    import numpy as np
    from PIL import Image

    from orchestrator.config import ActiveLearningConfig
    from orchestrator.coordinator import Coordinator, cycle_dir
    from orchestrator.oracles import AnnotationRequest, SimulatedOracle
    from orchestrator.pool_state import PoolState
    from segxal.data.labels import CITYSCAPES

    after_imports = memory_mib("VmRSS")
    start = time.perf_counter()
    truth = np.zeros(LABEL_SIZE, np.uint8)
    truth[LABEL_SIZE[0] // 2 :] = 1
    al = ActiveLearningConfig(strategy="eem", budget=200, subset=0.5, theta=0.5)
    coordinator = Coordinator(
        folder / "run",
        PoolState.load(folder / "initial.parquet"),
        al,
        CITYSCAPES,
        seed=0,
        oracle=SimulatedOracle(lambda request: truth),
    )
    for cycle in range(1, cycles + 1):
        candidates = coordinator.candidates(cycle)
        scores = cycle_dir(folder / "run", cycle) / "scores.parquet"
        subprocess.run(
            [sys.executable, __file__, "--scores", str(candidates), str(scores)], check=True
        )
        selected = coordinator.unlabelled_manifest(coordinator.select(cycle, candidates, scores))
        requests = []
        for index, (sample_id, image_path) in enumerate(
            zip(selected["sample_id"].to_pylist(), selected["image_path"].to_pylist(), strict=True)
        ):
            image = (
                folder / "images" / Path(image_path).name
            )  # only the selected images need to exist
            image.parent.mkdir(exist_ok=True)
            Image.new("RGB", LABEL_SIZE[::-1]).save(image)
            prediction = truth.copy()
            prediction[: index % 6] = 2  # Dice varies, so the gate accepts some and returns others
            requests.append(
                AnnotationRequest(
                    sample_id,
                    str(image),
                    prediction,
                    prediction,
                    np.ones(LABEL_SIZE, np.float32),
                    np.ones(LABEL_SIZE, np.int32),
                    [{"id": 1}],
                )
            )
        coordinator.annotate(cycle, requests)
        coordinator.training_manifest(cycle)
        coordinator.validation_manifest(cycle)
        coordinator.pool_metrics()
        coordinator.snapshot(cycle)
    return {
        "coordinator_peak_mib": round(memory_mib("VmHWM"), 1),
        "after_imports_mib": round(after_imports, 1),
        "labelled": coordinator.state.count("labelled"),
        "seconds": round(time.perf_counter() - start, 2),
    }


def child(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--prepare", nargs=2, metavar=("SIZE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--coordinator", nargs=2, metavar=("FOLDER", "CYCLES"), help=argparse.SUPPRESS
    )
    parser.add_argument("--scores", nargs=2, metavar=("CANDIDATES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(prepare_pool(int(args.prepare[0]), Path(args.prepare[1]))))
    elif args.coordinator:
        print(json.dumps(run_coordinator(Path(args.coordinator[0]), int(args.coordinator[1]))))
    elif args.scores:
        write_scores(Path(args.scores[0]), Path(args.scores[1]))
    else:
        results = []
        for size in args.sizes:
            with tempfile.TemporaryDirectory() as folder:
                result = {
                    "size": size,
                    **child("--prepare", str(size), folder),
                    **child("--coordinator", folder, str(args.cycles)),
                }
            results.append(result)
            print(json.dumps(result), flush=True)
        smallest = results[0]["coordinator_peak_mib"]
        for result in results:
            print(
                f"{result['size']:>9,} entries: coordinator peak {result['coordinator_peak_mib']:.1f} MiB "
                f"(after imports {result['after_imports_mib']:.1f}), ratio {result['coordinator_peak_mib'] / smallest:.3f}"
            )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
