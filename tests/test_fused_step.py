"""Restore fused into the base optimizer's update (issue 7, docs/design.md §3).

With the Triton backend (interpreted on the CPU here), second_step runs one
kernel per bucket for torch.optim.SGD / Adam / AdamW instead of restore +
base_optimizer.step(). Each step is checked against torch.optim itself run on
the same inputs (the saved x, the second pass's gradient, a copy of the
state): within 2 ulp; lr = 0 gives x back bit for bit; the state is torch's
(keys, per-parameter tensors) so torch's own step continues from it.
"""
from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import io  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytestmark = pytest.mark.triton  # every test here runs the Triton backend

from helpers import (  # noqa: E402
    MODES, SHAPES, assert_within_ulps, curvature, curvature_backward, positive_params, torch_step_from_saved,
)
from presam_kernels import SAM, InfoSAM, base_update  # noqa: E402
from presam_kernels.backends.triton import table as triton_table  # noqa: E402

DEVICE = torch.device("cpu") if triton_table.interpreting() else torch.device("cuda")

SGD_OPTIONS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.02, momentum=0.9),
    "dampening_wd": dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "nesterov_maximize": dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True),
    "nesterov_wd": dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=0.1),
    "wd_no_momentum": dict(lr=0.1, weight_decay=0.05, dampening=0.5),
}
ADAM_OPTIONS = {
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam_wd_maximize": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.02, maximize=True, eps=1e-6)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99))),
    "adamw_large_beta1_weight": (torch.optim.AdamW, dict(lr=3e-3, betas=(0.3, 0.9), weight_decay=0.5)),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def check_steps_against_torch(opt, params, scales, steps=3):
    """Drive ``opt`` (fused) and, at every step, torch's own base optimizer on
    the same saved x, second gradient and a copy of the state; compare."""
    base = opt.base_optimizer
    ref_params = [torch.zeros_like(p, requires_grad=True) for p in params]
    ref = type(base)(ref_params, lr=0.0)
    for step in range(steps):
        ref.param_groups[0].update({k: v for k, v in base.param_groups[0].items() if k != "params"})
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.grad = None
        curvature_backward(params, scales)
        opt.first_step(zero_grad=True)
        curvature_backward(params, scales)
        torch_step_from_saved(ref, ref_params, saved, params, opt.state)
        opt.second_step(zero_grad=True)
        assert opt.last_step_fused, "the fused path was not taken"
        for k, (p, rp) in enumerate(zip(params, ref_params)):
            assert_within_ulps(p, rp, 2, f"step {step} param {k}")
            for key, value in ref.state[rp].items():
                got = opt.state[p][key]
                if key == "step":
                    assert got.device.type == "cpu" and got.dtype == torch.float32 and float(got) == float(value)
                else:
                    # exp_avg_sq holds d^2: an ulp of d is two of it
                    assert_within_ulps(got, value, 4 if key == "exp_avg_sq" else 2, f"step {step} param {k} state {key}")


@MODES
@pytest.mark.parametrize("options", list(SGD_OPTIONS), ids=list(SGD_OPTIONS))
def test_sgd_fused_matches_torch_within_2_ulp(options, flatten):
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    opt = SAM(params, torch.optim.SGD, rho=0.05, backend="triton", flatten=flatten, **SGD_OPTIONS[options])
    check_steps_against_torch(opt, params, curvature(params))


@MODES
@pytest.mark.parametrize("options", list(ADAM_OPTIONS), ids=list(ADAM_OPTIONS))
def test_adam_fused_matches_torch_within_2_ulp(options, flatten):
    cls, kwargs = ADAM_OPTIONS[options]
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    opt = SAM(params, cls, rho=0.05, backend="triton", flatten=flatten, **kwargs)
    check_steps_against_torch(opt, params, curvature(params))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_lr_zero_gives_params_back_bit_for_bit(base):
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    before = [p.detach().clone() for p in params]
    kwargs = dict(lr=0.0, momentum=0.9, weight_decay=0.1) if base == "sgd" else dict(lr=0.0, weight_decay=0.1)
    cls = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
    opt = SAM(params, cls, rho=0.5, backend="triton", **kwargs)
    scales = curvature(params)
    for _ in range(2):
        curvature_backward(params, scales)
        opt.first_step(zero_grad=True)
        curvature_backward(params, scales)
        opt.second_step(zero_grad=True)
        assert opt.last_step_fused
    for p, b in zip(params, before):
        assert torch.equal(p.detach().view(torch.int32), b.view(torch.int32))


def one_step(opt, params, scales):
    curvature_backward(params, scales)
    opt.first_step(zero_grad=True)
    curvature_backward(params, scales)
    opt.second_step(zero_grad=True)


def test_base_optimizer_step_is_not_called_when_fused(monkeypatch):
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    opt = SAM(params, torch.optim.SGD, rho=0.05, backend="triton", lr=0.1, momentum=0.9)

    def forbidden(*args, **kwargs):
        raise AssertionError("base_optimizer.step() was called on the fused path")

    monkeypatch.setattr(opt.base_optimizer, "step", forbidden)
    one_step(opt, params, curvature(params))
    assert opt.last_step_fused


def test_uncovered_option_takes_restore_and_base_step():
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    opt = SAM(params, torch.optim.Adam, rho=0.05, backend="triton", lr=1e-2, amsgrad=True)
    calls = []
    opt.base_optimizer.register_step_post_hook(lambda *a: calls.append(1))
    one_step(opt, params, curvature(params))
    assert not opt.last_step_fused and calls == [1]
    assert "max_exp_avg_sq" in opt.state[params[0]]


def test_eager_backend_is_not_fused_but_steps_the_same():
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    scales = curvature(params)
    fused = SAM(params, torch.optim.SGD, rho=0.05, backend="triton", lr=0.1, momentum=0.9, perturb="in_place")
    plain = SAM(twin, torch.optim.SGD, rho=0.05, backend="eager", lr=0.1, momentum=0.9, perturb="in_place")
    for _ in range(3):
        one_step(fused, params, scales)
        one_step(plain, twin, scales)
        assert fused.last_step_fused and not plain.last_step_fused
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


@MODES
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_switching_fused_unfused_plain_torch_mid_training_is_seamless(monkeypatch, cls, flatten):
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.1) if cls is torch.optim.SGD else dict(lr=1e-2)
    scales = None
    runs = []
    for mixed in (True, False):
        torch.manual_seed(0)
        params = positive_params(SHAPES["mixed_small"], device=DEVICE)
        scales = scales or curvature(params)
        opt = SAM(params, cls, rho=0.05, backend="triton", flatten=flatten, **kwargs)
        fused_flags = []
        for step in range(5):
            # run "mixed": fused, fused, unfused, plain torch, fused; the other: never fused
            if not mixed or step == 2:
                monkeypatch.setattr(base_update, "covered", lambda optimizer: None)
            if step == 3:
                # plain torch: the base optimizer alone, on the state we kept
                for p in params:
                    p.grad = None
                curvature_backward(params, scales)
                opt.base_optimizer.step()
                opt.zero_grad()
                fused_flags.append(None)
            else:
                one_step(opt, params, scales)
                fused_flags.append(opt.last_step_fused)
            monkeypatch.undo()
        runs.append((params, opt, fused_flags))
    (a, opt_a, flags_a), (b, opt_b, flags_b) = runs
    assert flags_a == [True, True, False, None, True] and flags_b == [False, False, False, None, False]
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in opt_b.state[q].items():
            torch.testing.assert_close(opt_a.state[p][key], value, rtol=1e-5, atol=1e-6)


