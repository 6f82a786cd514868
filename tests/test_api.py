"""Behaviour of the public API: construction, argument errors, the two-step
protocol, closures, hooks, LR schedulers and the conveniences.

Every expectation comes from an independent plain-PyTorch re-implementation
of SAM written below (``reference_perturb`` / ``reference_step``), never from
the package's own output, except where the property itself is an equality
between two ways of driving the package (closure vs two-step API).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (  # batch: the stream from seed 1000
    FP32, assert_bits_equal, assert_close, assert_params_close, assert_params_equal, assert_same, batch, loss_of,
    make_model, snapshot,
)
from presam_kernels import ASAM, SAM, FisherSAM, InfoSAM, VaSSO

ALL_CLASSES = [SAM, ASAM, InfoSAM, VaSSO, FisherSAM]


# ---------------------------------------------------------------------------
# helpers: a tiny model, deterministic batches, plain-PyTorch SAM
# ---------------------------------------------------------------------------
@torch.no_grad()
def reference_perturb(param_groups, eps=1e-12, c_of=None):
    """x <- x + rho_group * c^2 g / (||c g|| + eps), one global norm over every
    parameter with a gradient, computed in float64. Returns (backup, norm)."""
    rows = [(group, p) for group in param_groups for p in group["params"] if p.grad is not None]
    cs = {p: (None if c_of is None else c_of(p)) for _, p in rows}
    sq = 0.0
    for _, p in rows:
        g = p.grad.double()
        cu = g if cs[p] is None else cs[p] * g
        sq = sq + (cu * cu).sum()
    norm = torch.sqrt(torch.as_tensor(sq, dtype=torch.float64))
    backup = {}
    for group, p in rows:
        backup[p] = p.detach().clone()
        g = p.grad.double()
        c2 = 1.0 if cs[p] is None else cs[p] * cs[p]
        p.add_((group["rho"] * c2 * g / (norm + eps)).to(p.dtype))
    return backup, norm


@torch.no_grad()
def reference_restore(backup):
    for p, old in backup.items():
        p.copy_(old)


def reference_step(model, base, b, eps=1e-12, c_of=None, clip=None):
    """One SAM step in plain PyTorch on ``base`` (a torch optimizer whose
    param groups carry 'rho')."""
    base.zero_grad(set_to_none=True)
    loss = loss_of(model, b)
    loss.backward()
    backup, norm = reference_perturb(base.param_groups, eps=eps, c_of=c_of)
    base.zero_grad(set_to_none=True)
    loss_of(model, b).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    reference_restore(backup)
    base.step()
    base.zero_grad(set_to_none=True)
    return loss.detach(), norm


def sam_two_step(model, opt, b):
    loss = loss_of(model, b)
    loss.backward()
    opt.first_step(zero_grad=True)
    loss_of(model, b).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


# ---------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------
def test_base_optimizer_class_is_built_on_our_param_groups_with_base_kwargs():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups is opt.base_optimizer.param_groups
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["momentum"] == 0.9 and group["rho"] == 0.05
    assert group["adaptive"] is False


def test_base_optimizer_instance_is_used_as_is():
    model, ref = make_model(), make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SAM(model.parameters(), base, rho=0.05)
    assert opt.base_optimizer is base
    assert opt.param_groups is base.param_groups
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    for k in range(3):
        sam_two_step(model, opt, batch(k))
        reference_step(ref, ref_base, batch(k))
    assert_params_close(model, ref)


def test_base_optimizer_instance_with_base_kwargs_is_an_error_naming_them():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="momentum"):
        SAM(model.parameters(), base, rho=0.05, momentum=0.9)


def test_base_optimizer_that_is_not_an_optimizer_is_an_error_naming_it():
    model = make_model()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), "sgd", lr=0.1)


def test_sam_matches_plain_pytorch_sam_over_several_steps():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    for k in range(4):
        sam_two_step(model, opt, batch(k))
        reference_step(ref, ref_base, batch(k))
    assert_params_close(model, ref)


def test_sam_adaptive_perturbs_by_abs_x_squared_for_every_tensor_including_biases():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.5}], lr=0.1)
    loss_of(model, batch(0)).backward()
    loss_of(ref, batch(0)).backward()
    opt.first_step()
    reference_perturb(ref_base.param_groups, c_of=lambda p: p.detach().double().abs())
    assert_params_close(model, ref)


def test_per_group_rho_with_one_global_norm():
    model, ref = make_model(), make_model()
    groups = lambda m: [{"params": m[0].parameters(), "rho": 0.2}, {"params": m[2].parameters()}]  # noqa: E731
    opt = SAM(groups(model), torch.optim.SGD, rho=0.05, lr=0.1)
    assert [g["rho"] for g in opt.param_groups] == [0.2, 0.05]
    ref_groups = groups(ref)
    ref_groups[1]["rho"] = 0.05
    ref_base = torch.optim.SGD(ref_groups, lr=0.1)
    loss_of(model, batch(0)).backward()
    loss_of(ref, batch(0)).backward()
    opt.first_step()
    reference_perturb(ref_base.param_groups)
    assert_params_close(model, ref)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_optimizer_takes_eps_norm_and_backend(cls):
    model = make_model()
    opt = cls(model.parameters(), torch.optim.SGD, eps_norm=1e-12, backend="eager", lr=0.1)
    assert opt.backend == "eager"
    before = [p.detach().clone() for p in model.parameters()]
    sam_two_step(model, opt, batch(0))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("cls, default_rho", [(SAM, 0.05), (ASAM, 0.5), (InfoSAM, 0.05), (VaSSO, 0.05),
                                              (FisherSAM, 0.05)], ids=lambda v: getattr(v, "__name__", str(v)))
def test_default_eps_norm_is_1e_minus_12_after_the_square_root(cls, default_rho):
    # ||g|| = 1e-12: e = rho g / (||g|| + 1e-12) has norm rho / 2. A 1-D tensor is
    # not an ASAM weight (c = 1), FisherSAM's c is 1 to within 1e-24, and the first
    # infoSAM / VaSSO step is plain SAM.
    p = nn.Parameter(torch.zeros(4))
    opt = cls([p], torch.optim.SGD, lr=0.1)
    p.grad = torch.full((4,), 0.5e-12)
    opt.first_step()
    assert_close(p.detach().norm(), torch.tensor(default_rho / 2), (torch.float32, 0.0, 1e-5), "||e||")


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_default_backend_is_auto_so_presam_backend_applies(cls, monkeypatch):
    monkeypatch.setenv("PRESAM_BACKEND", "eager")
    assert cls(make_model().parameters(), torch.optim.SGD, lr=0.1).backend == "eager"
    monkeypatch.setenv("PRESAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PRESAM_BACKEND"):
        cls(make_model().parameters(), torch.optim.SGD, lr=0.1).backend


def test_eps_norm_is_used_in_the_perturbation():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, eps_norm=3.0, lr=0.1)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1)
    loss_of(model, batch(0)).backward()
    loss_of(ref, batch(0)).backward()
    opt.first_step()
    reference_perturb(ref_base.param_groups, eps=3.0)
    assert_params_close(model, ref)


def test_unknown_backend_is_an_error_naming_backend():
    with pytest.raises(ValueError, match="backend"):
        SAM(make_model().parameters(), torch.optim.SGD, backend="cuda", lr=0.1)


def test_presam_backend_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("PRESAM_BACKEND", "eager")
    opt = SAM(make_model().parameters(), torch.optim.SGD, backend="auto", lr=0.1)
    assert opt.backend == "eager"


def test_invalid_presam_backend_env_is_an_error_naming_it_and_touches_nothing(monkeypatch):
    monkeypatch.setenv("PRESAM_BACKEND", "bogus")
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, backend="auto", lr=0.1)
    loss_of(model, batch(0)).backward()
    snap = snapshot(opt, list(model.parameters()))
    with pytest.raises(ValueError, match="PRESAM_BACKEND"):
        opt.first_step()
    assert_same(snap, snapshot(opt, list(model.parameters())))


def test_presam_backend_env_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("PRESAM_BACKEND", "bogus")
    opt = SAM(make_model().parameters(), torch.optim.SGD, backend="eager", lr=0.1)
    assert opt.backend == "eager"


# ---------------------------------------------------------------------------
# ASAM: which tensors are weights
# ---------------------------------------------------------------------------
class AsamNet(nn.Module):
    """lin.weight: 2-D, named weight; lin.bias: 1-D; gain: 2-D but not named
    weight; norm_weight: 1-D but named weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.randn(3, 3))
        self.norm_weight = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return (self.lin(x) @ self.gain) * self.norm_weight


