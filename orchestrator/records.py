"""The records that cross a boundary (run ↔ scoring actors, run ↔ Ray Train, run ↔ its folder), in one
place: the Arrow schemas of work manifests, scores, gate decisions and the pool state, the roles a sample
takes, and the MLflow metric keys a run logs.

A work manifest row is what a worker needs to load one sample: its id, image, label and depth files,
and in region mode the mask of its pixels labelled so far.
Dataset manifests (``segxal.data.manifest.MANIFEST_SCHEMA``) carry more columns; the pool state keeps
these four and its bookkeeping.
"""

from __future__ import annotations

import pyarrow as pa

# -- work manifests: D^S, the selection, the training and validation sets ------------------------------
MANIFEST_COLUMNS = ("sample_id", "image_path", "label_path", "depth_path")
# ``mask_path``: the pixels labelled so far (al.unit region, segxal.data.region_labels), null for none
WORK_MANIFEST_SCHEMA = pa.schema([(name, pa.string()) for name in (*MANIFEST_COLUMNS, "mask_path")])

# -- scores: one row per candidate, in id order --------------------------------------------------------
UNREADABLE = "unreadable"  # why an image could not be read (null for the scored ones)
SCORE_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("score", pa.float64()), (UNREADABLE, pa.string())]
)
EMBEDDING_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("embedding", pa.list_(pa.float32())), (UNREADABLE, pa.string())]
)

# -- region scores (``al.unit: region``): one row per queryable region of a candidate, in id order ------
# ``record``: the region's JSON record (segxal.eem.regions), what the explain step finds it again by
REGION_SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("region", pa.int32()),
        ("score", pa.float64()),
        ("pixels", pa.int64()),
        ("record", pa.string()),
        (UNREADABLE, pa.string()),
    ]
)

# -- gate decisions: one row per image (region 0) or per queried region the oracle annotated, in the
# order of the requests ----------------------------------------------------------------------------------
WHOLE_IMAGE = 0  # the ``region`` of an image-level decision
DECISION_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("region", pa.int32()),
        ("cycle", pa.int32()),
        ("oracle", pa.string()),
        ("dice", pa.float64()),
        ("accepted", pa.bool_()),
        ("cost", pa.float64()),
        ("pixels", pa.int64()),
    ]
)

# -- the pool state: one row per sample, sorted by sample_id -------------------------------------------
LABELLED, UNLABELLED, VALIDATION, QUARANTINED = (
    "labelled",
    "unlabelled",
    "validation",
    "quarantined",
)
ROLES = (LABELLED, UNLABELLED, VALIDATION, QUARANTINED)
NEVER = -1  # cycle_labelled / last_cycle of a sample never labelled / never sent to an oracle
INITIAL_CYCLE = (
    0  # cycle_labelled of the initial labelled pool; active-learning cycles count from 1
)

POOL_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("label_path", pa.string()),  # ground truth from the manifest, if any
        pa.field("depth_path", pa.string()),
        pa.field("role", pa.string(), nullable=False),
        pa.field("cycle_labelled", pa.int32(), nullable=False),
        pa.field("last_cycle", pa.int32(), nullable=False),  # last cycle it went to an oracle
        pa.field("oracle", pa.string()),  # oracle of the last annotation
        pa.field("dice", pa.float64()),  # Dice at the last gate decision
        pa.field("annotation_cost", pa.float64(), nullable=False),  # summed over all annotations
        pa.field("times_returned", pa.int32(), nullable=False),  # times the gate sent it back
        pa.field("quarantine_reason", pa.string()),
        # the label training uses: ground truth or the accepted re-annotation
        pa.field("label_source", pa.string()),
        # al.unit region: the mask of the pixels labelled so far (null: every pixel or none is), and
        # their count at the scoring resolution
        pa.field("mask_path", pa.string()),
        pa.field("labelled_pixels", pa.int64(), nullable=False),
    ]
)


# -- MLflow metric keys, logged per cycle (step = cycle) -----------------------------------------------
class Metric:
    VAL_MIOU = "val/miou"  # Ray Train adds val/iou/<class> and val/loss beside it
    BEST_EPOCH = "train/best_epoch"
    LABELLED_FRACTION = "pool/labelled_fraction"
    LABELLED = "pool/labelled"
    UNLABELLED = "pool/unlabelled"
    QUARANTINED = "pool/quarantined"
    THETA = "gate/theta"
    SELECTED = "gate/selected"
    ACCEPTED = "gate/accepted"
    RETURNED = "gate/returned"
    MEAN_DICE = "gate/mean_dice"
    ACCEPTED_DICE = "gate/accepted_dice_mean"
    RETURNED_DICE = "gate/returned_dice_mean"
    CYCLE_COST = "oracle/cost"
    CYCLE_CLICKS = "oracle/clicks"
    CYCLE_PIXELS = "oracle/pixels"
    TOTAL_COST = "oracle/total_cost"
    RETURNED_COST = "gate/returned_cost"
    MEAN_SCORE = "query/mean_score"  # of the queried images or regions (strategies with a score)
    LABELLED_PIXEL_FRACTION = "pool/labelled_pixel_fraction"

    @staticmethod
    def class_pixels(class_id: int) -> str:
        """Labelled pixels of a class in the training set, as the last epoch counted them."""
        return f"train/class_pixels/{class_id}"

    @staticmethod
    def stage_seconds(stage: str) -> str:
        """Wall time of one stage of a cycle: score, select, explain, annotate, train."""
        return f"time/{stage}_s"
