"""Model surgery: abstention channel, frozen parameters and frozen BatchNorm statistics."""

import copy
import pickle

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from segxal.models.unet import UNet, UNetConfig
from segxal.pebal.model import (
    add_abstention_channel,
    freeze_except,
    parameter_counts,
    prepare_pebal_model,
)


@pytest.fixture(scope="module")
def trained_once():
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=3, width=4, depth=2))
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.randn(2, 3, 16, 16))
    return model.eval()


@pytest.fixture()
def trained(trained_once):
    return copy.deepcopy(trained_once)


def bn_state(model):
    return {
        name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    }


def train_step(model, steps=2):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(torch.randn(2, 3, 16, 16))
        loss = torch.nn.functional.cross_entropy(
            logits, torch.randint(0, logits.shape[1], (2, 16, 16))
        )
        loss.backward()
        optimizer.step()


def test_abstention_channel_is_last_with_copied_rows_and_mean_init(trained):
    before = copy.deepcopy(trained.state_dict())
    pebal = add_abstention_channel(trained)
    assert pebal.num_classes == 4 and pebal.head.weight.shape[0] == 4
    assert torch.equal(pebal.head.weight[:3], trained.head.weight)
    assert torch.equal(pebal.head.bias[:3], trained.head.bias)
    assert torch.allclose(pebal.head.weight[3], trained.head.weight.mean(0))
    assert torch.allclose(pebal.head.bias[3], trained.head.bias.mean())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        old, new = trained(x), pebal(x)
    assert torch.allclose(new[:, :3], old, atol=1e-5)
    assert torch.allclose(new[:, 3], old.mean(1), atol=1e-5)
    for key, value in trained.state_dict().items():  # the source model is untouched
        assert torch.equal(value, before[key])
    restored = UNet.from_checkpoint(pebal.to_checkpoint())
    assert restored.num_classes == 4


def test_only_trainable_modules_train_and_frozen_bn_statistics_stay(trained):
    pebal = prepare_pebal_model(trained, ("head",))
    frozen_params = {n: p.clone() for n, p in pebal.named_parameters() if not n.startswith("head.")}
    head_before = pebal.head.weight.clone()
    stats = bn_state(pebal)
    train_step(pebal)
    assert pebal.training  # model.train() was called ...
    for name, module in pebal.named_modules():
        if isinstance(module, _BatchNorm):
            assert not module.training, name  # ... but frozen BatchNorm stayed in eval
    for name, (mean, var, count) in bn_state(pebal).items():
        assert torch.equal(mean, stats[name][0]) and torch.equal(var, stats[name][1]), name
        assert torch.equal(count, stats[name][2]), name
    for name, param in pebal.named_parameters():
        if name in frozen_params:
            assert not param.requires_grad and param.grad is None, name
            assert torch.equal(param, frozen_params[name]), name
    assert not torch.equal(pebal.head.weight, head_before)
    trainable, total = parameter_counts(pebal)
    assert trainable == pebal.head.weight.numel() + pebal.head.bias.numel() and total > trainable


def test_bn_inside_a_trainable_block_keeps_training(trained):
    pebal = prepare_pebal_model(trained, ("decoder.1", "head"))
    stats = bn_state(pebal)
    train_step(pebal, steps=1)
    after = bn_state(pebal)
    for name in stats:
        changed = not torch.equal(stats[name][0], after[name][0])
        assert changed == name.startswith("decoder.1."), name


def test_refreeze_with_other_modules_and_copies_keep_behaviour(trained):
    pebal = prepare_pebal_model(trained, ("decoder.1", "head"))
    freeze_except(pebal, ("head",))
    clone = pickle.loads(pickle.dumps(pebal))  # what Ray does when it ships a model
    stats = bn_state(clone)
    train_step(clone, steps=1)
    assert all(torch.equal(stats[n][0], m[0]) for n, m in bn_state(clone).items())
    assert [n for n, p in clone.named_parameters() if p.requires_grad] == [
        "head.weight",
        "head.bias",
    ]


def test_unknown_trainable_module_is_an_error(trained):
    with pytest.raises(KeyError, match="'decoder.9' not found; top-level modules: encoder"):
        prepare_pebal_model(trained, ("decoder.9",))