def _asam_expectation(weight_names, rho=0.5, eta=0.01):
    """Params of a fresh AsamNet after the reference ASAM perturbation."""
    ref = AsamNet()
    names = {p: n for n, p in ref.named_parameters()}
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
    ref(x).pow(2).sum().backward()
    groups = [{"params": list(ref.parameters()), "rho": rho}]
    c_of = lambda p: (p.detach().double().abs() + eta) if names[p] in weight_names else None  # noqa: E731
    reference_perturb(groups, c_of=c_of)
    return ref, x


@pytest.mark.parametrize(
    "how, weight_names",
    [
        ("named", {"lin.weight", "norm_weight"}),
        ("plain", {"lin.weight", "gain"}),
        ("named+is_weight", {"gain"}),
        ("plain+is_weight", {"gain"}),
    ],
)
def test_asam_weight_selection(how, weight_names):
    model = AsamNet()
    kwargs = {}
    if how.startswith("named"):
        params = model.named_parameters()
    else:
        params = model.parameters()
    if how == "named+is_weight":
        kwargs["is_weight"] = lambda name, t: name == "gain"
    if how == "plain+is_weight":
        kwargs["is_weight"] = lambda name, t: name is None and tuple(t.shape) == (3, 3)
    opt = ASAM(params, torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1, **kwargs)
    ref, x = _asam_expectation(weight_names)
    model(x).pow(2).sum().backward()
    opt.first_step()
    assert_params_close(model, ref)


