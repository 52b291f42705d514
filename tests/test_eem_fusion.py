import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from segxal.data.labels import CITYSCAPES
from segxal.data.transforms import IMAGENET_MEAN, denormalize
from segxal.eem import pipeline
from segxal.eem.config import EEMConfig
from segxal.eem.entropy import normalized_entropy
from segxal.eem.fusion import fuse_eem, image_scores
from segxal.eem.gradcam import grad_cam
from segxal.eem.pipeline import score_batch
from segxal.eem.proximity import depth_informed_image, mask_weight, near_region, otsu_threshold
from segxal.eem.regions import extract_regions
from segxal.models.depth import DatasetDepth, GeometricDepth
from segxal.models.unet import UNet, UNetConfig


def test_otsu_splits_a_bimodal_map_per_image():
    proximity = torch.full((2, 8, 8), 0.1)
    proximity[0, 5:] = 0.8  # 24 near pixels
    proximity[1, :, :2] = 0.55
    threshold = otsu_threshold(proximity, bins=64)
    assert 0.1 < threshold[0] <= 0.8 and 0.1 < threshold[1] <= 0.55
    near = near_region(proximity, "otsu")
    assert torch.equal(near[0], proximity[0] > 0.5) and torch.equal(near[1], proximity[1] > 0.5)
    assert otsu_threshold(torch.full((1, 4, 4), 0.3)).isinf().all()  # flat: no near region
    assert not near_region(torch.full((1, 4, 4), 0.3)).any()


def test_quantile_and_fixed_thresholds():
    proximity = torch.arange(100, dtype=torch.float32).view(1, 10, 10) / 99
    assert near_region(proximity, "quantile", quantile=0.7).sum() == 30
    assert near_region(proximity, "fixed", fixed=0.5).sum() == 50
    flat_far = torch.zeros(1, 10, 10)
    flat_far[0, 0, :3] = 1.0
    assert (
        near_region(flat_far, "quantile", quantile=0.5).sum() == 3
    )  # ties at the quantile stay far


def test_depth_informed_image_hard_and_soft():
    images = torch.randn(2, 3, 4, 5)
    proximity = torch.rand(2, 4, 5)
    near = proximity > 0.5
    hard = depth_informed_image(images, proximity, near, "hard")
    soft = depth_informed_image(images, proximity, near, "soft")
    assert torch.equal(hard[near[:, None].expand_as(hard)], images[near[:, None].expand_as(images)])
    assert hard[~near[:, None].expand_as(hard)].eq(0).all()  # far pixels: the dataset-mean colour
    assert torch.allclose(denormalize(hard)[0, :, ~near[0]], torch.tensor(IMAGENET_MEAN)[:, None])
    assert torch.allclose(soft, images * proximity[:, None])
    assert torch.equal(mask_weight(proximity, near, "soft"), proximity)
    with pytest.raises(ValueError, match="near"):
        depth_informed_image(images, proximity, near[:, :2], "hard")


def test_fusion_weights_and_anomaly_term():
    cam, entropy = torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    assert torch.equal(fuse_eem(cam, entropy, 0.0, 1.0), entropy)
    assert torch.allclose(fuse_eem(cam, entropy, 0.5, 0.5), (cam + entropy) / 2)
    anomaly = torch.linspace(-20, -5, 24).view(2, 3, 4)
    fused = fuse_eem(cam, entropy, 0.5, 0.5, 1.0, anomaly)
    span = anomaly.amax((1, 2), keepdim=True) - anomaly.amin((1, 2), keepdim=True)
    expected_anomaly = (anomaly - anomaly.amin((1, 2), keepdim=True)) / span
    assert torch.allclose(fused, (cam + entropy) / 2 + expected_anomaly)
    with pytest.raises(ValueError, match="anomaly"):
        fuse_eem(cam, entropy, 0.5, 0.5, 1.0)


