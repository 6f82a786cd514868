"""step(closure): where the first pass comes from, GradScaler.step driving it,
and ASAM's names matched to tensors by identity.

Every expectation is the README's two-step loop on the same batches (a
separately built twin model and optimizer), never the code under test.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import batch as batch_of
from helpers import MODES, assert_close, assert_params_close, assert_params_equal, loss_of, make_model
from presam_kernels import ASAM, SAM, InfoSAM

# The same fp32 math grouped otherwise (micro-batch gradients summed in another
# order, ASAM written out by hand): tighter than helpers.FP32 (rtol 1e-5).
TWIN = (torch.float32, 1e-6, 1e-6)


def batch(k: int, n: int = 16):
    return batch_of(k, n, first_seed=5000)  # this file's stream


def two_step(model, opt, batches):
    """The README's loop; several batches are accumulated micro-batches."""
    for b in batches:
        (loss_of(model, b) / len(batches)).backward()
    opt.first_step(zero_grad=True)
    for b in batches:
        (loss_of(model, b) / len(batches)).backward()
    opt.second_step(zero_grad=True)


def torch_idiom_closure(model, opt, b, calls):
    """torch's documented closure: zero_grad inside, then forward and backward."""
    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, b)
        loss.backward()
        return loss
    return closure


# ---------------------------------------------------------------------------
# (a) gradients left by the previous step are never a first pass
# ---------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("zero_before", [False, True], ids=["stale", "zeroed_kept"])
def test_torch_closure_idiom_runs_closure_twice_every_step_and_matches_two_step(flatten, zero_before):
    """(a) the gradients the last step's second pass left, and (issue 13.5)
    gradients zeroed but kept by opt.zero_grad() (flatten=True keeps them)
    are not this step's first backward: the closure runs twice each step."""
    model, twin = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, flatten=flatten)
    norms, twin_norms = [], []
    for k in range(4):
        calls = []
        if zero_before:
            opt.zero_grad()
        opt.step(torch_idiom_closure(model, opt, batch(k), calls))
        assert len(calls) == 2, f"step {k}: the closure ran {len(calls)} time(s)"
        norms.append(float(opt.last_perturbation_norm))
        two_step(twin, opt_twin, [batch(k)])
        twin_norms.append(float(opt_twin.last_perturbation_norm))
    assert all(n > 0 for n in norms), f"a zero perturbation: SAM became SGD ({norms})"
    assert norms == twin_norms
    assert_params_equal(model, twin)


@MODES
def test_kept_zeros_after_two_step_training_are_not_a_first_pass_at_the_first_step_closure(flatten):
    """Gradients zeroed and kept (flatten=True's default zero_grad, or
    set_to_none=False) after steps of the two-step API: the first
    step(closure) must still run its closure twice (found by an adversarial
    pass: the kept zeros were taken as the first pass, e = 0)."""
    model, twin = make_model(), make_model()
    opt = InfoSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    opt_twin = InfoSAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    for k in range(2):
        two_step(model, opt, [batch(k)])
        two_step(twin, opt_twin, [batch(k)])
    for k in range(2, 4):
        calls = []
        loss_of(model, batch(k)).backward()  # leaves gradients for zero_grad to keep
        opt.zero_grad(set_to_none=False)
        opt.step(torch_idiom_closure(model, opt, batch(k), calls))
        assert len(calls) == 2, f"step {k}: the closure ran {len(calls)} time(s)"
        two_step(twin, opt_twin, [batch(k)])
    assert float(opt.last_perturbation_norm) > 0
    assert_params_equal(model, twin)


# ---------------------------------------------------------------------------
# (b) the common wrapper's convention: a backward before step is the first pass
# ---------------------------------------------------------------------------
@MODES
def test_backward_before_step_is_the_first_pass_after_stale_and_zeroed_steps(flatten):
    model, twin = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    for k in range(3):
        calls = []
        if k == 2:
            opt.zero_grad()  # kept zeros under flatten: the backward below still counts
        else:
            model.zero_grad()
        loss_of(model, batch(k)).backward()

        def closure(b=batch(k)):
            calls.append(1)
            loss = loss_of(model, b)
            loss.backward()
            return loss

        opt.step(closure)
        assert len(calls) == 1
        two_step(twin, opt_twin, [batch(k)])
    assert_params_equal(model, twin)


