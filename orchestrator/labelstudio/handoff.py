"""The Label Studio stage of a run: a cycle's query is handed over as files for people and the run stops;
a later run imports Label Studio's export and takes the query back to finish the cycle.

``run_dir/labelstudio/cycle_NN/`` holds
- ``tasks.json``: the tasks to import into Label Studio;
- ``labelling_config.xml``: the project's labelling interface;
- ``requests.npz``: the requests' maps, so that the cycle continues exactly where it stopped;
- ``manifest.json``: each task's sample, image reference and native size (what an export is checked
  against), the requests' regions and the query's metrics and artifacts; written last, so its presence
  means the export is complete;
- ``export.json``: once imported, the Label Studio export the cycle used.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.labelstudio.imports import ExportedTask, LabelStudioImportError, read_export
from orchestrator.labelstudio.tasks import ImageReferences, labelling_config, task
from orchestrator.oracles import AnnotationRequest, LabelStudioOracle
from orchestrator.run import Query
from orchestrator.run_layout import RunLayout, cycle_name
from segxal.data.io import image_size
from segxal.data.labels import LabelSet
from segxal.files import write_atomically

TASKS, CONFIG, REQUESTS, MANIFEST, IMPORTED = (
    "tasks.json",
    "labelling_config.xml",
    "requests.npz",
    "manifest.json",
    "export.json",
)
MAPS = ("prediction", "tta_prediction", "tta_confidence", "region_map")


def export_dir(run_dir: str | Path, cycle: int) -> Path:
    return RunLayout(Path(run_dir)).labelstudio_dir(cycle)


def is_exported(run_dir: str | Path, cycle: int) -> bool:
    """Whether ``cycle`` was exported to Label Studio (and waits for its annotations unless completed)."""
    return (export_dir(run_dir, cycle) / MANIFEST).is_file()


def write_export(
    folder: Path,
    cycle: int,
    query: Query,
    images: ImageReferences,
    label_set: LabelSet,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model_version = f"segxal-{cycle_name(cycle - 1)}"  # the model trained in the previous cycle
    tasks, exported = [], []
    for number, request in enumerate(query.requests, start=1):
        size = image_size(request.image_path)
        reference = images.reference(request.image_path)
        tasks.append(task(number, request, reference, size, label_set, model_version))
        exported.append(ExportedTask(request.sample_id, request.image_path, reference, *size))
    prompts = max([1, *(len(r.regions) for r in query.requests)])  # EEM 1 .. the most any task has
    (folder / TASKS).write_text(json.dumps(tasks))
    regions = any(r.queried_regions_only for r in query.requests)
    (folder / CONFIG).write_text(labelling_config(label_set, prompts, regions))
    np.savez_compressed(
        folder / REQUESTS,
        **{
            f"{name}_{i}": getattr(request, name)
            for i, request in enumerate(query.requests)
            for name in MAPS
        },
    )
    manifest = {
        "cycle": cycle,
        "tasks": [
            dataclasses.asdict(t)
            | {"regions": r.regions, "queried_regions_only": r.queried_regions_only}
            for t, r in zip(exported, query.requests, strict=True)
        ],
        "metrics": query.metrics,
        "artifacts": [str(path) for path in query.artifacts],
    }
    write_atomically(
        folder / MANIFEST, lambda handle: handle.write(json.dumps(manifest, indent=1).encode())
    )


@dataclass(frozen=True)
class PendingCycle:
    """A cycle exported to Label Studio, waiting for its annotations."""

    cycle: int
    folder: Path
    tasks: list[ExportedTask]
    query: Query

    @classmethod
    def load(cls, run_dir: str | Path, cycle: int) -> PendingCycle:
        folder = export_dir(run_dir, cycle)
        if not is_exported(run_dir, cycle):
            raise LabelStudioImportError(
                f"{folder}: no Label Studio export of cycle {cycle} waits for annotations "
                "(run jobs.al with --stage export first)"
            )
        manifest = json.loads((folder / MANIFEST).read_text())
        names = [field.name for field in dataclasses.fields(ExportedTask)]
        tasks = [
            ExportedTask(**{name: record[name] for name in names}) for record in manifest["tasks"]
        ]
        with np.load(folder / REQUESTS) as maps:
            requests = [
                AnnotationRequest(
                    sample_id=record["sample_id"],
                    image_path=record["image_path"],
                    prediction=maps[f"prediction_{i}"],
                    tta_prediction=maps[f"tta_prediction_{i}"],
                    tta_confidence=maps[f"tta_confidence_{i}"],
                    region_map=maps[f"region_map_{i}"],
                    regions=record["regions"],
                    queried_regions_only=record.get("queried_regions_only", False),
                )
                for i, record in enumerate(manifest["tasks"])
            ]
        return cls(
            cycle,
            folder,
            tasks,
            Query(requests, manifest["metrics"], [Path(p) for p in manifest["artifacts"]]),
        )


@dataclass(frozen=True)
class ImportedCycle:
    pending: PendingCycle
    labels: dict[str, np.ndarray]  # sample id -> (H, W) train ids at the image's native size

    @property
    def query(self) -> Query:
        query = self.pending.query
        return Query(
            query.requests, query.metrics, [*query.artifacts, self.pending.folder / IMPORTED]
        )


def import_cycle(
    run_dir: str | Path,
    cycle: int,
    export_file: str | Path,
    images: ImageReferences,
    label_set: LabelSet,
) -> ImportedCycle:
    """Check Label Studio's export against the cycle's pending export and decode it. Nothing is written
    unless all of it is valid; then the export is kept in the cycle's folder."""
    pending = PendingCycle.load(run_dir, cycle)
    labels = read_export(export_file, pending.tasks, images, label_set)
    try:  # region mode: every queried region labelled (checked here, before any work)
        LabelStudioOracle(labels).annotate(pending.query.requests)
    except ValueError as error:
        raise LabelStudioImportError(f"{export_file}: {error}") from None
    kept = pending.folder / IMPORTED
    if Path(export_file).resolve() != kept.resolve():
        shutil.copyfile(export_file, kept)
    return ImportedCycle(pending, labels)


