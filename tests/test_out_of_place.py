"""Out-of-place perturbation (issue 7, docs/design.md §3): x + e written to a
flat buffer of ours and each parameter's .data pointed at its slice for the
second pass, then pointed back. Same numbers as in place, bit for bit; the
parameters keep their identity, autograd, memory format and (flatten=True)
their flat views.
"""
from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from helpers import MODES, VARIANTS, assert_bits_equal  # noqa: E402
from presam_kernels import SAM, PreSAM  # noqa: E402
from presam_kernels.optim import presam as presam_module  # noqa: E402

try:
    from presam_kernels.backends.triton import table as triton_table

    TRITON = triton_table.interpreting() or torch.cuda.is_available()
except ImportError:  # no triton
    TRITON = False
DEVICE = torch.device("cuda") if TRITON and not triton_table.interpreting() else torch.device("cpu")
BACKENDS = ["eager"] + (["triton"] if TRITON else [])

SGD, ADAMW = torch.optim.SGD, torch.optim.AdamW
# The variants run here: (rho, base optimizer, its options).
RUNS = {
    "sam": (0.05, SGD, dict(lr=0.1, momentum=0.9)),
    "sam_adaptive": (0.5, SGD, dict(lr=0.1)),
    "asam": (0.5, SGD, dict(lr=0.1)),
    "fisher": (0.05, SGD, dict(lr=0.1)),
    "vasso": (0.05, SGD, dict(lr=0.1)),
    "infosam": (0.05, ADAMW, dict(lr=1e-2)),  # delta = 1e-3 (below)
}
# The interpreter takes about a second per step: the Triton backend runs these on the CPU.
TRITON_CORE = {"sam", "infosam"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).to(DEVICE)
    model[0].to(memory_format=torch.channels_last)
    return model


def batch(k):
    gen = torch.Generator().manual_seed(100 + k)
    return torch.randn(6, 3, 5, 5, generator=gen).to(DEVICE), torch.randn(6, 5, generator=gen).to(DEVICE)


def loss_of(model, b):
    return ((model(b[0]) - b[1]) ** 2).mean()


def run(variant, backend, flatten, perturb, steps=3, between=None):
    model = make_model()
    rho, base, options = RUNS[variant]
    spec = VARIANTS[variant].with_(delta=1e-3) if variant == "infosam" else VARIANTS[variant]
    opt = spec.make(list(model.parameters()), rho, flatten=flatten, backend=backend, base=base, perturb=perturb,
                    **options)
    grads = []
    for k in range(steps):
        b = batch(k)
        loss_of(model, b).backward()
        opt.first_step(zero_grad=True)
        if between:
            between(model, opt)
        loss_of(model, b).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.second_step(zero_grad=True)
    return model, opt, grads


def test_perturb_argument_is_validated():
    with pytest.raises(ValueError, match="perturb must be one of"):
        SAM([torch.zeros(3, requires_grad=True)], torch.optim.SGD, lr=0.1, perturb="sideways")


@MODES
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(RUNS))
def test_out_of_place_equals_in_place_bit_for_bit(variant, backend, flatten, core_case):
    core_case(variant in TRITON_CORE)
    a, opt_a, grads_a = run(variant, backend, flatten, "in_place")
    b, opt_b, grads_b = run(variant, backend, flatten, "out_of_place")
    for k, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert_bits_equal(p, q, f"param {k}")
        for key, value in opt_a.state[p].items():
            assert_bits_equal(value, opt_b.state[q][key], f"param {k} state {key}")
    for t, (ga, gb) in enumerate(zip(grads_a, grads_b)):  # the second pass ran at the same x + e
        for k, (g, h) in enumerate(zip(ga, gb)):
            assert_bits_equal(g, h, f"step {t}: second-pass gradient of param {k}")
    assert opt_a.last_step_fused == opt_b.last_step_fused == (backend == "triton")


@MODES
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_point_at_x_plus_e_for_the_second_pass_and_back(backend, flatten):
    model = make_model()
    params = list(model.parameters())
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, backend=backend, flatten=flatten, perturb="out_of_place")
    storage = [p.data_ptr() for p in params]
    strides = [p.stride() for p in params]
    x = [p.detach().clone() for p in params]
    b = batch(0)
    loss_of(model, b).backward()
    opt.first_step(zero_grad=True)
    assert opt._buckets[0].buffers.backup is None, "out of place keeps no backup"
    for p, ptr, st, x0 in zip(params, storage, strides, x):
        assert p.data_ptr() != ptr and p.stride() == st
        assert not torch.equal(p.detach(), x0)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    loss_of(model, b).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    opt.second_step(zero_grad=True)
    assert list(model.parameters()) == params  # identity
    for p, ptr, st in zip(params, storage, strides):
        assert p.data_ptr() == ptr and p.stride() == st
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    if flatten:
        bucket = opt._buckets[0]
        assert all(bucket.in_flat_buffers(i) for i in range(len(bucket.params)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_points_the_parameters_back(backend):
    model = make_model()
    params = list(model.parameters())
    x = [p.detach().clone() for p in params]
    storage = [p.data_ptr() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, backend=backend, perturb="out_of_place")
    loss_of(model, batch(0)).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    for p, x0, ptr in zip(params, x, storage):
        assert p.data_ptr() == ptr and torch.equal(p.detach(), x0)
    loss_of(model, batch(1)).backward()
    opt.first_step(zero_grad=True)  # a new step starts cleanly
    opt.restore()


@MODES
@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_points_at_an_exact_copy(backend, flatten):
    model = make_model()
    params = list(model.parameters())
    x = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, backend=backend, flatten=flatten, perturb="out_of_place")
    loss_of(model, batch(0)).backward()
    with torch.no_grad():
        params[2].grad.view(-1)[0] = float("nan")
    opt.first_step(zero_grad=True)
    assert int(opt.skipped_steps) == 1
    for p, x0 in zip(params, x):
        assert_bits_equal(p, x0, "x after a skipped step")
    opt.restore()


def test_auto_chooses_by_average_tensor_size(monkeypatch):
    monkeypatch.setattr(presam_module, "_OUT_OF_PLACE_MIN_AVG", {"cpu": 100})
    small = PreSAM([torch.zeros(50, requires_grad=True)] * 1, torch.optim.SGD, lr=0.1, backend="eager")
    large = PreSAM([torch.zeros(500, requires_grad=True)], torch.optim.SGD, lr=0.1, backend="eager")
    fixed = PreSAM([torch.zeros(500, requires_grad=True)], torch.optim.SGD, lr=0.1, backend="eager",
                   perturb="in_place")
    assert not small._out_of_place(small._ensure_buckets()[0])
    assert large._out_of_place(large._ensure_buckets()[0])
    assert not fixed._out_of_place(fixed._ensure_buckets()[0])
