"""AnomalyMix on batches: labels of pasted pixels, untouched pixels, fraction, scale, flip, determinism."""

import numpy as np
import pytest
import torch

from segxal.data.labels import IGNORE_INDEX
from segxal.data.transforms import normalize
from segxal.pebal.anomalymix import AnomalyMix, OutlierObject, SyntheticOutliers, synthetic_outlier
from segxal.pebal.config import AnomalyMixConfig

Y = 4  # inlier classes; the anomaly index


class TwoColourBars:
    """Always the same object: left half red, right half green, fully masked (h x w)."""

    def __init__(self, h=4, w=8):
        image = np.zeros((h, w, 3), np.uint8)
        image[:, : w // 2] = (255, 0, 0)
        image[:, w // 2 :] = (0, 255, 0)
        self.object = OutlierObject(image, np.ones((h, w), bool), "test")

    def sample(self, rng):
        return self.object


class SolidRed(TwoColourBars):
    def __init__(self):
        super().__init__()
        self.object.image[:] = (255, 0, 0)


def batch(b=6, h=60, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, Y, (b, h, w), generator=g)
    labels[:, :5] = IGNORE_INDEX  # void rows may be covered too
    return torch.randn(b, 3, h, w, generator=g), labels


def test_pasted_pixels_carry_the_anomaly_label_and_others_are_unchanged():
    images, labels = batch()
    before = images.clone(), labels.clone()
    mix = AnomalyMix(AnomalyMixConfig(fraction=0.5, max_objects=3), Y, outliers=SolidRed())
    out, out_labels, mixed = mix(images, labels, np.random.default_rng(0))
    assert torch.equal(images, before[0]) and torch.equal(labels, before[1])  # inputs untouched
    pasted = out_labels == Y
    assert torch.equal(pasted.flatten(1).any(1), mixed) and int(mixed.sum()) == 3
    assert torch.equal(out_labels[~pasted], labels[~pasted])
    assert torch.equal(out.permute(0, 2, 3, 1)[~pasted], images.permute(0, 2, 3, 1)[~pasted])
    red = normalize(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)).flatten()
    assert torch.allclose(
        out.permute(0, 2, 3, 1)[pasted], red.expand(int(pasted.sum()), 3), atol=1e-6
    )
    assert out_labels.dtype == labels.dtype and out.dtype == images.dtype


@pytest.mark.parametrize("fraction, size", [(0.5, 8), (1.0, 3), (0.0, 5)])
def test_exact_fractions(fraction, size):
    images, labels = batch(b=size)
    mix = AnomalyMix(AnomalyMixConfig(fraction=fraction), Y, outliers=SolidRed())
    rng = np.random.default_rng(1)
    for _ in range(5):
        out, out_labels, mixed = mix(images, labels, rng)
        assert int(mixed.sum()) == round(fraction * size)
        assert torch.equal((out_labels != labels).flatten(1).any(1), mixed)
    if fraction == 0.0:
        assert torch.equal(out, images) and torch.equal(out_labels, labels)


def test_fractional_count_is_right_on_average():
    images, labels = batch(b=4, h=16, w=16)
    mix = AnomalyMix(AnomalyMixConfig(fraction=0.3), Y, outliers=SolidRed())
    rng = np.random.default_rng(2)
    counts = [int(mix(images, labels, rng)[2].sum()) for _ in range(400)]
    assert set(counts) == {1, 2}
    assert np.mean(counts) == pytest.approx(1.2, abs=0.08)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_scale_range_and_flip(flip):
    images, labels = batch(b=1, h=60, w=100)
    config = AnomalyMixConfig(
        fraction=1.0, max_objects=1, scale_min=0.2, scale_max=0.3, flip_probability=flip
    )
    mix = AnomalyMix(config, Y, outliers=TwoColourBars())
    rng = np.random.default_rng(3)
    red = normalize(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)).flatten()
    widths = []
    for _ in range(20):
        out, out_labels, _ = mix(images, labels, rng)
        rows, cols = torch.nonzero(out_labels[0] == Y, as_tuple=True)
        width, height = int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)
        widths.append(width)
        assert (
            0.2 * 60 - 1 <= width <= 0.3 * 60 + 1 and abs(height - width / 2) <= 1
        )  # longer side = width
        left_pixel = out[0, :, rows.min(), cols.min()]
        assert torch.allclose(left_pixel, red, atol=1e-5) == (flip == 0.0)
    assert len(set(widths)) > 1


def test_same_seed_same_result_and_objects_stay_inside():
    images, labels = batch(b=4, h=24, w=24)
    mix = AnomalyMix(AnomalyMixConfig(fraction=1.0, scale_min=1.0, scale_max=1.0), Y)
    first = mix(images, labels, np.random.default_rng(7))
    second = mix(images, labels, np.random.default_rng(7))
    third = mix(images, labels, np.random.default_rng(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1], third[1])
    assert first[2].all()


def test_synthetic_outliers_are_the_default_and_vary():
    mix = AnomalyMix(AnomalyMixConfig(), Y)
    assert isinstance(mix.outliers, SyntheticOutliers)
    rng = np.random.default_rng(0)
    objects = [synthetic_outlier(rng) for _ in range(60)]
    assert all(
        o.mask.any() and o.mask.shape == o.image.shape[:2] and o.image.dtype == np.uint8
        for o in objects
    )
    assert len({o.source for o in objects}) >= 8  # shapes x textures
    colours = np.stack([o.image[o.mask].mean(0) for o in objects])
    assert colours.std(0).min() > 30  # many different colours
    a = synthetic_outlier(np.random.default_rng(5))
    b = synthetic_outlier(np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_follows_dtype_and_rejects_bad_shapes():
    images, labels = batch(b=2, h=20, w=20)
    mix = AnomalyMix(AnomalyMixConfig(fraction=1.0), Y)
    out, out_labels, _ = mix(images.double(), labels, np.random.default_rng(0))
    assert out.dtype == torch.float64 and (out_labels == Y).any()
    with pytest.raises(ValueError, match="expected images"):
        mix(images[0], labels, np.random.default_rng(0))
    with pytest.raises(ValueError, match="anomaly_index"):
        AnomalyMix(AnomalyMixConfig(), 0)


class ThinPole:
    """A tall object one pixel wide: it stays one pixel wide after scaling and flipping."""

    def sample(self, rng):
        from segxal.pebal.anomalymix import OutlierObject

        image = np.zeros((20, 1, 3), np.uint8)
        image[..., 0] = 255
        return OutlierObject(image, np.ones((20, 1), bool), "thin")


def test_flipped_one_pixel_wide_object_is_pasted():
    mix = AnomalyMix(
        AnomalyMixConfig(
            fraction=1.0, max_objects=1, flip_probability=1.0, scale_min=0.5, scale_max=0.5
        ),
        Y,
        outliers=ThinPole(),
    )
    images, labels = torch.zeros(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)
    _, mixed_labels, mixed = mix(images, labels, np.random.default_rng(0))
    assert mixed.all()
    for label in mixed_labels:
        columns = (label == Y).any(0).nonzero().flatten()
        assert len(columns) == 1 and (label == Y).sum() == 8  # one column, half the image tall
