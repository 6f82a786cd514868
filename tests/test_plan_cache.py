"""The fused base step's plan kept from step to step (base_update.PlanCache):
whatever a user does to the base optimizer's state or param groups between
steps, the next fused step is the step torch's own optimizer takes from that
state. Each case drives a fused optimizer and, in lockstep on the same
batches, one on the eager backend (restore, then torch's own base step),
makes the same change to both once the plan is kept, and compares the
parameters and the base state after every step. Both host paths run: the C++
state check (csrc/host.cpp ``StateWatch``) and the Python one.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_close
from presam_kernels import SAM, _host, extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")

SHAPES = [(7,), (5, 3), (11,)]
STEPS_BEFORE = 3  # fused steps before the change: the plan is kept from the second on
STEPS_AFTER = 3
# Fused kernels against torch's own step (fp32, a few ulps over six steps).
TOL = (torch.float32, 1e-6, 1e-5)


def _sgd(p):
    return torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)


def _sgd_plain(p):
    return torch.optim.SGD, dict(lr=0.1)


def _adam(p):
    return torch.optim.Adam, dict(lr=0.05)


def replace_momentum(opt, params):
    opt.state[params[1]]["momentum_buffer"] = torch.full_like(params[1], 0.5)


def momentum_in_place(opt, params):
    opt.state[params[1]]["momentum_buffer"].mul_(-2.0)


def drop_entry(opt, params):
    del opt.state[params[0]]


def clear_entry(opt, params):
    opt.state[params[2]].clear()


def momentum_off(opt, params):
    opt.param_groups[0]["momentum"] = 0.0


def momentum_on(opt, params):
    opt.param_groups[0]["momentum"] = 0.9


def lr_changed(opt, params):
    opt.param_groups[0]["lr"] = 0.5


def replace_exp_avg(opt, params):
    opt.state[params[1]]["exp_avg"] = torch.full_like(params[1], 0.25)


def step_written(opt, params):
    for p in params:
        opt.state[p]["step"].fill_(1.0)  # every parameter: the group agrees, the bias correction is another


def step_replaced(opt, params):
    for p in params:
        opt.state[p]["step"] = torch.tensor(1.0)


def betas_changed(opt, params):
    opt.param_groups[0]["betas"] = (0.5, 0.9)


CHANGES = {
    "sgd": (_sgd, [replace_momentum, momentum_in_place, drop_entry, clear_entry, momentum_off, lr_changed]),
    "sgd_plain": (_sgd_plain, [momentum_on, lr_changed]),
    "adam": (_adam, [replace_exp_avg, step_written, step_replaced, drop_entry, betas_changed, lr_changed]),
}
CASES = [pytest.param(kind, change, id=f"{kind}-{change.__name__}") for kind, (_, cs) in CHANGES.items() for change in cs]


def make(kind, backend, seed=0):
    torch.manual_seed(seed)
    params = [torch.randn(s).requires_grad_(True) for s in SHAPES]
    base, kwargs = CHANGES[kind][0](params)
    return params, SAM(params, base, rho=0.05, backend=backend, **kwargs)


def backward(params, step):
    gen = torch.Generator().manual_seed(step)
    loss = sum(((p - torch.randn(p.shape, generator=gen)) ** 2).sum() + p.sin().sum() for p in params)
    loss.backward()


def sam_step(opt, params, step):
    backward(params, step)
    opt.first_step(zero_grad=True)
    backward(params, step)
    opt.second_step(zero_grad=True)


def assert_same(fused, fused_params, ref, ref_params, what):
    for k, (p, r) in enumerate(zip(fused_params, ref_params)):
        assert_close(p.detach(), r.detach(), TOL, f"{what}: param {k}")
        for key, value in ref.state[r].items():
            assert key in fused.state[p], f"{what}: param {k} has no state {key!r}"
            assert_close(fused.state[p][key].detach().reshape(value.shape), value.detach(), TOL,
                         f"{what}: param {k} state {key!r}")


@pytest.fixture(params=["cpp", "python"])
def host_path(request, monkeypatch):
    monkeypatch.setattr(_host, "USE_NATIVE", request.param == "cpp")
    return request.param


def change_between_steps_in_lockstep(kind, change):
    """A fused optimizer and an eager one, steps in lockstep; ``change(opt,
    params)`` made to both once the fused one keeps its plan; the two
    compared after every later step."""
    fused_params, fused = make(kind, "cpp")
    ref_params, ref = make(kind, "eager")
    for step in range(STEPS_BEFORE):
        sam_step(fused, fused_params, step)
        sam_step(ref, ref_params, step)
        assert fused.last_step_fused and not ref.last_step_fused
    assert fused._plans._steady is not None, "the plan was not kept: the case tests nothing"
    change(fused, fused_params)
    change(ref, ref_params)
    for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
        sam_step(fused, fused_params, step)
        sam_step(ref, ref_params, step)
        assert_same(fused, fused_params, ref, ref_params, f"{change.__name__}, step {step}")


@pytest.mark.parametrize("kind, change", CASES)
def test_a_change_between_steps_is_seen_by_the_next_fused_step(host_path, kind, change):
    change_between_steps_in_lockstep(kind, change)


@pytest.mark.parametrize("kind", list(CHANGES))
def test_load_state_dict_of_an_earlier_step_is_seen(host_path, kind):
    fused_params, fused = make(kind, "cpp")
    ref_params, ref = make(kind, "eager")
    sam_step(fused, fused_params, 0)
    sam_step(ref, ref_params, 0)
    # Copies: torch's state_dict refers to the live state tensors.
    saved_fused, saved_ref = copy.deepcopy(fused.state_dict()), copy.deepcopy(ref.state_dict())
    for step in range(1, STEPS_BEFORE + 1):
        sam_step(fused, fused_params, step)
        sam_step(ref, ref_params, step)
    assert fused._plans._steady is not None
    fused.load_state_dict(saved_fused)
    ref.load_state_dict(saved_ref)
    for step in range(STEPS_BEFORE + 1, STEPS_BEFORE + 1 + STEPS_AFTER):
        sam_step(fused, fused_params, step)
        sam_step(ref, ref_params, step)
        assert_same(fused, fused_params, ref, ref_params, f"after load_state_dict, step {step}")


def test_a_gradient_missing_for_one_step_takes_the_other_rows(host_path):
    fused_params, fused = make("sgd", "cpp")
    ref_params, ref = make("sgd", "eager")
    for step in range(STEPS_BEFORE + 2):
        for params, opt in ((fused_params, fused), (ref_params, ref)):
            backward(params, step)
            opt.first_step(zero_grad=True)
            backward(params, step)
            if step == STEPS_BEFORE:
                params[1].grad = None  # no second-pass gradient: this step leaves it alone
            opt.second_step(zero_grad=True)
        assert_same(fused, fused_params, ref, ref_params, f"step {step}")


def test_a_deep_copy_keeps_its_own_plan(host_path):
    params, opt = make("sgd", "cpp")
    for step in range(STEPS_BEFORE):
        sam_step(opt, params, step)
    clone = copy.deepcopy(opt)
    assert clone._plans._steady is None  # the copy's state entries are other dicts
    clone_params = clone._params()
    ref_params, ref = make("sgd", "eager")
    for step in range(STEPS_BEFORE):
        sam_step(ref, ref_params, step)
    for step in range(STEPS_BEFORE, STEPS_BEFORE + 2):
        sam_step(clone, clone_params, step)
        sam_step(ref, ref_params, step)
        assert_same(clone, clone_params, ref, ref_params, f"the copy, step {step}")
