"""The Triton backend against the eager backend, verb by verb and through the optimizers.

Without CUDA the kernels run under the Triton interpreter on CPU tensors;
TRITON_INTERPRET must be set before ``presam_kernels.backends.triton`` is
imported (the tests' conftest sets it too). With CUDA (and no
TRITON_INTERPRET) the same tests run the compiled kernels on the GPU.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import (  # noqa: E402
    DTYPES, FP32, FP32_REORDERED, LARGE, SHAPES, TOLERANCES, VARIANTS, assert_bits_equal, assert_close, batch, loss_of,
    make_model, make_tensors,
)
from presam_kernels import SAM  # noqa: E402
from presam_kernels.backends import eager  # noqa: E402
from presam_kernels.backends import triton as triton_backend  # noqa: E402
from presam_kernels.backends.triton import k1_reduce, k2_perturb, k3_restore  # noqa: E402
from presam_kernels.backends.triton import table as triton_table  # noqa: E402
from presam_kernels.buckets import build_buckets  # noqa: E402

if triton_table.interpreting():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip(
        "Triton kernels need CUDA or TRITON_INTERPRET=1 set before presam_kernels.backends.triton is imported",
        allow_module_level=True,
    )

# Parameters after the perturbation are compared with helpers.TOLERANCES: fp32
# a few ulp (the norm is summed in another order than eager's); bf16/fp16 one
# ulp of the dtype (the interpreter truncates fp32 -> bf16 where eager rounds
# to nearest, and an fp32 ulp of difference can cross a rounding boundary).
# The norm (fp32 whatever the parameters): FP32_REORDERED. The EMA: FP32, an
# absolute 1e-6 being a few ulp of m and g (|m|, |g| ~ 1): a cold VaSSO step
# on a device flag forms m = (g - m) * 1 + m in Triton, g in eager, 2 ulp apart.

# The variants run here; the infoSAM ones with delta = 1e-3: with the oracle
# rows' 1e-12, an ulp of m where m is close to g moves u' by orders of
# magnitude, and eager and Triton round m independently here.
PERTURB_VARIANTS = ["sam", "sam_adaptive", "asam", "fisher", "vasso", "infosam", "infosam_asam"]
SPECS = {
    name: (VARIANTS[name].with_(delta=1e-3) if VARIANTS[name].spec.objective == "info" else VARIANTS[name])
    .preconditioner for name in PERTURB_VARIANTS
}
MIXED = SHAPES["mixed"]
LARGE_ROW = [shape for shape, _ in MIXED].index((LARGE,))  # the row with several chunks and a masked tail


def make_problem(shapes, dtypes, flatten, spec, groups=None, seed=0, grads=None):
    """Parameters (a list of (shape, memory_format)) with gradients of the same
    strides, their buckets and (for EMA variants) a random EMA state; identical
    for identical arguments."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes if isinstance(dtypes, (list, tuple)) else [dtypes] * len(shapes)
    params = [make_tensors([s], dtype, DEVICE, generator=gen)[0] for s, dtype in zip(shapes, dtypes)]
    grads = grads or [make_tensors([s], dtype, DEVICE, generator=gen)[0] for s, dtype in zip(shapes, dtypes)]
    for p, g in zip(params, grads):
        p.grad = g.to(DEVICE)
    group_index = groups or [0] * len(params)
    buckets = build_buckets(params, group_index, [p.ndim >= 2 for p in params], flatten)
    if spec.objective.has_state:
        for b in buckets:
            b.buffers.ensure_grad_ema().copy_(torch.randn(b.layout.flat_numel, generator=gen).to(DEVICE))
    return params, buckets


