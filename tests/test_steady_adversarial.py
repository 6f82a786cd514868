"""Adversarial checks of the steady step (optim/steady.py): a replaying
optimizer and one that never replays, run in lockstep through changes a
user can make; parameters and state must stay the same bits, and the
replaying one must actually have replayed."""
from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch

from presam_kernels import ASAM, SAM, InfoSAM, VaSSO, _host, extension_available
from helpers import assert_bits_equal
from test_steady_step import (  # noqa: F401 (native: the autouse fixture)
    IN_PLACE, SHAPES, CountsReplays, NeverReplays, assert_same_run, at, backward, lockstep, make, native, nothing,
    sam_step,
)

pytestmark = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")

# -- changes ------------------------------------------------------------------
@at("first")
def grad_data_assigned(opt, params, step):
    params[1].grad.data = params[1].grad.data.clone()  # same tensor object, new memory


@at("second")
def second_grad_data_assigned(opt, params, step):
    params[1].grad.data = params[1].grad.data.clone()


@at("first")
def grads_swapped(opt, params, step):
    params[0].grad, params[2].grad = params[2].grad, params[0].grad


@at("second")
def second_grads_swapped(opt, params, step):
    params[1].grad, params[4].grad = params[4].grad, params[1].grad


@at("first")
def params_reordered(opt, params, step):
    ps = opt.param_groups[0]["params"]
    ps[0], ps[2] = ps[2], ps[0]


@at("first")
def params_list_replaced(opt, params, step):
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])


@at("first")
def group_dict_replaced(opt, params, step):
    opt.param_groups[0] = dict(opt.param_groups[0])


@at("second", None)
def clipped_every_second_pass(opt, params, step):
    torch.nn.utils.clip_grad_norm_(params, 0.1)


@at("first", None)
def rho_scheduled(opt, params, step):
    opt.param_groups[0]["rho"] = 0.05 * (1 + step // 3)


@at("first")
def storage_resized_away_and_back(opt, params, step):
    g = params[1].grad
    storage = g.untyped_storage()  # with flatten=True: every gradient's
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    value, n = whole.clone(), storage.nbytes()
    storage.resize_(0)
    storage.resize_(n)
    torch.empty(0, dtype=torch.uint8).set_(storage).copy_(value)


@at("first")
def grad_set_to_other_storage(opt, params, step):
    params[1].grad.set_(params[1].grad.clone())


@at("first")
def grad_viewed_through_another_dtype(opt, params, step):
    params[1].grad = params[1].grad.view(torch.int32).view(torch.float32)


@at("first")
def grad_as_neg_view(opt, params, step):
    params[1].grad = torch._neg_view(params[1].grad.neg())  # same values, a neg-bit tensor elsewhere


@at("after", None)
def requires_grad_toggled(opt, params, step):
    params[3].requires_grad_(step % 2 == 0)


@at("first", 2)
def nan_in_first_pass(opt, params, step):
    params[1].grad[0] = float("nan")


@at("first", 2)
def inf_everywhere_first_pass(opt, params, step):
    for p in params:
        p.grad.fill_(float("inf"))


@at("second", 2)
def nan_in_second_pass(opt, params, step):
    params[1].grad[0] = float("nan")


@at("after")
def state_reloaded(opt, params, step):
    opt.load_state_dict(opt.state_dict())


_SAVED = {}


@at("after", None)
def older_state_loaded(opt, params, step):
    if step == 0:
        _SAVED[id(opt)] = copy.deepcopy(opt.state_dict())
    if step == 3:
        opt.load_state_dict(_SAVED.pop(id(opt)))


@at("after")
def fresh_state_loaded(opt, params, step):
    _, fresh = make(cls=type(opt))
    opt.load_state_dict(fresh.state_dict())


@at("after", None)
def lr_decayed(opt, params, step):
    for g in opt.param_groups:
        g["lr"] *= 0.5


@at("after")
def base_state_replaced(opt, params, step):
    for p in params:
        for k in ("momentum_buffer", "exp_avg"):
            if k in opt.state[p]:
                opt.state[p][k] = opt.state[p][k].clone()


def restore_and_retake(opt, params, seed):
    """restore() mid-step, then the step's first pass and first_step again and the second pass."""
    opt.restore()
    opt.zero_grad(set_to_none=False)
    backward(params, seed)
    opt.first_step()
    opt.zero_grad(set_to_none=False)
    backward(params, seed + 100)


@at("second", None)
def restored_midstep_and_retaken(opt, params, step):
    if step in (2, 4):
        restore_and_retake(opt, params, 100 + step)


@at("after", None)
def perturb_mode_flipped(opt, params, step):
    if step == 2:
        opt.perturb_mode = "out_of_place"
    if step == 4:
        opt.perturb_mode = "in_place"


@at("after")
def copied_and_pickled(opt, params, step):
    copy.deepcopy(opt)
    pickle.loads(pickle.dumps(opt))


CHANGES = [grad_data_assigned, second_grad_data_assigned, grads_swapped, second_grads_swapped, params_reordered,
           params_list_replaced, group_dict_replaced, clipped_every_second_pass, rho_scheduled,
           storage_resized_away_and_back, grad_set_to_other_storage, grad_viewed_through_another_dtype,
           grad_as_neg_view, requires_grad_toggled, nan_in_first_pass, inf_everywhere_first_pass,
           nan_in_second_pass, state_reloaded, older_state_loaded, lr_decayed, base_state_replaced,
           restored_midstep_and_retaken, perturb_mode_flipped, copied_and_pickled]


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda c: c.__name__)
def test_sam_sgd(change, flatten):
    lockstep(change, flatten=flatten)


