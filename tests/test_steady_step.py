"""The steady step (optim/steady.py, issue 15): a half step whose inputs are
the last one's replays its tables and launches instead of scanning.

Two optimizers run in lockstep on the same batches, one replaying and one
never replaying (every step general), and a change a user can make is made
to both between steps or between the two passes; after every step their
parameters and state must be the same bits. The steady part of each run
must actually replay (counted), else the case tests nothing.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import assert_bits_equal
from presam_kernels import SAM, InfoSAM, _host, buckets, extension_available
from presam_kernels.optim import steady

pytestmark = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")

BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.triton)]
SHAPES = [(7,), (5, 3), (11,), (3, 4)]


class NeverReplays(steady.SteadyStep):
    def replay_first(self, opt):
        return None

    def replay_second(self, opt, pending):
        return None


class CountsReplays(steady.SteadyStep):
    def __init__(self):
        super().__init__()
        self.replayed = []

    def replay_first(self, opt):
        out = super().replay_first(opt)
        self.replayed.append(("first", out is not None))
        return out

    def replay_second(self, opt, pending):
        out = super().replay_second(opt, pending)
        self.replayed.append(("second", out is not None))
        return out


def make(backend, variant, options, seed=0):
    torch.manual_seed(seed)
    params = [torch.randn(s).requires_grad_(True) for s in SHAPES]
    cls = InfoSAM if variant == "info" else SAM
    base = torch.optim.Adam if options.pop("adam", False) else torch.optim.SGD
    kwargs = dict(lr=0.05) if base is torch.optim.Adam else dict(lr=0.1, momentum=0.9)
    opt = cls(params, base, rho=0.05, backend=backend, **options, **kwargs)
    return params, opt


def backward(params, seed):
    gen = torch.Generator().manual_seed(seed)
    loss = sum(((p - torch.randn(p.shape, generator=gen)) ** 2).sum() + p.sin().sum() for p in params)
    loss.backward()


def sam_step(opt, params, step, change, set_to_none):
    backward(params, 2 * step)
    change("first", opt, params, step)
    opt.first_step(zero_grad=True) if set_to_none else opt.first_step()
    if not set_to_none:
        opt.zero_grad(set_to_none=False)
    backward(params, 2 * step + 1)
    change("second", opt, params, step)
    opt.second_step(zero_grad=True) if set_to_none else opt.second_step()
    if not set_to_none:
        opt.zero_grad(set_to_none=False)


def assert_same_run(a, a_params, b, b_params, what):
    for k, (p, q) in enumerate(zip(a_params, b_params)):
        assert_bits_equal(p.detach(), q.detach(), f"{what}: param {k}")
        for key, value in b.state[q].items():
            if isinstance(value, torch.Tensor):
                assert_bits_equal(a.state[p][key].detach(), value.detach(), f"{what}: param {k} state {key!r}")
    assert int(a.skipped_steps) == int(b.skipped_steps), f"{what}: skipped steps"


# -- changes: (where, opt, params, step), made at step CHANGE_AT only ---------------
CHANGE_AT = 3
STEPS = 7


def nothing(where, opt, params, step):
    pass


def at(where_wanted):
    def decorate(fn):
        def change(where, opt, params, step):
            if where == where_wanted and step == CHANGE_AT:
                fn(opt, params)
        change.__name__ = fn.__name__
        return change
    return decorate


@at("first")
def grad_restrided(opt, params):
    params[1].grad = params[1].grad.t().contiguous().t()  # strides unlike its parameter's: another path


@at("first")
def param_replaced(opt, params):
    params[2].data = params[2].data.clone()


@at("first")
def param_restrided(opt, params):
    params[3].data = params[3].data.t().contiguous().t()


@at("first")
def grad_dropped(opt, params):
    params[0].grad = None


@at("second")
def second_grad_dropped(opt, params):
    params[0].grad = None


@at("second")
def second_grad_replaced(opt, params):
    params[2].grad = params[2].grad.clone()


@at("first")
def rho_changed(opt, params):
    opt.param_groups[0]["rho"] = 0.2


@at("first")
def rho_zero(opt, params):
    opt.param_groups[0]["rho"] = 0.0


@at("first")
def rho_tensor(opt, params):
    opt.param_groups[0]["rho"] = torch.tensor(0.05)


@at("first")
def lr_and_momentum_changed(opt, params):
    opt.param_groups[0]["lr"] = 0.3
    opt.param_groups[0]["momentum"] = 0.0


@at("first")
def state_reloaded(opt, params):
    opt.load_state_dict(opt.state_dict())


@at("first")
def moved_to_a_new_group(opt, params):
    last = opt.param_groups[0]["params"].pop()
    opt.add_param_group({"params": [last], "rho": 0.1})


@at("first")
def base_hook_registered(opt, params):
    opt.base_optimizer.register_step_pre_hook(lambda *args: None)


CHANGES = [nothing, grad_restrided, param_replaced, param_restrided, grad_dropped, second_grad_dropped,
           second_grad_replaced, rho_changed, rho_zero, rho_tensor, lr_and_momentum_changed, state_reloaded,
           moved_to_a_new_group, base_hook_registered]
IN_PLACE = {"perturb": "in_place"}  # "auto" is out of place on the CPU
OPTIONS = [pytest.param(IN_PLACE, id="in_place"), pytest.param({"perturb": "out_of_place"}, id="out_of_place"),
           pytest.param({**IN_PLACE, "flatten": True}, id="flatten"), pytest.param({**IN_PLACE, "adam": True}, id="adam")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("set_to_none", [True, False], ids=["fresh_grads", "kept_grads"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda c: c.__name__)
def test_a_replaying_run_is_the_general_run_bit_for_bit(monkeypatch, core_case, backend, options, set_to_none, change):
    # Interpreted Triton (about a second a step): the plain cases, every change once.
    core_case(options == IN_PLACE and set_to_none)
    monkeypatch.setattr(_host, "USE_NATIVE", True)
    a_params, a = make(backend, "sam", dict(options))
    b_params, b = make(backend, "sam", dict(options))
    a._steady, b._steady = CountsReplays(), NeverReplays()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a strided gradient: the step names its fallback
        for step in range(STEPS):
            sam_step(a, a_params, step, change, set_to_none)
            sam_step(b, b_params, step, change, set_to_none)
            assert_same_run(a, a_params, b, b_params, f"step {step}")
            assert a.last_step_fused == b.last_step_fused and a.last_step_backend == b.last_step_backend
    replayed = {half for half, hit in a._steady.replayed if hit}
    # Out of place, a second step whose parameters were switched is never replayed.
    wanted = {"first"} if options.get("perturb") == "out_of_place" else {"first", "second"}
    if not set_to_none or options.get("flatten"):  # fresh gradients may land elsewhere: replays not promised
        assert wanted <= replayed, f"replayed {sorted(replayed)}: the case tests nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_infosam_replays_across_its_ema_becoming_ready(monkeypatch, backend):
    """The EMA flag goes from 'known cold' (False) to the device flag after the
    first step: a replay of the cold step's launch would be the wrong formula."""
    monkeypatch.setattr(_host, "USE_NATIVE", True)
    a_params, a = make(backend, "info", {**IN_PLACE, "flatten": True})
    b_params, b = make(backend, "info", {**IN_PLACE, "flatten": True})
    a._steady, b._steady = CountsReplays(), NeverReplays()
    for step in range(5):
        sam_step(a, a_params, step, nothing, set_to_none=False)
        sam_step(b, b_params, step, nothing, set_to_none=False)
        assert_same_run(a, a_params, b, b_params, f"step {step}")
        if step == 1:
            a.load_state_dict(a.state_dict())  # the flag is loaded: known again
            b.load_state_dict(b.state_dict())
    assert ("first", True) in a._steady.replayed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [IN_PLACE, {**IN_PLACE, "flatten": True}], ids=["in_place", "flatten"])
