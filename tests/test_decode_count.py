"""How often a cycle opens each image file in the scoring actors: a candidate once (scoring), a selected
image twice (scoring, then explaining for the oracle), counted by an audit hook in every Ray worker."""

from __future__ import annotations

import collections
import json
import sys

import pyarrow.parquet as pq
import pytest
import ray
from helpers import tiny

from jobs import al as al_job


def audit_image_opens(log_path: str):
    """A Ray worker set-up hook: every file opened for reading below ``leftImg8bit/`` is logged."""

    def install() -> None:
        def hook(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[0], str) and "leftImg8bit" in args[0]:
                mode = args[1] if isinstance(args[1], str) else "r"
                if "r" in mode and args[0] != log_path:
                    with open(log_path, "a") as log:  # an append-only log: no event is lost
                        log.write(json.dumps(args[0]) + "\n")

        sys.addaudithook(hook)

    return install


@pytest.mark.slow
def test_a_cycle_opens_a_candidate_once_and_a_selected_image_twice(
    own_ray, synthetic_root, tmp_path
):
    log_path = tmp_path / "opens.jsonl"
    run_dir = tmp_path / "runs" / "decodes"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": audit_image_opens(str(log_path))},
    )
    try:  # the training runs in the driver (scaling.num_workers: 0), outside the hook
        history = al_job.main(tiny(synthetic_root, tmp_path / "runs", uri, "decodes", 1))
    finally:
        ray.shutdown()
    assert len(history) == 2
    opens = collections.Counter(json.loads(line) for line in log_path.read_text().splitlines())
    cycle = run_dir / "cycles" / "cycle_01"
    candidates = pq.read_table(cycle / "candidates.parquet").to_pydict()
    selected = {d["sample_id"] for d in pq.read_table(cycle / "decisions.parquet").to_pylist()}
    paths = dict(zip(candidates["sample_id"], candidates["image_path"], strict=True))
    assert len(selected) == 2 and len(paths) > len(selected)
    for sample_id, path in paths.items():
        assert opens[path] == (2 if sample_id in selected else 1), sample_id
    assert set(opens) == set(paths.values())  # nothing else is read in the actors
