"""What Label Studio is given for a cycle: the labelling config for the dataset's label set, and one task per
selected image with its image reference and pre-annotations (the model's segmentation as one brush region
per class, the EEM prompt points as keypoints ranked by EEM).

In region mode a task asks for its queried regions only: the segmentation is pre-annotated inside them,
each region is shown as a ``Region k`` brush of its own (a layer the import skips), and the task's note
says which regions to label."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import torch

from orchestrator.config import LabelStudioConfig
from orchestrator.labelstudio.rle import mask_to_rle
from orchestrator.oracles import AnnotationRequest
from segxal.data.labels import LabelSet
from segxal.data.transforms import resize_nearest
from segxal.eem.panels import PROMPT_COLOUR, hex_colour

# tag names in the labelling config; every result's from_name / to_name is one of them
IMAGE, BRUSH, POLYGON, PROMPT, QUERY, NOTE = "image", "label", "polygon", "prompt", "query", "note"
LOCAL_FILES = "/data/local-files/?d="
QUERY_COLOUR = "#00ffff"


def prompt_label(rank: int) -> str:
    return f"EEM {rank}"


def query_label(rank: int) -> str:
    return f"Region {rank}"


def labelling_config(label_set: LabelSet, max_prompts: int, regions: bool = False) -> str:
    """Label Studio's labelling interface: brush and polygon labels for every class of ``label_set``
    (in its colours) and keypoint labels ``EEM 1`` .. ``EEM <max_prompts>`` for the prompts; with
    ``regions``, the queried regions' layer ``Region 1`` .. and the task's note."""
    view = ET.Element("View")
    header = (
        "Label the queried regions only (Region 1, Region 2, ...): pixels outside them are not used."
        if regions
        else "Correct the model's segmentation. Start at the EEM prompts: "
        "EEM 1 marks the largest explainable error."
    )
    ET.SubElement(view, "Header", value=header)
    if regions:
        ET.SubElement(view, "Text", name=NOTE, value="$note")
    ET.SubElement(view, "Image", name=IMAGE, value="$image", zoom="true", zoomControl="true")
    for tag, name in (("BrushLabels", BRUSH), ("PolygonLabels", POLYGON)):
        labels = ET.SubElement(view, tag, name=name, toName=IMAGE)
        for class_name, colour in zip(label_set.class_names, label_set.colors, strict=True):
            ET.SubElement(labels, "Label", value=class_name, background=hex_colour(colour))
    prompts = ET.SubElement(view, "KeyPointLabels", name=PROMPT, toName=IMAGE)
    for rank in range(1, max_prompts + 1):
        ET.SubElement(prompts, "Label", value=prompt_label(rank), background=PROMPT_COLOUR)
    if regions:
        queried = ET.SubElement(view, "BrushLabels", name=QUERY, toName=IMAGE, opacity="0.3")
        for rank in range(1, max_prompts + 1):
            ET.SubElement(queried, "Label", value=query_label(rank), background=QUERY_COLOUR)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


@dataclass(frozen=True)
class ImageReferences:
    """How Label Studio finds an image (a local-files URL, or a URL below ``url_prefix``) and how a
    reference in an export leads back to a file, never one outside the dataset root."""

    dataset_root: Path
    document_root: Path
    url_prefix: str | None = None

    @classmethod
    def from_config(cls, dataset_root: str | Path, config: LabelStudioConfig) -> ImageReferences:
        root = Path(dataset_root).resolve()
        document_root = (
            root if config.document_root is None else Path(config.document_root).resolve()
        )
        if not root.is_relative_to(document_root):
            raise ValueError(
                f"al.labelstudio.document_root {document_root} must be the dataset root {root} or a "
                "folder above it, for Label Studio to serve the images"
            )
        return cls(
            root,
            document_root,
            None if config.url_prefix is None else config.url_prefix.rstrip("/"),
        )

    def reference(self, image_path: str | Path) -> str:
        path = Path(image_path).resolve()
        if not path.is_relative_to(self.dataset_root):
            raise ValueError(
                f"{path}: the image is not inside the dataset root {self.dataset_root}"
            )
        if self.url_prefix is not None:
            return f"{self.url_prefix}/{quote(path.relative_to(self.dataset_root).as_posix())}"
        return LOCAL_FILES + quote(path.relative_to(self.document_root).as_posix())

    def resolve(self, reference: str) -> Path:
        """The file ``reference`` points to; a ValueError when it is not a reference of ours or points
        outside the dataset root."""
        if self.url_prefix is not None and reference.startswith(self.url_prefix + "/"):
            base, relative = self.dataset_root, reference[len(self.url_prefix) + 1 :]
        elif reference.startswith(LOCAL_FILES):
            base, relative = self.document_root, reference[len(LOCAL_FILES) :]
        else:
            raise ValueError(
                f"image {reference!r} is neither a local-files URL ({LOCAL_FILES}...) "
                "nor below al.labelstudio.url_prefix"
            )
        path = (base / unquote(relative)).resolve()
        if not path.is_relative_to(self.dataset_root):
            raise ValueError(
                f"image {reference!r} points outside the dataset root {self.dataset_root}"
            )
        return path


def brush_result(region_id: str, class_name: str, mask: np.ndarray, control: str = BRUSH) -> dict:
    height, width = mask.shape
    return {
        "id": region_id,
        "from_name": control,
        "to_name": IMAGE,
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [class_name]},
    }


def prompt_result(
    rank: int, region: dict, scoring_size: tuple[int, int], image_size: tuple[int, int]
) -> dict:
    """A keypoint at the region's prompt (scoring-resolution pixel), in percent of the image."""
    (scoring_height, scoring_width), (height, width) = scoring_size, image_size
    prompt = region["prompt"]
    note = (
        f"rank {rank}: mean EEM {region['mean_eem']:.2f}, {region['area']} px at the scoring resolution, "
        f"mostly {region.get('class_name') or region['class_id']}"
    )
    return {
        "id": f"eem-{rank}",
        "from_name": PROMPT,
        "to_name": IMAGE,
        "type": "keypointlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "meta": {"text": [note]},
        "value": {
            "x": 100 * (prompt["x"] + 0.5) / scoring_width,
            "y": 100 * (prompt["y"] + 0.5) / scoring_height,
            "width": 1.0,
            "keypointlabels": [prompt_label(rank)],
        },
    }


