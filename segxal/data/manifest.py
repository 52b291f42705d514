"""Dataset manifests: one Arrow table row per sample, the unit every other part refers to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from segxal.data.io import DataError, check_same_size, image_size

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("label_path", pa.string()),
        pa.field("depth_path", pa.string()),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
)


@dataclass(frozen=True)
class SampleFiles:
    sample_id: str
    split: str
    image_path: Path
    label_path: Path | None = None
    depth_path: Path | None = None


def build_manifest(samples: list[SampleFiles], source: str) -> pa.Table:
    """Check that every file exists and label/depth sizes match the image; return a sorted manifest.

    Paths are stored absolute: Ray workers read them from another working directory. ``source`` names the
    dataset folder in the error raised when there are no samples.
    """
    if not samples:
        raise DataError(f"{source}: no images found")
    rows = []
    for sample in sorted(samples, key=lambda s: s.sample_id):
        height, width = image_size(sample.image_path)
        for kind, other in (("label", sample.label_path), ("depth", sample.depth_path)):
            if other is not None:
                if not other.is_file():
                    raise DataError(f"{other}: {kind} not found for image {sample.image_path}")
                check_same_size(
                    str(sample.image_path), (height, width), str(other), image_size(other)
                )
        rows.append(
            {
                "sample_id": sample.sample_id,
                "split": sample.split,
                "image_path": str(sample.image_path.absolute()),
                "label_path": None
                if sample.label_path is None
                else str(sample.label_path.absolute()),
                "depth_path": None
                if sample.depth_path is None
                else str(sample.depth_path.absolute()),
                "height": height,
                "width": width,
            }
        )
    ids = [row["sample_id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"{source}: duplicate sample ids")
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
