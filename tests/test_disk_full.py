"""A full disk while the run writes its state: one line that names the file and says how to go on, a
state that still loads, and a resume that ends as an uninterrupted run does. jobs.al runs in-process on
a fake backend (no Ray), so the failure can be injected where the run writes."""

import errno

import pytest
from helpers import SIZE, FakeBackend, comparable_pool_state, ground_truth, tiny

import actors.al_backend
from jobs import al as al_job
from orchestrator.pool_state import PoolState
from orchestrator.run import Progress
from orchestrator.run_layout import RunLayout
from segxal import verified_files
from segxal.data.cityscapes import cityscapes_manifest


class Backend(FakeBackend):
    def shutdown(self):
        pass


@pytest.fixture
def no_ray(monkeypatch, synthetic_root):
    truth = ground_truth(cityscapes_manifest(synthetic_root, "train"), SIZE)
    monkeypatch.setattr(al_job, "init_ray", lambda: None)
    monkeypatch.setattr(
        actors.al_backend,
        "RayCycleBackend",
        lambda config, layout, *a, **k: Backend(truth, layout.root),
    )


def job(synthetic_root, tmp_path, name, *extra):
    argv = tiny(synthetic_root, tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}", name, 2)
    return [*argv, "--set", f"data.image_size=[{SIZE[0]}, {SIZE[1]}]", *extra]


def test_a_full_disk_while_saving_the_pool_state_is_one_line_and_the_run_resumes(
    no_ray, synthetic_root, tmp_path, monkeypatch
):
    straight = al_job.main(job(synthetic_root, tmp_path, "straight"))
    real_write = verified_files.write_synced

    def full_disk(path, write):
        if "cycle_01" in str(path):  # the end-of-cycle-1 snapshot
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, write)

    monkeypatch.setattr(verified_files, "write_synced", full_disk)
    layout = RunLayout(tmp_path / "runs" / "full")
    with pytest.raises(SystemExit) as stopped:
        al_job.main(job(synthetic_root, tmp_path, "full"))
    message = str(stopped.value.code)
    assert message == (
        f"error: cannot write {layout.snapshot(1)}: No space left on device. The run's state is kept "
        f"as of its last completed step: fix the cause (free disk space), then continue with "
        f"python -m jobs.al --resume {layout.root}"
    )
    assert PoolState.load(layout.state_file).count("labelled") > 0  # loads, no fallback needed
    assert Progress.load(layout).completed_cycle == 0
    monkeypatch.setattr(verified_files, "write_synced", real_write)  # space freed
    resumed = al_job.main(["--resume", str(layout.root), "--quiet"])
    assert [h["pool/labelled"] for h in resumed] == [h["pool/labelled"] for h in straight[1:]]
    assert comparable_pool_state(layout.root).equals(
        comparable_pool_state(tmp_path / "runs" / "straight")
    )
