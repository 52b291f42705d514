"""The Label Studio oracle: brush RLE, labelling config, tasks, export checks, and the stage round trip
(export, people accept or correct, import) through the loop against a fake backend."""

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from helpers import FakeBackend, ground_truth, tiny

from jobs import al as al_job
from orchestrator.config import ActiveLearningConfig, LabelStudioConfig
from orchestrator.labelstudio import imports, rle
from orchestrator.labelstudio.handoff import (
    LabelStudioHandoff,
    export_dir,
    import_cycle,
    instructions,
)
from orchestrator.labelstudio.imports import LabelStudioImportError, polygon_mask
from orchestrator.labelstudio.tasks import LOCAL_FILES, ImageReferences, labelling_config
from orchestrator.oracles import AnnotationRequest, LabelStudioOracle
from orchestrator.pool_state import LABELLED, PoolState
from orchestrator.run import ActiveLearningRun, Explained, Progress
from orchestrator.run_layout import RunLayout
from orchestrator.typed_config import ConfigError, load_config
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.data.transforms import resize_nearest

SIZE = (
    24,
    40,
)  # scoring resolution; the synthetic images are 64x128, so the ratios are not integers
NATIVE = (64, 128)
AL = ActiveLearningConfig(strategy="entropy", budget=3, subset=1.0, theta=0.5)


