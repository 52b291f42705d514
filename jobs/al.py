"""SegXAL active learning on Ray, logged to MLflow.

    python -m jobs.al --config jobs/configs/demo.yaml [--set al.strategy=entropy ...]
    python -m jobs.al --resume runs/demo            # continue an interrupted run

With ``al.oracle: labelstudio`` people annotate: the run stops once a cycle's images are exported for
Label Studio (``--stage export``, the default) and continues from there with Label Studio's JSON export:

    python -m jobs.al --resume runs/demo --stage import export.json

Locally this starts an embedded Ray; under ``ray job submit`` it joins the cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc
import yaml

from jobs.common import (
    check_tracking_or_exit,
    init_ray,
    parse_job_args,
    print_results_hint,
    show_progress,
)
from orchestrator.config import ExperimentConfig, load_experiment
from orchestrator.datasets import check_label_ids, label_set_for, manifest_for
from orchestrator.labelstudio.handoff import (
    LabelStudioHandoff,
    import_cycle,
    instructions,
    is_exported,
)
from orchestrator.labelstudio.tasks import ImageReferences
from orchestrator.oracles import (
    DatasetGroundTruth,
    LabelStudioOracle,
    Oracle,
    PseudoLabelOracle,
    SimulatedOracle,
)
from orchestrator.pool_state import PoolState
from orchestrator.records import LABELLED, VALIDATION, Metric
from orchestrator.run import ActiveLearningRun, Progress
from orchestrator.run_layout import RunLayout, cycle_name
from orchestrator.run_lock import RunFolderInUse, exclusive_run
from orchestrator.tracking import (
    experiment_run,
    log_artifact,
    log_dataset,
    log_image,
    log_metrics,
    log_segmenter,
    log_table,
    set_tags,
)
from orchestrator.typed_config import ConfigError, to_dict
from segxal.checkpoint import load_checkpoint
from segxal.files import write_atomically
from segxal.models.unet import UNet
from segxal.training import check_class_weights

log = logging.getLogger("jobs.al")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    parser.add_argument(
        "--stage",
        nargs="+",
        metavar="STAGE",
        help="al.oracle=labelstudio only: 'export' (the default) runs until a cycle's images are "
        "exported for Label Studio; 'import FILE' (with --resume) continues with Label "
        "Studio's JSON export FILE",
    )


def export_file_of(args: argparse.Namespace, config: ExperimentConfig) -> Path | None:
    """The Label Studio export that ``--stage import FILE`` continues with; None for the export stage and
    for machine oracles. A misused ``--stage`` exits with a message."""
    if args.stage is None:
        return None
    if config.al.oracle != "labelstudio":
        raise SystemExit(
            f"--stage is for al.oracle=labelstudio; this run's oracle is {config.al.oracle}"
        )
    if args.stage == ["export"]:
        return None
    if args.stage[0] != "import" or len(args.stage) != 2:
        raise SystemExit(f"--stage {' '.join(args.stage)}: expected 'export' or 'import FILE'")
    if not args.resume:
        raise SystemExit("--stage import FILE continues a run: add --resume RUN_DIR")
    return Path(args.stage[1])


def labelstudio_oracle(
    config: ExperimentConfig, run_dir: Path, cycle: int, label_set, export_file: Path | None
) -> tuple[Oracle, LabelStudioHandoff]:
    """People in Label Studio; with an export file, its annotations of ``cycle``, checked in full here."""
    images = ImageReferences.from_config(config.data.root, config.al.labelstudio)
    imported = (
        None
        if export_file is None
        else import_cycle(run_dir, cycle, export_file, images, label_set)
    )
    handoff = LabelStudioHandoff(run_dir, images, label_set, imported)
    return LabelStudioOracle({} if imported is None else imported.labels), handoff


def create_pool(config: ExperimentConfig, path: Path, show: bool) -> None:
    """The run's initial pool state at ``path``, from the dataset's training and validation manifests,
    with the label ids of its initial labelled pool and its validation set checked (images drawn later
    are checked when they are read)."""
    train = manifest_for(config.data, config.data.train_split, config.data.max_train_images, show)
    val = manifest_for(config.data, config.data.val_split, config.data.max_val_images)
    state = PoolState.create(path, train, config.al.initial_labelled, config.seed, validation=val)
    check_label_ids(labels_to_check(state), label_set_for(config.data))


def labels_to_check(state: PoolState) -> Iterator[str]:
    """The label files of the initial labelled pool and of the validation set, streamed."""
    for table in state.batches(["role", "label_source", "label_path"]):
        yield from table.filter(pc.equal(table["role"], LABELLED))["label_source"].to_pylist()
        yield from table.filter(pc.equal(table["role"], VALIDATION))["label_path"].to_pylist()


def create_pool_apart(config: ExperimentConfig, path: Path, show: bool) -> PoolState:
    """:func:`create_pool` in a process of its own: the manifests are held whole while the pool is built
    (about 650 MiB for a million images), and the driver, which then runs every cycle, never holds them.
    Its errors (bad data, too small a pool) come back as they were raised."""
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        pool.submit(create_pool, config, path, show).result()
    return PoolState.load(path)


def prepare(
    config: ExperimentConfig,
    layout: RunLayout,
    progress: Progress,
    show: bool,
    export_file: Path | None = None,
) -> ActiveLearningRun:
    """The run, built once, with everything that can fail on bad input checked before Ray starts: data,
    pool, budget, oracle, and a Label Studio export."""
    run_dir = layout.root
    label_set = label_set_for(config.data)
    check_class_weights(config.train, label_set.class_names)
    if progress.completed_cycle >= 0:
        state = PoolState.load(layout.snapshot(progress.completed_cycle))
    else:
        state = create_pool_apart(config, layout.state_file, show)
    handoff = None
    if config.al.oracle == "labelstudio":
        oracle, handoff = labelstudio_oracle(
            config, run_dir, progress.completed_cycle + 1, label_set, export_file
        )
    elif config.al.oracle == "pseudo":
        oracle = PseudoLabelOracle(config.al.pseudo_confidence)
    else:
        oracle = SimulatedOracle(DatasetGroundTruth(label_set, config.data.image_size))
    return ActiveLearningRun(
        layout,
        state,
        config.al,
        label_set,
        config.seed,
        oracle,
        handoff,
        progress,
        config.data.image_size,
    )


# What a resume may change: how long the run goes on, where it logs, and resources that do not change
# what it computes. Everything else (seed, strategy, data, model, training) would make another experiment.
RESUME_OVERRIDES = (  # al.unit, al.budget_unit and al.region_cell are not: they change the experiment
    "al.cycles",
    "al.panels",
    "progress",
    "tracking.",
    "al.num_scorers",
    "al.scorer_cpus",
    "al.scorer_gpus",
    "al.scorer_batch_size",
    "scaling.use_gpu",
    "scaling.cpus_per_worker",
    "scaling.max_failures",
)


def check_resume_overrides(overrides: list[str]) -> None:
    keys = [override.partition("=")[0].strip() for override in overrides]
    refused = [
        k
        for k in keys
        if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUME_OVERRIDES)
    ]
    if refused:
        allowed = ", ".join(a + "*" if a.endswith(".") else a for a in RESUME_OVERRIDES)
        raise SystemExit(
            f"--resume keeps the experiment: --set {', '.join(refused)} cannot change on resume "
            f"(it may change: {allowed}); start a new run for another experiment"
        )


def record_resume_overrides(
    layout: RunLayout, overrides: list[str], config: ExperimentConfig
) -> None:
    """The run folder keeps saying what runs: config.yaml takes the accepted overrides, and
    overrides.jsonl keeps each resume's, with its time."""
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "set": overrides}
    with open(layout.overrides_file, "a") as log_file:
        log_file.write(json.dumps(entry) + "\n")
    save_config(layout, config)


