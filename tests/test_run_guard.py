"""One job per run folder, a resume that keeps the experiment, and clean errors for a malformed --set
value or a damaged progress.json: all before Ray starts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import REPO

from jobs import al as al_job
from orchestrator.run_layout import RunLayout
from orchestrator.run_lock import RunFolderInUse, exclusive_run

HOLD = (
    "import sys, time\n"
    "from orchestrator.run_layout import RunLayout\n"
    "from orchestrator.run_lock import exclusive_run\n"
    "with exclusive_run(RunLayout(sys.argv[1])):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def holder(folder):
    """A real process holding the run folder; returns once it holds it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_job_on_a_held_run_folder_is_refused_at_once_with_the_holders_pid(tmp_path):
    folder = tmp_path / "runs" / "race"
    process = holder(folder)
    try:
        start = time.monotonic()
        refused = subprocess.run(
            [sys.executable, "-m", "jobs.al", "--quiet", "--set", f"output_dir={tmp_path / 'runs'}",
             "--set", "name=race"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0
        assert f"is in use by another job (pid {process.pid})" in refused.stderr
        assert time.monotonic() - start < 60  # refused, not queued behind the holder
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # it wrote nothing
    finally:
        process.kill()
        process.wait()
    with exclusive_run(RunLayout(folder)):  # a killed holder leaves no stale lock
        with pytest.raises(RunFolderInUse, match=f"pid {os.getpid()}"):
            with exclusive_run(RunLayout(folder)):
                pass


def test_the_lock_is_released_when_the_holder_is_killed(tmp_path):
    process = holder(tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with exclusive_run(RunLayout(tmp_path)):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def fake_run(tmp_path, **config):
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir(parents=True)
    layout.config_file.write_text(yaml.safe_dump({"name": "run", **config}))
    return layout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "jobs/configs/demo.yaml"], "drop --config"),
        (["--set", "seed=3"], "--set seed cannot change on resume"),
        (["--set", "al.strategy=random", "--set", "data.root=/x"], "al.strategy, data.root cannot"),
    ],
)
def test_resume_refuses_another_experiment(tmp_path, argv, message):
    layout = fake_run(tmp_path)
    with pytest.raises(SystemExit, match=message):
        al_job.main(["--resume", str(layout.root), *argv])
    assert not layout.overrides_file.exists()


def test_accepted_resume_overrides_are_recorded_with_their_time(tmp_path, monkeypatch):
    layout = fake_run(tmp_path, al={"cycles": 2})
    monkeypatch.setattr(
        al_job, "check_tracking_or_exit", lambda uri: (_ for _ in ()).throw(SystemExit("stop"))
    )
    with pytest.raises(SystemExit, match="stop"):
        al_job.main(
            ["--resume", str(layout.root), "--set", "al.cycles=5", "--set", "tracking.experiment=x"]
        )
    (entry,) = [json.loads(line) for line in layout.overrides_file.read_text().splitlines()]
    assert entry["set"] == ["al.cycles=5", "tracking.experiment=x"] and entry["time"].startswith(
        "20"
    )
    saved = yaml.safe_load(layout.config_file.read_text())
    assert saved["al"]["cycles"] == 5 and saved["tracking"]["experiment"] == "x"


def test_a_damaged_progress_file_is_a_clean_error(tmp_path):
    layout = fake_run(tmp_path)
    layout.progress_file.write_text('{"completed_cycle": 1,')
    with pytest.raises(SystemExit, match=r"progress\.json is damaged"):
        al_job.main(
            [
                "--resume",
                str(layout.root),
                "--set",
                "tracking.tracking_uri=sqlite:///" + str(tmp_path / "m.db"),
            ]
        )


def test_a_set_value_that_is_not_yaml_names_the_key(capsys):
    with pytest.raises(SystemExit):
        al_job.main(["--set", "data.image_size=[32,"])
    assert "the value of data.image_size is not valid YAML" in capsys.readouterr().err
