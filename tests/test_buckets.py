"""Where parameters and gradients live, and what happens when something else
moves them: set_to_none, model.to(dtype), create_graph, DDP-like gradient
bucket views, and (flatten=True) replaced parameters or gradients.

Both bucket modes run every case; the expectation is a plain-PyTorch SAM
(and a float64 infoSAM) written below, never the package's own output.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import FP32, MODES, assert_close, assert_params_close, loss_of, make_model
from helpers import batch as batch_of
from presam_kernels import SAM, InfoSAM

# Parameters trained in fp32 for some steps, then moved to float64: fp32 tolerances.
FP64_AFTER_FP32 = (torch.float64, *FP32[1:])
# A few bf16 training steps against a bf16 reference that rounds elsewhere.
BF16_TRAINING = (torch.bfloat16, 2e-2, 2e-2)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def batch(k: int, n: int = 16, dtype=torch.float32):
    return batch_of(k, n, dtype, first_seed=2000)


class ReferenceSAM:
    """Plain-PyTorch SAM (u = g, c = 1), float64 math, per-parameter loop.
    With ``alpha`` set it is infoSAM: u = g / ((m - g)^2 + delta), m an EMA
    of g (weight alpha on the old value), m = g and belief = 1 on the first step."""

    def __init__(self, base, rho, alpha=None, delta=1e-12, eps=1e-12):
        self.base, self.rho, self.alpha, self.delta, self.eps = base, rho, alpha, delta, eps
        self.grad_ema = {}
        self.backup = {}

    @torch.no_grad()
    def first_step(self):
        rows = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        us, m_new = {}, {}
        for p in rows:
            g = p.grad.double()
            if self.alpha is None:
                us[p] = g
                continue
            if p not in self.grad_ema:
                m_new[p], belief = g.clone(), torch.ones_like(g)
            else:
                m_new[p] = self.alpha * self.grad_ema[p] + (1 - self.alpha) * g
                belief = (m_new[p] - g) ** 2
            us[p] = g / (belief + self.delta)
        norm = torch.sqrt(sum((u * u).sum() for u in us.values()))
        self.grad_ema.update(m_new)
        for p in rows:
            self.backup[p] = p.detach().clone()
            p.add_((self.rho * us[p] / (norm + self.eps)).to(p.dtype))
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self):
        for p, old in self.backup.items():
            p.copy_(old)
        self.backup = {}
        self.base.step()
        self.base.zero_grad(set_to_none=True)


def reference(model, rho=0.05, lr=0.1, momentum=0.9, **kw):
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=kw.pop("weight_decay", 0))
    return ReferenceSAM(base, rho, **kw)


def two_step(model, opt, b, create_graph=False, zero_grad_to_none=None):
    def backward():
        loss_of(model, b).backward(create_graph=create_graph)

    if zero_grad_to_none is not None:
        opt.zero_grad(set_to_none=zero_grad_to_none)
    backward()
    opt.first_step(zero_grad=True)
    backward()
    opt.second_step(zero_grad=True)


def params_at_base_step(opt):
    """A list that receives a copy of the parameters each time the base optimizer steps."""
    seen = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, args, kwargs: seen.append([p.detach().clone() for g in o.param_groups for p in g["params"]])
    )
    return seen


def storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


# ---------------------------------------------------------------------------
# defaults: parameters and gradients stay where PyTorch put them
# ---------------------------------------------------------------------------
def test_default_mode_leaves_parameters_and_gradients_where_pytorch_put_them():
    model = make_model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for k in range(2):
        loss_of(model, batch(k)).backward()
        grad_ptrs = [p.grad.data_ptr() for p in model.parameters()]
        opt.first_step()
        assert [p.grad.data_ptr() for p in model.parameters()] == grad_ptrs
        opt.zero_grad()
        loss_of(model, batch(k)).backward()
        opt.second_step(zero_grad=True)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


@MODES
def test_zero_grad_set_to_none_every_step_matches_reference(flatten):
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    ref_opt = reference(ref)
    for k in range(3):
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch(k)).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch(k)).backward()
        opt.second_step()
        opt.zero_grad(set_to_none=True)
        loss_of(ref, batch(k)).backward()
        ref_opt.first_step()
        loss_of(ref, batch(k)).backward()
        ref_opt.second_step()
    assert_params_close(model, ref)


# ---------------------------------------------------------------------------
# model.to(dtype) after the optimizer was built
# ---------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("when", ["before_any_step", "after_a_step"])
def test_model_to_float64_after_construction_matches_reference(flatten, when):
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    ref_opt = reference(ref)
    steps = range(3)
    for k in steps:
        if (when == "before_any_step" and k == 0) or (when == "after_a_step" and k == 1):
            model.to(torch.float64)
            ref.to(torch.float64)
        dtype = next(model.parameters()).dtype
        two_step(model, opt, batch(k, dtype=dtype))
        loss_of(ref, batch(k, dtype=dtype)).backward()
        ref_opt.first_step()
        loss_of(ref, batch(k, dtype=dtype)).backward()
        ref_opt.second_step()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert_params_close(model, ref, FP64_AFTER_FP32)


@MODES
def test_model_to_float64_keeps_the_infosam_ema_with_its_parameter(flatten):
    model, ref = make_model(), make_model()
    opt = InfoSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.9, delta=1e-3, lr=0.1,
                  momentum=0.9, flatten=flatten)
    ref_opt = reference(ref, alpha=0.9, delta=1e-3)
    for k in range(4):
        if k == 2:
            model.to(torch.float64)
            ref.to(torch.float64)
        dtype = next(model.parameters()).dtype
        two_step(model, opt, batch(k, dtype=dtype))
        loss_of(ref, batch(k, dtype=dtype)).backward()
        ref_opt.first_step()
        loss_of(ref, batch(k, dtype=dtype)).backward()
        ref_opt.second_step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert_close(opt.state[p]["grad_ema"], ref_opt.grad_ema[q], FP32, f"step {k}: grad_ema")
    assert_params_close(model, ref, FP64_AFTER_FP32)


@MODES
def test_model_to_bfloat16_after_construction_perturbs_the_model_and_restores_exactly(flatten):
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, flatten=flatten)
    seen = params_at_base_step(opt)
    ref_opt = reference(ref, rho=0.5, momentum=0.0)
    for k in range(2):
        if k == 1:
            model.to(torch.bfloat16)
            ref.to(torch.bfloat16)
        dtype = next(model.parameters()).dtype
        b = batch(k, dtype=dtype)
        before = [p.detach().clone() for p in model.parameters()]
        loss_of(model, b).backward()
        opt.first_step(zero_grad=True)
        loss_of(ref, b).backward()
        ref_opt.first_step()
        # the module's own tensors are the perturbed ones
        assert_params_close(model, ref, BF16_TRAINING if dtype == torch.bfloat16 else FP32)
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
        loss_of(ref, b).backward()
        ref_opt.second_step()
        for got, want in zip(seen[-1], before):
            assert got.dtype == dtype
            assert torch.equal(got, want), "the base step did not start from the exact x"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_params_close(model, ref, BF16_TRAINING)


# ---------------------------------------------------------------------------
# backward(create_graph=True)
# ---------------------------------------------------------------------------
@MODES
def test_backward_with_create_graph_matches_reference(flatten):
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    ref_opt = reference(ref)
    try:
        with warnings.catch_warnings():
            # torch warns about a reference cycle when backward(create_graph=True) fills .grad
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            for k in range(3):
                two_step(model, opt, batch(k), create_graph=True)
                loss_of(ref, batch(k)).backward()
                ref_opt.first_step()
                loss_of(ref, batch(k)).backward()
                ref_opt.second_step()
    finally:
        for p in model.parameters():
            p.grad = None  # break the graph cycle
    assert_params_close(model, ref)


# ---------------------------------------------------------------------------
# DDP-like gradient bucket views
# ---------------------------------------------------------------------------
class GradBucket:
    """Simulates DDP's gradient_as_bucket_view: every .grad is a view into one
    big tensor, the backward accumulates into it in place, and the all-reduce
    works on the big tensor."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.flat = torch.zeros(sum(p.numel() for p in self.params))

    def attach(self):
        self.flat.zero_()
        offset = 0
        for p in self.params:
            p.grad = self.flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()

    def all_reduce(self, world_size=2):
        self.flat.div_(world_size)  # identical ranks: the average of world_size copies, scaled

    def holds_grads(self):
        lo = self.flat.data_ptr()
        hi = lo + self.flat.numel() * self.flat.element_size()
        return all(p.grad is not None and lo <= p.grad.data_ptr() < hi for p in self.params)


