"""Changes a user can make that the host-path caches (issue 15) must see:
writes that leave every object the caches key on in place (a step count
written through ``.data``, a state tensor re-pointed through ``.data =``),
a parameter moved to another param group without changing the parameters'
order, second_step's hooks as torch calls them, and no gradient of a past
step kept alive. Lockstep against the eager backend, as tests/test_plan_cache.py.
"""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from helpers import assert_close
from presam_kernels import SAM, _host, extension_available
from test_plan_cache import (
    CHANGES, SHAPES, STEPS_AFTER, STEPS_BEFORE, TOL, backward, change_between_steps_in_lockstep, make,
    sam_step,
)

pytestmark = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")


@pytest.fixture(params=["cpp", "python"])
def host_path(request, monkeypatch):
    monkeypatch.setattr(_host, "USE_NATIVE", request.param == "cpp")
    return request.param


def step_filled_through_data(opt, params):
    for p in params:  # .data is another tensor object: no version counter of the step moves
        opt.state[p]["step"].data.fill_(1.0)


def step_repointed(opt, params):
    for p in params:
        opt.state[p]["step"].data = torch.tensor(1.0)


def exp_avg_repointed(opt, params):
    opt.state[params[1]]["exp_avg"].data = torch.full_like(params[1], 0.25)


def momentum_repointed(opt, params):
    opt.state[params[1]]["momentum_buffer"].data = torch.full_like(params[1], 0.5)


CASES = [
    ("adam", step_filled_through_data),
    ("adam", step_repointed),
    ("adam", exp_avg_repointed),
    ("sgd", momentum_repointed),
]


@pytest.mark.parametrize("kind, change", [pytest.param(k, c, id=f"{k}-{c.__name__}") for k, c in CASES])
def test_a_write_through_data_is_seen_by_the_next_fused_step(host_path, kind, change):
    change_between_steps_in_lockstep(kind, change)


def test_second_steps_hooks_get_the_arguments_torchs_step_hooks_get():
    seen = {}
    for name, make_opt in (("torch", lambda p: torch.optim.SGD([p], lr=0.1)),
                           ("sam", lambda p: SAM([p], torch.optim.SGD, rho=0.05, lr=0.1))):
        p = torch.ones(3, requires_grad=True)
        opt = make_opt(p)
        opt.register_step_pre_hook(lambda o, args, kwargs, name=name: seen.setdefault(f"{name} pre", args) and None)
        opt.register_step_post_hook(lambda o, args, kwargs, name=name: seen.setdefault(f"{name} post", args) and None)
        p.sum().backward()
        if name == "sam":
            opt.first_step()
            p.sum().backward()
            opt.second_step()
        else:
            opt.step()
        # torch's profile_hook_step hands the hooks the step's positional
        # arguments with the optimizer first (what a pre-hook returns is called as step(*args)).
        assert seen[f"{name} pre"][:1] == (opt,), f"{name}: pre-hook got {seen[f'{name} pre']}"
        assert seen[f"{name} post"][:1] == (opt,), f"{name}: post-hook got {seen[f'{name} post']}"


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("options", [{}, {"perturb": "out_of_place"}, {"flatten": True}], ids=str)
def test_no_gradient_of_a_past_step_is_kept_alive(host_path, kind, options):
    torch.manual_seed(0)
    params = [torch.randn(s).requires_grad_(True) for s in SHAPES]
    base, kwargs = CHANGES[kind][0](params)
    opt = SAM(params, base, rho=0.05, backend="cpp", **kwargs, **options)
    grads = []
    for step in range(STEPS_BEFORE + 1):
        backward(params, step)
        grads += [weakref.ref(p.grad) for p in params]
        opt.first_step(zero_grad=True)
        backward(params, step)
        grads += [weakref.ref(p.grad) for p in params]
        opt.second_step()
        opt.zero_grad(set_to_none=True)
    assert opt.last_step_fused
    gc.collect()
    alive = [k for k, g in enumerate(grads) if g() is not None]
    assert not alive, f"gradients {alive} of past steps are still referenced"


def split_off_last_parameter(opt, params):
    """The last parameter of group 0 moves to a new group with another lr:
    the parameters' order (and so each one's id, device and dtype in it) stays."""
    last = opt.param_groups[0]["params"].pop()
    opt.add_param_group({"params": [last], "lr": 0.5})


def load_into_the_base_optimizer(opt, params):
    opt.base_optimizer.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("midstep", [False, True], ids=["between_steps", "midstep"])
def test_a_load_into_the_base_optimizer_itself_is_refused_before_anything_is_touched(backend, midstep):
    """torch's load_state_dict gives the base optimizer a new state dict and
    param groups, which the optimizer's steps would not read (they read and
    write the ones it shares with the base): the next step raises instead."""
    from helpers import assert_same as assert_untouched, snapshot

    params, opt = make("sgd", backend)
    for step in range(STEPS_BEFORE):
        sam_step(opt, params, step)
    backward(params, STEPS_BEFORE)
    if midstep:
        opt.first_step(zero_grad=True)
        backward(params, STEPS_BEFORE)
    load_into_the_base_optimizer(opt, params)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="opt.base_optimizer.load_state_dict"):
        opt.second_step() if midstep else opt.first_step()
    assert_untouched(before, snapshot(opt, params))


def assert_same_base_state(fused, fused_params, ref, ref_params, what):
    """As assert_same, with the state the base optimizer itself holds."""
    for k, (p, r) in enumerate(zip(fused_params, ref_params)):
        assert_close(p.detach(), r.detach(), TOL, f"{what}: param {k}")
        for key, value in ref.base_optimizer.state[r].items():
            assert_close(fused.base_optimizer.state[p][key].detach().reshape(value.shape), value.detach(), TOL,
                         f"{what}: param {k} state {key!r}")


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("change", [
    split_off_last_parameter,
], ids=lambda c: c.__name__)
def test_a_change_to_the_base_optimizer_between_steps_is_seen(host_path, kind, change):
    fused_params, fused = make(kind, "cpp")
    ref_params, ref = make(kind, "eager")
    for step in range(STEPS_BEFORE + STEPS_AFTER):
        if step == STEPS_BEFORE:
            change(fused, fused_params)
            change(ref, ref_params)
        sam_step(fused, fused_params, step)
        sam_step(ref, ref_params, step)
        assert fused.last_step_fused
        assert_same_base_state(fused, fused_params, ref, ref_params, f"{change.__name__}, step {step}")
