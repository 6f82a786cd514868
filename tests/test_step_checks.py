"""Checks made at step time, each raising (or skipping the step) before
anything changes: a GradScaler given to one step only, rho as a tensor,
radii too large for fp32, complex and overlapping parameters, and the
smaller cases of issue 13 (frozen parameters, empty first steps, the common
wrapper's adaptive flag)."""
from __future__ import annotations

import numpy as np


import pytest
import torch

from helpers import assert_same, snapshot
from presam_kernels import SAM, FisherSAM, InfoSAM

PERTURB = pytest.mark.parametrize("perturb", ["in_place", "out_of_place"])


def scaler():
    return torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)


@PERTURB
def test_grad_scaler_given_to_first_step_only_refuses_before_the_base_step(perturb, flatten, backend):
    p = torch.zeros(3, requires_grad=True)
    opt = SAM([p], torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten, backend=backend, perturb=perturb)
    s = scaler()
    s.scale(torch.ones(()))  # as scaler.scale(loss).backward() would, creating the scale
    p.grad = torch.full((3,), 1024.0)
    opt.first_step(grad_scaler=s)
    p.grad = torch.full((3,), 2048.0)  # the second backward, scaled
    before = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="grad_scaler"):
        opt.second_step()
    assert_same(before, snapshot(opt, [p]))
    opt.second_step(grad_scaler=s)
    s.update()
    assert torch.allclose(p.detach(), torch.full((3,), -0.2))  # lr 0.1 times the unscaled gradient 2


# -- rho --------------------------------------------------------------------------
def infosam_after_one_step(backend, flatten, perturb, **kwargs):
    params = [torch.zeros(4, requires_grad=True), torch.ones(3, requires_grad=True)]
    opt = InfoSAM(params, torch.optim.SGD, rho=0.1, lr=0.0, flatten=flatten, backend=backend, perturb=perturb,
                  **kwargs)
    give_grads(params)
    opt.first_step(zero_grad=True)
    give_grads(params)
    opt.second_step(zero_grad=True)
    return params, opt


def give_grads(params, value=1.0):
    for k, p in enumerate(params):
        p.grad = torch.full_like(p, value * (1.0 + k))


@PERTURB
@pytest.mark.parametrize("rho", [float("nan"), float("inf"), -0.1, 1e30], ids=["nan", "inf", "negative", "huge"])
def test_a_bad_rho_tensor_perturbs_nothing_and_counts_a_skipped_step(rho, perturb, flatten, backend, core_case):
    """Read on the device, never on the host: a rho tensor that is non-finite,
    negative or too large for fp32 makes first_step a skipped step (x and
    the EMA as they were, skipped_steps + 1), like non-finite gradients."""
    core_case(rho != 1e30)
    params, opt = infosam_after_one_step(backend, flatten, perturb)
    opt.param_groups[0]["rho"] = torch.tensor(rho)
    give_grads(params, 2.0)
    ema = [opt.state[p]["grad_ema"].clone() for p in params]
    skipped = int(opt.skipped_steps)
    opt.first_step()
    assert int(opt.skipped_steps) == skipped + 1
    assert torch.equal(params[0].detach(), torch.zeros(4)) and torch.equal(params[1].detach(), torch.ones(3))
    for p, m in zip(params, ema):
        assert torch.equal(opt.state[p]["grad_ema"], m), "a skipped step updated the EMA"
    opt.second_step()
    assert torch.equal(params[0].detach(), torch.zeros(4)) and torch.equal(params[1].detach(), torch.ones(3))
    opt.param_groups[0]["rho"] = torch.tensor(0.1)
    opt.first_step()
    assert not torch.equal(params[0].detach(), torch.zeros(4)), "a good rho after a bad one perturbs again"
    opt.second_step()
    assert int(opt.skipped_steps) == skipped + 1


@pytest.mark.parametrize(
    "rho", [torch.ones(2), torch.tensor(1, dtype=torch.int64), torch.tensor(0.1, dtype=torch.complex64)],
    ids=["two_elements", "integer", "complex"],
)
def test_a_rho_tensor_of_the_wrong_shape_or_dtype_refuses_before_anything(rho, flatten, backend):
    params, opt = infosam_after_one_step(backend, flatten, "in_place")
    opt.param_groups[0]["rho"] = rho
    give_grads(params, 2.0)
    before = snapshot(opt, params)
    with pytest.raises((ValueError, TypeError), match="rho"):
        opt.first_step()
    assert_same(before, snapshot(opt, params))


def test_rho_too_large_for_eps_norm_is_refused_at_construction_and_at_step_time(flatten):
    with pytest.raises(ValueError, match="rho"):
        SAM([torch.zeros(2, requires_grad=True)], torch.optim.SGD, rho=1e300, lr=0.1, flatten=flatten)
    p = torch.zeros(2, requires_grad=True)
    opt = SAM([p], torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten)
    opt.param_groups[0]["rho"] = 1e27  # 1e27 / 1e-12 overflows fp32
    p.grad = torch.zeros(2)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    assert_same(before, snapshot(opt, [p]))


def test_eps_norm_zero_is_refused():
    with pytest.raises(ValueError, match="eps_norm"):
        SAM([torch.zeros(2, requires_grad=True)], torch.optim.SGD, eps_norm=0.0, lr=0.1)


@PERTURB
def test_all_zero_gradients_with_the_largest_allowed_rho_give_e_zero(perturb, flatten, backend):
    p = torch.ones(3, requires_grad=True)
    opt = SAM([p], torch.optim.SGD, rho=1e25, lr=0.0, flatten=flatten, backend=backend, perturb=perturb)
    p.grad = torch.zeros(3)
    opt.first_step()
    assert torch.equal(p.detach(), torch.ones(3))
    opt.second_step()
    assert torch.equal(p.detach(), torch.ones(3))