def task(
    number: int,
    request: AnnotationRequest,
    reference: str,
    image_size: tuple[int, int],
    label_set: LabelSet,
    model_version: str,
) -> dict:
    """One Label Studio task (JSON import format). The prediction, at the scoring resolution, is resized to
    the image's native size with the nearest neighbour the dataset loader uses, so resizing the imported
    masks back gives the prediction pixel for pixel."""
    prediction = resize_nearest(torch.tensor(request.prediction), image_size).numpy()
    data = {"image": reference, "sample_id": request.sample_id}
    queried = []
    if request.queried_regions_only:
        region_map = resize_nearest(torch.tensor(request.region_map), image_size).numpy()
        prediction = np.where(region_map > 0, prediction, label_set.num_classes)
        queried = [
            brush_result(f"region-{rank}", query_label(rank), region_map == region["id"], QUERY)
            for rank, region in enumerate(request.regions, start=1)
        ]
        data["note"] = (
            f"Label these {len(request.regions)} regions only: "
            + ", ".join(
                f"Region {rank} (at EEM {rank})" for rank in range(1, len(request.regions) + 1)
            )
            + ". Pixels outside them are not used."
        )
    present = [int(c) for c in np.unique(prediction) if c < label_set.num_classes]
    results = [
        brush_result(f"class-{c}", label_set.class_names[c], prediction == c) for c in present
    ]
    results += queried
    results += [
        prompt_result(rank, region, request.prediction.shape, image_size)
        for rank, region in enumerate(request.regions, start=1)
    ]
    return {
        "id": number,
        "data": data,
        "predictions": [{"model_version": model_version, "result": results}],
    }
