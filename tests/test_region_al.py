"""Region-level active learning (al.unit: region) against a fake backend: ranking regions across D^S,
spending a budget in clicks or pixels, region-only oracles, the per-region gate, region labels that
accumulate over cycles, cost counting, resume, and bad input."""

import json
import logging
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SIZE, FakeBackend, fake_run, loop_pool
from PIL import Image
from sklearn.metrics import f1_score

from orchestrator.config import ActiveLearningConfig, ExperimentConfig, load_experiment
from orchestrator.oracles import (
    AnnotationRequest,
    LabelStudioOracle,
    PseudoLabelOracle,
    SimulatedOracle,
)
from orchestrator.pool_state import LABELLED, UNLABELLED, PoolState
from orchestrator.records import REGION_SCORE_SCHEMA
from orchestrator.run import Progress
from orchestrator.run_layout import RunLayout
from orchestrator.selection import spend_on_regions
from orchestrator.typed_config import ConfigError
from segxal.data.labels import IGNORE_INDEX
from segxal.data.region_labels import LABELLED_VOID
from segxal.data.region_labels import UNLABELLED as NOT_LABELLED
from segxal.eem.regions import cell_regions, extract_regions, queried_region_map

CLICKS = lambda t: [1] * t.num_rows  # noqa: E731
PIXELS = lambda t: t["pixels"].to_pylist()  # noqa: E731


def regions_table(rows):
    return pa.Table.from_pylist(
        [
            {"sample_id": s, "region": r, "score": v, "pixels": p, "record": "{}"}
            for s, r, v, p in rows
        ],
        schema=REGION_SCORE_SCHEMA,
    )


# -- ranking and spending, model-free ----------------------------------------------------------------
ROWS = [
    ("a", 1, 0.9, 40),
    ("a", 2, 0.5, 10),
    ("b", 1, 0.9, 30),  # ties "a"/1 on score: "a" first
    ("b", 2, 0.7, 25),
    ("c", 3, 0.2, 5),
    ("c", 1, 0.7, 50),  # ties "b"/2: "b" first
]


@pytest.mark.parametrize(
    "budget, costs, expected",
    [
        (3, CLICKS, [("a", 1), ("b", 1), ("b", 2)]),
        (1, CLICKS, [("a", 1)]),
        (99, CLICKS, [("a", 1), ("b", 1), ("b", 2), ("c", 1), ("a", 2), ("c", 3)]),
        # pixels: 40, 70, 95 -> the third crosses 90 and is the last one taken
        (90, PIXELS, [("a", 1), ("b", 1), ("b", 2)]),
        (70, PIXELS, [("a", 1), ("b", 1)]),  # exactly spent
        (10, PIXELS, [("a", 1)]),  # one region over a small budget: never nothing
    ],
)
def test_regions_are_taken_best_first_until_the_budget_is_spent(budget, costs, expected):
    chosen = spend_on_regions([regions_table(ROWS)], budget, costs)
    assert (
        list(zip(chosen["sample_id"].to_pylist(), chosen["region"].to_pylist(), strict=True))
        == expected
    )


@pytest.mark.parametrize("budget, costs", [(3, CLICKS), (90, PIXELS), (99, CLICKS)])
def test_spending_streamed_in_batches_equals_spending_on_everything(budget, costs):
    whole = spend_on_regions([regions_table(ROWS)], budget, costs)
    cut = spend_on_regions([regions_table(ROWS[i : i + 2]) for i in (0, 2, 4)], budget, costs)
    assert cut.equals(whole)


def test_a_region_without_a_score_is_refused():
    with pytest.raises(ValueError, match="without a score"):
        spend_on_regions([regions_table([("a", 1, None, 3)])], 1, CLICKS)