# -- parameters the optimizer cannot perturb --------------------------------------
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_are_refused_at_construction(dtype, flatten, backend):
    z = torch.zeros(3, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match="complex"):
        SAM([z], torch.optim.SGD, lr=0.1, flatten=flatten, backend=backend)
    opt = SAM([torch.zeros(2, requires_grad=True)], torch.optim.SGD, lr=0.1, flatten=flatten, backend=backend)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_an_expanded_parameter_is_refused_at_construction(flatten):
    """A stride-0 (expand()ed) tensor: one element stands for several."""
    expanded = torch.zeros(1, 3).expand(4, 3).requires_grad_()
    with pytest.raises(ValueError, match="overlap"):
        SAM([expanded], torch.optim.SGD, lr=0.1, flatten=flatten)


# -- smaller cases of issue 13 ------------------------------------------------------
def test_a_numpy_float32_rho_is_accepted_like_a_float(flatten):
    def perturbed_with(rho):
        p = torch.zeros(3, requires_grad=True)
        opt = SAM([p], torch.optim.SGD, rho=rho, lr=0.1, flatten=flatten)
        p.grad = torch.tensor([1.0, 2.0, 2.0])
        opt.first_step()
        return p.detach().clone()

    assert torch.equal(perturbed_with(np.float32(0.3)), perturbed_with(float(np.float32(0.3))))


def test_a_first_step_without_gradients_leaves_the_ema_not_ready(flatten, backend):
    """Nothing was seen, so the next real step is still a first step (plain SAM)."""
    def make():
        p = torch.zeros(4, requires_grad=True)
        return p, InfoSAM([p], torch.optim.SGD, rho=0.1, lr=0.0, flatten=flatten, backend=backend)

    p, opt = make()
    opt.first_step()  # no gradient anywhere
    opt.second_step()
    fresh_p, fresh = make()
    for q, o in ((p, opt), (fresh_p, fresh)):
        q.grad = torch.tensor([1.0, -2.0, 0.5, 3.0])
        o.first_step()
    assert torch.equal(p.detach(), fresh_p.detach())


def test_step_closure_after_a_failed_second_pass_steps_normally(flatten):
    p = torch.ones(3, requires_grad=True)
    opt = SAM([p], torch.optim.SGD, rho=0.1, lr=0.0, flatten=flatten)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory in the second pass")
        loss = (p * p).sum()
        loss.backward()
        return loss

    with pytest.raises(MemoryError):
        opt.step(closure)
    assert torch.equal(p.detach(), torch.ones(3)), "the failed step left x + e"
    opt.zero_grad()
    opt.step(closure)
    assert torch.equal(p.detach(), torch.ones(3))


def test_a_parameter_frozen_mid_training_stops_moving(flatten):
    """requires_grad_(False): with flatten=True its gradient slot is kept
    allocated, which must not keep Adam stepping it on momentum alone."""
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = SAM([p, q], torch.optim.Adam, rho=0.1, lr=0.1, flatten=flatten)

    def step():
        for _ in range(2):
            loss = ((p - 1) ** 2).sum() + (((q - 1) ** 2).sum() if q.requires_grad else 0)
            loss.backward()
            (opt.first_step if _ == 0 else opt.second_step)(zero_grad=True)

    step()
    q.requires_grad_(False)
    frozen = q.detach().clone()
    for _ in range(3):
        step()
    assert torch.equal(q.detach(), frozen)


@pytest.mark.parametrize("backend", ["eager"])
def test_infosam_delta_too_small_for_eps_norm_is_refused(backend):
    """eps_norm * delta = 1e-42 underflows: 1 / (0 + 1e-42) is inf in fp32 and
    an all-zero gradient after the first step gave NaN parameters."""
    with pytest.raises(ValueError, match="eps_norm \\* delta = 1e-42 is too small"):
        InfoSAM([torch.zeros(2, requires_grad=True)], torch.optim.SGD, rho=0.05, delta=1e-30, lr=0.1, backend=backend)
    p = torch.ones(2, requires_grad=True)
    opt = InfoSAM([p], torch.optim.SGD, rho=0.05, delta=1e-25, lr=0.0, backend=backend)
    for g in (torch.ones(2), torch.zeros(2)):
        p.grad = g.clone()
        opt.first_step()
        assert torch.isfinite(p).all()
        opt.second_step()
    assert torch.equal(p.detach(), torch.ones(2))


def test_fisher_sam_first_step_without_gradients_is_a_no_op(flatten, backend):
    """Found by the fuzzer: the eager Fisher constraint called a foreach op on an empty list."""
    p = torch.ones(3, requires_grad=True)
    opt = FisherSAM([p], torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten, backend=backend)
    opt.first_step()
    opt.second_step()
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("with_grads", [[True, False], [False, False]], ids=["one_bucket_idle", "no_gradients"])
def test_infosam_steps_with_a_bucket_without_gradients(with_grads, flatten, backend):
    """Found by the fuzzer: after the first step, a bucket (here the bf16 one,
    frozen) with no gradient made the eager infoSAM direction crash."""
    a, b = torch.zeros(5, requires_grad=True), torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    opt = InfoSAM([a, b], torch.optim.SGD, rho=0.1, lr=0.0, flatten=flatten, backend=backend)
    for step in range(3):
        for p, has in zip((a, b), with_grads if step else [True, True]):
            p.grad = torch.ones_like(p) if has else None
        opt.first_step()
        opt.second_step()
    assert torch.equal(a.detach(), torch.zeros(5)) and torch.equal(b.detach(), torch.zeros(4, dtype=torch.bfloat16))
