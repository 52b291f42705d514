"""Command-line plumbing shared by the jobs: arguments, config, logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from orchestrator.config import ExperimentConfig, load_experiment
from orchestrator.typed_config import ConfigError


def parse_job_args(
    description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, argv: list[str] | None = None
) -> tuple[argparse.Namespace, ExperimentConfig]:
    """``--config FILE``, repeated ``--set key=value`` and ``--quiet``; exits with a message on a config error."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML experiment config (defaults apply to missing keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = load_experiment(args.config, args.overrides)
    except ConfigError as error:
        parser.exit(2, f"config error: {error}\n")
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    return args, config


def show_progress(config: ExperimentConfig, args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, unless the config or ``--quiet`` turns them off."""
    return config.progress and not args.quiet and sys.stderr.isatty()


def setup_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def init_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray
    bound to loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: loopback only
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, configure_logging=False)
