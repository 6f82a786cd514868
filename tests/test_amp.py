"""GradScaler handed to both steps (docs/design.md §1, mixed precision),
with the CPU GradScaler: gradients unscaled exactly once per pass, infoSAM's
EMA built from unscaled gradients, and a step whose first, second or both
backwards overflowed changes no parameter and no state while the scale drops.

Loss scales are powers of two, so scaling and unscaling are exact and the
scaled runs can be compared with unscaled ones.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import (
    FP32, MODES, TRAINING_STATE_KEYS, TRAINING_VARIANTS, assert_close, assert_params_close, loss_of, make_model,
)
from helpers import batch as batch_of
from presam_kernels import SAM, InfoSAM

INIT_SCALE = 2.0**10


def batch(k: int, n: int = 16):
    return batch_of(k, n, first_seed=3000)


def make_scaler(**kw):
    kw.setdefault("init_scale", INIT_SCALE)
    kw.setdefault("growth_interval", 1000)
    scaler = torch.amp.GradScaler("cpu", **kw)
    assert scaler.is_enabled()
    return scaler


def plain_grads(model, b):
    """Gradients of the unscaled loss at the model's current parameters, by plain autograd."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
    loss_of(twin, b).backward()
    return [p.grad.clone() for p in twin.parameters()]


def poison(model):
    """An overflow in the backward: one non-finite gradient element."""
    with torch.no_grad():
        model[2].weight.grad[0, 0] = float("inf")


def scaled_step(model, opt, scaler, b, overflow=None, user_unscales=()):
    scaler.scale(loss_of(model, b)).backward()
    if overflow in ("first", "both"):
        poison(model)
    if "first" in user_unscales:
        scaler.unscale_(opt)
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_of(model, b)).backward()
    if overflow in ("second", "both"):
        poison(model)
    if "second" in user_unscales:
        scaler.unscale_(opt)
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()


def plain_step(model, opt, b):
    loss_of(model, b).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, b).backward()
    opt.second_step(zero_grad=True)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {}
    for i, p in enumerate(model.parameters()):
        if p in opt.state and opt.state[p]:
            state[i] = {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v))
                        for k, v in opt.state[p].items()}
    return params, state


def assert_unchanged(model, opt, snap, what):
    params, state = snap
    for i, (p, v) in enumerate(zip(model.parameters(), params)):
        assert torch.equal(p.detach(), v), f"{what}: parameter {i} changed"
    for i, p in enumerate(model.parameters()):
        now = opt.state[p] if p in opt.state else {}
        before = state.get(i, {})
        for k in set(now) | set(before):
            assert k in now and k in before, f"{what}: state[{i}][{k!r}] appeared or vanished"
            a, b = now[k], before[k]
            same = torch.equal(a, b) if torch.is_tensor(a) else a == b
            assert same, f"{what}: state[{i}][{k!r}] changed"


VARIANTS = TRAINING_VARIANTS


# ---------------------------------------------------------------------------
# unscaled exactly once
# ---------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("user_unscales", [(), ("first",), ("second",), ("first", "second")],
                         ids=["none", "user-unscales-first", "user-unscales-second", "user-unscales-both"])
def test_gradients_are_unscaled_exactly_once_per_pass(flatten, user_unscales):
    rho, lr = 0.05, 0.1
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, flatten=flatten)
    scaler = make_scaler()
    b = batch(0)
    x0 = [p.detach().clone() for p in model.parameters()]

    g1 = plain_grads(model, b)
    scaler.scale(loss_of(model, b)).backward()
    if "first" in user_unscales:
        scaler.unscale_(opt)
    opt.first_step(zero_grad=False, grad_scaler=scaler)
    for p, g in zip(model.parameters(), g1):
        assert_close(p.grad, g, FP32, "first pass: gradient")
    # the perturbation is SAM's on the unscaled gradient
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    for p, x, g in zip(model.parameters(), x0, g1):
        assert_close(p, x.double() + rho * g.double() / norm, FP32, "x + e")

    opt.zero_grad()
    g2 = plain_grads(model, b)  # at x + e
    scaler.scale(loss_of(model, b)).backward()
    if "second" in user_unscales:
        scaler.unscale_(opt)
    opt.second_step(zero_grad=False, grad_scaler=scaler)
    scaler.update()
    for p, g in zip(model.parameters(), g2):
        assert_close(p.grad, g, FP32, "second pass: gradient")
    for p, x, g in zip(model.parameters(), x0, g2):
        assert_close(p, x - lr * g, FP32, "base step")
    assert scaler.get_scale() == INIT_SCALE, "no overflow, yet the scale changed"


