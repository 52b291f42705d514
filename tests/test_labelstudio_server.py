"""A run's cycle pushed to a real Label Studio server on 127.0.0.1 and its annotations pulled back
(``jobs.labelstudio``). The server runs from its own virtual environment, ``.venv-labelstudio``, which
``make test`` installs (``make labelstudio-server``)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from helpers import tiny
from PIL import Image

from jobs import al as al_job
from jobs import labelstudio as labelstudio_job
from jobs.common import free_loopback_port
from orchestrator.labelstudio.handoff import PendingCycle, export_dir
from orchestrator.labelstudio.server import TOKEN_ENV, URL_ENV
from orchestrator.pool_state import PoolState
from orchestrator.run import Progress
from orchestrator.run_layout import RunLayout
from segxal.data.labels import CITYSCAPES

REPO = Path(__file__).resolve().parents[1]
LS_VENV = REPO / ".venv-labelstudio"


def label_studio_or_skip() -> Path:
    executable = LS_VENV / "bin" / "label-studio"
    if (LS_VENV / ".installed").is_file() and executable.is_file():
        return executable
    failed = REPO / ".venv-labelstudio.failed"
    if failed.is_file():
        pytest.skip(f"Label Studio could not be installed: {failed.read_text().strip()}")
    pytest.skip(
        f"Label Studio is not installed in {LS_VENV}: make labelstudio-server (make test does)"
    )


def request(url: str, token: str, method: str = "GET") -> bytes:
    headers = {"Authorization": f"Token {token}"}
    with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers)) as r:
        return r.read()


@pytest.fixture(scope="module")
def label_studio(synthetic_root, tmp_path_factory):
    """A Label Studio server serving the synthetic dataset as local files: its URL, a personal access
    token (made with the legacy token the server starts with, as a person would in the UI) and that
    legacy token (for plain HTTP requests)."""
    executable = label_studio_or_skip()
    data_dir = tmp_path_factory.mktemp("label-studio")
    port, legacy = free_loopback_port(), secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "SENTRY"))} | {
        "LATEST_VERSION_CHECK": "false",  # it would ask pypi.org
        "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(synthetic_root),
    }
    command = [executable, "start", "--no-browser", "--data-dir", data_dir, "--internal-host"]
    command += ["127.0.0.1", "-p", str(port), "--username", "person@example.com", "--password"]
    command += [secrets.token_hex(8), "--user-token", legacy, "--enable-legacy-api-token"]
    log_path = data_dir / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # the first start migrates its database
        while True:
            if server.poll() is not None:
                pytest.fail(f"Label Studio exited: {log_path.read_text()[-2000:]}")
            try:
                request(f"{url}/health", legacy)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"Label Studio did not answer in time: {log_path.read_text()[-2000:]}"
                    )
                time.sleep(1)
        token = json.loads(request(f"{url}/api/token/", legacy, "POST"))["token"]
        yield url, token, legacy
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def person_paints(mask: np.ndarray, class_name: str) -> dict:
    """A brush region as Label Studio's editor sends it, encoded with the SDK's own converter."""
    from label_studio_sdk.converter.brush import mask2rle

    height, width = mask.shape
    return {
        "id": "person",
        "type": "brushlabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": width,
        "original_height": height,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": [class_name],
        },
    }


def project_named(client, title: str):
    (project,) = [p for p in client.projects.list() if p.title == title]
    return client.projects.get(project.id)


@pytest.mark.slow
def test_a_cycle_goes_to_a_real_label_studio_and_its_annotations_come_back(
    label_studio, own_ray, synthetic_root, tmp_path, monkeypatch, capsys
):
    from label_studio_sdk import LabelStudio

    url, token, legacy = label_studio
    monkeypatch.setenv(URL_ENV, url)
    monkeypatch.setenv(TOKEN_ENV, token)
    client = LabelStudio(base_url=url, api_key=token)
    run_dir = tmp_path / "runs" / "people"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        al_job.main(
            tiny(synthetic_root, tmp_path / "runs", uri, "people", 2)
            + ["--set", "al.oracle=labelstudio"]
        )
        folder = export_dir(run_dir, 1)
        sent = {t["data"]["sample_id"]: t for t in json.loads((folder / "tasks.json").read_text())}
        labelstudio_job.main(["push", str(run_dir)])
        labelstudio_job.main(["push", str(run_dir)])  # again: the same project, no task twice
        project = project_named(client, "segxal people cycle_01")
        assert (
            f"cycle 1 is in Label Studio: {url}/projects/{project.id}/data"
            in capsys.readouterr().out
        )
        assert project.label_config == (folder / "labelling_config.xml").read_text().strip()
        tasks = list(client.tasks.list(project=project.id))
        assert sorted(t.data["sample_id"] for t in tasks) == sorted(sent)
        pending = PendingCycle.load(run_dir, 1)
        images = {t.sample_id: Path(t.image_path) for t in pending.tasks}
        (storage,) = client.import_storage.local.list(project=project.id)
        assert all(path.resolve().is_relative_to(storage.path) for path in images.values())
        for t in tasks:  # the browser gets each image through the storage
            image = request(url + t.data["image"], legacy)
            assert image == images[t.data["sample_id"]].read_bytes()

        with pytest.raises(SystemExit, match="0 of 2 tasks annotated; submit the rest"):
            labelstudio_job.main(["pull", str(run_dir)])

        # the person accepts the first task's pre-annotation and paints all of the second image with a
        # class the model did not predict there
        predictions = {r.sample_id: r.prediction for r in pending.query.requests}
        first, second = sorted(sent)
        absent = next(c for c in range(19) if not (predictions[second] == c).any())
        height, width = Image.open(images[second]).size[::-1]
        for t in tasks:
            sample = t.data["sample_id"]
            result = (
                sent[sample]["predictions"][0]["result"]
                if sample == first
                else [person_paints(np.ones((height, width), bool), CITYSCAPES.class_names[absent])]
            )
            client.annotations.create(t.id, result=result, was_cancelled=False)
        labelstudio_job.main(["pull", str(run_dir), "--quiet"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "cycle 1: 2 annotated tasks fetched" in out
    decisions = {
        d["sample_id"]: d
        for d in pq.read_table(run_dir / "cycles" / "cycle_01" / "decisions.parquet").to_pylist()
    }
    assert decisions[first]["dice"] == 1.0 and decisions[first]["pixels"] == 0
    assert decisions[second]["pixels"] == predictions[second].size  # every pixel changed
    assert decisions[second]["dice"] == 0.0
    state = PoolState.load(run_dir / "pool_state.parquet")
    assert state.record(second)["oracle"] == "labelstudio"
    assert (folder / "export.json").is_file()
    # the run went on to cycle 2, which waits for people again and is in Label Studio already
    assert Progress.load(RunLayout(run_dir)).completed_cycle == 1
    following = project_named(client, "segxal people cycle_02")
    assert f"cycle 2 is in Label Studio: {url}/projects/{following.id}/data" in out
    assert following.task_number == len(
        json.loads((export_dir(run_dir, 2) / "tasks.json").read_text())
    )


def test_commands_say_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.setenv(TOKEN_ENV, "x")
    with pytest.raises(SystemExit, match=f"error: set {URL_ENV}: the Label Studio server's URL"):
        labelstudio_job.main(["push", str(tmp_path)])
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9")
    with pytest.raises(SystemExit, match=f"error: {tmp_path}: not a jobs.al run folder"):
        labelstudio_job.main(["push", str(tmp_path)])