def test_plain_torch_step_continues_from_the_fused_state():
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    scales = curvature(params)
    opt = SAM(params, torch.optim.Adam, rho=0.05, backend="triton", lr=1e-2)
    one_step(opt, params, scales)
    views = {k: opt.state[params[1]][k] for k in ("exp_avg", "exp_avg_sq")}
    curvature_backward(params, scales)
    opt.base_optimizer.step()  # torch updates our views in place
    assert all(opt.state[params[1]][k] is v for k, v in views.items())
    assert float(opt.state[params[1]]["step"]) == 2.0


@MODES
def test_state_is_torch_keys_as_views_of_flat_buffers(flatten):
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    opt = SAM(params, torch.optim.AdamW, rho=0.05, backend="triton", flatten=flatten, lr=1e-2)
    one_step(opt, params, curvature(params))
    bucket = opt._buckets[0]
    flat = bucket.buffers.base_state["exp_avg"]
    for i, p in enumerate(bucket.params):
        entry = opt.state[p]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["exp_avg"].shape == p.shape and entry["exp_avg"].stride() == p.stride()
        assert entry["exp_avg"].data_ptr() == flat.data_ptr() + bucket.layout.offsets[i] * flat.element_size()


@MODES
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_state_dict_round_trip_continues_bit_identically(cls, flatten):
    kwargs = dict(lr=0.1, momentum=0.9) if cls is torch.optim.SGD else dict(lr=1e-2, weight_decay=0.01)
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    scales = curvature(params)
    opt = SAM(params, cls, rho=0.05, backend="triton", flatten=flatten, **kwargs)
    for _ in range(2):
        one_step(opt, params, scales)
    sd = opt.state_dict()
    ours = base_update.views_of_ours(opt._buckets)
    for entry in sd["state"].values():
        for key, value in entry.items():
            assert value.untyped_storage().data_ptr() not in ours, f"{key}: the live flat buffer was saved"
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = SAM(twin, cls, rho=0.05, backend="triton", flatten=flatten, **kwargs)
    buffer = io.BytesIO()
    torch.save(sd, buffer)  # as a checkpoint goes (torch's load keeps 'step' tensors as given)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    one_step(opt, params, scales)
    one_step(resumed, twin, scales)
    assert resumed.last_step_fused
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_scheduler_changes_the_fused_lr_without_warnings():
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    scales = curvature(params)
    opt = SAM(params, torch.optim.SGD, rho=0.05, backend="triton", lr=0.1)
    sched_base = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(opt, params, scales)
        sched_base.step()
    assert opt.param_groups[0]["lr"] == 0.05
    # lr halved: the fused update uses it (compare one step of torch at lr 0.05)
    check_steps_against_torch(opt, params, scales, steps=1)


