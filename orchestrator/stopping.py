"""Stopping rules (``al.stop``): when a run ends before ``al.cycles``.

- ``max_cost``: the cumulative annotation cost (``oracle/total_cost``, see ``orchestrator.cost``) reached it;
- ``plateau``: the tracked value has not improved by more than ``epsilon`` over the last ``patience``
  cycles: ``val_miou`` (the best of the last ``patience`` cycles is at most ``epsilon`` above the best
  before them) or ``mean_score`` (the mean acquisition score of the queried images or regions moved by at
  most ``epsilon`` in each of the last ``patience`` cycles);
- always: the pool has nothing left to query (the budget is spent).

The run keeps the tracked values in ``progress.json``, so a resumed run decides as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator.records import Metric

PLATEAU_METRICS = {"val_miou": Metric.VAL_MIOU, "mean_score": Metric.MEAN_SCORE}


@dataclass(frozen=True)
class StopConfig:
    max_cost: float | None = None
    plateau: Literal["none", "val_miou", "mean_score"] = "none"
    epsilon: float = 0.005
    patience: int = 2

    def __post_init__(self) -> None:
        if self.max_cost is not None and not self.max_cost > 0:
            raise ValueError(f"max_cost must be > 0, got {self.max_cost}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    @property
    def tracked(self) -> str | None:
        """The metric key the plateau rule follows, if any."""
        return PLATEAU_METRICS.get(self.plateau)


def stop_reason(config: StopConfig, trace: Sequence[float], total_cost: float) -> str | None:
    """Why the run stops after the cycle just done (None: it goes on). ``trace``: the tracked metric at
    every cycle so far (NaN where a cycle had none)."""
    if config.max_cost is not None and total_cost >= config.max_cost:
        return f"cost: {total_cost:g} spent, al.stop.max_cost is {config.max_cost:g}"
    values = [v for v in trace if not math.isnan(v)]
    k = config.patience
    if config.plateau == "val_miou" and len(values) > k:
        gain = max(values[-k:]) - max(values[:-k])
        if gain <= config.epsilon:
            return (
                f"plateau: val/miou gained {gain:.4f} <= {config.epsilon} over the last {k} cycles"
            )
    if config.plateau == "mean_score" and len(values) > k:
        moves = [abs(b - a) for a, b in zip(values[-k - 1 : -1], values[-k:], strict=True)]
        if max(moves) <= config.epsilon:
            return (
                f"plateau: the mean acquisition score moved by at most {max(moves):.4f} <= "
                f"{config.epsilon} in each of the last {k} cycles"
            )
    return None