# ---------------------------------------------------------------------------
# (c) accumulation: the closure adds the last micro-batch to those present
# ---------------------------------------------------------------------------
@MODES
def test_first_pass_closure_adds_the_last_micro_batch_and_replays_in_second_pass(flatten):
    """Lightning's accumulation: micro-batches 1..k-1 are backpropagated before
    step, the closure adds micro-batch k. With first_pass="closure" the first
    pass is all k (the closure here replays 1..k-1 on its second call)."""
    model, twin = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    for step in range(3):
        micro = [batch(10 * step + j) for j in range(3)]
        opt.zero_grad()
        for b in micro[:-1]:
            (loss_of(model, b) / 3).backward()
        calls = []

        def closure():
            calls.append(1)
            for b in micro[:-1] if len(calls) == 2 else []:
                (loss_of(model, b) / 3).backward()
            loss = loss_of(model, micro[-1]) / 3
            loss.backward()
            return loss

        opt.step(closure, first_pass="closure")
        assert len(calls) == 2
        two_step(twin, opt_twin, micro)
    assert_params_close(model, twin, TWIN)


def test_first_pass_done_finishes_a_step_begun_with_first_step():
    model, twin = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    loss_of(model, batch(0)).backward()
    opt.first_step(zero_grad=True)
    opt.step(lambda: loss_of(model, batch(0)).backward(), first_pass="done")
    two_step(twin, opt_twin, [batch(0)])
    assert_params_equal(model, twin)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.step(lambda: None, first_pass="done")
    with pytest.raises(ValueError, match="first_pass"):
        opt.step(lambda: None, first_pass="given")


def test_first_pass_present_takes_the_gradients_present_even_after_a_step():
    model, twin = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.step(lambda: None, first_pass="present")
    for k in range(2):
        opt.zero_grad()
        loss_of(model, batch(k)).backward()
        calls = []
        opt.step(lambda b=batch(k): calls.append(loss_of(model, b).backward()), first_pass="present")
        assert len(calls) == 1
        two_step(twin, opt_twin, [batch(k)])
    assert_params_equal(model, twin)


@MODES
def test_closure_that_raises_in_second_pass_leaves_x_and_the_next_step_runs(flatten):
    model, twin = make_model(), make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    opt_twin = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    before = copy.deepcopy(model)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("nan loss")
        loss_of(model, batch(0)).backward()

    with pytest.raises(FloatingPointError):
        opt.step(failing)
    assert_params_equal(model, before)
    opt.step(torch_idiom_closure(model, opt, batch(1), []))
    two_step(twin, opt_twin, [batch(1)])
    assert_params_equal(model, twin)


# ---------------------------------------------------------------------------
# GradScaler.step(opt, closure)
# ---------------------------------------------------------------------------
def make_scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)


def poison(model):
    with torch.no_grad():
        model[2].weight.grad[0, 0] = float("inf")


SCALER_CASES = [  # (class, flatten, overflow, where the first backward happens)
    (SAM, False, None, "before_step"),
    (SAM, True, "first", "in_closure"),
    (SAM, False, "second", "in_closure"),
    (InfoSAM, True, "second", "before_step"),
    (InfoSAM, False, "first", "before_step"),
    (InfoSAM, True, None, "in_closure"),
]