class LabelStudioHandoff:
    """The run's :class:`~orchestrator.run.Handoff` for people annotating in Label Studio."""

    def __init__(
        self,
        run_dir: str | Path,
        images: ImageReferences,
        label_set: LabelSet,
        imported: ImportedCycle | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.images = images
        self.label_set = label_set
        self.imported = imported
        self.handed_over: int | None = None  # the cycle exported by this run, if any

    def hand_over(self, cycle: int, query: Query) -> None:
        write_export(
            export_dir(self.run_dir, cycle),
            cycle,
            query,
            self.images,
            self.label_set,
        )
        self.handed_over = cycle

    def take_back(self, cycle: int) -> Query | None:
        if self.imported is None or self.imported.pending.cycle != cycle:
            return None
        return self.imported.query


def instructions(run_dir: str | Path, cycle: int) -> str:
    """What the person does next, with the exact command that continues the run."""
    folder = export_dir(run_dir, cycle)
    count = len(json.loads((folder / TASKS).read_text()))
    return (
        f"cycle {cycle} waits for people: {count} images to annotate in Label Studio, exported to {folder}\n"
        f"  1. With LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token) set, push it:\n"
        f"     python -m jobs.labelstudio push {run_dir}\n"
        f"  2. Correct each image, starting at the prompts EEM 1, EEM 2, ..., and submit it\n"
        f"  3. Pull the annotations; the run continues:\n"
        f"     python -m jobs.labelstudio pull {run_dir}\n"
        f"  (by hand: a project with {folder / CONFIG}, tasks from {folder / TASKS}, then\n"
        f"   python -m jobs.al --resume {run_dir} --stage import <the exported JSON file>)\n"
        f"(step by step: README, 'Annotating a cycle in Label Studio')"
    )