def test_image_score_reductions():
    eem = torch.arange(10, dtype=torch.float32).view(1, 2, 5)
    assert image_scores(eem, "mean").item() == pytest.approx(4.5)
    assert image_scores(eem, "topk", 20).item() == pytest.approx(8.5)  # top 2 of 10
    assert image_scores(eem, "topk", 1).item() == pytest.approx(9.0)  # at least one pixel
    pixels = torch.arange(375, dtype=torch.float32).reshape(1, 15, 25)  # 17.6 % of 375 is 66 pixels
    assert image_scores(pixels, "topk", 17.6).item() == pytest.approx(
        float(np.mean(np.arange(309, 375)))
    )


def test_regions_records_known_layout_and_json():
    eem = np.zeros((20, 30))
    eem[2:6, 3:9] = 0.6
    eem[4, 7] = 0.9  # peak of the first blob
    eem[12:18, 20:28] = 0.7
    eem[12, 27] = 0.95
    eem[0, 29] = 0.99  # a single pixel: below min_area
    prediction = np.full((20, 30), 13)
    prediction[12:18, 20:24] = 11
    prediction[12:18, 24:28] = 0
    prediction[12:18, 20:25] = 11  # class 11 dominates the second blob (30 vs 18 px)
    regions = extract_regions(
        eem,
        torch.from_numpy(prediction),
        threshold=0.5,
        min_area=4,
        class_names=CITYSCAPES.class_names,
    )
    assert [r["id"] for r in regions] == [1, 2]
    first, second = regions
    assert first["prompt"] == {"x": 27, "y": 12} and first["area"] == 48
    assert first["class_id"] == 11 and first["class_name"] == "person"
    assert first["bbox"] == {"x0": 20, "y0": 12, "x1": 27, "y1": 17}
    assert first["mean_eem"] == pytest.approx((47 * 0.7 + 0.95) / 48)
    assert (
        second["prompt"] == {"x": 7, "y": 4}
        and second["area"] == 24
        and second["class_name"] == "car"
    )
    assert json.loads(json.dumps(regions)) == regions
    assert len(extract_regions(eem, prediction, 0.5, 4, max_regions=1)) == 1
    assert extract_regions(eem, prediction, 0.5, 1)[0]["prompt"] == {"x": 29, "y": 0}


def test_the_prompt_marks_the_uncertainty_peak_off_the_outer_ring():
    """A near band along the bottom: Grad-CAM (coarse) peaks on row 10, the entropy at a wrong pixel
    inside, and higher still on the image's outermost ring (the zero padding's artefact). The prompt
    goes to the entropy's peak off the ring; the region and its EEM figures stay."""
    cam = np.zeros((12, 16))
    cam[6:, :] = 0.5
    cam[10, :] = 1.0
    entropy = np.full((12, 16), 0.6)
    entropy[8, 5] = 0.9  # where the model is wrong
    entropy[11, 3] = 1.0  # the outermost row
    entropy[0, 0] = 1.0  # outside every region (a single pixel): never a prompt
    eem = 0.5 * cam + 0.5 * entropy
    prediction = np.zeros((12, 16), int)
    (region,) = extract_regions(eem, prediction, 0.5, 4, uncertainty=torch.from_numpy(entropy))
    assert region["prompt"] == {"x": 5, "y": 8}
    assert region["area"] == 6 * 16 and region["bbox"] == {"x0": 0, "y0": 6, "x1": 15, "y1": 11}
    assert region["peak_eem"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.6)
    assert region["mean_eem"] == pytest.approx(eem[6:].mean())
    (without,) = extract_regions(eem, prediction, 0.5, 4)  # the EEM's own peak, off the ring
    assert without["prompt"] == {"x": 1, "y": 10} and without["peak_eem"] == region["peak_eem"]
    with pytest.raises(ValueError, match="uncertainty shape"):
        extract_regions(eem, prediction, 0.5, 4, uncertainty=entropy[:6])
    on_ring = np.zeros((12, 16))
    on_ring[0, 4:10] = [0.6, 0.7, 0.9, 0.8, 0.6, 0.6]  # a region on the top row only
    (region,) = extract_regions(on_ring, prediction, 0.5, 4, uncertainty=on_ring)
    assert region["prompt"] == {"x": 6, "y": 0}


