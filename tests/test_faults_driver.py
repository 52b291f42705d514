"""The jobs.al driver killed with SIGKILL in the middle of cycle 1 (its pool state already changed by the
Dice gate, retraining under way): its embedded Ray goes down with it, and ``--resume`` finishes the run
with the final pool state of an uninterrupted run with the same seed, in the same MLflow run.

Only the raylet's two agents outlive the driver: they notice the raylet's death within seconds but try
to reach the dead GCS before they exit (40-80 s later); the test ends them itself."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from helpers import REPO, comparable_pool_state, tiny
from procfs import command_line, descendants, kill_exactly, wait_gone

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 300
LINGERING_AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def job_env() -> dict:
    env = {
        key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"
    }  # its own embedded Ray
    return {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start_job(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.al", *args],
            cwd=REPO,
            env=job_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish_job(job: subprocess.Popen, log: Path) -> None:
    assert job.wait(timeout=JOB_TIMEOUT_S) == 0, log.read_text()[-3000:]


def kill_job(job: subprocess.Popen) -> dict[int, int]:
    """SIGKILL the driver ``job``; returns the processes it had started, {pid: start time}."""
    started = descendants(job.pid)
    job.kill()
    job.wait()
    return started


@contextlib.contextmanager
def cleaned_up(job: subprocess.Popen):
    """``job``, and in the end neither it nor a process it started left running."""
    try:
        yield job
    finally:
        if job.poll() is None:
            kill_exactly(kill_job(job))


def kill_when(job: subprocess.Popen, log: Path, ready: Path) -> dict[int, int]:
    """SIGKILL the driver ``job`` as soon as ``ready`` exists; returns the processes it had started."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ready.exists():
        assert job.poll() is None, (
            f"the driver ended before {ready.name}:\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no {ready} after {JOB_TIMEOUT_S} s"
        time.sleep(0.05)
    return kill_job(job)


def test_driver_killed_mid_cycle_then_resumed_matches_an_uninterrupted_run(
    own_ray, synthetic_root, tmp_path
):
    runs, uri, killed_dir = (
        tmp_path / "runs",
        f"sqlite:///{tmp_path / 'killed.db'}",
        tmp_path / "runs" / "killed",
    )
    straight_log, killed_log = tmp_path / "straight.log", tmp_path / "killed.log"
    # on Ray Train: its start-up keeps cycle 1's training going for seconds after the gate's decisions,
    # where the kill lands (training in the driver would be over before the kill)
    on_ray_train = ["--set", "scaling.num_workers=1"]
    # the uninterrupted run alongside the interrupted one: most of a job's time is Ray starting up
    straight = start_job(
        tiny(synthetic_root, runs, f"sqlite:///{tmp_path / 'straight.db'}", "straight", 1)
        + on_ray_train,
        straight_log,
    )
    with (
        cleaned_up(straight),
        cleaned_up(
            start_job(tiny(synthetic_root, runs, uri, "killed", 1) + on_ray_train, killed_log)
        ) as killed,
    ):
        ray_processes = kill_when(
            killed, killed_log, killed_dir / "cycles" / "cycle_01" / "decisions.parquet"
        )
        assert len(ray_processes) > 3  # GCS, raylet, dashboard, workers...
        left = {pid: command_line(pid) for pid in wait_gone(ray_processes, timeout_s=10)}
        # a worker exits when it notices its raylet is gone, on its own clock: Ray Train's async
        # DatasetManager actor once took over 10 s (two jobs on 2 cores); a leak outlives 30 s more
        workers = {
            pid: ray_processes[pid] for pid, name in left.items() if name not in LINGERING_AGENTS
        }
        gone = set(workers) - set(wait_gone(workers, timeout_s=30))
        left = {pid: name for pid, name in left.items() if pid not in gone}
        kill_exactly({pid: ray_processes[pid] for pid in left})
        assert set(left.values()) <= LINGERING_AGENTS, f"the driver's Ray outlived it: {left}"
        assert not (
            killed_dir / "cycles" / "cycle_01" / "model.pt"
        ).exists()  # killed before cycle 1 ended
        with cleaned_up(start_job(["--resume", str(killed_dir), "--quiet"], killed_log)) as resumed:
            finish_job(resumed, killed_log)
        finish_job(straight, straight_log)
    assert comparable_pool_state(killed_dir).equals(comparable_pool_state(runs / "straight"))
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val/miou")
    assert [m.step for m in history] == [0, 1]  # cycle 0 from before the kill, cycle 1 after