STATEFUL = [nan_in_first_pass, inf_everywhere_first_pass, nan_in_second_pass, state_reloaded, older_state_loaded,
            fresh_state_loaded, restored_midstep_and_retaken, perturb_mode_flipped]


@pytest.mark.parametrize("cls", [InfoSAM, VaSSO], ids=["infosam", "vasso"])
@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
@pytest.mark.parametrize("change", [nothing] + STATEFUL, ids=lambda c: c.__name__)
def test_ema_variants(change, cls, flatten):
    lockstep(change, cls=cls, flatten=flatten)


@pytest.mark.parametrize("base", ["adam", "adamw"])
@pytest.mark.parametrize("change", [nothing, lr_decayed, base_state_replaced, nan_in_second_pass],
                         ids=lambda c: c.__name__)
def test_asam_adam_groups(change, base):
    groups = [((0, 2), {"rho": 0.1}), ((2, 4), {"rho": 0.0, "lr": 0.01}), ((4, 5), {})]
    lockstep(change, cls=ASAM, base=base, groups=groups)


def test_rho_alternating_each_step_never_replays_a_stale_rho():
    @at("first", None)
    def alternating(opt, params, step):
        opt.param_groups[0]["rho"] = 0.05 if step % 2 else 0.1
    lockstep(alternating, wanted=("second",))


def test_mixed_dtype_buckets():
    @at("first", None)
    def half_grads_sometimes(opt, params, step):
        if step % 3 == 2:
            params[1].grad = params[4].grad = None

    a, _, _, _ = lockstep(half_grads_sometimes,
                          dtypes=[torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16])
    assert len(a._buckets) == 3


def test_two_optimizers_over_the_same_parameters():
    finals = []
    for steady_cls in (CountsReplays, NeverReplays):
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_(True) for s in SHAPES]
        o1 = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpp", **IN_PLACE)
        o2 = SAM(params, torch.optim.SGD, lr=0.05, momentum=0.5, rho=0.2, backend="cpp", **IN_PLACE)
        o1._steady, o2._steady = steady_cls(), steady_cls()
        for step in range(6):
            sam_step(o1 if step % 2 == 0 else o2, params, step, nothing)
        finals.append([p.detach().clone() for p in params])
        if steady_cls is CountsReplays:
            assert o1._steady.hits() == o2._steady.hits() == {"first", "second"}
    for k, (p, q) in enumerate(zip(*finals)):
        assert_bits_equal(p, q, f"param {k}")


def test_a_steady_record_keeps_no_gradient_alive():
    params, opt = make()
    opt._steady = CountsReplays()
    for step in range(4):
        sam_step(opt, params, step, nothing)
    assert opt._steady.hits() == {"first", "second"}
    refs = [weakref.ref(p.grad) for p in params]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_a_stale_second_record_keeps_no_old_buffers_alive(flatten):
    params, opt = make(flatten=flatten)
    for step in range(3):
        sam_step(opt, params, step, nothing)
    old = opt._buckets[0].buffers
    backup = weakref.ref(old.backup)
    flat_grad = weakref.ref(old.flat_grad) if flatten else (lambda: None)
    del old
    opt.base_optimizer.register_step_pre_hook(lambda *args: None)  # no fused second step from now on
    extra = torch.randn(4, requires_grad=True)
    opt.add_param_group({"params": [extra]})  # new buckets, new buffers
    params = params + [extra]
    for step in range(3, 6):
        sam_step(opt, params, step, nothing)
    gc.collect()
    assert backup() is None, "the old buckets' backup buffer is still alive"
    assert flat_grad() is None, "the old buckets' flat gradient buffer is still alive"


