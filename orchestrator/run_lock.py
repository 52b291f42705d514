"""One job at a time on a run folder: an exclusive ``flock`` on ``runs/<name>/.lock``, taken before the
job writes anything there and held until it ends, resume included. The kernel drops the lock when the
holder's process ends however it ends, so a crash leaves no stale lock; the file keeps the holder's pid
for the message a second job gets."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.run_layout import RunLayout


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder."""


@contextmanager
def exclusive_run(layout: RunLayout) -> Iterator[None]:
    """Hold ``layout``'s folder for the ``with`` block; another holder is refused at once."""
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(
        layout.lock_file, os.O_RDWR | os.O_CREAT, 0o644
    )  # not inherited by child processes
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderInUse(
                f"{layout.root} is in use by another job (pid {holder}): wait for it to end, "
                "or give this run another name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