class Constant(nn.Module):
    """Fixed logits, for pipeline maths without a real model."""

    last_decoder_layer = "features"

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)))


def test_alpha_zero_gives_pure_normalised_entropy():
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=5, width=4, depth=2))
    images = torch.randn(2, 3, 16, 24)
    result = score_batch(
        model, images, EEMConfig(alpha=0.0, beta=1.0), GeometricDepth(), return_maps=True
    )
    with torch.no_grad():
        expected = normalized_entropy(model.eval()(images))
    assert torch.allclose(result.maps.eem, expected, atol=1e-6)
    assert torch.equal(result.maps.proxgradcam, torch.zeros_like(expected))
    assert torch.allclose(result.score, expected.mean(dim=(1, 2)), atol=1e-6)


def test_score_batch_fuses_maps_and_records():
    torch.manual_seed(0)
    model = Constant().train()
    images = torch.randn(3, 3, 16, 24)
    disparity = torch.zeros(3, 16, 24)
    disparity[:, 10:] = 20.0
    disparity[:, 4:10] = 2.0
    config = EEMConfig(reduction="topk", topk_percent=25.0)
    result = score_batch(model, images, config, DatasetDepth(), depth=disparity, return_maps=True)
    maps = result.maps
    assert torch.equal(maps.near, disparity > 10)
    assert torch.allclose(maps.eem, 0.5 * maps.proxgradcam + 0.5 * maps.entropy)
    assert torch.allclose(result.score, image_scores(maps.eem, "topk", 25.0))
    assert result.near_fraction.tolist() == pytest.approx([6 / 16] * 3)
    assert maps.proxgradcam.amax(dim=(1, 2)).tolist() == pytest.approx([1.0] * 3)
    assert maps.proxgradcam[~maps.near].eq(0).all()  # gated: removed pixels carry no attribution
    ungated = score_batch(
        model, images, EEMConfig(gate_cam=False), DatasetDepth(), depth=disparity, return_maps=True
    )
    informed = depth_informed_image(images, maps.proximity, maps.near, "hard")
    raw = grad_cam(model, informed, "features", maps.prediction, maps.near)
    assert torch.allclose(ungated.maps.proxgradcam, raw, atol=1e-6)
    assert torch.allclose(
        maps.proxgradcam, raw * maps.near / (raw * maps.near).amax((1, 2), keepdim=True), atol=1e-6
    )
    assert model.training and all(p.grad is None for p in model.parameters())
    records = result.records(["a", "b", "c"])
    assert [r["sample_id"] for r in records] == ["a", "b", "c"]
    assert records[1]["score"] == pytest.approx(result.score[1].item())
    json.dumps(records)
    lean = score_batch(model, images, config, DatasetDepth(), depth=disparity)
    assert lean.maps is None and torch.allclose(lean.score, result.score, atol=1e-6)
    regions = maps.regions(EEMConfig(region_threshold=0.3, min_region_area=1))
    assert len(regions) == 3 and all(isinstance(r, list) for r in regions)


