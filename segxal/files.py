"""Files written so that a crash never leaves a partial one: a temporary file beside the target,
fsynced, then renamed over it. A reader sees the old file or the complete new one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")


def tmp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_synced(path: Path, write: Callable[[BinaryIO], T]) -> T:
    """Write ``path`` through ``write(handle)`` and fsync it; returns what ``write`` returns."""
    with open(path, "wb") as handle:
        result = write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return result


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised while writing ``path`` (through its temporary file) names ``path``: a write
    that fails for want of space names no file at all, and the temporary's name means nothing to a user."""
    try:
        yield
    except OSError as error:
        if error.filename == str(path) or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def write_atomically(path: str | Path, write: Callable[[BinaryIO], T]) -> T:
    """Write ``path`` through ``write(handle)``; returns what ``write`` returns. If anything fails, the
    old file (if any) is left as it was and no temporary file stays behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with naming(path):
            result = write_synced(tmp, write)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return result
