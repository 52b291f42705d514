import pytest
import torch
from torch import nn

from segxal.eem.gradcam import grad_cam
from segxal.models.unet import UNet, UNetConfig


class TinySegmenter(nn.Module):
    """features (the explained layer, ends with an in-place ReLU) -> spatial mixing -> 1x1 head."""

    last_decoder_layer = "features"

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        )
        self.mix = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.head = nn.Conv2d(4, num_classes, 1)

    def forward(self, x):
        return self.head(self.mix(self.features(x)))


def _model(seed: int = 0) -> TinySegmenter:
    torch.manual_seed(seed)
    model = TinySegmenter()
    with torch.no_grad():  # non-trivial running statistics so eval-mode BatchNorm matters
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model.train()


def _hand_grad_cam(model, image, prediction, region, classes=None):
    """Grad-CAM for one image written out: A = features(x); S = sum over region pixels predicted c of
    logit_c; w_k = mean_ij dS/dA_kij; ReLU(sum_k w_k A_k) / max."""
    model.eval()
    activation = model.features(image[None]).detach().requires_grad_(True)
    logits = model.head(model.mix(activation))
    mask = region.float() * torch.ones_like(prediction, dtype=torch.float)
    maps = []
    for c in classes if classes is not None else [None]:
        if c is None:
            selected = (
                torch.nn.functional.one_hot(prediction, logits.shape[1]).permute(2, 0, 1).float()
            )
        else:
            selected = torch.zeros_like(logits[0])
            selected[c] = (prediction == c).float()
        score = (logits[0] * selected * mask).sum()
        (gradient,) = torch.autograd.grad(score, activation, retain_graph=True)
        weights = gradient[0].mean(dim=(1, 2))
        class_map = torch.relu((weights[:, None, None] * activation[0].detach()).sum(0))
        maps.append(class_map / class_map.max() if class_map.max() > 0 else class_map)
    cam = torch.stack(maps).amax(0)
    return cam / cam.max()


def _inputs(seed: int = 1, batch: int = 3, size=(10, 12)):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=generator)
    prediction = torch.randint(0, 3, (batch, *size), generator=generator)
    region = torch.zeros(batch, *size, dtype=torch.bool)
    region[:, size[0] // 2 :, : size[1] // 2 + 2] = True
    return images, prediction, region


def test_grad_cam_equals_hand_computed_and_batched_equals_per_image():
    model = _model()
    images, prediction, region = _inputs()
    batched = grad_cam(model, images, "features", prediction, region)
    assert batched.shape == (3, 10, 12)
    for b in range(3):
        expected = _hand_grad_cam(model, images[b], prediction[b], region[b])
        single = grad_cam(
            model, images[b : b + 1], "features", prediction[b : b + 1], region[b : b + 1]
        )
        assert torch.allclose(batched[b], expected, atol=1e-5)
        assert torch.allclose(single[0], batched[b], atol=1e-5)
        assert batched[b].max() == pytest.approx(1.0) and batched[b].min() >= 0


def test_max_target_is_pixelwise_max_of_per_class_maps():
    model = _model(3)
    images, prediction, region = _inputs(seed=4, batch=2)
    prediction[1] = torch.where(
        prediction[1] == 2, 0, prediction[1]
    )  # image 1: fewer classes than image 0
    batched = grad_cam(model, images, "features", prediction, region, target="max")
    for b in range(2):
        classes = sorted(set(prediction[b][region[b]].tolist()))
        expected = _hand_grad_cam(model, images[b], prediction[b], region[b], classes)
        assert torch.allclose(batched[b], expected, atol=1e-5)
    assert not torch.allclose(
        batched, grad_cam(model, images, "features", prediction, region, target="sum")
    )


def test_grad_cam_leaves_model_untouched_under_no_grad():
    model = _model()
    model.mix[0].weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    images, prediction, region = _inputs()
    with torch.no_grad():
        cam = grad_cam(model, images, None, prediction, region)
    assert cam.max() > 0 and not cam.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.training and model.features[1].training
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.is_grad_enabled()  # the caller's no_grad block has ended, grad mode is back


def test_grad_mode_restored_inside_no_grad_block():
    model = _model()
    images, prediction, region = _inputs()
    with torch.no_grad():
        grad_cam(model, images, "features", prediction, region)
        assert not torch.is_grad_enabled()


def test_hooks_released_after_an_exception():
    model = _model()
    images, prediction, region = _inputs()
    with pytest.raises(ValueError, match="prediction"):
        grad_cam(model, images, "features", prediction[:, :5], region)
    with pytest.raises(RuntimeError):
        grad_cam(
            model, images[:, :2], "features", prediction, region
        )  # conv rejects 2 channels mid-forward
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.is_grad_enabled() and model.training
    with pytest.raises(KeyError, match="nope"):
        grad_cam(model, images, "nope", prediction, region)


def test_exception_after_the_hook_fired_restores_everything(monkeypatch):
    model = _model()
    images, prediction, region = _inputs()

    def broken(_x):
        raise RuntimeError("head exploded")

    monkeypatch.setattr(model.head, "forward", broken)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="head exploded"):
            grad_cam(model, images, "features", prediction, region)
        assert not torch.is_grad_enabled()  # the hook turned recording on; it must be off again
    assert all(not m._forward_hooks for m in model.modules()) and model.training


