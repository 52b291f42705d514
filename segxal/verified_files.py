"""Files with a verified history: each version of ``state.parquet`` is published with a
``state.parquet.sha256`` sidecar (the whole file's SHA-256, ``sha256sum -c`` format), and the previous
good version is rotated to ``state.prev.parquet`` (+ its sidecar).

Each file is written to a temporary file in the same folder, fsynced and renamed into place, and the
steps are ordered so that after a crash at any point at least one of the two files verifies and holds the
latest completed write; a truncated or corrupted file fails verification and is never rotated over the
previous good one. What the file holds is the caller's business (``orchestrator.pool_state``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from segxal.files import naming, tmp_name, write_atomically, write_synced

T = TypeVar("T")


class VerifiedFileError(ValueError):
    """A file is missing, or disagrees with its checksum sidecar; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def previous_path(path: str | Path) -> Path:
    """Where ``publish`` keeps the previous good version: ``state.parquet`` -> ``state.prev.parquet``."""
    path = Path(path)
    if path.name.endswith(".prev.parquet"):
        return path
    return path.with_name(
        f"{path.stem}.prev{path.suffix}" if path.suffix == ".parquet" else f"{path.name}.prev"
    )


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def publish(path: Path, write: Callable[[BinaryIO], T], expected_digest: str | None = None) -> T:
    """Write a new version of ``path`` through ``write(handle)`` in the crash-safe order of the module doc;
    returns what ``write`` returns. With ``expected_digest``, the written file must have that SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with naming(path):
            result = write_synced(tmp, write)
        digest = sha256_file(tmp)
        if expected_digest is not None and digest != expected_digest:
            raise VerifiedFileError(
                path, f"copy has sha256 {digest}, expected {expected_digest}: the source changed"
            )
        current = verified_digest(path)
        if current is not None:
            # Order matters: each window between these steps leaves one file that verifies.
            write_checksum(previous_path(path), current)
            os.replace(path, previous_path(path))
            fsync_dir(path.parent)
        elif path.exists():
            warnings.warn(
                f"{path}: failed verification; overwriting it and keeping {previous_path(path)}",
                stacklevel=2,
            )
        os.replace(tmp, path)
        fsync_dir(path.parent)
        write_checksum(path, digest)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checksum(path: Path, digest: str) -> None:
    """Atomically write ``path``'s sidecar in ``sha256sum`` format."""
    target = checksum_path(path)
    write_atomically(
        target, lambda handle: handle.write(f"{digest}  {path.name}\n".encode("ascii"))
    )
    fsync_dir(target.parent)


def read_checksum(path: Path) -> str:
    sidecar = checksum_path(path)
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError:
        raise VerifiedFileError(
            path, f"checksum file {sidecar.name} not found, cannot verify the file"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise VerifiedFileError(
            path, f"cannot read checksum file {sidecar.name} ({error})"
        ) from None
    digest = text.split(maxsplit=1)[0] if text.strip() else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise VerifiedFileError(path, f"checksum file {sidecar.name} is malformed")
    return digest


def verified_digest(path: Path) -> str | None:
    """``path``'s digest if the file and its sidecar exist and agree, else None."""
    if not path.is_file():
        return None
    try:
        expected = read_checksum(path)
    except VerifiedFileError:
        return None
    return expected if sha256_file(path) == expected else None


def verify(path: Path) -> None:
    """Raise :class:`VerifiedFileError` unless ``path`` agrees with its sidecar."""
    expected = read_checksum(path)
    actual = sha256_file(path)
    if actual != expected:
        raise VerifiedFileError(
            path,
            f"checksum mismatch (sha256 {actual}, expected {expected}): the file is truncated or corrupted",
        )
