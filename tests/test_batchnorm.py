"""disable_running_stats / enable_running_stats: the second (perturbed)
forward of a SAM step must not move BatchNorm's running statistics, and
after enabling they update exactly as if that forward never happened."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from presam_kernels import SAM, disable_running_stats, enable_running_stats

MOMENTA = pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "cumulative"])


def mlp(momentum):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=momentum), nn.Tanh(), nn.Linear(6, 3))


def convnet(momentum):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


MODELS = pytest.mark.parametrize("factory", [mlp, convnet], ids=["bn1d", "bn2d"])


def inputs(factory, k):
    gen = torch.Generator().manual_seed(500 + k)
    shape = (8, 5) if factory is mlp else (4, 3, 7, 7)
    return torch.randn(shape, generator=gen) * (1 + k)


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def stats(model):
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bn_layers(model)]


def assert_same_stats(a, b, what):
    for (m1, v1), (m2, v2) in zip(a, b):
        assert torch.equal(m1, m2), f"{what}: running_mean differs"
        assert torch.equal(v1, v2), f"{what}: running_var differs"


@MODELS
@MOMENTA
def test_forward_with_running_stats_disabled_leaves_them_unchanged(factory, momentum):
    model = factory(momentum).train()
    model(inputs(factory, 0))  # running stats away from their initial values
    before = stats(model)
    disable_running_stats(model)
    model(inputs(factory, 1))
    assert_same_stats(stats(model), before, "after a forward with running stats disabled")


@MODELS
@MOMENTA
def test_forward_with_running_stats_disabled_still_normalizes_with_batch_statistics(factory, momentum):
    model = factory(momentum).train()
    twin = copy.deepcopy(model)
    disable_running_stats(model)
    x = inputs(factory, 1)
    assert torch.equal(model(x), twin(x))


@MODELS
@MOMENTA
def test_enable_restores_updates_as_if_the_disabled_forward_never_happened(factory, momentum):
    model = factory(momentum).train()
    untouched = copy.deepcopy(model)
    for m in (model, untouched):
        m(inputs(factory, 0))
    disable_running_stats(model)
    model(inputs(factory, 1))  # the perturbed forward of a SAM step
    enable_running_stats(model)
    assert [bn.momentum for bn in bn_layers(model)] == [momentum] * len(bn_layers(model))
    for m in (model, untouched):
        m(inputs(factory, 2))
    assert_same_stats(stats(model), stats(untouched), "after enabling again")


@MOMENTA
def test_disable_twice_then_enable_once_restores_the_original_momentum(momentum):
    model = mlp(momentum)
    disable_running_stats(model)
    disable_running_stats(model)
    enable_running_stats(model)
    assert bn_layers(model)[0].momentum == momentum
    enable_running_stats(model)  # enabling again is a no-op
    assert bn_layers(model)[0].momentum == momentum


def test_enable_without_disable_changes_nothing():
    model = mlp(0.3)
    enable_running_stats(model)
    assert bn_layers(model)[0].momentum == 0.3
    twin = copy.deepcopy(model)
    x = inputs(mlp, 0)
    model(x)
    twin(x)
    assert_same_stats(stats(model), stats(twin), "enable without disable")


@MOMENTA
def test_sam_step_with_frozen_second_pass_updates_running_stats_once(momentum):
    """The recipe: enable for the first forward (at x), disable for the second (at x + e)."""
    model = mlp(momentum).train()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for k in range(3):
        x, y = inputs(mlp, k), torch.randint(0, 3, (8,), generator=gen)
        enable_running_stats(model)
        expected = copy.deepcopy(model)
        expected(x)  # plain BatchNorm: one update, with the batch statistics at x
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        disable_running_stats(model)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        assert_same_stats(stats(model), stats(expected), f"after SAM step {k}")
    enable_running_stats(model)
    assert bn_layers(model)[0].momentum == momentum
