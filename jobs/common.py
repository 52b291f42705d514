"""Command-line plumbing shared by the jobs: arguments, config, logging."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from actors.ray_train import VERBOSE
from orchestrator.config import ExperimentConfig, load_experiment
from orchestrator.tracking import TrackingError, check_tracking_reachable
from orchestrator.typed_config import ConfigError


def parse_job_args(
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> tuple[argparse.Namespace, ExperimentConfig]:
    """``--config FILE``, repeated ``--set key=value`` and ``--quiet``; exits with a message on a config error."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML experiment config (defaults apply to missing keys)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also every epoch's line, Ray Train's reports and checkpoints, and MLflow's notes",
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = load_experiment(args.config, args.overrides)
    except ConfigError as error:
        parser.exit(2, f"config error: {error}\n")
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    # with --verbose: the project's own detail (every epoch, every cycle's log line) and MLflow's notes
    # (store set-up, the system metrics monitor)
    for package in ("segxal", "orchestrator", "actors", "jobs"):
        logging.getLogger(package).setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    logging.getLogger("mlflow").setLevel(logging.NOTSET if args.verbose else logging.WARNING)
    if args.verbose:
        os.environ[VERBOSE] = "1"  # Ray Train's workers and controller read it (actors.ray_train)
    return args, config


def show_progress(config: ExperimentConfig, args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, unless the config or ``--quiet`` turns them off."""
    return config.progress and not args.quiet and sys.stderr.isatty()


def check_tracking_or_exit(tracking_uri: str) -> None:
    """Stop before any work (and before Ray starts) when the MLflow store cannot be reached."""
    try:
        check_tracking_reachable(tracking_uri)
    except TrackingError as error:
        raise SystemExit(f"error: {error}") from error


def print_results_hint(tracking_uri: str, run_dir=None) -> None:
    """How to look at what a job logged."""
    where = f"run folder: {run_dir}\n" if run_dir is not None else ""
    mlflow = Path(sys.executable).with_name("mlflow")
    print(
        f"{where}open the results: {mlflow} ui --backend-store-uri {tracking_uri} "
        "--host 127.0.0.1 --port 5000 --workers 1  (then http://127.0.0.1:5000)"
    )


def setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


# Ports below the kernel's ephemeral range and above `ray start`'s default worker ports (10002-19999).
# Nothing else on the machine is handed one at random: the kernel's port-0 binds and Ray's own port
# choices (random, from an ephemeral port upwards) land in the ephemeral range, so a port chosen here
# and released stays free until Ray binds it, even while another Ray starts beside us.
QUIET_PORTS_START = 20000
EPHEMERAL_PORTS_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that no other process is likely to be given before
    we use it (see ``QUIET_PORTS_START``). The choice ignores ``random``'s seed: two jobs run with the
    same seed must not pick the same port."""
    ephemeral_start = (
        int(EPHEMERAL_PORTS_FILE.read_text().split()[0]) if EPHEMERAL_PORTS_FILE.exists() else 32768
    )
    candidates = list(range(QUIET_PORTS_START, ephemeral_start))
    secrets.SystemRandom().shuffle(candidates)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(
        f"no free TCP port on 127.0.0.1 between {QUIET_PORTS_START} and {ephemeral_start}"
    )


# Ray 2.60 waits a fixed 30 s for its node to register (ray/_private/node.py, no setting lengthens it),
# then raises a bare Exception with this text.
NODE_START_TIMEOUT = "timed out during startup"


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``); otherwise start a local Ray of
    our own (``address="local"``: never a ``ray start`` cluster that happens to run here), bound to
    loopback, with its dashboard on a free loopback port announced in ``RAY_API_SERVER_ADDRESS``.

    Why the dashboard: Ray Train V2 starts a PlacementGroupCleaner with every run, which frees the run's
    worker placement group if the run's controller dies; it asks the State API (served by the dashboard)
    whether the controller is alive. When ASHA stops a Tune trial, its Train controller goes down with it;
    without a dashboard the placement group leaks and the next trials wait forever for its CPUs.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    port = free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = (
        f"http://127.0.0.1:{port}"  # inherited by the Ray processes
    )
    # Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does that, but Ray reads it when it is imported,
    # which may have happened already; set the constant it was read into as well.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = (
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
    )
    start = functools.partial(
        ray.init,
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        configure_logging=False,
    )
    for attempt in (1, 2):
        try:
            start()
            break
        except Exception as error:  # Ray raises a bare Exception for it
            if NODE_START_TIMEOUT not in str(error):
                raise
            ray.shutdown()
            if attempt == 2:
                raise SystemExit(
                    "error: the local Ray's node did not come up within Ray's 30 s, twice: the "
                    "machine is too loaded to start Ray now (see `uptime`); try again when it is "
                    "quieter, or join a running cluster with RAY_ADDRESS=..."
                ) from error
            logging.getLogger(__name__).warning(
                "the local Ray's node did not come up within 30 s (a loaded machine): trying once more"
            )
    private_ray_token()


def private_ray_token() -> Path | None:
    """The token file of Ray's token authentication, made readable by its owner only: Ray writes
    ``~/.ray/auth_token`` with the process's umask (0644 under the usual 022), so on a home folder that
    others may enter (0755, the Debian and Ubuntu default) any local user could read it and submit
    jobs. Returns the file, or None when no token file is in use."""
    if os.environ.get("RAY_AUTH_TOKEN"):  # the token is given in the environment, not a file
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file():
        return None
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path
