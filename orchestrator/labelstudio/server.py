"""A cycle's project on a Label Studio server, through its API (``label-studio-sdk``): what a person would
otherwise click (create the project, paste the labelling config, add the local-files storage, import the
tasks, export the annotations).

One project per exported cycle, named after the run and the cycle, so that pushing again reuses it and
never imports a task twice. The server and the token come from the environment, as the SDK's own CLI reads
them: ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (a personal access token, Account & Settings >
Personal Access Token; a legacy token works where the server still allows them)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.labelstudio.handoff import CONFIG, TASKS, PendingCycle
from orchestrator.labelstudio.tasks import LOCAL_FILES
from orchestrator.run_layout import cycle_name
from segxal.files import write_atomically

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

URL_ENV, TOKEN_ENV = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"
# in the cycle's folder: which project on which server holds its tasks
PROJECT_FILE = "project.json"
DOWNLOADED = "downloaded_export.json"  # the export as last fetched from the server


class LabelStudioServerError(Exception):
    """The server refused or could not be reached; the message is one line that says which and why."""


@dataclass(frozen=True)
class CycleProject:
    url: str
    project_id: int
    title: str

    @property
    def page(self) -> str:
        return f"{self.url}/projects/{self.project_id}/data"

    def save(self, folder: Path) -> None:
        text = json.dumps(asdict(self), indent=1).encode()
        write_atomically(folder / PROJECT_FILE, lambda handle: handle.write(text))

    @classmethod
    def load(cls, folder: Path) -> CycleProject:
        path = folder / PROJECT_FILE
        if not path.is_file():
            raise LabelStudioServerError(
                f"{folder}: this cycle is not in Label Studio yet (push it first)"
            )
        return cls(**json.loads(path.read_text()))


def connect(environ: Mapping[str, str] = os.environ) -> tuple[LabelStudio, str]:
    """The SDK's client for the server the environment names, and that server's URL."""
    missing = [name for name in (URL_ENV, TOKEN_ENV) if not environ.get(name)]
    if missing:
        raise LabelStudioServerError(
            f"set {' and '.join(missing)}: the Label Studio server's URL (e.g. http://127.0.0.1:8080) and "
            "a personal access token (Label Studio: Account & Settings > Personal Access Token)"
        )
    try:
        from label_studio_sdk import LabelStudio
    except ImportError:
        raise LabelStudioServerError(
            "label-studio-sdk is not installed: pip install -e '.[labelstudio]'"
        ) from None
    url = environ[URL_ENV].rstrip("/")
    return LabelStudio(base_url=url, api_key=environ[TOKEN_ENV]), url


@contextmanager
def server_errors(url: str) -> Iterator[None]:
    """The SDK's and httpx's errors as one line naming the server."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as error:
        body = error.body if isinstance(error.body, dict) else {}
        detail = body.get("validation_errors") or body.get("detail") or error.body
        hint = " (check LABEL_STUDIO_API_KEY)" if error.status_code in (401, 403) else ""
        raise LabelStudioServerError(
            f"Label Studio at {url} refused: HTTP {error.status_code}: {detail}{hint}"
        ) from None
    except httpx.HTTPError as error:
        raise LabelStudioServerError(
            f"Label Studio at {url} cannot be reached: {error} (is it running? LABEL_STUDIO_URL)"
        ) from None


def project_title(run_dir: Path, cycle: int) -> str:
    return f"segxal {run_dir.name} {cycle_name(cycle)}"


def storage_folder(pending: PendingCycle) -> Path | None:
    """The folder a local-files storage must grant for Label Studio to serve the cycle's images: the
    deepest one holding them all. None when the images are served by another web server (a URL prefix)."""
    if not all(task.image.startswith(LOCAL_FILES) for task in pending.tasks):
        return None
    return Path(os.path.commonpath([Path(t.image_path).resolve().parent for t in pending.tasks]))


def require_id(project_id: int | None) -> int:
    if project_id is None:
        raise LabelStudioServerError("Label Studio answered a project without an id")
    return project_id


def find_project(client: LabelStudio, title: str) -> int | None:
    """The id of the project named ``title``, if there is one."""
    projects: Iterable[Any] = client.projects.list(title=title)  # the SDK's pager is untyped
    for project in projects:
        if project.title == title:
            return require_id(project.id)
    return None


def push_cycle(client: LabelStudio, url: str, run_dir: Path, pending: PendingCycle) -> CycleProject:
    """Create (or find again) the cycle's project with its labelling config and storage, and import its
    tasks once. A project that holds some other number of tasks is an error: it is not this cycle's."""
    title = project_title(run_dir, pending.cycle)
    config = (pending.folder / CONFIG).read_text()
    tasks = json.loads((pending.folder / TASKS).read_text())
    with server_errors(url):
        project_id = find_project(client, title)
        if project_id is None:
            project_id = require_id(
                client.projects.create(
                    title=title,
                    label_config=config,
                    description=f"SegXAL active learning: {run_dir}, cycle {pending.cycle}",
                ).id
            )
        state = client.projects.get(project_id)
        if (state.label_config or "").strip() != config.strip():  # the server strips it
            client.projects.update(project_id, label_config=config)
        folder = storage_folder(pending)
        if folder is not None and not any(
            Path(s.path or "") == folder
            for s in client.import_storage.local.list(project=project_id)
        ):
            client.import_storage.local.create(
                project=project_id, path=str(folder), title="images", use_blob_urls=False
            )
        present = state.task_number or 0
        if present == 0:
            client.projects.import_tasks(project_id, request=tasks)
        elif present != len(tasks):
            raise LabelStudioServerError(
                f"Label Studio project {project_id} ({title!r}) holds {present} tasks, but cycle "
                f"{pending.cycle} exported {len(tasks)}: delete the project and push again"
            )
    cycle_project = CycleProject(url, project_id, title)
    cycle_project.save(pending.folder)
    return cycle_project


def annotated_tasks(client: LabelStudio, project: CycleProject) -> tuple[int, int]:
    """How many of the project's tasks have an annotation, and how many tasks it has."""
    with server_errors(project.url):
        state = client.projects.get(project.project_id)
    return state.num_tasks_with_annotations or 0, state.task_number or 0


def download_export(client: LabelStudio, project: CycleProject, folder: Path) -> Path:
    """The project's JSON export (every task), written atomically into the cycle's folder."""
    with server_errors(project.url):
        data = b"".join(
            client.projects.exports.download_sync(
                project.project_id, export_type="JSON", download_all_tasks=True
            )
        )
    path = folder / DOWNLOADED
    write_atomically(path, lambda handle: handle.write(data))
    return path