def save_config(layout: RunLayout, config: ExperimentConfig) -> None:
    """The run's configuration, written atomically to its config.yaml (what a resume reads)."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False).encode()
    write_atomically(layout.config_file, lambda handle: handle.write(text))


def main(argv: list[str] | None = None) -> list[dict]:
    args, config = parse_job_args(__doc__, add_arguments, argv)
    if args.resume:
        if args.config:
            raise SystemExit(
                "--resume continues a run with its own config.yaml: drop --config (change what may "
                "change with --set)"
            )
        check_resume_overrides(args.overrides)
        layout = RunLayout(Path(args.resume).absolute())
        if not layout.config_file.is_file():
            raise SystemExit(
                f"--resume {layout.root}: no {layout.config_file.name} there; is it a jobs.al run folder?"
            )
    else:
        export_file_of(args, config)  # a misused --stage exits before the run folder is made
        # absolute: actors write there from other working directories
        layout = RunLayout((Path(config.output_dir) / config.name).absolute())
    try:
        with exclusive_run(layout):
            return run_job(args, config, layout)
    except RunFolderInUse as error:
        raise SystemExit(f"error: {error}") from None


def run_job(args: argparse.Namespace, config: ExperimentConfig, layout: RunLayout) -> list[dict]:
    """The job, holding the run folder."""
    run_dir = layout.root
    if args.resume:
        try:
            config = load_experiment(layout.config_file, args.overrides)
        except ConfigError as error:
            raise SystemExit(f"config error: {error}") from None
        if args.overrides:
            record_resume_overrides(layout, args.overrides, config)
        export_file = export_file_of(args, config)
    else:
        export_file = export_file_of(args, config)
        if layout.progress_file.is_file():
            raise SystemExit(
                f"{run_dir} holds a run already: continue it with --resume {run_dir}, or set another name"
            )
        save_config(layout, config)
    check_tracking_or_exit(config.tracking.tracking_uri)
    show = show_progress(config, args)
    try:
        progress = Progress.load(layout)
        run = prepare(config, layout, progress, show, export_file)
    except ValueError as error:  # bad data, pool, budget or export: nothing has started yet
        raise SystemExit(f"error: {error}") from error
    first_cycle = progress.completed_cycle + 1
    handoff = run.handoff
    if handoff is not None and export_file is None and is_exported(run_dir, first_cycle):
        print(instructions(run_dir, first_cycle))  # still waiting for the people
        return []
    start = time.perf_counter()
    init_ray()
    from actors.al_backend import RayCycleBackend  # imports ray; after the input checks

    ray_started = time.perf_counter()
    backend = RayCycleBackend(config, layout, run.label_set, progress=show)
    start_up = {
        Metric.stage_seconds("ray_start"): ray_started - start,
        Metric.stage_seconds("actors_start"): time.perf_counter() - ray_started,
    }
    try:
        history, waiting = run_cycles_logged(run, backend, config, progress, layout, show, start_up)
    except OSError as error:
        if isinstance(error, ConnectionError) or error.errno is None:
            raise
        raise SystemExit(write_failure(error, run_dir)) from error
    finally:
        backend.shutdown()
    if waiting:
        print(instructions(run_dir, handoff.handed_over))
    print_results_hint(config.tracking.tracking_uri, run_dir)
    return history


def write_failure(error: OSError, run_dir: Path) -> str:
    """One line for a file the run could not write (a full disk, a read-only folder): which file, why,
    and how to go on. Every state file is replaced atomically, so the run's state is the last one
    completed."""
    target = error.filename or "a file of the run"
    return (
        f"error: cannot write {target}: {error.strerror or error}. The run's state is kept as of its "
        f"last completed step: fix the cause (free disk space), then continue with "
        f"python -m jobs.al --resume {run_dir}"
    )


def cycle_summary(cycle: int, metrics: dict) -> str:
    """The cycle's line in the terminal: mIoU, labelled share, the gate's verdicts, cost and time."""
    parts = [
        f"cycle {cycle}: mIoU {100 * metrics[Metric.VAL_MIOU]:.2f} %",
        f"labelled {100 * metrics[Metric.LABELLED_FRACTION]:.1f} %",
    ]
    if Metric.ACCEPTED in metrics:
        parts.append(
            f"accepted {metrics[Metric.ACCEPTED]:.0f} / returned {metrics[Metric.RETURNED]:.0f}"
        )
        parts.append(f"cost {metrics[Metric.CYCLE_COST]:g}")
    seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
    return "  ".join(parts) + f"  ({seconds:.0f} s)"


def log_cycle_records(layout: RunLayout, cycle: int, artifacts: list[Path]) -> None:
    """A cycle's files in MLflow: EEM panels as images at ``step = cycle`` (``panel_<k>``: the k-th
    query of the cycle), the gate's decisions as a table, the pools it trained, validated and scored on
    as datasets, the rest (prompt regions, pool snapshot) as artifacts."""
    name = cycle_name(cycle)
    panels = [path for path in artifacts if path.suffix == ".png"]
    for rank, path in enumerate(panels, 1):
        log_image(path, key=f"panel_{rank}", step=cycle)
    for path in artifacts:
        if path.suffix != ".png":
            log_artifact(path, name)
    if layout.decisions(cycle).is_file():
        log_table(layout.decisions(cycle), f"{name}/decisions.json")
    pools = [(layout.train_manifest(cycle), "labelled", "training")]
    pools.append((layout.candidates(cycle), "candidates", "scoring"))  # D^S
    if cycle == 0:
        pools.append((layout.val_manifest(cycle), "validation", "validation"))
    for path, pool, context in pools:
        if path.is_file():
            log_dataset(path, f"{pool}@{name}", context, ["sample_id", "image_path", "label_path"])


WAITING_TAG = "waiting_for"
STOP_TAG = "stop/reason"


def run_cycles_logged(
    run: ActiveLearningRun,
    backend,
    config: ExperimentConfig,
    progress: Progress,
    layout: RunLayout,
    show: bool,
    start_up: dict[str, float],
) -> tuple[list[dict], bool]:
    """The run's cycles inside its MLflow run (``start_up``: the seconds Ray and the scoring actors
    took to start, logged at the first cycle's step); returns their metrics and whether the run now
    waits for people."""

    def on_cycle(cycle: int, metrics: dict, artifacts: list[Path]) -> None:
        log_metrics(metrics, step=cycle)
        log_cycle_records(layout, cycle, artifacts)
        line = cycle_summary(cycle, metrics)
        if show:
            from tqdm import tqdm

            tqdm.write(line)  # above the progress bars
        else:
            print(line, flush=True)

    bar = None
    if show:
        from tqdm import tqdm

        bar = lambda cycles: tqdm(cycles, desc="cycles", unit="cycle")  # noqa: E731
    tracking = config.tracking
    handoff = run.handoff
    with experiment_run(
        tracking.tracking_uri,
        tracking.experiment,
        tracking.run_name or f"al-{config.name}-{config.al.strategy}-{config.al.oracle}",
        config,
        run_id=progress.tracking_run_id,
    ) as tracked:
        if progress.tracking_run_id is None:
            progress.tracking_run_id = tracked.info.run_id
            progress.save(layout)
            set_tags(
                {
                    "job": "al",
                    "strategy": config.acquisition,
                    "unit": config.al.unit,
                    "oracle": config.al.oracle,
                    "depth_backend": config.eem.depth.backend,
                    "dataset": config.data.dataset,
                }
            )
        log_metrics(start_up, step=progress.completed_cycle + 1)
        history = run.run(
            backend, config.al.cycles, on_cycle, **({"progress_bar": bar} if bar else {})
        )
        waiting = handoff is not None and handoff.handed_over is not None
        # the run ends FINISHED either way: a tag says when it waits for people, and what for
        set_tags({WAITING_TAG: f"people: Label Studio annotations of cycle {handoff.handed_over}"
                  if waiting else "nothing"})  # fmt: skip
        if not waiting:
            log_artifact(progress.checkpoint, "model")
            log_segmenter(UNet.from_checkpoint(load_checkpoint(progress.checkpoint)["model"]))
        if progress.stopped is not None:
            set_tags({STOP_TAG: progress.stopped})
            print(f"the run stopped early: {progress.stopped}")
    return history, waiting


if __name__ == "__main__":
    main()
