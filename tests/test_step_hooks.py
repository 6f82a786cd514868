"""second_step's hooks and profiler range (optim/presam.py ``_step_hooks``),
which stand in for torch's ``Optimizer.profile_hook_step``: global hooks run
around the optimizer's own in torch's order, a pre-hook may hand the step new
arguments, and a running profiler sees the step as ``Optimizer.step#SAM.step``.
"""
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from helpers import batch, loss_of, make_model
from presam_kernels import SAM


def two_passes(model, opt, k=0):
    loss_of(model, batch(k)).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, batch(k)).backward()


def test_global_and_own_hooks_run_in_torchs_order():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    order = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, kw: order.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, kw: order.append("pre")),
        opt.register_step_post_hook(lambda o, a, kw: order.append("post")),
        register_optimizer_step_post_hook(lambda o, a, kw: order.append("global post")),
    ]
    try:
        two_passes(model, opt)
        opt.second_step()
    finally:
        for handle in handles:
            handle.remove()
    # With a step hook the fused base step is off (base_update.covered): the
    # base optimizer's own step() runs inside, and the global hooks with it.
    assert order == ["global pre", "pre", "global pre", "global post", "post", "global post"]


def test_a_pre_hook_can_hand_the_step_new_arguments():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {**kwargs, "zero_grad": True}))
    two_passes(model, opt)
    opt.second_step(zero_grad=False)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters()), "the hook's zero_grad=True was not used"


def test_a_running_profiler_sees_the_step():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    two_passes(model, opt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.second_step()
    names = {event.name for event in prof.events()}
    assert "Optimizer.step#SAM.step" in names