def test_the_steady_state_does_no_per_parameter_python(monkeypatch, backend, options):
    """Kept gradients, nothing changed: no scan and no table is made, on either half step."""
    monkeypatch.setattr(_host, "USE_NATIVE", True)
    params, opt = make(backend, "sam", dict(options))
    for step in range(3):
        sam_step(opt, params, step, nothing, set_to_none=False)

    def refused(*args, **kwargs):
        raise AssertionError("the steady step scanned the parameters or made a table")

    monkeypatch.setattr(_host, "scan_params", refused)
    monkeypatch.setattr(buckets.Bucket, "table", refused)
    for step in range(3, 6):
        sam_step(opt, params, step, nothing, set_to_none=False)
    assert opt.last_step_fused


def test_a_gradient_put_back_at_the_recorded_address_with_flatten_is_copied_in(monkeypatch):
    """flatten=True: a gradient set to the same outside tensor each step (one
    address every time) must be copied into the flat buffer each step; the
    replay's record is of the state after that copy, which it never matches."""
    monkeypatch.setattr(_host, "USE_NATIVE", True)
    a_params, a = make("cpp", "sam", {**IN_PLACE, "flatten": True})
    b_params, b = make("cpp", "sam", {**IN_PLACE, "flatten": True})
    a._steady, b._steady = CountsReplays(), NeverReplays()
    outside_a = [torch.zeros(a_params[1].shape)]
    outside_b = [torch.zeros(b_params[1].shape)]

    def put_back(outside):
        def change(where, opt, params, step):
            outside[0].copy_(params[1].grad * (step + 1))
            params[1].grad = outside[0]
        return change

    for step in range(5):
        sam_step(a, a_params, step, put_back(outside_a), set_to_none=False)
        sam_step(b, b_params, step, put_back(outside_b), set_to_none=False)
        assert_same_run(a, a_params, b, b_params, f"step {step}")