def test_panel_is_written(tmp_path):
    from PIL import Image

    from segxal.eem.panels import save_panel

    torch.manual_seed(0)
    model = Constant(num_classes=19)
    images = torch.randn(1, 3, 32, 64)
    result = score_batch(
        model,
        images,
        EEMConfig(min_region_area=1, region_threshold=0.2),
        GeometricDepth(),
        return_maps=True,
    )
    maps = result.maps
    regions = maps.regions(
        EEMConfig(min_region_area=1, region_threshold=0.2), CITYSCAPES.class_names
    )
    assert regions[0], "the panel should show at least one prompt"
    path = save_panel(
        tmp_path / "p" / "panel.png",
        images[0],
        maps.prediction[0],
        maps.entropy[0],
        maps.proximity[0],
        maps.proxgradcam[0],
        maps.eem[0],
        regions[0],
        CITYSCAPES,
        "sample",
    )
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] >= 600
        assert np.asarray(png.convert("L")).std() > 5  # not a blank canvas
        with_prompts = np.asarray(png.convert("RGB")).astype(int)
    bare = save_panel(tmp_path / "p" / "bare.png", images[0], maps.prediction[0], maps.entropy[0],
                      maps.proximity[0], maps.proxgradcam[0], maps.eem[0], [], CITYSCAPES, "sample")  # fmt: skip
    with Image.open(bare) as png:
        without = np.asarray(png.convert("RGB")).astype(int)

    def magenta(rgb):  # the prompts' colour, the one Label Studio's keypoints have
        return int(((rgb[..., 0] > 230) & (rgb[..., 1] < 25) & (rgb[..., 2] > 230)).sum())

    assert magenta(with_prompts) > magenta(without) + 10


def test_the_eem_overlay_shows_the_image_where_the_eem_is_low():
    from matplotlib import colormaps

    from segxal.eem.panels import OVERLAY_OPACITY, heat_overlay

    rgb = np.full((2, 2, 3), 0.2)
    heat = np.array([[0.0, 1.0], [2.0, 4.0]])
    blended = heat_overlay(rgb, heat)
    assert np.allclose(blended[0, 0], 0.2)  # no EEM: the image itself
    top = colormaps["inferno"](1.0)[:3]
    assert np.allclose(blended[1, 1], (1 - OVERLAY_OPACITY) * 0.2 + OVERLAY_OPACITY * np.array(top))
    half = colormaps["inferno"](0.5)[:3]  # 2 of a maximum of 4
    opacity = OVERLAY_OPACITY * 0.5
    assert np.allclose(blended[1, 0], (1 - opacity) * 0.2 + opacity * np.array(half))


def test_region_map_matches_region_records():
    from segxal.eem.regions import extract_regions, region_map

    eem = np.zeros((8, 8))
    eem[1:3, 1:3] = 0.9  # region A, peak 0.9
    eem[5:8, 4:8] = 0.7  # region B
    eem[6, 6] = 0.8
    eem[0, 7] = 0.95  # too small
    records = extract_regions(eem, np.zeros((8, 8), int), threshold=0.5, min_area=2)
    mapping = region_map(eem, records)
    assert [r["id"] for r in records] == [1, 2]
    assert (mapping == 1).sum() == 4 and mapping[1, 1] == 1
    assert (mapping == 2).sum() == 12 and mapping[6, 6] == 2
    assert mapping[0, 7] == 0


def test_bf16_on_a_cpu_without_native_bfloat16_warns_once(monkeypatch):
    monkeypatch.setattr(pipeline, "_warned_slow_bf16", False)
    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bfloat16 .* 26x slower"):
        pipeline.segmenter_precision("bf16", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline.segmenter_precision("bf16", torch.device("cpu"))  # once only
        monkeypatch.setattr(pipeline, "_warned_slow_bf16", False)
        monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: True)
        pipeline.segmenter_precision("bf16", torch.device("cpu"))  # native: no warning


def test_bf16_precision_runs_the_segmenter_in_bfloat16_and_scores_close_to_fp32():
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=5, width=8, depth=2)).eval()
    images = torch.randn(2, 3, 32, 48)
    disparity = torch.linspace(0, 20, 32)[None, :, None].expand(2, 32, 48).contiguous()
    dtypes = []
    hook = model.head.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype)
    )
    exact = score_batch(
        model, images, EEMConfig(), DatasetDepth(), depth=disparity, return_maps=True
    )
    fast = score_batch(
        model,
        images,
        EEMConfig(precision="bf16"),
        DatasetDepth(),
        depth=disparity,
        return_maps=True,
    )
    hook.remove()
    assert dtypes == [
        torch.float32,
        torch.float32,
        torch.bfloat16,
        torch.bfloat16,
    ]  # two forwards each
    assert fast.score.dtype == torch.float32 and fast.maps.eem.dtype == torch.float32
    assert torch.equal(fast.maps.near, exact.maps.near)
    assert (fast.score - exact.score).abs().max() < 3e-3  # the documented bound
    assert (fast.maps.entropy - exact.maps.entropy).abs().max() < 5e-2
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        score_batch(model, images, EEMConfig(precision="fp16"), DatasetDepth(), depth=disparity)
    with pytest.raises(
        ValueError, match="EEMConfig.precision must be one of fp32, bf16, fp16; got 'fp8'"
    ):
        EEMConfig(precision="fp8")