@MODES
def test_infosam_ema_is_built_from_unscaled_gradients(flatten):
    model, twin = make_model(), make_model()
    opt = InfoSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.9, delta=1e-3, lr=0.1, flatten=flatten)
    twin_opt = InfoSAM(twin.parameters(), torch.optim.SGD, rho=0.05, alpha=0.9, delta=1e-3, lr=0.1,
                       flatten=flatten)
    scaler = make_scaler(growth_interval=1)  # a different scale every step
    scales = []
    for k in range(4):
        scales.append(scaler.get_scale())
        scaled_step(model, opt, scaler, batch(k))
        plain_step(twin, twin_opt, batch(k))
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_close(opt.state[p]["grad_ema"], twin_opt.state[q]["grad_ema"], FP32, f"step {k}: grad_ema")
    assert len(set(scales)) == len(scales), scales
    assert_params_close(model, twin)


# ---------------------------------------------------------------------------
# overflow: nothing changes, the scale drops
# ---------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("overflow", ["first", "second", "both"])
def test_overflowed_step_changes_no_parameter_and_no_state_and_lowers_the_scale(overflow, variant, flatten):
    model = make_model()
    opt = VARIANTS[variant](model.parameters(), flatten)
    scaler = make_scaler()
    scaled_step(model, opt, scaler, batch(0))  # a good step: state to protect
    assert scaler.get_scale() == INIT_SCALE
    snap = snapshot(model, opt)
    expected_keys = TRAINING_STATE_KEYS[variant]
    assert all(expected_keys <= set(s) for s in snap[1].values()) and len(snap[1]) == 4
    skipped = int(opt.skipped_steps)

    scaled_step(model, opt, scaler, batch(1), overflow=overflow)

    assert_unchanged(model, opt, snap, f"overflow in the {overflow} pass")
    assert scaler.get_scale() == INIT_SCALE * 0.5, "scaler.update() did not lower the scale"
    assert int(opt.skipped_steps) == skipped + 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@MODES
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("overflow", ["first", "second", "both"])
@pytest.mark.parametrize("at", ["first_step_ever", "later_step"])
def test_training_after_an_overflowed_step_is_as_if_it_never_happened(at, overflow, variant, flatten):
    """The run good, [overflow,] good equals the run without the overflowed step
    (for infoSAM: an overflow on the very first step leaves the next step a first step)."""
    model, twin = make_model(), make_model()
    opt = VARIANTS[variant](model.parameters(), flatten)
    twin_opt = VARIANTS[variant](twin.parameters(), flatten)
    scaler, twin_scaler = make_scaler(), make_scaler()
    schedule = [("bad", 1), ("good", 2), ("good", 3)] if at == "first_step_ever" else \
        [("good", 0), ("bad", 1), ("good", 2)]
    for kind, k in schedule:
        if kind == "bad":
            scaled_step(model, opt, scaler, batch(k), overflow=overflow)
        else:
            scaled_step(model, opt, scaler, batch(k))
            scaled_step(twin, twin_opt, twin_scaler, batch(k))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q, FP32, "parameter")
        for key, value in twin_opt.state[q].items():
            if torch.is_tensor(value):
                assert_close(opt.state[p][key], value, FP32, key)
            else:
                assert opt.state[p][key] == value
