"""Grad-CAM (Selvaraju et al. 2017) for a segmenter, batched, in plain torch.

The target of image b is a set of its predicted pixels (e.g. those in the near region): with
``prediction`` y and ``region`` R, class c scores S_c = sum_{p in R, y(p) = c} logit_c(p).
``sum`` explains sum_c S_c in one backward; ``max`` explains each present class separately, scales
each class map to a maximum of 1 (so a small near object is not drowned by a large near class such as
the road) and keeps the pixel-wise maximum. Channel weights are the spatial mean of dS/dA,
the map is ReLU(sum_k w_k A_k), resized to the image and divided by its per-image maximum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from segxal.eem.fusion import unit_max_per_image


class _NamedLayers(Protocol):
    """A model that resolves its own layer names (the U-Net's ``layer(name)``)."""

    def layer(self, name: str) -> nn.Module: ...


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """The module to explain: given, named (``model.layer(name)`` if the model has it), or the model's
    ``last_decoder_layer`` when None."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        layer = getattr(model, "last_decoder_layer", None)
        if layer is None:
            raise ValueError(
                f"target_layer: {type(model).__name__} has no last_decoder_layer; name a layer"
            )
    if hasattr(model, "layer"):
        return cast(_NamedLayers, model).layer(layer)
    try:
        return model.get_submodule(layer)
    except AttributeError as error:
        raise KeyError(f"target_layer: {type(model).__name__} has no layer {layer!r}") from error


def input_multiple(model: nn.Module) -> int:
    """Multiple the model pads its input to (bottom/right), so feature maps cover the padded size.

    A model states it as ``input_multiple`` (the U-Net does); models without it do not pad.
    """
    return int(getattr(model, "input_multiple", 1))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (BatchNorm with running statistics, so images do not interact within a
    batch), then every submodule's own training flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _activation_leaf(module: nn.Module) -> Iterator[dict]:
    """Replace ``module``'s output by a fresh leaf that requires grad and switch grad recording on from
    there: layers before it record no graph, gradients stop at it and never reach parameters."""
    store: dict = {}

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"Grad-CAM target layer must output a tensor, got {type(output).__name__}"
            )
        if "activation" in store:
            raise RuntimeError(
                "Grad-CAM target layer ran twice in one forward; choose a layer used once"
            )
        torch.set_grad_enabled(True)  # restored by the caller's context after the forward
        leaf = output.detach().requires_grad_(True)
        store["activation"] = leaf
        return leaf.clone()  # later in-place ops (ReLU(inplace=True)) must not touch the leaf

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _weighted_map(gradient: torch.Tensor | None, activation: torch.Tensor) -> torch.Tensor:
    if gradient is None:  # the target does not depend on this layer
        return torch.zeros(activation.shape[0], *activation.shape[2:], device=activation.device)
    weights = gradient.mean(dim=(2, 3))
    return F.relu(torch.einsum("bk,bkhw->bhw", weights, activation)).float()


def _to_image(cam: torch.Tensor, size: tuple[int, int], multiple: int) -> torch.Tensor:
    """(B, h, w) map over the padded input -> (B, H, W) over the image, each divided by its maximum
    there: the padding is cropped before the maximum is taken, so a class whose map peaks in the
    padding is not scaled down."""
    height, width = size
    padded = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    if tuple(cam.shape[-2:]) != padded:
        cam = F.interpolate(cam[:, None], size=padded, mode="bilinear", align_corners=False)[:, 0]
    return unit_max_per_image(cam[:, :height, :width].clamp(min=0))


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: str | nn.Module | None = None,
    prediction: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    target: Literal["sum", "max"] = "sum",
) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] of ``model`` on ``images`` (B, C_in, H, W).

    ``prediction`` (B, H, W) class ids (None: the model's argmax on ``images``); ``region`` (B, H, W)
    bool or 0/1 pixels whose predicted classes are explained (None: all). One forward; one backward
    for ``sum``, one per class slot for ``max``. The model runs in eval mode, its training flags, hooks
    and parameters' ``requires_grad``/``grad`` are left as they were; works under ``torch.no_grad()``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if target not in ("sum", "max"):
        raise ValueError(f"target must be sum or max, got {target!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("grad_cam needs autograd: call it outside torch.inference_mode()")
    batch = images.shape[0]
    size: tuple[int, int] = (images.shape[-2], images.shape[-1])
    for name, maps in (("prediction", prediction), ("region", region)):
        if maps is not None and tuple(maps.shape) != (batch, *size):
            raise ValueError(
                f"{name} shape {tuple(maps.shape)} does not match images {tuple(images.shape)}"
            )
    module = resolve_layer(model, layer)
    grad_enabled = torch.is_grad_enabled()
    try:
        with eval_mode(model), _activation_leaf(module) as store:
            torch.set_grad_enabled(False)
            logits = model(images)
            if "activation" not in store:
                raise RuntimeError("Grad-CAM target layer did not run in the model's forward")
            activation = store["activation"]
            if tuple(logits.shape[-2:]) != size:
                raise ValueError(
                    f"model logits {tuple(logits.shape)} are not at the image size {size}"
                )
            if prediction is None:
                prediction = logits.detach().argmax(dim=1)
            # each pixel's predicted-class logit, weighted by the region (no (B, C, H, W) one-hot)
            picked = logits.gather(1, prediction.long()[:, None])[:, 0]
            weight = torch.ones_like(picked) if region is None else region.to(picked.dtype)
            if target == "sum":
                (gradient,) = torch.autograd.grad(
                    (picked * weight).sum(), activation, allow_unused=True
                )
                cam = _weighted_map(gradient, activation.detach())
            else:
                counts = torch.zeros(
                    batch, logits.shape[1], device=picked.device, dtype=picked.dtype
                )
                present = (
                    counts.scatter_add_(1, prediction.long().flatten(1), weight.detach().flatten(1))
                    > 0
                )
                rank = present.long().cumsum(dim=1) - 1
                slots = int(present.sum(dim=1).max()) if batch else 0
                cam = torch.zeros(batch, *size, device=images.device)
                for slot in range(slots):  # slot s explains the s-th present class of every image
                    chosen = present & (rank == slot)  # (B, C): at most one class per image
                    label = torch.where(chosen.any(dim=1), chosen.long().argmax(dim=1), -1)
                    selected = (prediction == label[:, None, None]).to(picked.dtype)
                    (gradient,) = torch.autograd.grad(
                        (picked * weight * selected).sum(),
                        activation,
                        retain_graph=slot < slots - 1,
                        allow_unused=True,
                    )
                    class_map = _weighted_map(gradient, activation.detach())
                    cam = torch.maximum(cam, _to_image(class_map, size, input_multiple(model)))
                return unit_max_per_image(cam).to(images.dtype)
    finally:
        torch.set_grad_enabled(grad_enabled)
    return _to_image(cam, size, input_multiple(model)).to(images.dtype)