def run_perturb(backend, shapes, dtypes, flatten, spec, rhos=(0.05,), ema_ready=False, found_inf=None, **kw):
    params, buckets = make_problem(shapes, dtypes, flatten, spec, **kw)
    before = [p.detach().clone() for p in params]
    perturbed = [not (isinstance(r, float) and r == 0.0) for r in rhos]
    # Rows of a rho = 0 group are never written, their backup included.
    backup_expected = [p.detach().clone() if perturbed[b.layout.group_index[i]] else None
                       for b in buckets for i, p in enumerate(b.params)]
    emas_before = [None if b.buffers.grad_ema is None else b.buffers.grad_ema.clone() for b in buckets]
    tables = [b.table(perturbed) for b in buckets]
    result = backend.perturb(tables, buckets, spec, list(rhos), ema_ready, found_inf)
    norm, skipped = result.norm, result.skipped
    out = dict(
        norm=norm.clone(),
        skipped=skipped.clone(),
        params=[p.detach().clone() for p in params],
        before=before,
        backups=[b.layout.view(b.buffers.backup, i).clone() for b in buckets for i in range(len(b.params))],
        backup_params=backup_expected,
        emas=[None if b.buffers.grad_ema is None else b.buffers.grad_ema.clone() for b in buckets],
        emas_before=emas_before,
    )
    backend.restore(result)
    out["restored"] = [p.detach().clone() for p in params]
    return out


def check_against_eager(shapes, dtypes, flatten, spec, **kw):
    ref = run_perturb(eager, shapes, dtypes, flatten, spec, **kw)
    got = run_perturb(triton_backend, shapes, dtypes, flatten, spec, **kw)
    assert got["norm"].dtype == torch.float32 and got["norm"].dim() == 0
    assert got["skipped"].dtype == torch.bool and got["skipped"].dim() == 0
    assert_close(got["norm"], ref["norm"], FP32_REORDERED, "norm")
    assert bool(got["skipped"]) == bool(ref["skipped"])
    for k, (p, q) in enumerate(zip(got["params"], ref["params"])):
        assert_close(p, q, TOLERANCES[p.dtype], f"param {k} ({p.dtype})")
    for k, (b, p) in enumerate(zip(got["backups"], got["backup_params"])):
        if p is not None:
            assert_bits_equal(b, p, f"backup {k}")
    for k, (b, p) in enumerate(zip(got["before"], got["restored"])):
        assert_bits_equal(p, b, f"restored param {k}")
    for k, (m, n) in enumerate(zip(got["emas"], ref["emas"])):
        if m is not None:
            assert_close(m, n, FP32, f"EMA of bucket {k}")
    return got, ref


# -- perturb against eager ---------------------------------------------------
@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("variant", PERTURB_VARIANTS)
def test_perturb_matches_eager_mixed_shapes(variant, tol, flatten):
    check_against_eager(MIXED, tol[0], flatten, SPECS[variant])  # to TOLERANCES[dtype], i.e. tol


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("shapes", ["size1", "size7", "size4097"])
@pytest.mark.parametrize("variant", ["sam", "infosam"])
def test_perturb_matches_eager_odd_sizes(variant, shapes, flatten):
    check_against_eager(SHAPES[shapes], torch.float32, flatten, SPECS[variant])


@pytest.mark.parametrize("ema_ready", ["host_not_ready", "flag_not_ready", "flag_ready"])
@pytest.mark.parametrize("variant", ["vasso", "infosam", "infosam_asam"])
def test_perturb_matches_eager_ema_flag(variant, ema_ready):
    """ema_ready is False (host knows), a device flag still at 0.0, or 1.0 (EMA ready)."""
    flag = {"host_not_ready": False, "flag_not_ready": torch.zeros((), device=DEVICE),
            "flag_ready": torch.ones((), device=DEVICE)}
    check_against_eager(MIXED, torch.float32, False, SPECS[variant], ema_ready=flag[ema_ready])