def test_cells_cover_the_unlabelled_pixels_with_their_means_by_hand():
    values = np.arange(24, dtype=float).reshape(4, 6) / 24  # 4x6, cells of 3: 2 rows x 2 columns
    prediction = np.zeros((4, 6), np.int64)
    prediction[:, 3:] = 5
    labelled = np.zeros((4, 6), bool)
    labelled[:3, :3] = True  # the first cell is fully labelled: no record
    labelled[3, 0] = True
    records = cell_regions(values, prediction, labelled, 3)
    assert [r["id"] for r in records] == [2, 3, 4]  # row-major over the whole grid
    by_id = {r["id"]: r for r in records}
    assert by_id[2]["area"] == 9 and by_id[2]["class_id"] == 5
    assert by_id[2]["mean_eem"] == pytest.approx(np.mean([3, 4, 5, 9, 10, 11, 15, 16, 17]) / 24)
    assert by_id[3]["area"] == 2  # row 3, columns 1-2 (column 0 is labelled)
    assert by_id[3]["mean_eem"] == pytest.approx((19 + 20) / 2 / 24)
    assert by_id[3]["prompt"] == {"x": 2, "y": 3}  # the peak of its unlabelled pixels
    assert by_id[4]["bbox"] == {"x0": 3, "y0": 3, "x1": 5, "y1": 3}
    area = queried_region_map(values, labelled, [by_id[3]])
    assert np.argwhere(area == 3).tolist() == [[3, 1], [3, 2]]
    assert (area[area != 3] == 0).all()


def test_eem_regions_leave_labelled_pixels_out():
    eem = np.zeros((6, 8))
    eem[1:5, 1:7] = 0.9
    labelled = np.zeros((6, 8), bool)
    labelled[:, 4] = True  # cuts the blob in two
    masked = np.where(labelled, -np.inf, eem)
    records = extract_regions(masked, np.zeros((6, 8), np.int64), 0.5, min_area=2)
    assert sorted(r["area"] for r in records) == [8, 12]  # columns 1-3 and 5-6, rows 1-4
    area = queried_region_map(eem, labelled, records)
    assert not area[labelled].any()
    assert sorted(np.bincount(area.ravel())[1:].tolist()) == [8, 12]


# -- region-only oracles --------------------------------------------------------------------------
def region_request(prediction, region_map, regions, **kwargs):
    return AnnotationRequest(
        "img",
        "img.png",
        prediction,
        kwargs.pop("tta_prediction", prediction),
        kwargs.pop("tta_confidence", np.ones(prediction.shape, np.float32)),
        region_map,
        regions,
        queried_regions_only=True,
        **kwargs,
    )


def two_regions():
    region_map = np.zeros((4, 6), np.int32)
    region_map[0:2, 0:2], region_map[2:4, 4:6] = 1, 2
    regions = [{"id": k, "prompt": {"x": x, "y": y}} for k, x, y in ((1, 0, 0), (2, 4, 2))]
    return region_map, regions


def test_the_simulated_oracle_gives_the_truth_inside_the_regions_only():
    truth = np.arange(24, dtype=np.uint8).reshape(4, 6) % 7
    region_map, regions = two_regions()
    request = region_request(np.zeros((4, 6), np.uint8), region_map, regions)
    [annotation] = SimulatedOracle(lambda r: truth).annotate([request])
    assert (annotation.label[region_map > 0] == truth[region_map > 0]).all()
    assert (annotation.label[region_map == 0] == IGNORE_INDEX).all()


def test_the_pseudo_oracle_labels_confident_pixels_inside_the_regions_only():
    region_map, regions = two_regions()
    confidence = np.full((4, 6), 0.95, np.float32)
    confidence[0, 0] = 0.5
    request = region_request(
        np.full((4, 6), 3, np.uint8), region_map, regions, tta_confidence=confidence
    )
    [annotation] = PseudoLabelOracle(0.9).annotate([request])
    expected = np.where(region_map > 0, 3, IGNORE_INDEX)
    expected[0, 0] = IGNORE_INDEX
    assert (annotation.label == expected).all()


def test_label_studio_masks_are_kept_inside_the_regions_and_spills_are_reported(caplog):
    region_map, regions = two_regions()
    person = np.full((4, 6), 2, np.uint8)  # paints the whole image
    request = region_request(np.zeros((4, 6), np.uint8), region_map, regions)
    [annotation] = LabelStudioOracle({"img": person}).annotate([request])
    assert (annotation.label == np.where(region_map > 0, 2, IGNORE_INDEX)).all()
    assert "16 annotated pixels lie outside the queried regions" in caplog.text