@MODES
def test_ddp_like_gradient_bucket_views_match_reference(flatten):
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    ref_opt = reference(ref)
    bucket, ref_bucket = GradBucket(model), GradBucket(ref)
    for k in range(3):
        for m, o, bk in ((model, opt, bucket), (ref, ref_opt, ref_bucket)):
            bk.attach()
            loss_of(m, batch(k)).backward()
            assert bk.holds_grads(), "the simulation is broken: backward left the bucket"
            bk.all_reduce()
            o.first_step() if o is ref_opt else o.first_step(zero_grad=False)
            if o is opt and not flatten:
                assert bk.holds_grads(), "first_step moved the gradients out of the bucket"
            bk.attach()
            loss_of(m, batch(k)).backward()
            bk.all_reduce()
            o.second_step()
    assert_params_close(model, ref)


# ---------------------------------------------------------------------------
# flatten=True: one flat buffer per bucket, replacements re-adopted
# ---------------------------------------------------------------------------
def test_flatten_points_parameters_and_gradients_into_one_buffer_each_without_changing_values():
    model = make_model()
    values = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=True)
    params = list(model.parameters())
    assert len(storages(params)) == 1
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    # Gradients that autograd allocated are adopted (one copy) by the first step
    # and stay in the flat buffer from then on, accumulated into in place.
    loss_of(model, batch(0)).backward()
    opt.first_step()
    assert len(storages([p.grad for p in params])) == 1
    flat_grads = storages([p.grad for p in params])
    opt.second_step()
    opt.zero_grad()
    loss_of(model, batch(1)).backward()
    assert storages([p.grad for p in params]) == flat_grads
    assert storages([p.grad for p in params]) != storages(params)


