import json

import pytest
import torch

from segxal.data.transforms import normalize
from segxal.eem.config import DepthConfig
from segxal.models.depth import (
    DatasetDepth,
    DepthCheckpointError,
    GeometricDepth,
    TransformersDepth,
    build_depth_backend,
    checkpoint_convention,
    to_proximity,
)

H, W = 48, 80  # non-square on purpose


def _images(batch: int = 2) -> torch.Tensor:
    return normalize(torch.rand(batch, 3, H, W, generator=torch.Generator().manual_seed(0)))


def test_inverse_depth_convention_nearest_pixel_is_one():
    inverse = torch.tensor([[[0.5, 2.0], [8.0, 1.0]], [[-1.0, 3.0], [0.0, 1.0]]])
    proximity = to_proximity(inverse, "inverse_depth")
    assert proximity[0, 1, 0] == 1.0 and proximity[0, 0, 0] == 0.0
    assert proximity[1, 0, 1] == 1.0 and proximity[1, 0, 0] == 0.0
    assert torch.allclose(proximity[0], (inverse[0] - 0.5) / 7.5)


def test_metric_depth_convention_nearest_pixel_is_one():
    depth = torch.tensor([[[10.0, 2.0], [40.0, 5.0]]])
    proximity = to_proximity(depth, "depth")
    assert proximity[0, 0, 1] == 1.0 and proximity[0, 1, 0] == 0.0
    inverse = 1 / depth[0]
    assert torch.allclose(proximity[0], (inverse - inverse.min()) / (inverse.max() - inverse.min()))
    assert torch.equal(to_proximity(torch.full((1, 2, 2), 3.0), "depth"), torch.zeros(1, 2, 2))


def test_dataset_backend_unknown_disparity_is_far():
    disparity = torch.zeros(2, H, W)
    disparity[0, 30:, 10:20] = 12.0  # near object
    disparity[0, 10:20, 40:] = 3.0
    disparity[1] = torch.linspace(1, 5, W)  # no unknown pixels: min-max
    proximity = DatasetDepth().proximity(_images(), disparity)
    assert proximity.shape == (2, H, W)
    assert proximity[0, 35, 15] == 1.0 and proximity[0, 0, 0] == 0.0
    assert proximity[0, 15, 50] == pytest.approx(0.25)
    assert proximity[1, :, -1].eq(1.0).all() and proximity[1, :, 0].eq(0.0).all()
    with pytest.raises(ValueError, match="depth"):
        DatasetDepth().proximity(_images(), None)


def test_geometric_prior_grows_towards_the_bottom():
    proximity = GeometricDepth(horizon=0.5).proximity(_images(3))
    assert proximity.shape == (3, H, W)
    assert proximity[:, -1].eq(1.0).all() and proximity[:, : H // 2].eq(0.0).all()
    column = proximity[0, :, 7]
    assert (column[1:] >= column[:-1]).all() and torch.equal(proximity[0], proximity[2])


def _tiny_backbone():
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=14,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )


def _save_tiny(kind: str, folder, processor: dict | None = None) -> str:
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        DPTConfig,
        DPTForDepthEstimation,
    )

    torch.manual_seed(0)
    common = {"neck_hidden_sizes": (8, 16), "reassemble_factors": (2, 1), "fusion_hidden_size": 8}
    if kind == "midas":
        model = DPTForDepthEstimation(
            DPTConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=32,
                patch_size=8,
                backbone_out_indices=(0, 1),
                **common,
            )
        )
    elif kind == "dpt_dinov2":
        model = DPTForDepthEstimation(
            DPTConfig(backbone_config=_tiny_backbone(), hidden_size=16, **common)
        )
    else:
        model = DepthAnythingForDepthEstimation(
            DepthAnythingConfig(
                backbone_config=_tiny_backbone(),
                reassemble_hidden_size=16,
                head_hidden_size=8,
                patch_size=14,
                **common,
            )
        )
    final = model.head.conv3 if kind == "depth_anything" else model.head.head[4]
    with torch.no_grad():  # random heads end in ReLU and may output all zeros: keep them positive
        final.bias.fill_(1.0)
    model.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(folder)


@pytest.mark.parametrize(
    "kind, backend, convention, model_size",
    [
        ("midas", "midas", "inverse_depth", (32, 32)),  # plain ViT: square at its image_size
        (
            "dpt_dinov2",
            "dinov2",
            "depth",
            (28, 42),
        ),  # DINOv2: short side 28, aspect kept, multiple of 14
        ("depth_anything", "dinov2", "inverse_depth", (28, 42)),
    ],
)
def test_transformers_backend_from_saved_tiny_checkpoint(
    tmp_path, kind, backend, convention, model_size
):
    checkpoint = _save_tiny(kind, tmp_path / kind)
    depth = build_depth_backend(DepthConfig(backend=backend, checkpoint=checkpoint))
    assert isinstance(depth, TransformersDepth)
    assert depth.convention == convention and depth.model_input_size(H, W) == model_size
    images = _images()
    proximity = depth.proximity(images)
    assert proximity.shape == (2, H, W) and proximity.dtype == torch.float32
    assert proximity.amin(dim=(1, 2)).eq(0).all() and proximity.amax(dim=(1, 2)).eq(1).all()
    raw = depth.predict(images)
    nearest = (raw if convention == "inverse_depth" else -raw).flatten(1).argmax(1)
    assert (
        proximity.flatten(1).gather(1, nearest[:, None]).eq(1).all()
    )  # nearest pixel per the convention
    per_image = depth.proximity(images[1:])
    assert torch.allclose(per_image[0], proximity[1], atol=1e-4)


def test_convention_override_and_processor_normalisation(tmp_path):
    checkpoint = _save_tiny(
        "depth_anything",
        tmp_path / "da",
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    )
    depth = build_depth_backend(
        DepthConfig(backend="dinov2", checkpoint=checkpoint, convention="depth", input_size=56)
    )
    assert depth.convention == "depth" and depth.model_input_size(H, W) == (56, 98)
    assert torch.allclose(depth.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    defaults = build_depth_backend(DepthConfig(backend="dinov2", checkpoint=checkpoint))
    assert checkpoint_convention(defaults.model.config) == "inverse_depth"
    plain = build_depth_backend(
        DepthConfig(backend="midas", checkpoint=_save_tiny("midas", tmp_path / "m"))
    )
    assert torch.allclose(plain.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_backend_and_checkpoint_family_must_agree(tmp_path):
    checkpoint = _save_tiny("dpt_dinov2", tmp_path / "d")
    with pytest.raises(ValueError, match="backend 'dinov2'"):
        build_depth_backend(DepthConfig(backend="midas", checkpoint=checkpoint))


@pytest.mark.parametrize(
    "checkpoint", ["missing-org/no-such-depth-model", "/nonexistent/depth/folder"]
)
def test_missing_checkpoint_error_names_it_and_how_to_provide_it(checkpoint):
    with pytest.raises(DepthCheckpointError) as error:
        build_depth_backend(DepthConfig(backend="midas", checkpoint=checkpoint))
    message = str(error.value)
    assert (
        checkpoint in message and "save_pretrained" in message and "eem.depth.checkpoint" in message
    )


def test_folder_without_weights_is_a_clear_error(tmp_path):
    checkpoint = _save_tiny("midas", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(DepthCheckpointError, match="weights"):
        build_depth_backend(DepthConfig(backend="midas", checkpoint=checkpoint))