def test_ema_ready_flag_as_a_device_tensor_equals_the_host_flag():
    a = run_perturb(triton_backend, MIXED, torch.float32, True, SPECS["infosam"], ema_ready=False)
    b = run_perturb(triton_backend, MIXED, torch.float32, True, SPECS["infosam"], ema_ready=torch.zeros((), device=DEVICE))
    assert_close(b["norm"], a["norm"], (torch.float32, 0.0, 0.0), "norm")
    for k, (p, q) in enumerate(zip(b["params"], a["params"])):
        assert_close(p, q, FP32, f"param {k}")
    for m, n in zip(b["emas"], a["emas"]):
        assert_bits_equal(m, n, "EMA")


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
def test_mixed_dtype_buckets_share_one_global_norm(flatten):
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 2
    got, ref = check_against_eager(MIXED, dtypes, flatten, SPECS["infosam"], ema_ready=torch.ones((), device=DEVICE))
    assert len(got["emas"]) == 3


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("variant", ["sam", "infosam", "asam"])
def test_rho_zero_group_counts_in_norm_but_is_not_perturbed(variant, flatten):
    groups = [0, 1, 0, 1, 2, 0]
    got, ref = check_against_eager(MIXED, torch.float32, flatten, SPECS[variant], rhos=(0.05, 0.0, 0.2), groups=groups)
    for k, g in enumerate(groups):
        if g == 1:
            assert_bits_equal(got["params"][k], got["before"][k], f"param {k} of the rho = 0 group")


def test_rho_as_device_tensors_equals_floats():
    rhos = (0.05, 0.0, 0.2)
    a = run_perturb(triton_backend, MIXED, torch.float32, False, SPECS["sam"], rhos=rhos, groups=[0, 1, 0, 1, 2, 0])
    t = tuple(torch.tensor(r, device=DEVICE) for r in rhos)
    b = run_perturb(triton_backend, MIXED, torch.float32, False, SPECS["sam"], rhos=t, groups=[0, 1, 0, 1, 2, 0])
    for k, (p, q) in enumerate(zip(b["params"], a["params"])):
        assert_bits_equal(p, q, f"param {k}")


# -- skipping ----------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("variant", ["sam", "infosam", "vasso"])
@pytest.mark.parametrize("tol", DTYPES[:2])
def test_non_finite_grads_skip_without_touching_params_or_ema(variant, tol, bad):
    dtype = tol[0]
    spec = SPECS[variant]
    gen = torch.Generator().manual_seed(1)
    grads = make_tensors(MIXED, dtype, generator=gen)
    grads[LARGE_ROW].view(-1)[100] = bad
    got = run_perturb(triton_backend, MIXED, dtype, False, spec, grads=grads, ema_ready=torch.ones((), device=DEVICE))
    ref = run_perturb(eager, MIXED, dtype, False, spec, grads=grads, ema_ready=torch.ones((), device=DEVICE))
    assert bool(got["skipped"]) and bool(ref["skipped"])
    assert not torch.isfinite(got["norm"])
    for k, (p, b) in enumerate(zip(got["params"], got["before"])):
        assert_bits_equal(p, b, f"param {k} after a skipped perturb")
    for k, (b, p) in enumerate(zip(got["backups"], got["backup_params"])):
        assert_bits_equal(b, p, f"backup {k}")
    for m, m0 in zip(got["emas"], got["emas_before"]):
        if m is not None:
            assert_bits_equal(m, m0, "EMA after a skipped perturb")
    for k, (p, b) in enumerate(zip(got["restored"], got["before"])):
        assert_bits_equal(p, b, f"restored param {k}")


@pytest.mark.parametrize("flag", [0.0, 1.0])
def test_found_inf_skips_a_finite_step(flag):
    found = torch.full((1,), flag, device=DEVICE)
    got, ref = check_against_eager(MIXED, torch.float32, True, SPECS["infosam"], found_inf=found,
                                   ema_ready=torch.ones((), device=DEVICE))
    assert bool(got["skipped"]) == (flag > 0)
    if flag > 0:
        for k, (p, b) in enumerate(zip(got["params"], got["before"])):
            assert_bits_equal(p, b, f"param {k}")
        for m, m0 in zip(got["emas"], got["emas_before"]):
            assert_bits_equal(m, m0, "EMA")


# -- exactness ---------------------------------------------------------------
@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("tol", DTYPES)
def test_restore_is_bit_exact_with_special_values(tol, flatten):
    dtype = tol[0]
    params, buckets = make_problem(MIXED, dtype, flatten, SPECS["sam"])
    with torch.no_grad():
        specials = torch.tensor([-0.0, 0.0, 1e-40, -1e-40, 3e38, float("nan"), float("inf"), -1.0 / 3.0])
        params[LARGE_ROW].view(-1)[: specials.numel()] = specials.to(dtype).to(DEVICE)
    before = [p.detach().clone() for p in params]
    tables = [b.table([True]) for b in buckets]
    done = triton_backend.perturb(tables, buckets, SPECS["sam"], [0.05], False)
    assert not torch.equal(params[0], before[0])
    triton_backend.restore(done)
    for k, (p, b) in enumerate(zip(params, before)):
        assert_bits_equal(p, b, f"param {k}")


