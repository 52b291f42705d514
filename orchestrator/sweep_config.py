"""Ray Tune search over PEBAL's margins and regularisation: the ``sweep:`` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SweepConfig:
    """Search space (uniform ranges, log-uniform for the β and λ weights) and ASHA settings.

    Trials with ``m_in >= m_out`` are never sampled: m_out is drawn as m_in plus a positive gap.
    The default ranges suit models whose inlier free energy is far below zero (the paper's -12/-6);
    a small U-Net's sits near -3, so narrow ``m_in`` to its energy (see ``jobs/configs/pebal_demo.yaml``).
    ``max_concurrent``: trials (Ray Train runs) in flight at once; each takes ``scaling``'s workers.
    ``trial_cpus``: CPUs Tune reserves for each trial's driver function, which only launches and
    watches its Train run (0: the workers' CPUs are all a trial needs).
    ASHA (``ray.tune.schedulers.ASHAScheduler``) runs on epochs: a trial is first judged after
    ``grace_period`` epochs, and 1 / ``reduction_factor`` of the trials go on at every rung, up to
    ``pebal.finetune.epochs``.
    """

    num_samples: int = 8
    max_concurrent: int = 2
    m_in: tuple[float, float] = (-16.0, -2.0)
    margin_gap: tuple[float, float] = (1.0, 8.0)
    beta_smooth: tuple[float, float] = (1e-5, 1e-2)
    beta_sparse: tuple[float, float] = (1e-7, 1e-4)
    lam: tuple[float, float] = (0.01, 1.0)
    grace_period: int = 1
    reduction_factor: int = 2
    trial_cpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError("num_samples and max_concurrent must be >= 1")
        for name in ("m_in", "margin_gap", "beta_smooth", "beta_sparse", "lam"):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(
                    f"{name}: the range must be (low, high) with low < high, got {(low, high)}"
                )
        if self.margin_gap[0] <= 0:
            raise ValueError("margin_gap must be positive so that m_in < m_out")
        for name in ("beta_smooth", "beta_sparse", "lam"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(
                    f"{name}: a log-uniform range needs low > 0, got {getattr(self, name)}"
                )
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError(
                f"grace_period must be >= 1 and reduction_factor >= 2, got {self.grace_period}, {self.reduction_factor}"
            )
        if self.trial_cpus < 0:
            raise ValueError(f"trial_cpus must be >= 0, got {self.trial_cpus}")
