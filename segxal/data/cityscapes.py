"""Cityscapes folder layout.

``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with labels in
``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` and optional disparity in
``disparity/<split>/<city>/<stem>_disparity.png``. Sample ids are ``<split>/<stem>``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from segxal.data.io import DataError
from segxal.data.manifest import SampleFiles, build_manifest

IMAGE_SUFFIX = "_leftImg8bit.png"


def cityscapes_manifest(root: str | Path, split: str, with_labels: bool = True) -> pa.Table:
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: Cityscapes image folder not found")
    samples = []
    for image_path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        city = image_path.parent.name
        stem = image_path.name[: -len(IMAGE_SUFFIX)]
        label_path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        depth_path = root / "disparity" / split / city / f"{stem}_disparity.png"
        samples.append(
            SampleFiles(
                sample_id=f"{split}/{stem}",
                split=split,
                image_path=image_path,
                label_path=label_path if with_labels else None,
                depth_path=depth_path if depth_path.is_file() else None,
            )
        )
    return build_manifest(samples, str(image_dir))
