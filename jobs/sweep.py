"""Ray Tune sweep of PEBAL's m_in, m_out (m_in < m_out), β smoothness, β sparsity and λ, with ASHA on epochs.

    python -m jobs.sweep --config jobs/configs/pebal_demo.yaml [--set sweep.num_samples=8 ...]

Every trial is a Ray Train fine-tuning run (the ``scaling`` section) scored by AP on the AnomalyMix'd
validation split (FPR95 and AUROC reported too); ``sweep.max_concurrent`` trials run at once. Every trial
is an MLflow run nested under the sweep's run. The best trial's config (ready for ``jobs.pebal``) and
checkpoint are written to ``<output_dir>/<name>/sweep/best_config.yaml`` and ``best_checkpoint.pt`` and
logged. Margins are sampled, so ``pebal.margin_quantiles`` does not apply here.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from actors.pebal_train import prepare_pebal_job
from actors.tune_pebal import MlflowTrialCallback, SweepResult, run_sweep, trial_experiment
from jobs.common import check_tracking_or_exit, init_ray, parse_job_args, show_progress
from jobs.pebal import inputs_or_exit, pretrained_segmenter
from orchestrator.tracking import experiment_run, log_artifact, log_metrics, log_params, set_tags
from orchestrator.typed_config import to_dict
from segxal.markdown import markdown_table

log = logging.getLogger("jobs.sweep")


def trials_table(result: SweepResult) -> str:
    """Markdown: one row per trial with its sampled values and best epoch, best AP first."""
    header = [
        "trial",
        "m_in",
        "m_out",
        "β smooth",
        "β sparse",
        "λ",
        "best epoch",
        "AP",
        "FPR95",
        "AUROC",
        "status",
    ]
    rows = []
    for t in sorted(result.trials, key=lambda t: -(t.best_metrics or {}).get("val/ap", -1.0)):
        p, m = t.params, t.best_metrics or {}
        values = [
            f"{p['m_in']:.3f}",
            f"{p['m_in'] + p['margin_gap']:.3f}",
            f"{p['beta_smooth']:.2e}",
            f"{p['beta_sparse']:.2e}",
            f"{p['lam']:.3f}",
            str(int(m["epoch"])) if "epoch" in m else "-",
        ]
        values += [
            f"{100 * m[k]:.2f}" if k in m else "-" for k in ("val/ap", "val/fpr95", "val/auroc")
        ]
        rows.append([t.trial_id, *values, "failed" if t.error else "ok"])
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> SweepResult:
    args, config = parse_job_args(__doc__, argv=argv)
    check_tracking_or_exit(config.tracking.tracking_uri)
    progress = show_progress(config, args)
    if config.scaling.num_workers == 0:
        sys.exit(
            "config error: scaling.num_workers: 0 trains in the driver, but every sweep trial is a "
            "Ray Train run: set it to 1 or more"
        )
    if config.pebal.margin_quantiles is not None:
        log.warning("pebal.margin_quantiles is ignored by the sweep: the margins are sampled")
        config = replace(config, pebal=replace(config.pebal, margin_quantiles=None))
    inputs = inputs_or_exit(config, progress)
    run_dir = (Path(config.output_dir) / config.name / "sweep").absolute()
    init_ray()
    with experiment_run(
        config.tracking.tracking_uri,
        config.tracking.experiment,
        config.tracking.run_name or f"sweep-{config.name}",
        config,
    ) as run:
        set_tags({"job": "sweep"})
        pretrained = pretrained_segmenter(config, inputs, run_dir, progress)
        job = prepare_pebal_job(config, pretrained, inputs.outliers, progress)
        callback = MlflowTrialCallback(
            config.tracking.tracking_uri, run.info.experiment_id, run.info.run_id, config
        )
        result = run_sweep(
            job,
            config.sweep,
            config.scaling,
            run_dir / "ray",
            f"tune-{run.info.run_id[:8]}",
            config.seed,
            [callback],
            verbose=0 if args.quiet else 1,
        )
        best = result.best
        pretrained_path = config.pebal.pretrained or str((run_dir / "pretrained.pt").resolve())
        best_config = trial_experiment(config, best.params)
        best_config = replace(
            best_config, pebal=replace(best_config.pebal, pretrained=pretrained_path)
        )
        (run_dir / "best_config.yaml").write_text(
            yaml.safe_dump(to_dict(best_config), sort_keys=False)
        )
        shutil.copyfile(best.checkpoint, run_dir / "best_checkpoint.pt")
        (run_dir / "trials.md").write_text(trials_table(result))
        set_tags({"best_trial": best.trial_id})
        log_params(
            {
                "best.m_in": best_config.pebal.m_in,
                "best.m_out": best_config.pebal.m_out,
                "best.beta_smooth": best_config.pebal.beta_smooth,
                "best.beta_sparse": best_config.pebal.beta_sparse,
                "best.lam": best_config.pebal.lam,
            }
        )
        log_metrics(
            {
                f"best/{key.split('/')[-1]}": value
                for key, value in best.best_metrics.items()
                if key != "epoch"
            }
        )
        for name in ("best_config.yaml", "best_checkpoint.pt", "trials.md"):
            log_artifact(run_dir / name, "sweep")
    print(trials_table(result), end="")
    print(
        f"best trial {best.trial_id}: AP {best.best_metrics['val/ap']:.4f}; config {run_dir / 'best_config.yaml'}, "
        f"checkpoint {run_dir / 'best_checkpoint.pt'}"
    )
    return result


if __name__ == "__main__":
    main()
