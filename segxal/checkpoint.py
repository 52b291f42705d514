"""Atomic checkpoint files loaded with ``weights_only=True`` (no arbitrary code on load)."""

from __future__ import annotations

from pathlib import Path

import torch

from segxal.files import write_atomically


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (tensors, primitives, nested dicts/lists) so that a crash never leaves a
    partial file at ``path``."""
    write_atomically(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path}: cannot load checkpoint ({error})") from error


def load_segmenter(path: str | Path) -> dict:
    """The ``model`` entry of a segmenter checkpoint (``UNet.to_checkpoint()``, as ``jobs.train``, the
    active-learning cycles and Ray Train write it); any other file is a :class:`CheckpointError`
    naming it."""
    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict) or "unet_config" not in state["model"]:
        raise CheckpointError(
            f"{path}: not a segmenter checkpoint (no 'model' entry written by UNet.to_checkpoint(); "
            "jobs.train and Ray Train write such files)"
        )
    return state["model"]