@pytest.mark.parametrize("what", ["param", "grad", "both", "set_to_none"])
def test_flatten_readopts_replaced_parameters_and_gradients(what):
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=True)
    ref_opt = reference(ref)
    gen = torch.Generator().manual_seed(5)
    for k in range(3):
        b = batch(k)
        if what in ("param", "both"):
            new = torch.randn(model[0].weight.shape, generator=gen)
            model[0].weight.data = new.clone()  # e.g. a checkpoint loader or an EMA swap
            ref[0].weight.data = new.clone()
        if what == "set_to_none":
            opt.zero_grad(set_to_none=True)
        loss_of(model, b).backward()
        loss_of(ref, b).backward()
        if what in ("grad", "both"):
            new_g = torch.randn(model[2].weight.shape, generator=gen)
            model[2].weight.grad = new_g.clone()  # e.g. a hand-made gradient
            ref[2].weight.grad = new_g.clone()
        opt.first_step(zero_grad=True)
        ref_opt.first_step()
        assert len(storages(model.parameters())) == 1, "a replaced parameter was not re-adopted"
        assert len(storages([p.grad for p in model.parameters()])) == 1, "a replaced gradient was not re-adopted"
        assert_params_close(model, ref)  # the perturbation used the replacements
        if what == "set_to_none":
            opt.zero_grad(set_to_none=True)
        loss_of(model, b).backward()
        loss_of(ref, b).backward()
        if what in ("grad", "both"):
            new_g = torch.randn(model[0].bias.shape, generator=gen)
            model[0].bias.grad = new_g.clone()
            ref[0].bias.grad = new_g.clone()
        opt.second_step(zero_grad=True)
        ref_opt.second_step()
        assert_params_close(model, ref)
    assert len(storages(model.parameters())) == 1


@MODES
def test_channels_last_parameters_keep_their_memory_format(flatten):
    def conv_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3)).to(memory_format=torch.channels_last)

    model, ref = conv_model(), conv_model()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    ref_opt = reference(ref)
    gen = torch.Generator().manual_seed(9)
    for k in range(2):
        x = torch.randn(2, 3, 7, 7, generator=gen).to(memory_format=torch.channels_last)
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).square().mean().backward()
            if o is opt:
                for conv in (m[0], m[2]):
                    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
            o.first_step()
            if o is opt:
                o.zero_grad()
            m(x).square().mean().backward()
            o.second_step()
            if o is opt:
                o.zero_grad()
        for conv in (model[0], model[2]):
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
            assert not conv.weight.is_contiguous()
        assert_params_close(model, ref)


# ---------------------------------------------------------------------------
# parameters without a gradient
# ---------------------------------------------------------------------------
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)  # never in the graph

    def forward(self, x, use_head=True):
        h = torch.tanh(self.body(x))
        return self.head(h) if use_head else h.sum(dim=1, keepdim=True).expand(-1, 3)


@MODES
@pytest.mark.parametrize("zero_grad_to_none", [None, True], ids=["default_zero_grad", "set_to_none"])
def test_parameter_without_gradient_is_neither_perturbed_nor_has_state_touched(flatten, zero_grad_to_none):
    model = TwoHeads()
    opt = InfoSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=0.1,
                  flatten=flatten)
    unused = list(model.unused.parameters())
    values = [p.detach().clone() for p in unused]
    for k in range(3):
        x, y = batch(k)
        if zero_grad_to_none is not None:
            opt.zero_grad(set_to_none=zero_grad_to_none)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        for p, v in zip(unused, values):
            assert torch.equal(p.detach(), v), f"a parameter without gradient changed (step {k}, after first_step)"
        if zero_grad_to_none is not None:
            opt.zero_grad(set_to_none=zero_grad_to_none)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for p, v in zip(unused, values):
        assert torch.equal(p.detach(), v), "a parameter without gradient was changed by the step"
        base_state = {k: v for k, v in opt.state.get(p, {}).items() if k != "grad_ema"}
        assert not base_state, f"the base optimizer got state for a parameter without gradient: {sorted(base_state)}"
        if "grad_ema" in opt.state.get(p, {}):
            assert torch.count_nonzero(opt.state[p]["grad_ema"]) == 0, "its grad_ema was touched"


@MODES
def test_parameter_without_second_gradient_is_still_restored_exactly(flatten):
    model = TwoHeads()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, flatten=flatten)
    seen = params_at_base_step(opt)
    x, y = batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(model.head.weight.detach(), before[2]), "the head was not perturbed"
    model(x, use_head=False).square().mean().backward()  # the head gets no gradient now
    opt.second_step(zero_grad=True)
    for got, want in zip(seen[-1], before):
        assert torch.equal(got, want), "a perturbed parameter was not restored before the base step"
    for p, want in zip(model.head.parameters(), before[2:4]):
        assert torch.equal(p.detach(), want), "the head moved without gradient"