# -- brush RLE ------------------------------------------------------------------------------------
def bits_to_bytes(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


HEADER = (
    "00111" + "0010" + "0011" + "0111" + "1111"
)  # 8-bit words, length fields of 3, 4, 8, 16 bits


def test_rle_encode_known_answer():
    # runs: 5 x3 (kind 1, size 0, m=2), 0 x1, 7 x1; each with its 8-bit word
    expected = (
        f"{5:032b}"
        + HEADER
        + "1"
        + "00"
        + "010"
        + "00000101"
        + "1"
        + "00"
        + "000"
        + "00000000"
        + "1"
        + "00"
        + "000"
        + "00000111"
    )
    assert rle.encode(np.array([5, 5, 5, 0, 7], np.uint8)) == bits_to_bytes(expected)


def test_rle_decode_known_answer_with_literals_and_runs():
    # a literal block (as Label Studio's editor writes them): 1, 2, 3; then 9 x20 in an 8-bit length field
    bits = (
        f"{23:032b}"
        + HEADER
        + "0"
        + "00"
        + "010"
        + "00000001"
        + "00000010"
        + "00000011"
        + "1"
        + "10"
        + f"{19:08b}"
        + "00001001"
    )
    assert rle.decode(bits_to_bytes(bits)).tolist() == [1, 2, 3] + [9] * 20


def test_rle_round_trip_of_masks_and_long_runs():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.3
    assert np.array_equal(rle.rle_to_mask(rle.mask_to_rle(mask), 37, 53), mask)
    words = np.zeros(200_000, np.uint8)
    words[70_000:] = 255  # runs longer than the 16-bit length field holds
    assert np.array_equal(rle.decode(rle.encode(words)), words)
    assert rle.decode(rle.encode(np.zeros(0, np.uint8))).tolist() == []


def test_rle_mask_uses_the_alpha_channel():
    rgba = np.array(
        [[[255, 255, 255, 0], [0, 0, 0, 255]], [[9, 9, 9, 127], [1, 2, 3, 128]]], np.uint8
    )
    assert rle.rle_to_mask(rle.encode(rgba.ravel()), 2, 2).tolist() == [
        [False, True],
        [False, True],
    ]


def test_rle_errors():
    encoded = rle.mask_to_rle(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="image is 5x4"):
        rle.rle_to_mask(encoded, 4, 5)
    with pytest.raises(ValueError, match="truncated"):
        rle.decode(rle.encode(np.arange(20, dtype=np.uint8))[:-3])
    with pytest.raises(ValueError, match="byte values"):
        rle.decode([1, 300])


def test_rle_matches_label_studio_sdk():
    brush = pytest.importorskip("label_studio_sdk.converter.brush")
    rng = np.random.default_rng(1)
    for _ in range(5):
        mask = rng.random((23, 31)) < rng.random()
        assert np.array_equal(
            brush.decode_rle(rle.mask_to_rle(mask)).reshape(23, 31, 4)[..., 3] >= 128, mask
        )
        assert np.array_equal(
            rle.rle_to_mask(brush.mask2rle(mask.astype(np.uint8) * 255), 23, 31), mask
        )


# -- labelling config, references, polygons --------------------------------------------------------
def test_labelling_config_lists_every_class_and_prompt_rank():
    view = ET.fromstring(labelling_config(CITYSCAPES, 3))
    (image,) = view.iter("Image")
    assert image.get("name") == "image" and image.get("value") == "$image"
    for tag, name in (("BrushLabels", "label"), ("PolygonLabels", "polygon")):
        (labels,) = view.iter(tag)
        assert labels.get("name") == name and labels.get("toName") == "image"
        assert [label.get("value") for label in labels] == list(CITYSCAPES.class_names)
        assert labels[13].get("background") == "#00008e"  # car (0, 0, 142)
    (prompts,) = view.iter("KeyPointLabels")
    assert prompts.get("name") == "prompt" and [p.get("value") for p in prompts] == [
        "EEM 1",
        "EEM 2",
        "EEM 3",
    ]


def test_image_references(tmp_path):
    root = tmp_path / "data"
    image = root / "leftImg8bit" / "train" / "a b.png"
    local = ImageReferences.from_config(root, LabelStudioConfig())
    assert local.reference(image) == LOCAL_FILES + "leftImg8bit/train/a%20b.png"
    assert local.resolve(local.reference(image)) == image.resolve()
    above = ImageReferences.from_config(root, LabelStudioConfig(document_root=str(tmp_path)))
    assert above.reference(image) == LOCAL_FILES + "data/leftImg8bit/train/a%20b.png"
    served = ImageReferences.from_config(
        root, LabelStudioConfig(url_prefix="http://127.0.0.1:8081/files/")
    )
    assert served.reference(image) == "http://127.0.0.1:8081/files/leftImg8bit/train/a%20b.png"
    assert served.resolve(served.reference(image)) == image.resolve()
    for bad in (
        LOCAL_FILES + "../secret.png",
        LOCAL_FILES + "/etc/passwd",
        "http://127.0.0.1:8081/files/../x.png",
    ):
        with pytest.raises(ValueError, match="outside the dataset root"):
            served.resolve(bad)
    with pytest.raises(ValueError, match="neither"):
        local.resolve("https://example.org/a.png")
    with pytest.raises(ValueError, match="not inside the dataset root"):
        local.reference(tmp_path / "elsewhere.png")
    with pytest.raises(ValueError, match="must be the dataset root .* or a folder above it"):
        ImageReferences.from_config(
            root, LabelStudioConfig(document_root=str(root / "leftImg8bit"))
        )


def test_labelstudio_config_is_validated():
    with pytest.raises(ConfigError, match="labelstudio: set document_root or url_prefix, not both"):
        load_config(
            ActiveLearningConfig,
            None,
            ["labelstudio.document_root=/data", "labelstudio.url_prefix=http://x"],
        )
    assert load_config(ActiveLearningConfig, None, ["oracle=labelstudio"]).oracle == "labelstudio"


def test_polygon_mask_takes_pixels_whose_centre_is_inside():
    square = polygon_mask([[25, 25], [75, 25], [75, 75], [25, 75]], 8, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True
    assert square.tolist() == expected.tolist()
    triangle = polygon_mask(
        [[0, 0], [100, 0], [0, 90]], 4, 4
    )  # x / 4 + y / 3.6 < 1 at pixel centres
    assert triangle.astype(int).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="at least 3"):
        polygon_mask([[0, 0], [10, 10]], 4, 4)


def test_oracle_counts_corrected_objects_and_pixels():
    prediction = np.zeros((4, 6), np.uint8)
    native = np.zeros((8, 12), np.uint8)
    native[0:4, 0:4] = 13  # one car, 2x2 at the scoring resolution
    native[6:8, 8:12] = 255  # not annotated: not a correction
    request = AnnotationRequest(
        "s",
        "s.png",
        prediction,
        prediction,
        np.ones((4, 6), np.float32),
        np.zeros((4, 6), np.int32),
        [],
    )
    (annotation,) = LabelStudioOracle({"s": native}).annotate([request])
    expected = np.zeros((4, 6), np.uint8)
    expected[0:2, 0:2] = 13
    expected[3, 4:6] = 255
    assert annotation.label.tolist() == expected.tolist()
    assert annotation.cost == 1.0 and annotation.pixels == 4
    with pytest.raises(ValueError, match="no Label Studio annotation"):
        LabelStudioOracle({}).annotate([request])


# -- the stage round trip through the loop ---------------------------------------------------------
class PromptingBackend(FakeBackend):
    """Predictions with several classes and no void, two EEM regions per image."""

    def prediction(self, sample_id):
        wrong = super().prediction(sample_id)
        return np.where(wrong == 255, 8, wrong).astype(np.uint8)

    def explain(self, cycle, checkpoint, selected, kind, panel_dir, panels):
        region_map = np.zeros(SIZE, np.int32)
        region_map[2:6, 3:9], region_map[10:12, 20:30] = 1, 2
        regions = [
            {
                "id": 1,
                "prompt": {"x": 5, "y": 3},
                "area": 24,
                "mean_eem": 0.8,
                "peak_eem": 0.9,
                "class_id": 13,
                "class_name": "car",
                "bbox": {"x0": 3, "y0": 2, "x1": 8, "y1": 5},
            },
            {
                "id": 2,
                "prompt": {"x": 29, "y": 11},
                "area": 20,
                "mean_eem": 0.6,
                "peak_eem": 0.7,
                "class_id": 0,
                "class_name": "road",
                "bbox": {"x0": 20, "y0": 10, "x1": 29, "y1": 11},
            },
        ]
        return Explained(
            [
                AnnotationRequest(
                    i,
                    p,
                    self.prediction(i),
                    self.prediction(i),
                    np.ones(SIZE, np.float32),
                    region_map,
                    regions,
                )
                for i, p in zip(
                    selected["sample_id"].to_pylist(),
                    selected["image_path"].to_pylist(),
                    strict=False,
                )
            ]
        )


@pytest.fixture
def exported(synthetic_root, tmp_path):
    """A run stopped after exporting cycle 1 to Label Studio; the images' references, its backend."""
    train = cityscapes_manifest(synthetic_root, "train")
    val = cityscapes_manifest(synthetic_root, "val")
    truth = ground_truth(train, SIZE)
    images = ImageReferences.from_config(synthetic_root, LabelStudioConfig())
    backend = PromptingBackend(truth, tmp_path)
    state = PoolState.create(tmp_path / "initial.parquet", train, 4, seed=3, validation=val)
    handoff = LabelStudioHandoff(tmp_path, images, CITYSCAPES)
    owner = ActiveLearningRun(
        RunLayout(tmp_path), state, AL, CITYSCAPES, 3, LabelStudioOracle({}), handoff
    )
    history = owner.run(backend, 2)
    assert (
        len(history) == 1 and handoff.handed_over == 1
    )  # cycle 0 trained, cycle 1 waits for people
    return tmp_path, images, backend


def continue_run(run_dir, images, backend, export_file, cycles=2):
    """What ``jobs.al --resume RUN --stage import FILE`` does, on the fake backend: check the export in
    full, then finish the cycle."""
    layout = RunLayout(run_dir)
    progress = Progress.load(layout)
    imported = import_cycle(run_dir, progress.completed_cycle + 1, export_file, images, CITYSCAPES)
    state = PoolState.load(layout.snapshot(progress.completed_cycle))
    handoff = LabelStudioHandoff(run_dir, images, CITYSCAPES, imported)
    owner = ActiveLearningRun(
        layout, state, AL, CITYSCAPES, 3, LabelStudioOracle(imported.labels), handoff, progress
    )
    history = owner.run(backend, cycles)
    return owner, history, handoff


def accepted_unchanged(tasks: list[dict]) -> list[dict]:
    """The export of a person who accepted every pre-annotation as it was (Label Studio numbers tasks itself)."""
    return [
        {
            "id": 100 + n,
            "data": task["data"],
            "predictions": task["predictions"],
            "annotations": [
                {"id": 500 + n, "was_cancelled": False, "result": task["predictions"][0]["result"]}
            ],
        }
        for n, task in enumerate(tasks)
    ]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def read_tasks(run_dir) -> list[dict]:
    return json.loads((export_dir(run_dir, 1) / "tasks.json").read_text())


def test_export_writes_tasks_config_and_instructions(exported):
    run_dir, images, backend = exported
    folder = export_dir(run_dir, 1)
    tasks = read_tasks(run_dir)
    assert len(tasks) == 3
    view = ET.fromstring((folder / "labelling_config.xml").read_text())
    prompts = [label.get("value") for label in view.find("KeyPointLabels")]
    assert prompts == [
        "EEM 1",
        "EEM 2",
    ]  # as many as the tasks have (two each), not eem.max_regions
    for task in tasks:
        sample_id = task["data"]["sample_id"]
        image = images.resolve(task["data"]["image"])
        assert image.is_file() and sample_id.split("/")[1] in image.name
        results = task["predictions"][0]["result"]
        prediction = resize_nearest(torch.from_numpy(backend.prediction(sample_id)), NATIVE).numpy()
        brushes = [r for r in results if r["type"] == "brushlabels"]
        assert sorted(r["value"]["brushlabels"][0] for r in brushes) == sorted(
            CITYSCAPES.class_names[c] for c in np.unique(prediction)
        )
        for brush in brushes:
            class_id = CITYSCAPES.class_names.index(brush["value"]["brushlabels"][0])
            assert (brush["original_height"], brush["original_width"]) == NATIVE
            assert np.array_equal(
                rle.rle_to_mask(brush["value"]["rle"], *NATIVE), prediction == class_id
            )
        prompts = [r for r in results if r["type"] == "keypointlabels"]
        assert [p["value"]["keypointlabels"] for p in prompts] == [["EEM 1"], ["EEM 2"]]
        assert prompts[0]["value"]["x"] == pytest.approx(100 * 5.5 / 40)
        assert prompts[0]["value"]["y"] == pytest.approx(100 * 3.5 / 24)
        assert "car" in prompts[0]["meta"]["text"][0]
    text = instructions(run_dir, 1)
    assert str(folder / "tasks.json") in text
    assert f"python -m jobs.al --resume {run_dir} --stage import" in text
    assert Progress.load(RunLayout(run_dir)).completed_cycle == 0


def test_round_trip_accepted_pre_annotations_equal_the_predictions(exported):
    run_dir, images, backend = exported
    tasks = read_tasks(run_dir)
    export_file = write_json(run_dir / "ls_export.json", accepted_unchanged(tasks))
    ids = [t["data"]["sample_id"] for t in tasks]

    imported = import_cycle(run_dir, 1, export_file, images, CITYSCAPES)
    for sample_id in ids:
        native = resize_nearest(torch.from_numpy(backend.prediction(sample_id)), NATIVE).numpy()
        assert np.array_equal(imported.labels[sample_id], native)

    owner, history, handoff = continue_run(run_dir, images, backend, export_file)
    assert len(history) == 1 and handoff.handed_over == 2  # cycle 1 finished, cycle 2 exported
    metrics = history[0]
    assert (
        metrics["gate/selected"] == 3
        and metrics["gate/accepted"] == 3
        and metrics["gate/mean_dice"] == 1.0
    )
    assert metrics["oracle/cost"] == 0.0 and metrics["oracle/pixels"] == 0.0
    assert (
        "time/score_s" in metrics and "time/train_s" in metrics
    )  # the query half, timed at export
    state = PoolState.load(RunLayout(run_dir).snapshot(1))
    assert state.count(LABELLED) == 4 + 3
    for sample_id in ids:
        record = state.record(sample_id)
        assert (record["role"], record["cycle_labelled"], record["oracle"], record["dice"]) == (
            LABELLED,
            1,
            "labelstudio",
            1.0,
        )
        relabel = SegmentationDataset(
            pa.table(
                {
                    "sample_id": [sample_id],
                    "image_path": [record["image_path"]],
                    "label_path": [record["label_source"]],
                    "depth_path": [None],
                }
            ),
            CITYSCAPES,
            SampleTransform(size=SIZE),
        )[0]["label"].numpy()
        assert np.array_equal(
            relabel, backend.prediction(sample_id)
        )  # what training reads, pixel for pixel
    assert (export_dir(run_dir, 1) / "export.json").read_text() == export_file.read_text()
    assert Progress.load(RunLayout(run_dir)).completed_cycle == 1


def test_corrections_are_painted_over_the_pre_annotation_and_costed(exported):
    run_dir, images, backend = exported
    tasks = read_tasks(run_dir)
    export = accepted_unchanged(tasks)
    # the person draws a bicycle polygon over the top-left quarter of the first image
    export[0]["annotations"][0]["result"].append(
        {
            "id": "p1",
            "type": "polygonlabels",
            "from_name": "polygon",
            "to_name": "image",
            "original_width": 128,
            "original_height": 64,
            "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["bicycle"]},
        }
    )
    # and skips the second image's first try before submitting it unchanged
    export[1]["annotations"].insert(0, {"id": 1, "was_cancelled": True, "result": []})
    owner, history, _ = continue_run(
        run_dir, images, backend, write_json(run_dir / "ls.json", export)
    )
    first = tasks[0]["data"]["sample_id"]
    native = resize_nearest(torch.from_numpy(backend.prediction(first)), NATIVE).numpy()
    native[:32, :64] = 18
    expected = resize_nearest(torch.from_numpy(native), SIZE).numpy()
    changed = int((expected != backend.prediction(first)).sum())
    assert changed > 0
    decisions = {
        d["sample_id"]: d
        for d in pq.read_table(run_dir / "cycles" / "cycle_01" / "decisions.parquet").to_pylist()
    }
    assert decisions[first]["pixels"] == changed and decisions[first]["cost"] == 1.0  # one bicycle
    assert decisions[first]["dice"] < 1.0
    assert history[0]["oracle/pixels"] == changed


# -- bad exports: a clear error naming the task, the pool state untouched ---------------------------
def unknown_task(export):
    export[0]["data"]["sample_id"] = "train/not_exported"
    return r"task 100 \(train/not_exported\): sample_id 'train/not_exported' is not one of the 3 images"


def unknown_class(export):
    export[1]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["unicorn"]
    return rf"task 101 \({export[1]['data']['sample_id']}\): region class-\d+: class 'unicorn' is not in the cityscapes"


def wrong_size(export):
    result = export[2]["annotations"][0]["result"][0]
    result["original_width"] = 127
    result["value"]["rle"] = rle.mask_to_rle(np.ones((64, 127), bool))
    return rf"task 102 \({export[2]['data']['sample_id']}\): region class-\d+: mask of size 127x64 but the image is 128x64"


def wrong_rle_length(export):
    export[2]["annotations"][0]["result"][0]["value"]["rle"] = rle.mask_to_rle(
        np.ones((64, 127), bool)
    )
    return rf"task 102 \({export[2]['data']['sample_id']}\): region class-\d+: brush mask holds 8128 pixels but the image is 128x64"


def huge_declared_rle(export):
    # a header that declares 2^28 words (1 GiB of pixels) in a few bytes: refused before decoding
    export[2]["annotations"][0]["result"][0]["value"]["rle"] = [16, 0, 0, 0, 0, 0, 0]
    return rf"task 102 \({export[2]['data']['sample_id']}\): region class-\d+: brush mask holds 6.71089e\+07 pixels"


def json_min(export):
    export[0] = {"id": 100, "sample_id": export[0]["data"]["sample_id"], "tag": []}
    return r"task 100: a JSON-MIN task .*export the project in Label Studio's JSON format"


def sample_id_of_another_type(export):
    export[0]["data"]["sample_id"] = ["a", "list"]
    return r"task 100 \(\['a', 'list'\]\): data.sample_id must be a string, got list"


def outside_root(export):
    export[0]["data"]["image"] = LOCAL_FILES + "../../../../etc/passwd"
    return (
        rf"task 100 \({export[0]['data']['sample_id']}\): image .* points outside the dataset root"
    )


def missing_task(export):
    del export[1]
    return r"no task for \['train/"


def not_annotated(export):
    export[0]["annotations"] = [{"id": 3, "was_cancelled": True, "result": []}]
    return rf"task 100 \({export[0]['data']['sample_id']}\): no submitted annotation"


@pytest.mark.parametrize(
    "spoil",
    [
        unknown_task,
        unknown_class,
        wrong_size,
        wrong_rle_length,
        huge_declared_rle,
        json_min,
        sample_id_of_another_type,
        outside_root,
        missing_task,
        not_annotated,
    ],
)
def test_bad_export_is_refused_and_the_pool_state_untouched(exported, spoil):
    run_dir, images, backend = exported
    export = accepted_unchanged(read_tasks(run_dir))
    expected = spoil(export)
    state_file = run_dir / "pool_state.parquet"
    before = hashlib.sha256(state_file.read_bytes()).hexdigest()
    with pytest.raises(LabelStudioImportError, match=expected):
        continue_run(run_dir, images, backend, write_json(run_dir / "bad.json", export))
    assert hashlib.sha256(state_file.read_bytes()).hexdigest() == before
    assert not (export_dir(run_dir, 1) / "export.json").exists()
    assert Progress.load(RunLayout(run_dir)).completed_cycle == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: folder, r"is a folder; pass the JSON file"),
        (lambda folder: write_text(folder / "deep.json", "[" * 100_000 + "]" * 100_000),
         r"deep\.json: JSON nested deeper than the parser allows"),
        (lambda folder: write_text(folder / "nested.json", "[" * 40 + "]" * 40),
         r"nested\.json: JSON nested more than 32 levels"),
    ],
)  # fmt: skip
def test_an_export_file_that_cannot_be_one_is_refused(exported, tmp_path, make, message):
    run_dir, images, backend = exported
    with pytest.raises(LabelStudioImportError, match=message):
        continue_run(run_dir, images, backend, make(tmp_path))
    assert Progress.load(RunLayout(run_dir)).completed_cycle == 0


