"""Reading images, label maps and disparity maps, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from error
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from error
    return height, width


def open_rgb(path: str | Path) -> Image.Image:
    """The decoded image as 8-bit RGB. 16-bit grey images are scaled by their bit depth (65535 -> 255;
    Pillow itself reads 16-bit colour PNGs as 8 bits per channel); 32-bit integer and floating-point
    images have no range to scale by and are refused, naming the file."""
    image = _open(path)
    if image.mode.startswith("I;16"):
        grey = np.round(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise DataError(
            f"{path}: a {kind} image (mode {image.mode}) has no defined range: "
            "convert it to 8- or 16-bit RGB or grey"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 of :func:`open_rgb`."""
    return np.asarray(open_rgb(path))


def read_label(path: str | Path) -> np.ndarray:
    """(H, W) uint8 raw label ids from a single-channel (L or P mode) PNG."""
    image = _open(path)
    if image.mode not in ("L", "P", "I;16", "I"):
        raise DataError(f"{path}: label must be a single-channel image, got mode {image.mode}")
    array = np.asarray(image)
    if array.max(initial=0) > 255:
        raise DataError(f"{path}: label ids above 255 are not supported")
    return array.astype(np.uint8)


def read_disparity(path: str | Path) -> np.ndarray:
    """(H, W) float32 disparity in pixels from a Cityscapes-format 16-bit PNG; 0 where invalid.

    Cityscapes stores ``p = disparity * 256 + 1`` with ``p = 0`` meaning invalid.
    """
    raw = np.asarray(_open(path)).astype(np.float32)
    return np.where(raw > 0, (raw - 1.0) / 256.0, 0.0).astype(np.float32)


def write_disparity(path: str | Path, disparity: np.ndarray) -> None:
    """Inverse of :func:`read_disparity`; non-positive or non-finite disparity is written as invalid."""
    valid = np.isfinite(disparity) & (disparity > 0)
    raw = np.where(valid, np.clip(disparity * 256.0 + 1.0, 1, 65535), 0).astype(np.uint16)
    Image.fromarray(raw).save(path)


def check_same_size(
    image_path: str, image_hw: tuple[int, int], other_path: str, other_hw: tuple[int, int]
) -> None:
    if tuple(image_hw) != tuple(other_hw):
        raise DataError(
            f"{other_path}: size {other_hw[0]}x{other_hw[1]} does not match image {image_path} "
            f"({image_hw[0]}x{image_hw[1]})"
        )
