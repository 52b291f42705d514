"""Model surgery for PEBAL: one more output channel (abstention, last) and last-block fine-tuning.

The abstention row of ``head`` (weight and bias) starts as the mean of the inlier rows, so its logit is
the mean inlier logit: well below the top logit where the trained model is confident (inlier
predictions unchanged), close to it where the inlier logits are flat, and deterministic.

Only the modules named in ``trainable`` (e.g. ``("head",)``) keep ``requires_grad``. BatchNorm layers
outside them get a forward pre-hook that puts them in eval mode before every forward, so their running
statistics stay frozen even when a training loop (or Ray Train) calls ``model.train()``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from segxal.models.unet import UNet

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def add_abstention_channel(model: UNet) -> UNet:
    """A new UNet with ``num_classes + 1`` outputs: every weight copied, the abstention row last.

    ``model`` is not modified; the result lives on ``model``'s device and dtype.
    """
    head = model.head
    new = UNet(replace(model.config, num_classes=model.num_classes + 1))
    new.to(device=head.weight.device, dtype=head.weight.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    new.load_state_dict(state, strict=False)  # everything but the head, whose shape changed
    if head.bias is None or new.head.bias is None:
        raise ValueError("add_abstention_channel needs a UNet head with a bias")
    with torch.no_grad():
        new.head.weight.copy_(torch.cat([head.weight, head.weight.mean(dim=0, keepdim=True)]))
        new.head.bias.copy_(torch.cat([head.bias, head.bias.mean(dim=0, keepdim=True)]))
    new.train(model.training)
    return new


def _keep_in_eval(module: nn.Module, args) -> None:
    if getattr(module, "_pebal_frozen", False):
        module.training = False


def _trainable_modules(model: nn.Module, trainable: tuple[str, ...]) -> list[nn.Module]:
    if not trainable:
        raise ValueError("trainable must name at least one module")
    modules = []
    for name in trainable:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError as error:
            top = ", ".join(n for n, _ in model.named_children())
            raise KeyError(
                f"trainable module {name!r} not found; top-level modules: {top}"
            ) from error
    return modules


def freeze_except(model: ModuleT, trainable: tuple[str, ...]) -> ModuleT:
    """Freeze ``model`` in place except the submodules named in ``trainable``; returns ``model``.

    Frozen parameters get ``requires_grad = False``; frozen BatchNorm layers stay in eval mode through
    every later ``model.train()`` (a forward pre-hook), so their running statistics do not change.
    """
    keep = _trainable_modules(model, trainable)
    trainable_params = {id(p) for module in keep for p in module.parameters()}
    trainable_modules = {id(m) for module in keep for m in module.modules()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable_params)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            if not hasattr(module, "_pebal_frozen"):
                module.register_forward_pre_hook(_keep_in_eval)
            frozen = id(module) not in trainable_modules
            # torch types nn.Module.__setattr__ for tensors and modules only; any value works
            module._pebal_frozen = frozen  # type: ignore[assignment]
            if frozen:
                module.eval()
    return model


def prepare_pebal_model(model: UNet, trainable: tuple[str, ...] = ("head",)) -> UNet:
    """A new Y+1-output UNet built from the trained ``model`` with only ``trainable`` modules training."""
    return freeze_except(add_abstention_channel(model), trainable)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameter elements."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
