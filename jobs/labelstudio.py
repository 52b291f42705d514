"""A run that waits for people, handed to a Label Studio server and back without clicking.

    export LABEL_STUDIO_URL=http://127.0.0.1:8080 LABEL_STUDIO_API_KEY=<personal access token>
    python -m jobs.labelstudio push runs/people   # the waiting cycle's project, storage and tasks
    python -m jobs.labelstudio pull runs/people   # its export; the run continues and the next cycle is pushed

``push`` creates the cycle's project (``segxal <run> cycle_NN``) with the labelling config, a local-files
storage for its images (when Label Studio serves them as local files) and the tasks; pushing again reuses
the project and imports nothing twice. ``pull`` checks that every task has an annotation, fetches the JSON
export, continues the run with it (``jobs.al --resume RUN --stage import FILE``, which checks it in full)
and pushes the cycle the run then waits for. Needs the ``labelstudio`` extra (``label-studio-sdk``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.labelstudio.handoff import PendingCycle, export_dir, is_exported
from orchestrator.labelstudio.server import (
    CycleProject,
    LabelStudioServerError,
    annotated_tasks,
    connect,
    download_export,
    push_cycle,
)
from orchestrator.run import Progress
from orchestrator.run_layout import RunLayout


def waiting_cycle(run_dir: Path) -> int | None:
    """The cycle the run waits on people for, if any."""
    layout = RunLayout(run_dir)
    if not layout.progress_file.is_file():
        raise LabelStudioServerError(f"{run_dir}: not a jobs.al run folder (no progress.json)")
    cycle = Progress.load(layout).completed_cycle + 1
    return cycle if is_exported(run_dir, cycle) else None


def push(client, url: str, run_dir: Path) -> None:
    cycle = waiting_cycle(run_dir)
    if cycle is None:
        print(f"{run_dir}: no cycle waits for annotations; nothing to push")
        return
    project = push_cycle(client, url, run_dir, PendingCycle.load(run_dir, cycle))
    print(
        f"cycle {cycle} is in Label Studio: {project.page}\n"
        f"  annotate and submit every task, then: python -m jobs.labelstudio pull {run_dir}"
    )


def pull(client, url: str, run_dir: Path, job_args: list[str]) -> None:
    from jobs import al as al_job  # imports torch and the run's machinery; after the input checks

    cycle = waiting_cycle(run_dir)
    if cycle is None:
        raise LabelStudioServerError(f"{run_dir}: no cycle waits for annotations; nothing to pull")
    folder = export_dir(run_dir, cycle)
    project = CycleProject.load(folder)
    done, total = annotated_tasks(client, project)
    if done < total:
        raise LabelStudioServerError(
            f"{project.page}: {done} of {total} tasks annotated; submit the rest, then pull again"
        )
    export = download_export(client, project, folder)
    print(f"cycle {cycle}: {total} annotated tasks fetched from {project.page}")
    al_job.main(["--resume", str(run_dir), "--stage", "import", str(export), *job_args])
    push(client, url, run_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["push", "pull"])
    parser.add_argument("run_dir", type=Path, help="the jobs.al run folder (runs/<name>)")
    parser.add_argument(
        "--quiet", action="store_true", help="pull: the run continues without progress bars"
    )
    args = parser.parse_args(argv)
    run_dir = args.run_dir.absolute()
    try:
        client, url = connect()
        if args.action == "push":
            push(client, url, run_dir)
        else:
            pull(client, url, run_dir, ["--quiet"] if args.quiet else [])
    except LabelStudioServerError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
