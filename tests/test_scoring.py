"""PoolScorer as a plain class: scores with known answers, and unreadable images kept aside with a reason."""

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from helpers import SCORER_ARGS, model_version, pool_rows, tiny_checkpoint

from actors.scoring import UNREADABLE, PoolScorer, ScorerPool
from orchestrator.strategies import RegionSpec, ScoreKind
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.data.region_labels import write_region_labels
from segxal.eem.bald import mc_probabilities, normalized_bald
from segxal.eem.config import DepthConfig, EEMConfig
from segxal.eem.entropy import normalized_entropy
from segxal.eem.pipeline import score_batch
from segxal.models.unet import UNet, UNetConfig

SIZE = (32, 64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=4, depth=2)).eval()


@pytest.fixture(scope="module")
def rows(synthetic_root):
    return cityscapes_manifest(synthetic_root, "train").slice(0, 6)


@pytest.fixture
def scorer(model):
    scorer = PoolScorer(
        EEMConfig(depth=DepthConfig(backend="geometric"), min_region_area=2),
        "cityscapes",
        SIZE,
        batch_size=4,
        device="cpu",
    )
    scorer.load_model(model.to_checkpoint())
    return scorer


def with_broken_image(rows: pa.Table, index: int, tmp_path) -> tuple[pa.Table, str]:
    """``rows`` with the image of row ``index`` replaced by the first half of its PNG (a truncated file)."""
    original = rows["image_path"][index].as_py()
    broken = tmp_path / "truncated.png"
    data = open(original, "rb").read()
    broken.write_bytes(data[: len(data) // 2])
    paths = rows["image_path"].to_pylist()
    paths[index] = str(broken)
    return rows.set_column(
        rows.schema.get_field_index("image_path"), "image_path", pa.array(paths)
    ), str(broken)


def test_entropy_scores_are_the_mean_normalised_entropy_of_each_image(scorer, model, rows):
    scores = scorer.score(rows, ScoreKind.ENTROPY)
    dataset = SegmentationDataset(rows, CITYSCAPES, SampleTransform(size=SIZE))
    with torch.no_grad():
        expected = [
            normalized_entropy(model(dataset[i]["image"][None])).mean().item()
            for i in range(len(rows))
        ]
    assert scores["sample_id"].to_pylist() == rows["sample_id"].to_pylist()
    np.testing.assert_allclose(scores["score"].to_numpy(), expected, rtol=1e-5)
    assert scores[UNREADABLE].null_count == len(rows)


def test_scoring_and_explaining_read_no_label(scorer, rows, tmp_path):
    missing = rows.set_column(
        rows.schema.get_field_index("label_path"),
        "label_path",
        pa.array([str(tmp_path / f"gone_{i}.png") for i in range(len(rows))]),
    )  # label files that do not exist: reading one would make the image unreadable
    assert scorer.score(missing, ScoreKind.EEM).equals(scorer.score(rows, ScoreKind.EEM))
    explained = scorer.explain(missing, ScoreKind.EEM)
    assert not explained.unreadable and len(explained.requests) == len(rows)
    assert "label" not in SegmentationDataset(missing, CITYSCAPES, load_label=False)[0]
    with pytest.raises(ValueError, match="augmentation moves the label"):
        SegmentationDataset(rows, CITYSCAPES, SampleTransform(augment=True), load_label=False)


def test_an_unreadable_image_is_set_aside_with_its_reason_and_the_rest_scored_as_before(
    scorer, rows, tmp_path
):
    clean = scorer.score(rows, ScoreKind.EEM)
    damaged, broken = with_broken_image(rows, 2, tmp_path)
    scores = scorer.score(damaged, ScoreKind.EEM)
    bad_id = rows["sample_id"][2].as_py()
    assert sorted(scores["sample_id"].to_pylist()) == sorted(
        rows["sample_id"].to_pylist()
    )  # every id, once
    reasons = {
        r["sample_id"]: r[UNREADABLE] for r in scores.to_pylist() if r[UNREADABLE] is not None
    }
    assert list(reasons) == [bad_id] and broken in reasons[bad_id]
    good = scores.filter(pc.is_null(scores[UNREADABLE]))
    assert scores.filter(pc.is_valid(scores[UNREADABLE]))["score"].null_count == 1
    expected = clean.filter(pc.not_equal(clean["sample_id"], bad_id))
    assert good["sample_id"].to_pylist() == expected["sample_id"].to_pylist()
    np.testing.assert_allclose(good["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5)


def test_loader_workers_decode_ahead_and_give_the_same_scores_and_reasons(
    scorer, model, rows, tmp_path
):
    damaged, broken = with_broken_image(rows, 3, tmp_path)
    prefetching = PoolScorer(
        scorer.eem, "cityscapes", SIZE, batch_size=4, device="cpu", loader_workers=2
    )
    prefetching.load_model(model.to_checkpoint())
    expected, scores = (
        scorer.score(damaged, ScoreKind.EEM),
        prefetching.score(damaged, ScoreKind.EEM),
    )
    assert scores["sample_id"].equals(expected["sample_id"])
    assert scores[UNREADABLE].to_pylist() == expected[UNREADABLE].to_pylist()
    assert broken in scores.filter(pc.is_valid(scores[UNREADABLE]))[UNREADABLE][0].as_py()
    np.testing.assert_allclose(
        scores["score"].to_numpy(zero_copy_only=False),
        expected["score"].to_numpy(zero_copy_only=False),
        rtol=1e-6,
    )


def test_core_set_embeddings_leave_an_unreadable_image_null(scorer, rows, tmp_path):
    damaged, _ = with_broken_image(rows, 0, tmp_path)
    table = scorer.score(damaged, ScoreKind.EMBEDDING)
    embeddings = dict(
        zip(table["sample_id"].to_pylist(), table["embedding"].to_pylist(), strict=True)
    )
    assert embeddings[rows["sample_id"][0].as_py()] is None
    assert all(len(e) > 0 for i, e in embeddings.items() if i != rows["sample_id"][0].as_py())


def test_explain_returns_requests_for_readable_images_only(scorer, rows, tmp_path):
    damaged, broken = with_broken_image(rows.slice(0, 3), 1, tmp_path)
    explained = scorer.explain(damaged, ScoreKind.EEM, str(tmp_path), panels=1)
    ids = rows["sample_id"].to_pylist()[:3]
    assert [r.sample_id for r in explained.requests] == [ids[0], ids[2]]
    assert list(explained.unreadable) == [ids[1]] and broken in explained.unreadable[ids[1]]
    assert (
        explained.requests[1].image_path == rows["image_path"][2].as_py()
    )  # paths still match their ids
    assert all(r.prediction.shape == SIZE for r in explained.requests)
    assert len(list(tmp_path.glob("*.png"))) == 2  # the truncated file and one panel


@pytest.mark.slow
def test_explaining_is_spread_over_the_actors_and_equals_one_scorer(
    local_ray, synthetic_root, tmp_path
):
    rows = pool_rows(synthetic_root, copies=1)
    checkpoint = tiny_checkpoint()
    pool = ScorerPool(2, SCORER_ARGS)
    try:
        pool.load_model(checkpoint)
        explained = pool.explain(rows, ScoreKind.EEM, str(tmp_path / "pool"), panels=5)
        loaded = [
            model_version(actor) for actor in pool.actors
        ]  # set when an actor explains a shard
    finally:
        pool.shutdown()
    local = PoolScorer(**SCORER_ARGS)
    local.load_model(checkpoint)
    expected = local.explain(rows, ScoreKind.EEM, str(tmp_path / "local"), panels=5)
    assert loaded == [pool.version, pool.version]  # both actors explained
    assert [r.sample_id for r in explained.requests] == rows["sample_id"].to_pylist()
    for got, want in zip(explained.requests, expected.requests, strict=True):
        assert np.array_equal(got.prediction, want.prediction) and got.regions == want.regions
    panels = lambda folder: sorted(p.name for p in (tmp_path / folder).glob("*.png"))  # noqa: E731
    assert panels("pool") == panels("local") and len(panels("pool")) == 5


# -- region mode ---------------------------------------------------------------------------------
def with_region_labels(rows: pa.Table, tmp_path, labelled_rows: slice) -> pa.Table:
    """``rows`` with a mask_path column: the first image has ``labelled_rows`` labelled."""
    labels = np.full(SIZE, 255, np.uint8)
    labels[labelled_rows] = 3
    path = tmp_path / "region_labels.png"
    write_region_labels(path, labels)
    return rows.append_column(
        "mask_path", pa.array([str(path)] + [None] * (len(rows) - 1), pa.string())
    )


def test_entropy_cells_score_the_mean_entropy_of_their_unlabelled_pixels(
    scorer, model, rows, tmp_path
):
    rows = with_region_labels(rows.slice(0, 2), tmp_path, slice(0, 20))
    table = scorer.score_regions(rows, RegionSpec("cells", ScoreKind.ENTROPY, 16))
    dataset = SegmentationDataset(rows, CITYSCAPES, SampleTransform(size=SIZE))
    first = rows["sample_id"][0].as_py()
    with torch.no_grad():
        entropy = normalized_entropy(model(dataset[0]["image"][None]))[0].numpy()
    cells = {r["region"]: r for r in table.to_pylist() if r["sample_id"] == first}
    # rows 0-19 labelled: the 2 x 4 grid loses its first row, and its second keeps rows 20-31
    assert sorted(cells) == [5, 6, 7, 8]
    for region, cell in cells.items():
        top, left = (region - 1) // 4 * 16, (region - 1) % 4 * 16
        window = entropy[max(top, 20) : top + 16, left : left + 16]
        assert cell["pixels"] == window.size
        assert cell["score"] == pytest.approx(window.mean(), rel=1e-5)
    assert table.filter(pc.equal(table["sample_id"], rows["sample_id"][1].as_py())).num_rows == 8


def test_eem_regions_avoid_labelled_pixels_and_explaining_finds_them_again(
    scorer, model, rows, tmp_path
):
    rows = with_region_labels(rows.slice(0, 3), tmp_path, slice(0, 16))
    dataset = SegmentationDataset(rows, CITYSCAPES, SampleTransform(size=SIZE))
    images = torch.stack([dataset[i]["image"] for i in range(len(rows))])
    maps = score_batch(model, images, scorer.eem, scorer.depth_backend, return_maps=True).maps
    # an untrained model's EEM is nearly flat: a threshold at its upper quartile gives regions
    threshold = float(np.quantile(maps.eem[0, 16:].numpy(), 0.75))
    scorer.eem = replace(scorer.eem, region_threshold=threshold)
    spec = RegionSpec("eem", ScoreKind.EEM, 16)
    table = scorer.score_regions(rows, spec)
    first = rows["sample_id"][0].as_py()
    records = [json.loads(r["record"]) for r in table.to_pylist() if r["sample_id"] == first and r["region"]]  # fmt: skip
    assert records and all(r["bbox"]["y0"] >= 16 for r in records)  # below the labelled rows
    queried = {i: [json.loads(r["record"]) for r in table.to_pylist() if r["sample_id"] == i and r["region"]][:2] for i in rows["sample_id"].to_pylist()}  # fmt: skip
    queried = {i: q for i, q in queried.items() if q}
    explained = scorer.explain(
        rows.filter(pc.is_in(rows["sample_id"], pa.array(list(queried)))),
        ScoreKind.EEM,
        queried=queried,
    )
    for request in explained.requests:
        assert request.queried_regions_only
        assert request.regions == queried[request.sample_id]
        for region in request.regions:
            assert (request.region_map == region["id"]).sum() == region["area"]
        if request.sample_id == first:
            assert not request.region_map[:16].any()


def test_bald_scores_are_the_mean_normalised_bald_of_each_image(rows):
    torch.manual_seed(0)
    config = UNetConfig(num_classes=CITYSCAPES.num_classes, width=4, depth=2, dropout=0.3)
    model = UNet(config).eval()
    scorer = PoolScorer(EEMConfig(mc_samples=4), "cityscapes", SIZE, batch_size=4, device="cpu")
    scorer.load_model(model.to_checkpoint())
    dataset = SegmentationDataset(rows, CITYSCAPES, SampleTransform(size=SIZE))
    images = torch.stack([dataset[i]["image"] for i in range(len(rows))])
    torch.manual_seed(5)
    expected = torch.cat(
        [
            normalized_bald(mc_probabilities(model, part, 4)).mean(dim=(1, 2))
            for part in (images[:4], images[4:])
        ]  # fmt: skip
    )
    torch.manual_seed(5)
    scores = scorer.score(rows, ScoreKind.BALD)
    np.testing.assert_allclose(scores["score"].to_numpy(), expected.numpy(), rtol=1e-5)
    assert (scores["score"].to_numpy() > 0).all()