@pytest.mark.parametrize("variant", ["sam", "infosam_asam"])
def test_norm_and_params_are_run_to_run_identical(variant):
    a = run_perturb(triton_backend, MIXED, torch.float32, False, SPECS[variant], ema_ready=torch.ones((), device=DEVICE))
    b = run_perturb(triton_backend, MIXED, torch.float32, False, SPECS[variant], ema_ready=torch.ones((), device=DEVICE))
    assert_bits_equal(a["norm"], b["norm"], "norm")
    for k, (p, q) in enumerate(zip(a["params"], b["params"])):
        assert_bits_equal(p, q, f"param {k}")


def test_infosam_direction_matches_float64_oracle():
    """u' = g / (1 + alpha^2 (m - g)^2 / delta), e = rho u' / (||u'|| + eps_norm delta)."""
    spec = SPECS["infosam"]
    rho, alpha, delta = 0.05, 1.0 - spec.ema_weight, spec.delta
    params, buckets = make_problem(MIXED, torch.float32, False, spec)
    x0 = [p.detach().double().clone() for p in params]
    g = [p.grad.double() for p in params]
    m = [buckets[0].layout.view(buckets[0].buffers.grad_ema, i).double().clone() for i in range(len(params))]
    u = [gi / (1 + (alpha * (mi - gi)) ** 2 / delta) for gi, mi in zip(g, m)]
    norm = torch.sqrt(sum((ui**2).sum() for ui in u))
    tables = [b.table([True]) for b in buckets]
    got = triton_backend.perturb(tables, buckets, spec, [rho], torch.ones((), device=DEVICE)).norm
    assert_close(got, norm, (torch.float32, 0.0, 1e-5), "norm of u' = delta u")
    for k, (p, x, ui) in enumerate(zip(params, x0, u)):
        assert_close(p, x + rho * ui / (norm + spec.eps_norm * delta), FP32, f"param {k}")
        assert_close(buckets[0].layout.view(buckets[0].buffers.grad_ema, k), g[k] + alpha * (m[k] - g[k]), FP32,
                     f"EMA {k}")


# -- layouts -----------------------------------------------------------------
def count_launches(monkeypatch):
    counts = {"reduce": 0, "perturb": 0, "restore": 0}

    def counted(module, fn_name, key):
        original = getattr(module, fn_name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, wrapper)

    counted(k1_reduce, "launch_reduce", "reduce")
    counted(k2_perturb, "launch_perturb", "perturb")
    counted(k3_restore, "launch_restore", "restore")
    return counts


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
def test_launches_per_step_do_not_grow_with_the_number_of_tensors(monkeypatch, flatten):
    counts = count_launches(monkeypatch)
    per_step = []
    for n in (3, 40):
        for key in counts:
            counts[key] = 0
        run_perturb(triton_backend, [((5, 3), None)] * n, torch.float32, flatten, SPECS["infosam"])
        per_step.append(dict(counts))
    assert per_step[0] == per_step[1] == {"reduce": 1, "perturb": 1, "restore": 1}


def test_two_buckets_launch_twice_each(monkeypatch):
    counts = count_launches(monkeypatch)
    run_perturb(triton_backend, MIXED, [torch.float32, torch.bfloat16] * 3, False, SPECS["sam"])
    assert counts == {"reduce": 2, "perturb": 2, "restore": 2}


