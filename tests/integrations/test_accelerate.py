"""accelerate: SharpnessAwareStep inside ``accelerator.accumulate`` gives the
README's loop (accumulation recipe, clipping after the second backward,
BatchNorm frozen in the second pass, GradScaler on both steps), and the
wrapped ``step(closure)`` of accelerate's fp16 path refuses before touching
anything.

On the CPU, accelerate gives no GradScaler for mixed_precision="fp16"
(``accelerator.scaler`` is None, native AMP off), so the scaler tests hand
torch's CPU GradScaler to the accelerator as its ``scaler`` before
``prepare``: every call from there on is accelerate's own code.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from integration_common import as_batches, assert_same_state, make_batches, make_net, readme_loop

from presam_kernels import SAM, InfoSAM

accelerate = pytest.importorskip("accelerate", reason="accelerate is pinned in requirements-test.txt")
from presam_kernels.integrations.accelerate import SharpnessAwareStep  # noqa: E402

INIT_SCALE = 2.0**10  # a power of two: scaling and unscaling are exact


def make_opt(kind, params):
    if kind == "infosam":
        return InfoSAM(params, torch.optim.SGD, rho=2.0, lr=0.1, momentum=0.9)
    return SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def make_accelerator(accumulate, scaler):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    if scaler:
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
    return acc


def cross_entropy_of(model):
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize(
    "kind,accumulate,clip,scaler",
    [("sam", 1, None, False), ("sam", 2, 0.5, False), ("infosam", 2, None, True), ("sam", 2, 0.5, True)],
    ids=["sam", "sam-accumulate2-clip", "infosam-accumulate2-scaler", "sam-accumulate2-clip-scaler"],
)
def test_accumulate_loop_equals_the_readme_loop(kind, accumulate, clip, scaler):
    acc = make_accelerator(accumulate, scaler)
    model = make_net()
    ref = copy.deepcopy(model)
    opt = make_opt(kind, model.parameters())
    batches = as_batches(*make_batches())
    loader = torch.utils.data.DataLoader(list(zip(*make_batches())), batch_size=len(batches[0][0]))
    model, prepared, loader = acc.prepare(model, opt, loader)
    sam_step = SharpnessAwareStep(acc, model, prepared, max_grad_norm=clip)
    model.train()
    for batch in loader:
        with acc.accumulate(model):
            sam_step(cross_entropy_of(model), batch)
    ref_opt = make_opt(kind, ref.parameters())
    readme_loop(ref, ref_opt, batches, accumulate, clip)
    assert_same_state(model, ref)
    assert int(opt.skipped_steps) == 0
    if scaler:
        assert acc.scaler.get_scale() == INIT_SCALE  # updated after each step, no overflow: unchanged


def test_scaler_overflow_in_second_pass_skips_the_step_and_lowers_the_scale():
    acc = make_accelerator(1, scaler=True)
    model = make_net()
    opt = make_opt("sam", model.parameters())
    model, prepared = acc.prepare(model, opt)
    sam_step = SharpnessAwareStep(acc, model, prepared)
    before = copy.deepcopy(model.state_dict())
    calls = []

    def overflowing_second_pass(batch):
        calls.append(1)
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * float("inf") if len(calls) == 2 else loss

    model.train()
    with acc.accumulate(model):
        sam_step(overflowing_second_pass, as_batches(*make_batches())[0])
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            torch.testing.assert_close(value, before[name], atol=0, rtol=0)
    assert acc.scaler.get_scale() == INIT_SCALE / 2
    assert int(opt.skipped_steps) == 1


def test_accelerated_optimizer_step_closure_with_scaler_refuses_before_touching():
    """accelerate's fp16 path: AcceleratedOptimizer.step(closure) wraps our step,
    so GradScaler sets grad_scale/found_inf on it instead of passing itself; the
    step used to run on scaled gradients. It must raise, nothing changed."""
    acc = make_accelerator(1, scaler=True)
    model = make_net()
    opt = make_opt("sam", model.parameters())
    model, prepared = acc.prepare(model, opt)
    x, y = as_batches(*make_batches())[0]
    acc.backward(F.cross_entropy(model(x), y))
    before = copy.deepcopy(model.state_dict())

    def closure():
        prepared.zero_grad()
        loss = F.cross_entropy(model(x), y)
        acc.backward(loss)
        return loss

    with pytest.raises(RuntimeError, match="grad_scaler"):
        prepared.step(closure)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)
    assert opt.skipped_steps is None and not opt.state
