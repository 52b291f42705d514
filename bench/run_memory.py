"""Peak memory of the process that runs the active-learning cycle, for pools of different sizes.

    python bench/run_memory.py [--sizes 10000 1000000] [--cycles 2]

Each size runs in fresh processes. A first process builds the manifest and the initial pool state file
(40 % labelled, as in the paper's protocol), as ``jobs.al`` does before its first cycle, also in a process
of its own (``jobs.al.create_pool_apart``). A second process, the one measured, runs the real ``orchestrator.run.ActiveLearningRun`` through each cycle, as the
driver of ``jobs.al`` does: draw D^S (50 % of the unlabelled pool, as in the shipped configs) and stream
it to an in-process backend that scores each batch as it comes (pseudo-random EEM scores), select the
top 200, explain them, have the simulated oracle re-annotate them, apply the Dice gate (theta 0.5),
stream the training and validation manifests to training, and write the end-of-cycle snapshot; the
audit files (candidates, scores, decisions, manifests) are written on the way.

Reported per size: the run process's peak resident memory (VmHWM, which, unlike ru_maxrss, is not
inherited across exec), its resident memory after its imports, and the ratio of peaks to the smallest
size (target: within 10 %). The budget is a count: what is sized by it (the requests and annotations) is
held whole by design.
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
    """The pool creation: a manifest of ``size`` images and the initial pool state file."""
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
    return {"create_peak_mib": round(memory_mib("VmHWM"), 1)}


class StreamingBackend:
    """An in-process backend that, like the Ray one, consumes what the run streams to it a batch at a
    time: pseudo-random EEM scores per candidate, requests for the selected images (whose image files
    are made on the spot), and training that only counts its manifest rows."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def train(self, cycle, train, val, init_checkpoint):
        import torch

        from orchestrator.run import TrainOutcome

        rows = sum(t.num_rows for t in train) + sum(t.num_rows for t in val)
        path = self.folder / f"model_{cycle}.pt"
        torch.save({"rows": rows}, path)
        return TrainOutcome(path, {"val/miou": 0.5})

    def score(self, cycle, checkpoint, rows, kind):
        import numpy as np
        import pyarrow as pa

        for table in rows:
            ids = table["sample_id"]
            scores = np.array([zlib.crc32(i.encode()) for i in ids.to_pylist()]) / 2**32
            yield pa.table(
                {"sample_id": ids, "score": scores, "unreadable": pa.nulls(len(ids), pa.string())}
            )

    def explain(self, cycle, checkpoint, selected, kind, panel_dir, panels):
        import numpy as np
        from PIL import Image

        from orchestrator.oracles import AnnotationRequest
        from orchestrator.run import Explained

        truth = ground_truth()
        requests = []
        for index, sample_id in enumerate(selected["sample_id"].to_pylist()):
            image = self.folder / "images" / (sample_id.replace("/", "__") + ".png")
            image.parent.mkdir(exist_ok=True)
            Image.new("RGB", LABEL_SIZE[::-1]).save(image)
            prediction = truth.copy()
            prediction[: index % 6] = 2  # Dice varies, so the gate accepts some and returns others
            requests.append(AnnotationRequest(sample_id, str(image), prediction, prediction,
                                              np.ones(LABEL_SIZE, np.float32),
                                              np.ones(LABEL_SIZE, np.int32), [{"id": 1}]))  # fmt: skip
        return Explained(requests)


def ground_truth():
    import numpy as np

    truth = np.zeros(LABEL_SIZE, np.uint8)
    truth[LABEL_SIZE[0] // 2 :] = 1
    return truth


def run_cycles(folder: Path, cycles: int) -> dict:
    """The measured process: the real ActiveLearningRun through ``cycles`` cycles."""
    from orchestrator.config import ActiveLearningConfig
    from orchestrator.oracles import SimulatedOracle
    from orchestrator.pool_state import PoolState
    from orchestrator.run import ActiveLearningRun
    from orchestrator.run_layout import RunLayout
    from segxal.data.labels import CITYSCAPES

    after_imports = memory_mib("VmRSS")
    start = time.perf_counter()
    truth = ground_truth()
    al = ActiveLearningConfig(strategy="eem", budget=200, subset=0.5, theta=0.5)
    run = ActiveLearningRun(
        RunLayout(folder / "run"),
        PoolState.load(folder / "initial.parquet"),
        al,
        CITYSCAPES,
        seed=0,
        oracle=SimulatedOracle(lambda request: truth),
    )
    (folder / "run").mkdir(exist_ok=True)
    history = run.run(StreamingBackend(folder / "run"), cycles)
    return {
        "run_peak_mib": round(memory_mib("VmHWM"), 1),
        "after_imports_mib": round(after_imports, 1),
        "labelled": run.state.count("labelled"),
        "accepted": [h.get("gate/accepted") for h in history],
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
    parser.add_argument("--run", nargs=2, metavar=("FOLDER", "CYCLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(prepare_pool(int(args.prepare[0]), Path(args.prepare[1]))))
    elif args.run:
        print(json.dumps(run_cycles(Path(args.run[0]), int(args.run[1]))))
    else:
        results = []
        for size in args.sizes:
            with tempfile.TemporaryDirectory() as folder:
                result = {
                    "size": size,
                    **child("--prepare", str(size), folder),
                    **child("--run", folder, str(args.cycles)),
                }
            results.append(result)
            print(json.dumps(result), flush=True)
        smallest = results[0]["run_peak_mib"]
        for result in results:
            print(
                f"{result['size']:>9,} entries: run peak {result['run_peak_mib']:.1f} MiB "
                f"(after imports {result['after_imports_mib']:.1f}), ratio {result['run_peak_mib'] / smallest:.3f}"
            )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