def test_asam_defaults_are_rho_half_and_eta_one_hundredth():
    model = AsamNet()
    opt = ASAM(model.named_parameters(), torch.optim.SGD, lr=0.1)
    assert opt.param_groups[0]["rho"] == 0.5
    ref, x = _asam_expectation({"lin.weight", "norm_weight"}, rho=0.5, eta=0.01)
    model(x).pow(2).sum().backward()
    opt.first_step()
    assert_params_close(model, ref)


# ---------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing touched
# ---------------------------------------------------------------------------
BAD_CONSTRUCTION = [
    (SAM, {"rho": -0.1}, "rho"),
    (SAM, {"rho": math.nan}, "rho"),
    (SAM, {"rho": math.inf}, "rho"),
    (ASAM, {"rho": -1.0}, "rho"),
    (InfoSAM, {"rho": math.nan}, "rho"),
    (VaSSO, {"rho": -math.inf}, "rho"),
    (FisherSAM, {"rho": -0.5}, "rho"),
    (InfoSAM, {"alpha": 1.0}, "alpha"),
    (InfoSAM, {"alpha": -0.1}, "alpha"),
    (InfoSAM, {"alpha": 1.5}, "alpha"),
    (InfoSAM, {"alpha": math.nan}, "alpha"),
    (VaSSO, {"theta": 0.0}, "theta"),
    (VaSSO, {"theta": -0.2}, "theta"),
    (VaSSO, {"theta": 1.01}, "theta"),
    (VaSSO, {"theta": math.nan}, "theta"),
    (InfoSAM, {"delta": 0.0}, "delta"),
    (InfoSAM, {"delta": -1e-3}, "delta"),
    (InfoSAM, {"delta": math.nan}, "delta"),
    (ASAM, {"eta": -0.01}, "eta"),
    (FisherSAM, {"eta": -1.0}, "eta"),
    (SAM, {"eps_norm": -1.0}, "eps_norm"),
]


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
@pytest.mark.parametrize("cls, kwargs, name", BAD_CONSTRUCTION,
                         ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_CONSTRUCTION])
def test_bad_hyperparameter_is_a_value_error_naming_it_before_anything_is_touched(cls, kwargs, name, flatten):
    model = make_model()
    loss_of(model, batch(0)).backward()
    ptrs = [(p.data_ptr(), p.grad.data_ptr()) for p in model.parameters()]
    values = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls(model.parameters(), torch.optim.SGD, lr=0.1, flatten=flatten, **kwargs)
    for p, ptr, (x, g) in zip(model.parameters(), ptrs, values):
        assert (p.data_ptr(), p.grad.data_ptr()) == ptr, "a parameter or gradient was re-pointed"
        assert torch.equal(p, x) and torch.equal(p.grad, g)