def test_device_table_is_rebuilt_only_when_an_address_changes(monkeypatch):
    builds = []
    original = triton_table._upload  # every new device table, on the C++ and the Python path
    monkeypatch.setattr(triton_table, "_upload", lambda *a: builds.append(1) or original(*a))
    params, buckets = make_problem(MIXED, torch.float32, False, SPECS["sam"])
    for _ in range(3):
        tables = [b.table([True]) for b in buckets]
        done = triton_backend.perturb(tables, buckets, SPECS["sam"], [0.05], False)
        triton_backend.restore(done)
    assert len(builds) == 1
    params[1].grad = params[1].grad.clone()  # a fresh gradient buffer, as after zero_grad(set_to_none=True)
    tables = [b.table([True]) for b in buckets]
    done = triton_backend.perturb(tables, buckets, SPECS["sam"], [0.05], False)
    triton_backend.restore(done)
    assert len(builds) == 2


def test_dense_non_contiguous_params_use_the_kernels(monkeypatch):
    counts = count_launches(monkeypatch)
    shapes = [((6, 5), None), ((4, 3, 2, 2), None)]
    ref = run_perturb(eager, shapes, torch.float32, False, SPECS["asam"])
    # Same values, permuted layouts: a transposed matrix and channels_last.
    params, buckets = make_problem(shapes, torch.float32, False, SPECS["asam"])
    params_t = [params[0].detach().t().contiguous().t(), params[1].detach().contiguous(memory_format=torch.channels_last)]
    for p, q in zip(params_t, params):
        p.grad = q.grad.clone().as_strided(p.shape, p.stride()).copy_(q.grad)
    buckets = build_buckets(params_t, [0, 0], [True, True], False)
    tables = [b.table([True]) for b in buckets]
    done = triton_backend.perturb(tables, buckets, SPECS["asam"], [0.05], False)
    assert counts["perturb"] == 1
    for k, (p, q) in enumerate(zip(params_t, ref["params"])):
        assert_close(p, q, FP32, f"param {k}")
    triton_backend.restore(done)
    assert counts["restore"] == 1


def test_grad_with_other_strides_than_param_falls_back_to_eager(monkeypatch):
    counts = count_launches(monkeypatch)
    shapes = [((4, 3, 2, 2), None), ((7,), None)]
    ref = run_perturb(eager, shapes, torch.float32, False, SPECS["sam"])
    params, buckets = make_problem(shapes, torch.float32, False, SPECS["sam"])
    before = [p.detach().clone() for p in params]
    params[0].grad = params[0].grad.contiguous(memory_format=torch.channels_last)
    tables = [b.table([True]) for b in buckets]
    done = triton_backend.perturb(tables, buckets, SPECS["sam"], [0.05], False)
    norm = done.norm
    assert counts == {"reduce": 0, "perturb": 0, "restore": 0}
    assert_close(norm, ref["norm"], (torch.float32, 0.0, 0.0), "norm")
    triton_backend.restore(done)
    for p, b in zip(params, before):
        assert_bits_equal(p, b, "restored param")


def test_empty_table_returns_zero_norm():
    params, buckets = make_problem([((5,), None)], torch.float32, False, SPECS["sam"])
    params[0].grad = None
    tables = [b.table([True]) for b in buckets]
    done = triton_backend.perturb(tables, buckets, SPECS["sam"], [0.05], False)
    norm, skipped = done.norm, done.skipped
    assert float(norm) == 0.0 and not bool(skipped)
    triton_backend.restore(done)


# -- through the optimizers --------------------------------------------------
# (variant, rho) per optimizer run here: rho = 0.5 where 0.05 moves x too
# little to tell a wrong constraint apart.
OPTIMIZERS = {
    "sam": (VARIANTS["sam"], 0.05),
    "sam_adaptive": (VARIANTS["sam_adaptive"], 0.5),
    "asam": (VARIANTS["asam"], 0.5),
    "infosam": (VARIANTS["infosam"].with_(delta=1e-3), 0.5),
    "infosam_asam": (VARIANTS["infosam_asam"].with_(delta=1e-3), 0.5),
    "vasso": (VARIANTS["vasso"].with_(theta=0.5), 0.05),
    "fisher": (VARIANTS["fisher"], 0.05),
}