def test_an_export_over_the_size_cap_is_refused_before_it_is_read(exported, monkeypatch):
    run_dir, images, backend = exported
    path = write_json(run_dir / "big.json", accepted_unchanged(read_tasks(run_dir)))
    monkeypatch.setattr(imports, "MAX_EXPORT_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read"))
    with pytest.raises(LabelStudioImportError, match=r"big\.json: 0 MiB, more than the 0 MiB"):
        continue_run(run_dir, images, backend, path)


def write_text(path, text):
    path.write_text(text)
    return path


def test_truncated_export_is_refused_and_the_pool_state_untouched(exported):
    run_dir, images, backend = exported
    text = json.dumps(accepted_unchanged(read_tasks(run_dir)))
    truncated = run_dir / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    before = (run_dir / "pool_state.parquet").read_bytes()
    with pytest.raises(
        LabelStudioImportError, match=rf"{truncated}: not valid JSON .*is the export file complete"
    ):
        continue_run(run_dir, images, backend, truncated)
    assert (run_dir / "pool_state.parquet").read_bytes() == before


def test_import_without_a_pending_export_is_refused(exported):
    run_dir, images, _ = exported
    with pytest.raises(LabelStudioImportError, match="no Label Studio export of cycle 2"):
        import_cycle(run_dir, 2, run_dir / "any.json", images, CITYSCAPES)


