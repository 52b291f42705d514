"""Stopping rules (al.stop): known answers for each rule, and a run that stops, says why and stays
stopped on resume."""

import math

import pytest
from helpers import fake_run, loop_pool

from orchestrator.config import ActiveLearningConfig
from orchestrator.pool_state import PoolState
from orchestrator.run import Progress
from orchestrator.run_layout import RunLayout
from orchestrator.stopping import StopConfig, stop_reason


@pytest.mark.parametrize(
    "trace, stops",
    [
        ([0.10, 0.20, 0.30], False),
        (
            [0.10, 0.30, 0.303, 0.304],
            True,
        ),  # the last 2 gained 0.004 over the best before: <= 0.005
        ([0.10, 0.30, 0.303, 0.306], False),  # 0.006
        ([0.10, 0.30, 0.25, 0.29], True),  # worse than the best before
        ([0.30, 0.31], False),  # too short for patience 2
        ([math.nan, 0.30, 0.30, 0.30], True),  # a cycle without the metric does not count
    ],
)
def test_the_miou_plateau(trace, stops):
    config = StopConfig(plateau="val_miou", epsilon=0.005, patience=2)
    assert (stop_reason(config, trace, 0.0) is not None) == stops


@pytest.mark.parametrize(
    "trace, stops",
    [
        ([0.9, 0.7, 0.695, 0.69], True),  # moves of 0.005 with epsilon 0.01
        ([0.9, 0.7, 0.69, 0.67], False),  # the last move is 0.02
        ([0.9, 0.7], False),
    ],
)
def test_the_mean_score_plateau(trace, stops):
    config = StopConfig(plateau="mean_score", epsilon=0.01, patience=2)
    assert (stop_reason(config, trace, 0.0) is not None) == stops


def test_the_cost_rule():
    config = StopConfig(max_cost=10)
    assert stop_reason(config, [], 9.9) is None
    assert stop_reason(config, [], 10.0) == "cost: 10 spent, al.stop.max_cost is 10"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_cost": 0}, "max_cost"), ({"epsilon": -1}, "epsilon"), ({"patience": 0}, "patience")],
)
def test_bad_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StopConfig(**kwargs)


@pytest.fixture
def pool(synthetic_root, tmp_path):
    return loop_pool(synthetic_root, tmp_path)


def run(run_dir, state, truth, cycles, al, progress=None):
    owner, _, history = fake_run(run_dir, state, truth, cycles, al, progress=progress)
    return owner, history


def test_a_run_stops_at_its_cost_and_stays_stopped_on_resume(pool, tmp_path):
    state, truth = pool
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    al = ActiveLearningConfig(
        strategy="entropy", budget=2, theta=0.0, stop=StopConfig(max_cost=1e-9)
    )
    owner, history = run(run_dir, state, truth, 5, al)
    costs = [h["oracle/total_cost"] for h in history]
    first = next(i for i, c in enumerate(costs) if c > 0)
    assert len(history) == first + 1  # the cycle that spent it is the last
    progress = Progress.load(RunLayout(run_dir))
    assert progress.stopped.startswith("cost: ") and progress.completed_cycle == first
    resumed_state = PoolState.load(RunLayout(run_dir).snapshot(first))
    _, again = run(run_dir, resumed_state, truth, 5, al, progress)
    assert again == []


def test_a_run_stops_when_the_pool_is_spent(pool, tmp_path):
    state, truth = pool
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    al = ActiveLearningConfig(strategy="random", budget=4, theta=0.0)  # 8 unlabelled: 2 cycles
    owner, history = run(run_dir, state, truth, 5, al)
    assert len(history) == 3 and history[-1]["pool/unlabelled"] == 0
    assert Progress.load(RunLayout(run_dir)).stopped == (
        "budget spent: the pool has nothing left to query"
    )


def test_the_mean_score_is_logged_and_tracked(pool, tmp_path):
    state, truth = pool
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    al = ActiveLearningConfig(strategy="entropy", budget=2, theta=0.0, stop=StopConfig(plateau="mean_score", epsilon=1.0, patience=1))  # fmt: skip
    _, history = run(run_dir, state, truth, 5, al)
    progress = Progress.load(RunLayout(run_dir))
    assert progress.trace[0] != progress.trace[0]  # cycle 0 queries nothing: NaN
    assert progress.trace[1:] == [h["query/mean_score"] for h in history[1:]]
    assert len(history) == 3 and progress.stopped.startswith("plateau: the mean acquisition")
