"""Operations between first_step and second_step (README, "Mid-step operations").

The rule: between the two passes the parameters hold x + e, so every
operation that would read or replace the optimizer's parameters, layout or
state (state_dict, load_state_dict, add_param_group, deepcopy, pickle) raises
a RuntimeError that says to call restore() or second_step() first, and
changes nothing.  Parameters moved or converted behind the optimizer's back
(model.to()) make second_step refuse the same way; restore() then puts x back
into them, wherever they are now.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from helpers import assert_same, snapshot
from presam_kernels import SAM, InfoSAM

PERTURB = pytest.mark.parametrize("perturb", ["in_place", "out_of_place"])
MIDSTEP = r"between first_step\(\) and second_step\(\).*opt\.second_step\(\).*opt\.restore\(\)"


def build(backend, flatten, perturb, cls=SAM, n=2, **kwargs):
    """Two tiny parameters at x = 0 and 1, lr = 0: they must never move."""
    params = [torch.zeros(4, requires_grad=True), torch.ones(3, requires_grad=True)]
    opt = cls(params, torch.optim.SGD, rho=0.1, lr=0.0, momentum=0.9, flatten=flatten, backend=backend,
              perturb=perturb, **kwargs)
    return params, opt


def give_grads(params):
    for k, p in enumerate(params):
        p.grad = torch.full_like(p, 1.0 + k)


def assert_at_x(params):
    assert torch.equal(params[0].detach(), torch.zeros(4)), params[0]
    assert torch.equal(params[1].detach(), torch.ones(3)), params[1]


def full_step(opt, params):
    give_grads(params)
    opt.first_step(zero_grad=True)
    give_grads(params)
    opt.second_step(zero_grad=True)


OPERATIONS = {
    "state_dict": lambda opt, params, saved: opt.state_dict(),
    "load_state_dict": lambda opt, params, saved: opt.load_state_dict(saved),
    "add_param_group": lambda opt, params, saved: opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]}),
    "deepcopy": lambda opt, params, saved: copy.deepcopy((params, opt)),
    "pickle": lambda opt, params, saved: pickle.dumps((params, opt)),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@PERTURB
def test_midstep_operation_refuses_and_changes_nothing(operation, perturb, flatten, backend, core_case):
    core_case(operation in ("load_state_dict", "deepcopy"))  # the refusal runs before any backend code
    params, opt = build(backend, flatten, perturb)
    full_step(opt, params)
    saved = opt.state_dict()
    give_grads(params)
    opt.first_step()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=MIDSTEP):
        OPERATIONS[operation](opt, params, saved)
    assert_same(before, snapshot(opt, params))
    give_grads(params)
    opt.second_step(zero_grad=True)
    assert_at_x(params)
    # Allowed once the step is over (or undone), and then the parameters stay at x.
    OPERATIONS[operation](opt, params, saved)
    full_step(opt, params)
    assert_at_x(params)


@PERTURB
def test_restore_then_load_state_dict_rolls_back_exactly(perturb, flatten, backend, core_case):
    """The rollback after a NaN loss: restore(), then load; x never moves (lr = 0)."""
    core_case(perturb == "out_of_place")
    params, opt = build(backend, flatten, perturb)
    saved = opt.state_dict()
    give_grads(params)
    opt.first_step()
    opt.restore()
    opt.load_state_dict(saved)
    assert_at_x(params)
    for _ in range(2):
        full_step(opt, params)
    assert_at_x(params)


@PERTURB
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["to_float64", "re_pointed"])
def test_parameters_moved_midstep_make_second_step_refuse_and_restore_puts_x_back(
    dtype, perturb, flatten, backend, core_case
):
    """model.to() (or p.data = ...) between the passes: second_step refuses,
    changing nothing; restore() writes x into the parameters where they are now."""
    core_case(dtype == torch.float64)
    params, opt = build(backend, flatten, perturb)
    full_step(opt, params)
    give_grads(params)
    opt.first_step()
    for p in params:  # what nn.Module.to() does to each parameter
        p.data = p.data.to(dtype, copy=True)
        if p.grad is not None:
            p.grad = p.grad.to(dtype)
    give_grads(params)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="restore\\(\\)"):
        opt.second_step()
    assert_same(before, snapshot(opt, params))
    opt.restore()
    assert params[0].dtype == dtype
    assert torch.equal(params[0].detach(), torch.zeros(4, dtype=dtype))
    assert torch.equal(params[1].detach(), torch.ones(3, dtype=dtype))
    for _ in range(2):
        full_step(opt, params)
    assert torch.equal(params[0].detach(), torch.zeros(4, dtype=dtype))
    assert torch.equal(params[1].detach(), torch.ones(3, dtype=dtype))


def test_infosam_refusal_keeps_the_ema(flatten, backend, core_case):
    core_case(flatten)
    params, opt = build(backend, flatten, "in_place", cls=InfoSAM)
    full_step(opt, params)
    saved = opt.state_dict()
    give_grads(params)
    opt.first_step()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=MIDSTEP):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt, params))


# -- a parameter listed twice ---------------------------------------------------
def tied_model():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 4)
    head = torch.nn.Linear(4, 6, bias=False)
    head.weight = emb.weight  # tied embedding / head
    return emb, head


@PERTURB
@pytest.mark.parametrize("instance", [False, True], ids=["class", "instance"])
def test_a_tied_weight_listed_twice_is_restored_exactly(instance, perturb, flatten, backend, core_case):
    """list(emb.parameters()) + list(head.parameters()) holds the tied weight
    twice: one row and one backup, so with lr = 0 it never moves."""
    core_case(not instance)
    emb, head = tied_model()
    params = list(emb.parameters()) + list(head.parameters())
    assert params[0] is params[1]
    kwargs = dict(rho=0.5, flatten=flatten, backend=backend, perturb=perturb)
    if instance:
        with pytest.warns(UserWarning, match="duplicate"):  # torch's own warning, for its own optimizer
            base = torch.optim.SGD(params, lr=0.0, momentum=0.9)
        opt = SAM(base.param_groups[0]["params"], base, **kwargs)
    else:
        opt = SAM(params, torch.optim.SGD, lr=0.0, momentum=0.9, **kwargs)
    assert len(opt.param_groups[0]["params"]) == 1
    x = emb.weight.detach().clone()
    tokens = torch.tensor([0, 3, 5, 1])
    for _ in range(3):
        head(emb(tokens)).logsumexp(-1).sum().backward()
        opt.first_step(zero_grad=True)
        head(emb(tokens)).logsumexp(-1).sum().backward()
        opt.second_step(zero_grad=True)
    assert torch.equal(emb.weight.detach(), x)
    assert head.weight is emb.weight


def test_a_parameter_listed_twice_in_an_added_group_is_kept_once():
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = SAM([p], torch.optim.SGD, lr=0.0)
    opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups[1]["params"]) == 1
    for t in (p, q):
        t.grad = torch.ones_like(t)
    opt.first_step()
    opt.second_step()
    assert torch.equal(q.detach(), torch.zeros(2))


@PERTURB
def test_a_restore_that_raises_keeps_the_step_pending_and_a_retry_puts_x_back(perturb, flatten, backend, core_case):
    """restore() into a parameter replaced by one of another shape raises; the
    step stays pending (mid-step operations still refuse), and once the user
    puts a fitting tensor back, restore() again leaves every parameter at x."""
    core_case(perturb == "in_place")
    params, opt = build(backend, flatten, perturb)
    give_grads(params)
    opt.first_step()
    own = params[0].data
    params[0].data = torch.zeros(2, 2)
    with pytest.raises(RuntimeError):
        opt.restore()
    with pytest.raises(RuntimeError, match=MIDSTEP):
        opt.state_dict()
    params[0].data = own.clone()
    opt.restore()
    assert_at_x(params)