def test_tensor_lr_is_used_without_host_read():
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    opt = SAM(params, torch.optim.SGD, rho=0.05, backend="triton", lr=torch.tensor(0.1), momentum=0.9)
    check_steps_against_torch(opt, params, curvature(params), steps=2)


def test_parameters_at_different_adam_steps_take_the_generic_path():
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    scales = curvature(params)
    opt = SAM(params, torch.optim.Adam, rho=0.05, backend="triton", lr=1e-2)
    curvature_backward(params, scales)
    params[0].grad = None  # params[0] misses the first step
    opt.first_step(zero_grad=True)
    curvature_backward(params, scales)
    params[0].grad = None
    opt.second_step(zero_grad=True)
    assert opt.last_step_fused and "step" not in opt.state[params[0]]
    one_step(opt, params, scales)  # steps 0 and 1 in one group: torch's own path
    assert not opt.last_step_fused
    assert float(opt.state[params[0]]["step"]) == 1.0 and float(opt.state[params[1]]["step"]) == 2.0
    one_step(opt, params, scales)
    assert not opt.last_step_fused


@pytest.mark.parametrize("overflow", ["first", "second"])
def test_amp_overflow_skips_the_fused_update(overflow):
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    scales = curvature(params)
    opt = InfoSAM(params, torch.optim.SGD, rho=0.05, backend="triton", lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    one_step(opt, params, scales)
    before = [p.detach().clone() for p in params]
    state_before = [opt.state[p]["momentum_buffer"].clone() for p in params]

    def scaled_backward(poisoned):
        loss = sum((0.5 * a * p * p + torch.sin(p)).sum() for p, a in zip(params, scales))
        scaler.scale(loss).backward()
        if poisoned:
            params[1].grad[0, 0] = float("inf")

    scaled_backward(overflow == "first")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaled_backward(overflow == "second")
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert not opt.last_step_fused
    for p, b, m in zip(params, before, state_before):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("perturb", ["in_place", "out_of_place"])
def test_group_with_rho_zero_is_updated_from_x_itself(perturb):
    params = positive_params(SHAPES["mixed_small"], device=DEVICE)
    scales = curvature(params)
    groups = [{"params": params[:2]}, {"params": params[2:], "rho": 0.0}]
    opt = SAM(groups, torch.optim.SGD, rho=0.05, backend="triton", lr=0.02, momentum=0.9, perturb=perturb)
    check_steps_against_torch_groups(opt, params, scales)


def check_steps_against_torch_groups(opt, params, scales):
    """As check_steps_against_torch, one reference optimizer per param group."""
    saved = [p.detach().clone() for p in params]
    curvature_backward(params, scales)
    opt.first_step(zero_grad=True)
    curvature_backward(params, scales)
    refs = []
    for group in opt.param_groups:
        ref_params = [torch.zeros_like(p, requires_grad=True) for p in group["params"]]
        ref = torch.optim.SGD(ref_params, lr=0.0)
        ref.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        with torch.no_grad():
            for rp, p in zip(ref_params, group["params"]):
                rp.copy_(saved[next(i for i, q in enumerate(params) if q is p)])
                rp.grad = p.grad.clone()
        ref.step()
        refs += ref_params
    opt.second_step(zero_grad=True)
    assert opt.last_step_fused
    for k, (p, rp) in enumerate(zip(params, refs)):
        assert_within_ulps(p, rp, 2, f"param {k}")


def test_hyperparameter_rows_are_written_by_column_name_and_refuse_a_missing_or_extra_one():
    """The host fills a group's row by the names of base_update.*_COLUMNS (the
    layout K4 and csrc read), so a renamed or forgotten column raises here."""
    group = dict(lr=0.1, momentum=0.9, dampening=0.25, weight_decay=0.01, nesterov=False, maximize=True)
    row = base_update._sgd_row(group, first=True)
    assert dict(zip(base_update.SGD_COLUMNS, row)) == dict(
        lr=0.1, momentum=0.9, one_minus_dampening=0.75, weight_decay=0.01, nesterov=0.0, maximize=1.0, first=1.0
    )
    values = dict(zip(base_update.SGD_COLUMNS, row))
    with pytest.raises(ValueError, match="columns"):
        base_update._row(base_update.SGD, **{k: v for k, v in values.items() if k != "first"})
    with pytest.raises(ValueError, match="columns"):
        base_update._row(base_update.SGD, **values, beta2=0.9)