# -- structure: groups, parameters added or removed, state dropped -------------
GROUPS = [((0, 2), {"rho": 0.1, "lr": 0.2}), ((2, 2), {"rho": 0.3}), ((2, 5), {"rho": 0.0})]  # one empty


@at("after")
def groups_reversed(opt, params, step):
    opt.param_groups.reverse()


@at("after")
def group_rhos_swapped(opt, params, step):
    groups = opt.param_groups
    groups[0]["rho"], groups[2]["rho"] = groups[2]["rho"], groups[0]["rho"]


@at("after")
def group_boundary_moved(opt, params, step):  # the same parameters in the same order, other groups
    groups = opt.param_groups
    groups[2]["params"].insert(0, groups[0]["params"].pop())


@at("after")
def moved_into_the_empty_group(opt, params, step):
    groups = opt.param_groups
    groups[1]["params"].append(groups[0]["params"].pop())


@at("after")
def empty_group_added(opt, params, step):
    opt.add_param_group({"params": [], "rho": 0.7})


@pytest.mark.parametrize("variant", [dict(), dict(cls=InfoSAM, flatten=True)], ids=["sam", "infosam_flatten"])
@pytest.mark.parametrize("change", [groups_reversed, group_rhos_swapped, group_boundary_moved,
                                    moved_into_the_empty_group, empty_group_added], ids=lambda c: c.__name__)
def test_groups(change, variant):
    lockstep(change, groups=GROUPS, **variant)


@at("after")
def param_appended_to_group_list(opt, params, step):  # not through add_param_group
    p = torch.linspace(-1, 1, 6).requires_grad_(True)
    opt.param_groups[0]["params"].append(p)
    params.append(p)


@at("after")
def param_object_replaced_in_its_slot(opt, params, step):
    q = params[1].detach().clone().requires_grad_(True)
    opt.param_groups[0]["params"][1] = q
    params[1] = q


@at("after")
def param_popped(opt, params, step):
    opt.param_groups[0]["params"].pop(1)


@at("after")
def base_state_dropped(opt, params, step):
    opt.state.pop(params[1], None)


_SCHEDULERS = {}


@at("after", None)
def one_cycle(opt, params, step):  # lr and momentum / betas every step
    if id(opt) not in _SCHEDULERS:
        _SCHEDULERS[id(opt)] = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=50)
    _SCHEDULERS[id(opt)].step()


@at("second", None)
def moved_between_passes_then_restored(opt, params, step):
    if step in (2, 4):
        params[1].data = params[1].data.clone()
        with pytest.raises(RuntimeError, match="moved"):
            opt.second_step()
        restore_and_retake(opt, params, 300 + step)


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
@pytest.mark.parametrize("change", [param_appended_to_group_list, param_object_replaced_in_its_slot, param_popped,
                                    base_state_dropped, one_cycle], ids=lambda c: c.__name__)
def test_structure(change, flatten, base):
    lockstep(change, flatten=flatten, base=base)


@pytest.mark.parametrize("options", [dict(), dict(flatten=True), dict(perturb="out_of_place"),
                                     dict(cls=InfoSAM, perturb="out_of_place", flatten=True)],
                         ids=["in_place", "flatten", "out_of_place", "infosam_out_of_place_flatten"])
def test_moved_between_passes_then_restored(options):
    wanted = ("first",) if options.get("perturb") == "out_of_place" else ("first", "second")
    lockstep(moved_between_passes_then_restored, wanted=wanted, **options)


def test_perturbation_norm_and_out_of_place_first_replays():
    a, _, b, _ = lockstep(nothing, perturb="out_of_place", wanted=("first",))
    assert_bits_equal(a.last_perturbation_norm, b.last_perturbation_norm, "norm")


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_compiled_steps_interleaved_with_eager_ones(flatten):
    def run(steady_cls):
        params, opt = make(flatten=flatten)
        opt._steady = steady_cls()
        first = torch.compile(lambda: opt.first_step(), backend="eager")
        second = torch.compile(lambda: opt.second_step(), backend="eager")
        for step in range(7):
            compiled = step in (2, 3)
            backward(params, 2 * step)
            first() if compiled else opt.first_step()
            opt.zero_grad(set_to_none=False)
            backward(params, 2 * step + 1)
            second() if compiled else opt.second_step()
            opt.zero_grad(set_to_none=False)
        return params, opt

    a_params, a = run(CountsReplays)
    b_params, b = run(NeverReplays)
    assert_same_run(a, a_params, b, b_params, "end")
    assert a._steady.hits() == {"first", "second"}


