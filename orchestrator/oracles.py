"""Oracles: who re-annotates the images a cycle selects.

- ``pseudo`` (machine): pixel-level pseudolabels from the current model, averaged over a horizontal-flip
  test-time augmentation; pixels whose confidence is below a threshold are left unlabelled (255).
- ``simulated`` (benchmarks): an annotator who corrects the model's prediction with the ground truth,
  object by object, wherever an EEM region points; everything else keeps the prediction. It counts the
  objects and pixels it corrected. Manual-M / Manual-D are this oracle with ``midas`` / ``dinov2`` depth.
- ``labelstudio`` (people): the annotations people made in Label Studio, guided by the EEM prompts
  (``orchestrator/labelstudio/``); Manual-M / Manual-D with real annotators.

Every oracle returns :class:`Annotation` s in train ids at the scoring resolution. In region mode
(``AnnotationRequest.queried_regions_only``) each labels the queried regions only: the simulated oracle
gives their ground-truth pixels, the pseudo oracle its confident pseudolabels there, Label Studio the
person's masks there; every other pixel stays unlabelled (255).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from scipy import ndimage

from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import IGNORE_INDEX, LabelSet
from segxal.data.transforms import resize_nearest

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotationRequest:
    """What an oracle sees of one selected image; maps are (H, W) at the scoring resolution."""

    sample_id: str
    image_path: str
    prediction: (
        np.ndarray
    )  # uint8 train ids: the model's segmentation (what the Dice gate compares)
    tta_prediction: np.ndarray  # uint8 train ids under flip test-time augmentation
    tta_confidence: np.ndarray  # float32 max softmax probability under the augmentation
    region_map: np.ndarray  # int32 EEM region ids (0 = none), matching ``regions``
    regions: list[dict]  # JSON records: prompt point, area, mean EEM, dominant class, bbox
    label_path: str | None = (
        None  # the dataset's ground truth, if any: for the simulated oracle only
    )
    queried_regions_only: bool = False  # region mode: label the pixels of region_map > 0 only


@dataclass(frozen=True)
class Annotation:
    sample_id: str
    label: np.ndarray  # uint8 train ids, 255 = not annotated
    cost: float  # human effort in objects corrected (0 for a machine)
    pixels: int  # pixels labelled or corrected


def queried_pixels(request: AnnotationRequest) -> np.ndarray:
    """The pixels an oracle labels: the queried regions in region mode, else the whole image."""
    if request.queried_regions_only:
        return request.region_map > 0
    return np.ones(request.region_map.shape, dtype=bool)


class Oracle(ABC):
    name: str

    @abstractmethod
    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]: ...


class PseudoLabelOracle(Oracle):
    name = "pseudo"

    def __init__(self, min_confidence: float) -> None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"al.pseudo_confidence must be in [0, 1], got {min_confidence}")
        self.min_confidence = min_confidence

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        annotations = []
        for request in requests:
            confident = request.tta_confidence >= self.min_confidence
            label = np.where(
                confident & queried_pixels(request), request.tta_prediction, IGNORE_INDEX
            )
            label = label.astype(np.uint8)
            annotations.append(
                Annotation(request.sample_id, label, 0.0, int((label != IGNORE_INDEX).sum()))
            )
        return annotations


def objects_touching(truth: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, int]:
    """Mask of the ground-truth objects (8-connected areas of one class, void excluded) that overlap
    ``region``, and their count."""
    touched = np.zeros(truth.shape, dtype=bool)
    count = 0
    for class_id in np.unique(truth[region & (truth != IGNORE_INDEX)]):
        components, _ = ndimage.label(truth == class_id, structure=EIGHT_CONNECTED)
        ids = np.unique(components[region & (components > 0)])
        touched |= np.isin(components, ids)
        count += len(ids)
    return touched, count


class SimulatedOracle(Oracle):
    """Ground truth comes from ``load_truth(request)`` (:class:`DatasetGroundTruth` in a run): (H, W) train
    ids at the scoring resolution."""

    name = "simulated"

    def __init__(self, load_truth: Callable[[AnnotationRequest], np.ndarray]) -> None:
        self.load_truth = load_truth

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        annotations = []
        for request in requests:
            truth = self.load_truth(request)
            if truth.shape != request.prediction.shape:
                raise ValueError(
                    f"{request.sample_id}: ground truth {truth.shape} != prediction {request.prediction.shape}"
                )
            touched, count = objects_touching(truth, request.region_map > 0)
            if request.queried_regions_only:
                touched = request.region_map > 0
                label = np.where(touched, truth, IGNORE_INDEX).astype(np.uint8)
            else:
                label = np.where(touched, truth, request.prediction).astype(np.uint8)
            corrected = int((label != request.prediction).sum())
            annotations.append(Annotation(request.sample_id, label, float(count), corrected))
        return annotations


class DatasetGroundTruth:
    """The simulated oracle's ground truth: a request's ``label_path`` read, checked against its image and
    resized as the dataset loader does for scoring. It holds nothing pool-sized, so the process
    that owns the oracle stays small however large the pool."""

    def __init__(self, label_set: LabelSet, size: tuple[int, int] | None) -> None:
        self.label_set = label_set
        if size is not None:
            height, width = size  # a tuple even when the config holds a list
            size = (height, width)
        self.transform = SampleTransform(size=size)

    def __call__(self, request: AnnotationRequest) -> np.ndarray:
        if request.label_path is None:
            raise ValueError(
                f"{request.sample_id}: the simulated oracle needs ground truth, and the dataset has "
                "no label for this image; use al.oracle=pseudo or labelstudio"
            )
        row = pa.table(
            {
                "sample_id": [request.sample_id],
                "image_path": [request.image_path],
                "label_path": [request.label_path],
                "depth_path": pa.array([None], pa.string()),
            }
        )
        return (
            SegmentationDataset(row, self.label_set, self.transform, load_image=False)[0]["label"]
            .numpy()
            .astype(np.uint8)
        )


class LabelStudioOracle(Oracle):
    """People in Label Studio. ``labels``: sample id -> (H, W) train ids at the image's native size, as
    imported from Label Studio's export (``orchestrator.labelstudio``, which checks that size); they are
    resized to the scoring resolution (the prediction's size) with the dataset loader's nearest neighbour.

    Cost counts corrections as the simulated oracle does: the objects (8-connected areas of one class in
    the annotation) holding a pixel whose class differs from the model's; pixels: those pixels. A person
    who accepts the pre-annotation unchanged costs 0; pixels left unannotated are not corrections."""

    name = "labelstudio"

    def __init__(self, labels: Mapping[str, np.ndarray]) -> None:
        self.labels = dict(labels)

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[Annotation]:
        annotations = []
        for request in requests:
            if request.sample_id not in self.labels:
                raise ValueError(
                    f"{request.sample_id}: no Label Studio annotation was imported for it"
                )
            label = resize_nearest(
                torch.tensor(self.labels[request.sample_id]), request.prediction.shape
            ).numpy()
            if request.queried_regions_only:
                label = self._inside_regions(request, label)
            changed = (label != IGNORE_INDEX) & (label != request.prediction)
            _, objects = objects_touching(label, changed)
            annotations.append(
                Annotation(request.sample_id, label, float(objects), int(changed.sum()))
            )
        return annotations

    @staticmethod
    def _inside_regions(request: AnnotationRequest, label: np.ndarray) -> np.ndarray:
        """The person's labels inside the queried regions; a region left blank is an error, and
        labels spilling outside the regions are dropped with a warning."""
        inside = request.region_map > 0
        for region in request.regions:
            if not (label[request.region_map == region["id"]] != IGNORE_INDEX).any():
                raise ValueError(
                    f"{request.sample_id}: the Label Studio annotation leaves queried region "
                    f"{region['id']} (prompt at x={region['prompt']['x']}, y={region['prompt']['y']}) "
                    "unlabelled; label it, or delete the task's annotation to annotate it again"
                )
        spilled = int(((label != IGNORE_INDEX) & ~inside).sum())
        if spilled:
            log.warning(
                "%s: %d annotated pixels lie outside the queried regions and are not used",
                request.sample_id,
                spilled,
            )
        return np.where(inside, label, IGNORE_INDEX).astype(np.uint8)