def test_a_blank_queried_region_in_label_studio_is_an_error_naming_it():
    region_map, regions = two_regions()
    person = np.full((4, 6), IGNORE_INDEX, np.uint8)
    person[0, 0] = 4  # region 1 only
    request = region_request(np.zeros((4, 6), np.uint8), region_map, regions)
    with pytest.raises(ValueError, match=r"img: .* leaves queried region 2 \(prompt at x=4, y=2\)"):
        LabelStudioOracle({"img": person}).annotate([request])


# -- the loop ------------------------------------------------------------------------------------
@pytest.fixture
def pool(synthetic_root, tmp_path):
    return loop_pool(synthetic_root, tmp_path)


def region_run(run_dir, state, truth, cycles, al, progress=None, oracle=None):
    return fake_run(run_dir, state, truth, cycles, al, progress=progress, oracle=oracle, image_size=SIZE)  # fmt: skip


def cycle_file(run_dir, cycle, name):
    return pq.read_table(RunLayout(run_dir).cycle_dir(cycle) / name).to_pylist()


def dice_by_sklearn(prediction, annotation):
    valid = (prediction != IGNORE_INDEX) & (annotation != IGNORE_INDEX)
    a, b = prediction[valid], annotation[valid]
    if a.size == 0:
        return float("nan")
    present = sorted(set(a.tolist()) | set(b.tolist()))
    return f1_score(b, a, labels=present, average="macro", zero_division=0)


REGION_AL = dict(unit="region", strategy="entropy", budget=5, subset=1.0, region_cell=8)


def test_a_region_cycle_queries_the_top_regions_of_d_s_and_gates_each_by_its_dice(pool, tmp_path):
    state, truth = pool
    al = ActiveLearningConfig(**{**REGION_AL, "budget": 12}, theta=0.9)
    owner, backend, history = region_run(tmp_path, state, truth, 1, al)
    scores = cycle_file(tmp_path, 1, "scores.parquet")
    ranked = sorted(
        (r for r in scores if r["region"] is not None),
        key=lambda r: (-r["score"], r["sample_id"], r["region"]),
    )
    expected = [(r["sample_id"], r["region"]) for r in ranked[:12]]
    decisions = cycle_file(tmp_path, 1, "decisions.parquet")
    assert sorted((d["sample_id"], d["region"]) for d in decisions) == sorted(expected)
    assert len({r["sample_id"] for r in scores}) == state.count(UNLABELLED)  # D^S = all of them
    for d in decisions:
        cell = json.loads(next(r["record"] for r in ranked if (r["sample_id"], r["region"]) == (d["sample_id"], d["region"])))  # fmt: skip
        box = cell["bbox"]
        window = (slice(box["y0"], box["y1"] + 1), slice(box["x0"], box["x1"] + 1))
        prediction = backend.prediction(d["sample_id"])[window]
        annotation = truth(d["sample_id"])[window]
        assert d["pixels"] == prediction.size == cell["area"]  # a cell of an unlabelled image
        assert d["dice"] == pytest.approx(dice_by_sklearn(prediction, annotation))
        assert d["accepted"] == (d["dice"] > 0.9)
        assert d["cost"] == 1.0
    metrics = history[1]
    assert metrics["oracle/clicks"] == 12 and metrics["gate/selected"] == 12
    returned = [d for d in decisions if not d["accepted"]]
    assert metrics["gate/returned_cost"] == len(returned) > 0
    assert metrics["gate/accepted"] == 12 - len(returned) > 0
    assert metrics["oracle/pixels"] == sum(d["pixels"] for d in decisions)
    accepted_pixels = sum(d["pixels"] for d in decisions if d["accepted"])
    pool_pixels = owner.state.training_pool_size * SIZE[0] * SIZE[1]
    assert metrics["pool/labelled_pixel_fraction"] == pytest.approx(
        (4 * SIZE[0] * SIZE[1] + accepted_pixels) / pool_pixels
    )
    assert metrics["oracle/total_cost"] == 12  # every region costs a click, returned ones too
    assert {(d["cycle"], d["oracle"]) for d in decisions} == {(1, "simulated")}
    # a returned region is queryable again: the next cycle scores it
    owner.run(backend, 2)
    again = {(r["sample_id"], r["region"]) for r in cycle_file(tmp_path, 2, "scores.parquet")}
    assert {(d["sample_id"], d["region"]) for d in returned} <= again
    accepted = {(d["sample_id"], d["region"]) for d in decisions if d["accepted"]}
    assert not accepted & again