@pytest.mark.parametrize(
    "cls, kwargs",
    [(SAM, {"rho": 0.0}), (InfoSAM, {"alpha": 0.0}), (VaSSO, {"theta": 1.0}),
     (ASAM, {"eta": 0.0}), (FisherSAM, {"eta": 0.0}), (InfoSAM, {"delta": 1e-25})],
    ids=["rho0", "alpha0", "theta1", "asam-eta0", "fisher-eta0", "tiny-delta"],
)
def test_boundary_hyperparameters_are_accepted(cls, kwargs):
    model = make_model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    sam_two_step(model, opt, batch(0))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_bad_per_group_rho_at_construction_is_an_error_naming_rho(bad):
    model = make_model()
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": model[0].parameters(), "rho": bad}, {"params": model[2].parameters()}],
            torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_bad_rho_set_after_construction_raises_in_first_step_before_anything_is_touched(bad, flatten):
    model = make_model()
    opt = InfoSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    sam_two_step(model, opt, batch(0))  # some state to protect
    loss_of(model, batch(1)).backward()
    opt.param_groups[0]["rho"] = bad
    snap = snapshot(opt, list(model.parameters()))
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    assert_same(snap, snapshot(opt, list(model.parameters())))


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_sparse_gradient_is_a_clear_error_before_anything_is_touched(flatten):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    head = nn.Linear(4, 2)
    model = nn.ModuleList([emb, head])
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    opt.zero_grad(set_to_none=True)
    head(emb(torch.tensor([1, 2, 3]))).sum().backward()
    assert emb.weight.grad.is_sparse
    snap = snapshot(opt, list(model.parameters()))
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        opt.first_step()
    assert_same(snap, snapshot(opt, list(model.parameters())))


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_second_step_without_first_step_is_an_error_and_touches_nothing(flatten):
    model = make_model()
    opt = InfoSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    sam_two_step(model, opt, batch(0))
    loss_of(model, batch(1)).backward()
    snap = snapshot(opt, list(model.parameters()))
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    assert_same(snap, snapshot(opt, list(model.parameters())))


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_first_step_twice_is_an_error_and_touches_nothing(flatten):
    model, ref = make_model(), make_model()
    opt = InfoSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    loss_of(model, batch(0)).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, batch(0)).backward()
    snap = snapshot(opt, list(model.parameters()))
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    assert_same(snap, snapshot(opt, list(model.parameters())))
    # The pending step is intact: second_step still restores and steps as SAM would
    # (infoSAM's first step is plain SAM).
    opt.second_step(zero_grad=True)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    reference_step(ref, ref_base, batch(0))
    assert_params_close(model, ref)


def test_step_without_closure_explains_the_two_step_api():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, batch(0)).backward()
    snap = snapshot(opt, list(model.parameters()))
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    for needed in ("closure", "first_step", "second_step", "backward"):
        assert needed in message, f"the error does not mention {needed!r}: {message}"
    assert_same(snap, snapshot(opt, list(model.parameters())))


# ---------------------------------------------------------------------------
# closures
# ---------------------------------------------------------------------------
def _closure(model, b, calls):
    def closure():
        calls.append(1)
        loss = loss_of(model, b)
        loss.backward()
        return loss
    return closure


def test_closure_common_wrapper_way_matches_two_step_api_and_reference():
    model, twin, ref = make_model(), make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    for k in range(3):
        calls = []
        loss = loss_of(model, batch(k))
        loss.backward()  # the first backward, as the common wrapper's users write it
        returned = opt.step(_closure(model, batch(k), calls))
        opt.zero_grad()
        assert len(calls) == 1, "the first backward already happened: the closure must run once"
        assert torch.is_tensor(returned)
        sam_two_step(twin, opt_twin, batch(k))
        reference_step(ref, ref_base, batch(k))
    assert_params_equal(model, twin)
    assert_params_close(model, ref)


def test_closure_lightning_way_runs_closure_twice_and_returns_first_loss():
    model, twin, ref = make_model(), make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    for k in range(3):
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
        calls, losses = [], []

        def closure(b=batch(k)):
            calls.append(1)
            loss = loss_of(model, b)
            loss.backward()
            losses.append(loss)
            return loss

        returned = opt.step(closure)
        assert len(calls) == 2, "no gradients present: the closure must run before first_step too"
        assert returned is losses[0], "step(closure) must return the loss at x (the first one)"
        first_loss = sam_two_step(twin, opt_twin, batch(k))
        ref_loss, _ = reference_step(ref, ref_base, batch(k))
        assert_close(returned.detach(), ref_loss, FP32, f"loss {k}")
        assert_bits_equal(returned.detach(), first_loss, f"loss {k}")
    assert_params_equal(model, twin)
    assert_params_close(model, ref)