# -- jobs.al: the stages from the command line ------------------------------------------------------
def test_stage_is_refused_where_it_does_not_apply(synthetic_root, tmp_path):
    args = tiny(
        synthetic_root, tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}", "misuse", 1
    )
    with pytest.raises(
        SystemExit, match="--stage is for al.oracle=labelstudio; this run's oracle is simulated"
    ):
        al_job.main(args + ["--stage", "export"])
    with pytest.raises(SystemExit, match="add --resume RUN_DIR"):
        al_job.main(args + ["--set", "al.oracle=labelstudio", "--stage", "import", "export.json"])
    with pytest.raises(SystemExit, match="expected 'export' or 'import FILE'"):
        al_job.main(args + ["--set", "al.oracle=labelstudio", "--stage", "import"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_jobs_al_stops_for_people_and_continues_with_their_export(
    own_ray, synthetic_root, tmp_path, capsys
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "people"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        history = al_job.main(
            tiny(synthetic_root, tmp_path / "runs", uri, "people", 1)
            + ["--set", "al.oracle=labelstudio"]
        )
        assert len(history) == 1  # cycle 0; cycle 1 exported
        mlflow.set_tracking_uri(uri)
        (waiting,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
        assert waiting.data.tags["waiting_for"] == "people: Label Studio annotations of cycle 1"
        command = f"python -m jobs.al --resume {run_dir} --stage import"
        assert command in capsys.readouterr().out
        assert (
            al_job.main(["--resume", str(run_dir), "--quiet"]) == []
        )  # still waiting: the instructions again
        assert command in capsys.readouterr().out

        tasks = read_tasks(run_dir)
        state_file = run_dir / "pool_state.parquet"
        before = state_file.read_bytes()
        truncated = tmp_path / "truncated.json"
        truncated.write_text(json.dumps(accepted_unchanged(tasks))[:200])
        with pytest.raises(SystemExit, match=f"error: {truncated}: not valid JSON"):
            al_job.main(["--resume", str(run_dir), "--quiet", "--stage", "import", str(truncated)])
        assert state_file.read_bytes() == before

        export = write_json(tmp_path / "export.json", accepted_unchanged(tasks))
        history = al_job.main(
            ["--resume", str(run_dir), "--quiet", "--stage", "import", str(export)]
        )
    finally:
        ray.shutdown()
    assert len(history) == 1 and history[0]["gate/accepted"] == 2 and history[0]["oracle/cost"] == 0
    decisions = pq.read_table(run_dir / "cycles" / "cycle_01" / "decisions.parquet").to_pylist()
    assert [d["dice"] for d in decisions] == [
        1.0,
        1.0,
    ]  # the model's own segmentation, pixel for pixel
    state = PoolState.load(state_file)
    assert {state.record(d["sample_id"])["oracle"] for d in decisions} == {"labelstudio"}
    assert Progress.load(RunLayout(run_dir)).completed_cycle == 1
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["al-test"], output_format="list")
    client = mlflow.MlflowClient(uri)
    assert run.data.tags["oracle"] == "labelstudio" and run.data.tags["waiting_for"] == "nothing"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [0, 1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "time/explain_s")] == [1]
    assert "cycle_01/export.json" in {
        a.path for a in client.list_artifacts(run.info.run_id, "cycle_01")
    }
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