class FaintEEMBackend(FakeBackend):
    """An EEM a hundred times fainter (BALD's scale): no pixel reaches the absolute threshold."""

    def values(self, sample_id):
        return super().values(sample_id) / 100


def test_an_eem_below_the_region_threshold_queries_nothing_and_says_which_key(
    pool, tmp_path, caplog
):
    state, truth = pool
    al = ActiveLearningConfig(**{**REGION_AL, "strategy": "eem"}, theta=0.0)
    backend = FaintEEMBackend(truth, tmp_path)
    with caplog.at_level(logging.WARNING, logger="orchestrator.run"):
        _, _, history = fake_run(tmp_path, state, truth, 1, al, backend=backend, image_size=SIZE)
    assert history[1]["gate/selected"] == 0
    assert "D^S holds no queryable region (no pixel reaches eem.region_threshold" in caplog.text
    assert "eem.region_threshold: otsu" in caplog.text


def test_a_budget_larger_than_every_region_of_d_s_is_reported(pool, tmp_path, caplog):
    state, truth = pool
    budget = 10 * state.count(UNLABELLED) * SIZE[0] * SIZE[1]
    al = ActiveLearningConfig(
        **{**REGION_AL, "strategy": "eem", "budget": budget}, budget_unit="pixels", theta=0.0
    )
    with caplog.at_level(logging.WARNING, logger="orchestrator.run"):
        _, _, history = region_run(tmp_path, state, truth, 1, al)
    spent = int(history[1]["oracle/pixels"])
    assert 0 < spent < budget
    assert f"every queryable region of D^S is taken and spends {spent} of the {budget} pixels" in (
        caplog.text
    )
    assert "eem.region_threshold: otsu" in caplog.text


def test_region_labels_hold_the_accepted_regions_and_training_reads_only_them(pool, tmp_path):
    state, truth = pool
    al = ActiveLearningConfig(**REGION_AL, theta=0.0)
    owner, backend, _ = region_run(tmp_path, state, truth, 1, al)
    decisions = cycle_file(tmp_path, 1, "decisions.parquet")
    scores = {(r["sample_id"], r["region"]): json.loads(r["record"]) for r in cycle_file(tmp_path, 1, "scores.parquet") if r["region"]}  # fmt: skip
    for sample_id in {d["sample_id"] for d in decisions}:
        record = owner.state.record(sample_id)
        assert record["role"] == LABELLED and record["cycle_labelled"] == 1
        labels = np.asarray(Image.open(record["mask_path"]))
        expected = np.full(SIZE, NOT_LABELLED, np.uint8)
        for d in decisions:
            if d["sample_id"] == sample_id:
                box = scores[(sample_id, d["region"])]["bbox"]
                window = (slice(box["y0"], box["y1"] + 1), slice(box["x0"], box["x1"] + 1))
                piece = truth(sample_id)[window]
                expected[window] = np.where(piece == IGNORE_INDEX, LABELLED_VOID, piece)
        assert (labels == expected).all()
        assert record["labelled_pixels"] == int((expected != NOT_LABELLED).sum())
        training = np.asarray(Image.open(record["label_source"]))  # raw ids at native size
        assert (training != 0).sum() > 0  # something labelled
    assert backend.trained_on[-1] == sorted(
        pq.read_table(owner.state.path)
        .filter(pa.compute.equal(pq.read_table(owner.state.path)["role"], LABELLED))["sample_id"]
        .to_pylist()  # fmt: skip
    )


def test_images_collect_regions_over_cycles_and_stay_queryable(pool, tmp_path):
    state, truth = pool
    al = ActiveLearningConfig(**{**REGION_AL, "budget": 20}, theta=0.0)
    owner, _, history = region_run(tmp_path, state, truth, 3, al)
    seen: dict[str, set] = {}
    for cycle in (1, 2, 3):
        for d in cycle_file(tmp_path, cycle, "decisions.parquet"):
            regions = seen.setdefault(d["sample_id"], set())
            assert d["region"] not in regions  # a labelled cell is never queried again
            regions.add(d["region"])
    again = [s for s, r in seen.items() if len(r) > 1]
    assert again  # some image got regions in more than one cycle
    record = owner.state.record(again[0])
    labels = np.asarray(Image.open(record["mask_path"]))
    assert record["labelled_pixels"] == int((labels != NOT_LABELLED).sum())
    assert history[3]["oracle/total_cost"] == 60
    fractions = [history[c]["pool/labelled_pixel_fraction"] for c in (0, 1, 2, 3)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]