@pytest.mark.parametrize("cls,flatten,overflow,first_backward", SCALER_CASES)
def test_scaler_step_with_closure_equals_the_grad_scaler_flow(cls, flatten, overflow, first_backward):
    """scaler.step(opt, closure) (accelerate's fp16 path) gives the README's
    grad_scaler= flow: same parameters, same skip and the same scale after an
    overflow in either pass. Today's code stepped on the scaled gradient."""
    model, twin = make_model(), make_model()
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    opt_twin = cls(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, flatten=flatten)
    scaler, scaler_twin = make_scaler(), make_scaler()
    scaler.scale(torch.zeros(()))  # the scale tensor exists before a closure's first backward
    before = first_backward == "before_step"
    for k in range(3):
        bad = overflow if k == 1 else None
        calls = []

        def closure(b=batch(k)):
            calls.append(1)
            opt.zero_grad()
            loss = loss_of(model, b)
            scaler.scale(loss).backward()
            if (bad, len(calls) + before) in (("first", 1), ("second", 2)):
                poison(model)
            return loss

        if before:
            model.zero_grad()
            scaler.scale(loss_of(model, batch(k))).backward()
            if bad == "first":
                poison(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch: the grad_scaler= contract is deprecated
            scaler.step(opt, closure)
        scaler.update()
        assert len(calls) == 2 - before

        scaler_twin.scale(loss_of(twin, batch(k))).backward()
        if bad == "first":
            poison(twin)
        opt_twin.first_step(zero_grad=True, grad_scaler=scaler_twin)
        scaler_twin.scale(loss_of(twin, batch(k))).backward()
        if bad == "second":
            poison(twin)
        opt_twin.second_step(zero_grad=True, grad_scaler=scaler_twin)
        scaler_twin.update()
        assert scaler.get_scale() == scaler_twin.get_scale()
        assert_params_equal(model, twin)
    assert int(opt.skipped_steps) == int(opt_twin.skipped_steps) == (0 if overflow is None else 1)


def test_scaler_step_after_unscale_with_closure_first_pass_raises_before_touching():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = make_scaler()
    scaler.scale(loss_of(model, batch(0))).backward()
    opt.step(torch_idiom_closure(model, opt, batch(0), []))  # an unscaled step, then:
    scaler.unscale_(opt)  # unscales stale gradients: the first pass would stay scaled
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="UNSCALED"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scaler.step(opt, torch_idiom_closure(model, opt, batch(1), []))
    assert_params_equal(model, before)


# ---------------------------------------------------------------------------
# ASAM names by identity
# ---------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).relu().mean((2, 3)))


def weight_decay_split(model, weight_decay=1e-4):
    """As timm's param_groups_weight_decay and the HF Trainer build them: decayed
    tensors (ndim >= 2) first, then biases and norm weights: another order than
    the model's."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def conv_batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(6, 2, 5, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)


def asam_perturbation(opt, model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = conv_batch()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    delta = {n: (p.detach() - before[n]).clone() for n, p in model.named_parameters()}
    opt.restore()
    return delta


def asam_reference(model, rho=0.5, eta=0.01):
    """The official rule with names: c = |x| + eta on tensors named *weight*."""
    x, y = conv_batch()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    named = list(model.named_parameters())
    cs = {n: (p.detach().abs() + eta if "weight" in n else torch.ones_like(p)).double() for n, p in named}
    norm = sum(((cs[n] * p.grad.double()) ** 2).sum() for n, p in named).sqrt()
    delta = {n: (rho * cs[n] ** 2 * p.grad.double() / (norm + 1e-12)).float() for n, p in named}
    model.zero_grad()
    return delta


@pytest.mark.parametrize("how", ["named_with_instance", "base_param_groups", "torch_named_groups"])
def test_asam_matches_names_to_tensors_by_identity_with_a_reordered_base(how):
    """ASAM(model.named_parameters(), base) where base's groups list biases and
    norm weights first: today the names were zipped in base order, so a bias was
    treated as a weight. ASAM(base.param_groups, base) (the call the error
    message suggests) and torch's own named groups work too."""
    model = ConvNet()
    expected = asam_reference(copy.deepcopy(model))
    if how == "torch_named_groups":
        named = dict(model.named_parameters())
        groups = [
            {"params": [(n, p) for n, p in named.items() if p.ndim < 2], "weight_decay": 0.0},
            {"params": [(n, p) for n, p in named.items() if p.ndim >= 2], "weight_decay": 1e-4},
        ]
        base = torch.optim.SGD(groups, lr=0.1)
        opt = ASAM(base.param_groups, base, rho=0.5)
    else:
        base = torch.optim.SGD(weight_decay_split(model), lr=0.1)
        if how == "named_with_instance":
            opt = ASAM(model.named_parameters(), base, rho=0.5)
        else:
            names = {id(p): n for n, p in model.named_parameters()}
            opt = ASAM(base.param_groups, base, rho=0.5, is_weight=lambda name, p: "weight" in names[id(p)])
    got = asam_perturbation(opt, model)
    for n in expected:
        assert_close(got[n], expected[n], TWIN, n)


def test_asam_with_base_param_groups_and_no_names_uses_ndim_rule():
    model = ConvNet()
    base = torch.optim.SGD(weight_decay_split(model), lr=0.1)
    opt = ASAM(base.param_groups, base, rho=0.5)  # raised "params must be exactly its parameters"
    assert opt.param_groups is base.param_groups
    with pytest.raises(ValueError, match="exactly its parameters"):
        ASAM(list(model.parameters())[:-1], base)