def test_empty_region_gives_zero_map():
    model = _model()
    images, prediction, region = _inputs()
    region[1] = False
    cam = grad_cam(model, images, "features", prediction, region)
    assert torch.equal(cam[1], torch.zeros_like(cam[1])) and cam[0].max() == pytest.approx(1.0)


def test_unet_padded_input_batched_equals_per_image():
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=4, width=4, depth=2)).train()
    images = torch.randn(3, 3, 18, 22)  # not a multiple of 4: the U-Net pads bottom/right
    with torch.no_grad():
        model.eval()
        prediction = model(images).argmax(1)
    region = torch.ones(3, 18, 22, dtype=torch.bool)
    for layer in ("decoder.1", "decoder.0", "bottleneck"):
        batched = grad_cam(model, images, layer, prediction, region)
        assert batched.shape == (3, 18, 22)
        for b in range(3):
            single = grad_cam(
                model, images[b : b + 1], layer, prediction[b : b + 1], region[b : b + 1]
            )
            assert torch.allclose(single[0], batched[b], atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def _hooked_grad_cam(model, image, layer, prediction, region, target):
    """An independent Grad-CAM of one image: a forward hook keeps the layer's output, a full backward of
    the score through the whole network gives its gradient; each class map is resized to the padded
    input, cropped to the image, then scaled to a maximum of 1 (``max``: per class, then the pixelwise
    maximum over the region's predicted classes)."""
    model.eval()
    kept = {}
    handle = model.layer(layer).register_forward_hook(lambda m, i, o: kept.update(a=o))
    try:
        logits = model(image[None].clone().requires_grad_(True))
    finally:
        handle.remove()
    activation = kept["a"]
    height, width = image.shape[-2:]
    multiple = model.input_multiple
    padded = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    classes = sorted(set(prediction[region].tolist())) if target == "max" else [None]
    maps = []
    for c in classes:
        chosen = region & (prediction == c) if c is not None else region
        score = logits[0].gather(0, prediction[None])[0][chosen].sum()
        (gradient,) = torch.autograd.grad(score, activation, retain_graph=True)
        cam = torch.relu((gradient[0].mean(dim=(1, 2))[:, None, None] * activation[0]).sum(0))
        cam = nn.functional.interpolate(cam[None, None].detach(), size=padded, mode="bilinear")
        cam = cam[0, 0, :height, :width]
        maps.append(cam / cam.max() if cam.max() > 0 else cam)
    cam = torch.stack(maps).amax(0)
    return cam / cam.max() if cam.max() > 0 else cam


@pytest.mark.parametrize(
    "size", [(50, 70), (18, 22), (32, 48)]
)  # 64x80, 32x32; the last is unpadded
@pytest.mark.parametrize("target", ["sum", "max"])
def test_unet_grad_cam_equals_a_hooked_full_backward_on_padded_and_unpadded_sizes(size, target):
    torch.manual_seed(5)
    model = UNet(UNetConfig(num_classes=6, width=8, depth=4))  # inputs padded to a multiple of 16
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        prediction = model.eval()(images).argmax(1)
    region = torch.ones(2, *size, dtype=torch.bool)
    region[1, : size[0] // 3] = False
    explained = 0
    for layer in ("decoder.3", "decoder.1", "bottleneck"):
        cams = grad_cam(model, images, layer, prediction, region, target=target)
        for b in range(2):
            expected = _hooked_grad_cam(model, images[b], layer, prediction[b], region[b], target)
            torch.testing.assert_close(cams[b], expected, atol=2e-5, rtol=1e-4)
            explained += int(expected.max() > 0)
    assert explained >= 4  # most maps are not all zero: the comparison says something