def test_a_pixel_budget_is_spent_up_to_the_last_region(pool, tmp_path):
    state, truth = pool
    al = ActiveLearningConfig(**{**REGION_AL, "budget": 200, "budget_unit": "pixels"}, theta=0.0)
    _, _, history = region_run(tmp_path, state, truth, 1, al)
    pixels = [d["pixels"] for d in cycle_file(tmp_path, 1, "decisions.parquet")]
    assert sum(pixels[:-1]) < 200 <= sum(pixels) and history[1]["oracle/pixels"] == sum(pixels)


@pytest.mark.parametrize("strategy", ["eem", "random"])
def test_a_resumed_region_run_ends_as_an_uninterrupted_one(pool, tmp_path, strategy):
    state, truth = pool
    al = ActiveLearningConfig(**{**REGION_AL, "strategy": strategy}, theta=0.6)
    straight, _, _ = region_run(tmp_path / "a", state, truth, 3, al)
    region_run(tmp_path / "b", state, truth, 1, al)
    resumed_state = PoolState.load(RunLayout(tmp_path / "b").snapshot(1))
    progress = Progress.load(RunLayout(tmp_path / "b"))
    resumed, _, history = region_run(tmp_path / "b", resumed_state, truth, 3, al, progress)
    assert len(history) == 2
    for cycle in (1, 2, 3):
        assert cycle_file(tmp_path / "a", cycle, "decisions.parquet") == cycle_file(
            tmp_path / "b", cycle, "decisions.parquet"
        )

    def comparable(table, run_dir):
        for name in ("label_source", "mask_path"):
            paths = [None if p is None else p.replace(str(run_dir), "RUN") for p in table[name].to_pylist()]  # fmt: skip
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(paths, pa.string()))  # fmt: skip
        return table

    assert comparable(resumed.state.table, tmp_path / "b").equals(
        comparable(straight.state.table, tmp_path / "a")
    )


def test_random_regions_depend_on_the_seed_only(pool, tmp_path):
    state, truth = pool
    al = ActiveLearningConfig(**{**REGION_AL, "strategy": "random"}, theta=0.0)
    region_run(tmp_path / "a", state, truth, 1, al)
    region_run(tmp_path / "b", state, truth, 1, al)
    picked = cycle_file(tmp_path / "a", 1, "decisions.parquet")
    assert picked == cycle_file(tmp_path / "b", 1, "decisions.parquet")
    assert len({d["sample_id"] for d in picked}) > 1  # spread over images, not one image's cells


# -- bad input -----------------------------------------------------------------------------------
def test_an_unknown_unit_or_budget_unit_names_the_key():
    with pytest.raises(ConfigError, match="al.unit"):
        load_experiment(None, ["al.unit=pixel"])
    with pytest.raises(ConfigError, match="al.budget_unit"):
        load_experiment(None, ["al.unit=region", "al.budget=3", "al.budget_unit=images"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["al.unit=region", "al.budget=0.05"], "budget: with unit region it is a count of clicks"),
        (["al.unit=region", "al.budget=3", "al.strategy=coreset"], "coreset has no region mode"),
        (
            ["al.unit=region", "al.budget=10", "al.budget_unit=pixels", "eem.min_region_area=16"],
            r"al.budget: 10 pixels is smaller than one region \(eem.min_region_area: 16",
        ),
        (
            ["al.unit=region", "al.budget=100", "al.budget_unit=pixels", "al.strategy=entropy"],
            r"smaller than one region \(al.region_cell squared: 1024",
        ),
        (["al.unit=region", "al.budget=3", "data.image_size=null"], "data.image_size"),
    ],
)
def test_bad_region_settings_are_refused_when_the_config_loads(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_experiment(None, overrides)


def test_the_default_stays_image_level():
    assert ExperimentConfig().al.unit == "image"
    assert replace(ActiveLearningConfig(), unit="region", budget=3).budget_unit == "clicks"