def exact_otsu(values: np.ndarray, bins: int) -> float:
    """Otsu by brute force: every split t = k/bins of the values binned as floor(v * bins), the
    between-class variance w0 w1 (mu0 - mu1)^2 of the bin centres, the first best split."""
    index = np.minimum((np.clip(values, 0, 1) * bins).astype(int), bins - 1)
    centres = (index + 0.5) / bins
    best, best_k = -1.0, None
    for k in range(1, bins):
        far, near = centres[index < k], centres[index >= k]
        if far.size == 0 or near.size == 0:
            continue
        w0, w1 = far.size / values.size, near.size / values.size
        between = w0 * w1 * (far.mean() - near.mean()) ** 2
        if between > best + 1e-12:
            best, best_k = between, k
    return np.inf if best_k is None else best_k / bins


@pytest.mark.parametrize("seed", range(5))
def test_otsu_equals_a_brute_force_otsu(seed):
    rng = np.random.default_rng(seed)
    maps = np.stack([
        np.clip(np.where(rng.random((20, 30)) < rng.uniform(0.2, 0.8), rng.normal(0.25, 0.08, (20, 30)),
                         rng.normal(0.7, 0.1, (20, 30))), 0, 1)
        for _ in range(3)
    ]).astype(np.float32)  # fmt: skip
    thresholds = otsu_threshold(torch.from_numpy(maps), bins=64).numpy()
    assert thresholds.tolist() == pytest.approx([exact_otsu(m.ravel(), 64) for m in maps])