def test_grad_scaler_steps_interleaved():
    def run(steady_cls):
        params, opt = make(cls=InfoSAM)
        opt._steady = steady_cls()
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for step in range(8):
            s = scaler if step in (2, 3, 5) else None
            gen = torch.Generator().manual_seed(step)
            for half in ("first", "second"):
                loss = sum(((p - torch.randn(p.shape, generator=gen)) ** 2).sum() for p in params)
                (scaler.scale(loss) if s else loss).backward()
                if step == 3 and half == "first":
                    params[0].grad[0] = float("inf")
                (opt.first_step if half == "first" else opt.second_step)(grad_scaler=s)
                opt.zero_grad(set_to_none=False)
            if s:
                scaler.update()
        return params, opt

    a_params, a = run(CountsReplays)
    b_params, b = run(NeverReplays)
    assert_same_run(a, a_params, b, b_params, "end")
    assert a._steady.hits() == {"first", "second"}


@pytest.mark.triton
@pytest.mark.parametrize("case", [
    dict(change=second_grads_swapped),
    dict(change=nan_in_first_pass, cls=InfoSAM),
    dict(change=state_reloaded, cls=VaSSO, flatten=True),
    dict(change=restored_midstep_and_retaken),
], ids=["second_grads_swapped", "infosam_nan", "vasso_flatten_reloaded", "restored_midstep"])
def test_triton(case):
    from presam_kernels import backends
    if not backends.triton_available():
        pytest.skip("no triton")
    case = dict(case)
    lockstep(case.pop("change"), backend="triton", steps=5, **case)


def test_use_native_false_stops_replays(monkeypatch):
    params, opt = make()
    opt._steady = CountsReplays()
    for step in range(3):
        sam_step(opt, params, step, nothing)
    monkeypatch.setattr(_host, "USE_NATIVE", False)
    n = len(opt._steady.replayed)
    for step in range(3, 5):
        sam_step(opt, params, step, nothing)
    assert not any(hit for _, hit in opt._steady.replayed[n:])


def test_use_native_toggled_between_steps_same_results():
    # Between steps only: the switch's two paths keep keys that never compare
    # equal (_host.USE_NATIVE), so a mid-step toggle reads as a move.
    @at("after", None)
    def toggled(opt, params, step):
        _host.USE_NATIVE = step not in (2, 3)
    try:
        lockstep(toggled)
    finally:
        _host.USE_NATIVE = True


@at("second", None)
def rho_changed_between_passes(opt, params, step):
    opt.param_groups[0]["rho"] = 0.0 if step == 3 else 0.05


@pytest.mark.parametrize("variant", [dict(), dict(cls=InfoSAM, flatten=True)], ids=["sam", "infosam_flatten"])
def test_rho_changed_between_passes(variant):
    lockstep(rho_changed_between_passes, **variant)


@at("first", None)
def rho_toggled_off_and_on(opt, params, step):
    opt.param_groups[0]["rho"] = 0.0 if step in (2, 3, 4) else 0.1


@pytest.mark.parametrize("variant", [dict(), dict(flatten=True), dict(cls=InfoSAM)],
                         ids=["sam", "flatten", "infosam"])
def test_out_of_place_with_unperturbed_groups(variant):
    """Out of place, a step that switches nothing (every perturbed group at rho 0)
    may replay its second half; one that switches must not."""
    groups = [((0, 2), {"rho": 0.1}), ((2, 5), {"rho": 0.0})]
    lockstep(rho_toggled_off_and_on, perturb="out_of_place", groups=groups, steps=7, **variant)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_fallback_warning_raised_as_an_error_leaves_a_step_restore_can_undo(backend):
    """Under ``python -W error`` the once-only fallback warning (a gradient
    strided unlike its parameter) escapes first_step after x + e was
    written; the step must be pending by then, so that restore() puts x back."""
    torch.manual_seed(0)
    params = [torch.randn(2, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, lr=0.1, backend=backend, perturb="in_place")
    before = [p.detach().clone() for p in params]
    backward(params, 0)
    params[0].grad = params[0].grad.t().contiguous().t()  # strided unlike its parameter: the eager fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match="ran on the eager backend"):
            opt.first_step()
    opt.restore()
    for k, (p, x) in enumerate(zip(params, before)):
        assert_bits_equal(p.detach(), x, f"param {k} after first_step raised and restore()")