def train(variant, backend, flatten, steps=3):
    """Three SAM steps (lr = 0.1) on make_model(), its second layer in a rho = 0 group."""
    model = make_model().to(DEVICE)
    groups = [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "rho": 0.0},
    ]
    spec, rho = OPTIMIZERS[variant]
    opt = spec.make(groups, rho, flatten=flatten, backend=backend, lr=0.1)
    assert opt.backend == backend
    b = tuple(t.to(DEVICE) for t in batch(0))
    norms = []
    for _ in range(steps):
        loss_of(model, b).backward()
        opt.first_step(zero_grad=True)
        norms.append(opt.last_perturbation_norm.clone())
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in model.parameters()], norms


# Three steps apart: the norm's summation order moves every later step a little.
AFTER_STEPS = (torch.float32, 1e-6, 1e-4)


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("variant", list(OPTIMIZERS))
def test_optimizer_steps_match_eager(variant, flatten):
    got, got_norms = train(variant, "triton", flatten)
    ref, ref_norms = train(variant, "eager", flatten)
    for k, (a, b) in enumerate(zip(got_norms, ref_norms)):
        assert_close(a, b, (torch.float32, 1e-7, 1e-4), f"perturbation norm at step {k}")
    for k, (p, q) in enumerate(zip(got, ref)):
        assert_close(p, q, AFTER_STEPS, f"param {k} after 3 steps")


# -- fp64 parameters (issue 13 item 3) --------------------------------------
FP64_BASES = {
    "sgd": (torch.optim.SGD, dict(momentum=0.9, weight_decay=0.01)),
    "adam": (torch.optim.Adam, dict(weight_decay=0.01)),
}


@pytest.mark.parametrize("flatten", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("lr", [0.0, 0.1], ids=["lr0", "lr0.1"])
@pytest.mark.parametrize("base", list(FP64_BASES))
def test_fp64_params_restore_bit_exact_and_step_in_fp64(base, lr, flatten):
    """[1 + 1e-12, pi] in fp64: lr = 0 gives them back bit for bit, lr > 0 the
    fp64 update of torch.optim (K4 computes in fp32, so fp64 is not fused)."""
    cls, options = FP64_BASES[base]
    start = torch.tensor([1 + 1e-12, 3.141592653589793], dtype=torch.float64, device=DEVICE)
    p = start.clone().requires_grad_()
    ref = start.clone().requires_grad_()
    opt = SAM([p], cls, rho=0.05, lr=lr, backend="triton", flatten=flatten, **options)
    ref_opt = cls([ref], lr=lr, **options)
    for step in range(3):
        p.grad = torch.tensor([0.3, -0.7], dtype=torch.float64, device=DEVICE) * (step + 1)
        opt.first_step(zero_grad=True)
        assert not torch.equal(p.detach(), ref.detach()) or lr != 0.0, "the perturbation did not move x"
        grad = torch.tensor([0.25 + 1e-13, -0.5], dtype=torch.float64, device=DEVICE) / (step + 1)
        p.grad, ref.grad = grad.clone(), grad.clone()
        opt.second_step(zero_grad=True)
        ref_opt.step()
        assert not opt.last_step_fused
    if lr == 0.0:
        assert_bits_equal(p.detach(), start, "fp64 params after steps at lr = 0")
    assert_bits_equal(p.detach(), ref.detach(), "fp64 params against torch.optim")
    for key, value in ref_opt.state[ref].items():
        assert_bits_equal(opt.base_optimizer.state[p][key], value, f"fp64 state {key}")


@pytest.mark.parametrize("variant", ["sam", "infosam"])
def test_fp64_perturbation_adds_in_fp64(variant):
    """x + e for fp64 parameters is formed in fp64, as eager forms it: in fp32
    x + e would round to fp32 (x is drawn in fp32 here, so the error is that
    rounding, ~6e-8; the norm summed in another order moves e by ~1e-9)."""
    got = run_perturb(triton_backend, MIXED, torch.float64, False, SPECS[variant])
    ref = run_perturb(eager, MIXED, torch.float64, False, SPECS[variant])
    for k, (p, q) in enumerate(zip(got["params"], ref["params"])):
        assert_close(p, q, (torch.float64, 1e-8, 0.0), f"fp64 param {k} after the perturbation")  # fp32 x + e: 6e-8 off
    for k, (p, b) in enumerate(zip(got["restored"], got["before"])):
        assert_bits_equal(p, b, f"restored fp64 param {k}")