def test_score_batch_equals_maps_computed_independently():
    """The whole pipeline against a reference written here from the definitions: scipy's entropy,
    min-max proximity of the disparity, a fixed near threshold, the hard depth-informed image, Grad-CAM
    by a full backward with a hook, the gate, the fusion, the top-k reduction, and scipy's connected
    regions."""
    from scipy import ndimage
    from scipy.stats import entropy as scipy_entropy

    torch.manual_seed(3)
    model = Constant(num_classes=5).eval()
    images = torch.randn(2, 3, 12, 20)
    disparity = torch.rand(2, 12, 20) * 30
    config = EEMConfig(threshold="fixed", fixed=0.4, reduction="topk", topk_percent=20.0,
                       region_threshold=0.45, min_region_area=3, max_regions=50)  # fmt: skip
    result = score_batch(model, images, config, DatasetDepth(), depth=disparity, return_maps=True)

    with torch.no_grad():
        logits = model(images).numpy().astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    entropy = scipy_entropy(probabilities, base=2, axis=1) / np.log2(5)
    prediction = logits.argmax(1)
    d = disparity.numpy().astype(np.float64)
    low, high = d.min(axis=(1, 2), keepdims=True), d.max(axis=(1, 2), keepdims=True)
    proximity = (d - low) / (high - low)
    near = proximity >= 0.4
    informed = (images * torch.tensor(near, dtype=torch.float32)[:, None]).requires_grad_()
    stored = {}
    hook = model.features.register_forward_hook(lambda m, i, o: stored.update(a=o))
    out = model(informed)
    hook.remove()
    stored["a"].retain_grad()
    picked = out.gather(1, torch.tensor(prediction)[:, None])[:, 0]
    (picked * torch.tensor(near, dtype=torch.float32)).sum().backward()
    activation, gradient = stored["a"].detach().numpy(), stored["a"].grad.numpy()
    cam = np.maximum(np.einsum("bk,bkhw->bhw", gradient.mean(axis=(2, 3)), activation), 0)
    cam = cam / cam.max(axis=(1, 2), keepdims=True)
    gated = cam * near
    proxgradcam = gated / gated.max(axis=(1, 2), keepdims=True)
    eem = 0.5 * proxgradcam + 0.5 * entropy
    k = int(np.ceil(12 * 20 * 0.2))
    scores = np.sort(eem.reshape(2, -1), axis=1)[:, ::-1][:, :k].mean(axis=1)

    maps = result.maps
    np.testing.assert_allclose(maps.entropy.numpy(), entropy, atol=1e-6)
    assert (maps.prediction.numpy() == prediction).all()
    assert (maps.near.numpy() == near).all()
    np.testing.assert_allclose(maps.proxgradcam.numpy(), proxgradcam, atol=1e-5)
    np.testing.assert_allclose(maps.eem.numpy(), eem, atol=1e-5)
    np.testing.assert_allclose(result.score.numpy(), scores, atol=1e-5)

    for image, records in enumerate(maps.regions(config)):
        labels, count = ndimage.label(eem[image] >= 0.45, structure=np.ones((3, 3)))
        areas = [int((labels == i).sum()) for i in range(1, count + 1)]
        kept = sorted(a for a in areas if a >= 3)
        assert sorted(r["area"] for r in records) == kept and kept
        for record in records:
            component = labels == labels[record["prompt"]["y"], record["prompt"]["x"]]
            assert record["area"] == int(component.sum())
            assert record["peak_eem"] == pytest.approx(eem[image][component].max(), abs=1e-5)
            assert record["mean_eem"] == pytest.approx(eem[image][component].mean(), abs=1e-5)
            assert record["class_id"] == np.bincount(prediction[image][component]).argmax()
        peaks = [r["peak_eem"] for r in records]
        assert peaks == sorted(peaks, reverse=True)  # highest peak first


def _best_split_by_brute_force(values: np.ndarray) -> float:
    """The cut between two sorted distinct levels of ``values`` maximising the between-class variance."""
    best, cut = -1.0, np.inf
    levels = np.unique(values)
    for low, high in zip(levels[:-1], levels[1:], strict=True):
        upper = values >= high
        w1, w0 = upper.mean(), 1 - upper.mean()
        between = w0 * w1 * (values[upper].mean() - values[~upper].mean()) ** 2
        if between > best:
            best, cut = between, (low + high) / 2
    return cut


def test_otsu_regions_follow_the_scale_of_a_bald_like_map():
    from segxal.eem.regions import extract_regions, otsu_region_threshold, region_map

    eem = np.zeros((10, 10))
    eem[0:3, :] = 0.002  # 30 pixels of mild mutual information
    eem[6:8, 2:7] = 0.01  # 10 pixels of high mutual information: still far below 0.5
    eem[9, 9] = -np.inf  # out of play (labelled)
    assert extract_regions(eem, np.zeros((10, 10), int), threshold=0.5, min_area=2) == []
    finite = eem[np.isfinite(eem)]
    cut = _best_split_by_brute_force(finite)
    threshold = otsu_region_threshold(eem)
    assert (finite >= threshold).sum() == (finite >= cut).sum() == 10
    records = extract_regions(eem, np.zeros((10, 10), int), threshold="otsu", min_area=2)
    assert [r["area"] for r in records] == [10]
    assert records[0]["threshold"] == pytest.approx(threshold)
    assert (region_map(eem, records) == 1).sum() == 10
    assert otsu_region_threshold(np.full((4, 4), 0.3)) == np.inf  # a flat map has no split


def test_region_threshold_is_a_value_or_otsu():
    assert EEMConfig(region_threshold="otsu").region_threshold == "otsu"
    for bad in (-0.1, "median"):
        with pytest.raises(ValueError, match="region_threshold must be >= 0 or 'otsu'"):
            EEMConfig(region_threshold=bad)