def test_closure_step_works_inside_no_grad():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1)
    calls = []
    with torch.no_grad():
        opt.step(_closure(model, batch(0), calls))
    assert len(calls) == 2
    reference_step(ref, ref_base, batch(0))
    assert_params_close(model, ref)


# ---------------------------------------------------------------------------
# hooks and schedulers
# ---------------------------------------------------------------------------
def test_step_hooks_on_the_sam_object_run_once_per_second_step():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    pre, post, base_calls = [], [], []
    opt.register_step_pre_hook(lambda o, args, kwargs: pre.append(o))
    opt.register_step_post_hook(lambda o, args, kwargs: post.append(o))
    opt.base_optimizer.register_step_post_hook(lambda o, args, kwargs: base_calls.append(o))
    for k in range(3):
        loss_of(model, batch(k)).backward()
        opt.first_step(zero_grad=True)
        assert len(pre) == k and len(post) == k, "first_step must not run the step hooks"
        loss_of(model, batch(k)).backward()
        opt.second_step(zero_grad=True)
        assert len(pre) == k + 1 and len(post) == k + 1
        assert len(base_calls) == k + 1
    assert all(o is opt for o in pre + post)


def test_step_hooks_on_the_sam_object_run_once_per_closure_step():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    pre, post = [], []
    opt.register_step_pre_hook(lambda o, args, kwargs: pre.append(o))
    opt.register_step_post_hook(lambda o, args, kwargs: post.append(o))
    for k in range(2):
        opt.zero_grad(set_to_none=True)
        opt.step(_closure(model, batch(k), []))
    assert len(pre) == 2 and len(post) == 2


def _make_scheduler(kind, optimizer):
    if kind == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=8)


_SCHEDULER_WARNINGS = ("lr_scheduler.step()", "optimizer.step()")


@pytest.mark.parametrize("kind", ["steplr", "onecycle"])
@pytest.mark.parametrize("attach", ["sam", "base"])
def test_scheduler_changes_the_lr_the_base_step_uses_without_warning(attach, kind):
    model, ref = make_model(), make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        sched = _make_scheduler(kind, opt if attach == "sam" else opt.base_optimizer)
        ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
        ref_sched = _make_scheduler(kind, ref_base)
        lrs = []
        for k in range(4):
            lrs.append(opt.base_optimizer.param_groups[0]["lr"])
            assert lrs[-1] == ref_base.param_groups[0]["lr"]
            sam_two_step(model, opt, batch(k))
            sched.step()
            reference_step(ref, ref_base, batch(k))
            ref_sched.step()
    ours = [str(w.message) for w in caught if any(s in str(w.message) for s in _SCHEDULER_WARNINGS)]
    assert not ours, ours
    assert len(set(lrs)) == len(lrs), f"the schedule did not move the lr: {lrs}"
    assert_params_close(model, ref)


def test_lr_set_on_the_sam_object_is_the_lr_of_the_base_step():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1)
    for group in opt.param_groups:
        group["lr"] = 0.37
    for group in ref_base.param_groups:
        group["lr"] = 0.37
    sam_two_step(model, opt, batch(0))
    reference_step(ref, ref_base, batch(0))
    assert_params_close(model, ref)


# ---------------------------------------------------------------------------
# conveniences
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_restore_puts_parameters_back_and_clears_the_pending_step(flatten):
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, batch(0)).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.restore()  # e.g. the second forward ran out of memory
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b), "restore() is not bit-exact"
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    opt.restore()  # a no-op without a pending step
    opt.zero_grad(set_to_none=True)
    # first_step works again, and the step is the one a fresh reference takes.
    sam_two_step(model, opt, batch(0))
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    reference_step(ref, ref_base, batch(0))
    assert_params_close(model, ref)


def test_last_perturbation_norm_is_the_global_gradient_norm_tensor():
    model, ref = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    assert opt.last_perturbation_norm is None
    loss_of(model, batch(0)).backward()
    loss_of(ref, batch(0)).backward()
    opt.first_step()
    _, norm = reference_perturb([{"params": list(ref.parameters()), "rho": 0.05}])
    assert isinstance(opt.last_perturbation_norm, torch.Tensor)
    assert_close(opt.last_perturbation_norm.reshape(()), norm, FP32, "norm")


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_param_group_with_rho_zero_is_not_perturbed_but_counts_in_the_norm(flatten):
    model, ref = make_model(), make_model()
    opt = SAM([{"params": model[0].parameters(), "rho": 0.0}, {"params": model[2].parameters()}],
              torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten)
    ref_base = torch.optim.SGD([{"params": ref[0].parameters(), "rho": 0.0},
                                {"params": ref[2].parameters(), "rho": 0.1}], lr=0.1)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    loss_of(model, batch(0)).backward()
    loss_of(ref, batch(0)).backward()
    opt.first_step(zero_grad=True)
    reference_perturb(ref_base.param_groups)
    for p, b in zip(model[0].parameters(), frozen):
        assert torch.equal(p.detach(), b), "a rho = 0 group was perturbed"
    assert_params_close(model, ref)
    loss_of(model, batch(0)).backward()
    opt.second_step(zero_grad=True)
    # and the full step is the reference's
    model2, ref2 = make_model(), make_model()
    opt2 = SAM([{"params": model2[0].parameters(), "rho": 0.0}, {"params": model2[2].parameters()}],
               torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten)
    ref_base2 = torch.optim.SGD([{"params": ref2[0].parameters(), "rho": 0.0},
                                 {"params": ref2[2].parameters(), "rho": 0.1}], lr=0.1)
    for k in range(2):
        sam_two_step(model2, opt2, batch(k))
        reference_step(ref2, ref_base2, batch(k))
    assert_params_close(model2, ref2)


def test_rho_zero_everywhere_is_the_base_optimizer():
    model, plain = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for k in range(3):
        sam_two_step(model, opt, batch(k))
        base.zero_grad()
        loss_of(plain, batch(k)).backward()
        base.step()
    assert_params_equal(model, plain)


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_recipe_gradient_accumulation(flatten):
    """Several backwards (micro-batches) before first_step, and again before second_step."""
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    for step in range(3):
        micro_batches = [(x, y) for x, y in zip(*(t.chunk(4) for t in batch(step)))]
        for x, y in micro_batches:  # first pass, at x
            (F.cross_entropy(model(x), y) / len(micro_batches)).backward()
        opt.first_step(zero_grad=True)
        for x, y in micro_batches:  # second pass, at x + e
            (F.cross_entropy(model(x), y) / len(micro_batches)).backward()
        opt.second_step(zero_grad=True)

    # Expected: plain-PyTorch SAM on the whole batch (4 equal micro-batch means average to the batch mean).
    ref = make_model()
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    for step in range(3):
        reference_step(ref, ref_base, batch(step))
    assert_params_close(model, ref)


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_recipe_gradient_clipping(flatten):
    """Clip the second pass's gradients after its backward, before second_step."""
    max_norm = 0.05
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    for step in range(3):
        x, y = batch(step)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
        opt.second_step(zero_grad=True)

    ref, unclipped = make_model(), make_model()
    ref_base = torch.optim.SGD([{"params": ref.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    un_base = torch.optim.SGD([{"params": unclipped.parameters(), "rho": 0.05}], lr=0.1, momentum=0.9)
    for step in range(3):
        reference_step(ref, ref_base, batch(step), clip=max_norm)
        reference_step(unclipped, un_base, batch(step))
    assert_params_close(model, ref)
    assert any(not torch.allclose(a, b, atol=FP32[1], rtol=FP32[2]) for a, b in zip(ref.parameters(), unclipped.parameters())), \
        "max_norm is too large for this test to see the clipping"


# ---------------------------------------------------------------------------
# GPU only: no host synchronisation inside a step
# ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
@pytest.mark.parametrize("cls", [SAM, ASAM, InfoSAM, VaSSO, FisherSAM], ids=lambda c: c.__name__)
def test_step_does_not_synchronize_with_the_host(cls, flatten):
    model = make_model().cuda()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, flatten=flatten)
    b = tuple(t.cuda() for t in batch(0))
    sam_two_step(model, opt, b)  # builds buckets and state
    loss_of(model, b).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    loss_of(model, b).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.second_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
