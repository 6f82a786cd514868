"""The "cpp" backend (csrc/, issue 15): the presam_cpp:: ops and what the
optimizer does with them. The oracle tests of the core (test_numerics.py,
test_properties.py) run on "cpp" through the ``backend`` fixture; here: the
fused base update against torch.optim, thread-count determinism, the ops'
schemas (opcheck), errors before anything is written, the eager path for
rows the ops cannot walk, and a package without the extension."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import SHAPES, assert_within_ulps, curvature, curvature_backward, positive_params, torch_step_from_saved
from presam_kernels import SAM, InfoSAM, extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")
ROOT = Path(__file__).resolve().parents[1]


def ops():
    from presam_kernels.backends import cpp  # noqa: F401  (registers the fake kernels)

    return torch.ops.presam_cpp


# -- restore fused with the base update, against torch.optim ----------------------
BASES = {
    "sgd_nesterov_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_dampening_maximize": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    "sgd_plain": (torch.optim.SGD, dict(lr=0.1)),
    "adam_wd": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.02, eps=1e-6)),
    "adamw_large_beta1_weight": (torch.optim.AdamW, dict(lr=3e-3, betas=(0.3, 0.9), weight_decay=0.5)),
    # Every hyperparameter column set, each to its own value: csrc reads the rows by
    # position, base_update writes them by name (SGD_COLUMNS, ADAM_COLUMNS), so an
    # order that disagrees swaps two of these and moves the result.
    "sgd_every_column": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01, maximize=True)),
    "sgd_nesterov_every_column": (
        torch.optim.SGD, dict(lr=0.03, momentum=0.7, nesterov=True, weight_decay=0.02, maximize=True)
    ),
    "adam_every_column": (torch.optim.Adam, dict(lr=0.02, betas=(0.6, 0.8), eps=1e-3, weight_decay=0.05, maximize=True)),
    "adamw_every_column": (
        torch.optim.AdamW, dict(lr=0.02, betas=(0.6, 0.8), eps=1e-3, weight_decay=0.05, maximize=True)
    ),
}
# fp32: SGD and AdamW match torch bit for bit here; coupled-decay Adam is an ulp off on a few
# elements. bf16: torch rounds some scalars to bf16 first (an ulp or two).
DTYPE_ULPS = [pytest.param(torch.float32, 1, id="fp32"), pytest.param(torch.bfloat16, 2, id="bf16")]


@pytest.mark.parametrize("dtype, ulps", DTYPE_ULPS)
@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
@pytest.mark.parametrize("base", list(BASES))
def test_fused_base_update_matches_torch_optim(base, flatten, dtype, ulps):
    """Each step: the fused second_step equals torch's own step from the saved
    x with the second gradient and a copy of the state, within ``ulps``."""
    cls, kwargs = BASES[base]
    params = positive_params(SHAPES["mixed"], dtype)
    opt = SAM(params, cls, rho=0.05, backend="cpp", flatten=flatten, **kwargs)
    ref_params = [torch.zeros_like(p, requires_grad=True) for p in params]
    ref = cls(ref_params, **kwargs)
    for step in range(3):
        saved = [p.detach().clone() for p in params]
        curvature_backward(params, curvature(params, seed=step))
        opt.first_step(zero_grad=True)
        curvature_backward(params, curvature(params, seed=step))
        torch_step_from_saved(ref, ref_params, saved, params, opt.state)
        opt.second_step(zero_grad=True)
        assert opt.last_step_fused, "the fused path was not taken"
        for k, (p, rp) in enumerate(zip(params, ref_params)):
            assert_within_ulps(p, rp, ulps, f"step {step} param {k}")
            for key, value in ref.state[rp].items():
                if key != "step":  # exp_avg_sq holds d^2: an ulp of d is two of it
                    assert_within_ulps(opt.state[p][key], value, 2 * ulps, f"step {step} param {k} {key}")


def test_lr_zero_gives_params_back_bit_for_bit():
    params = positive_params(SHAPES["mixed"])
    before = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.AdamW, rho=0.5, backend="cpp", lr=0.0, weight_decay=0.1)
    for step in range(2):
        curvature_backward(params, curvature(params, seed=step))
        opt.first_step(zero_grad=True)
        curvature_backward(params, curvature(params, seed=step))
        opt.second_step(zero_grad=True)
        assert opt.last_step_fused
    for p, b in zip(params, before):
        assert torch.equal(p.detach().view(torch.int32), b.view(torch.int32))


# -- determinism -------------------------------------------------------------------
def test_norm_and_perturbation_are_the_same_bits_on_one_and_two_threads():
    """The sum of squares is added per fixed chunk, in chunk order: the thread
    count does not change a bit (several chunks per tensor here)."""
    xs = [torch.randn(n, dtype=torch.float64).float() for n in (70_001, 40_000, 5)]
    gs = [torch.randn_like(x) * 1e3 for x in xs]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = [torch.nn.Parameter(x.clone()) for x in xs]
            opt = InfoSAM(params, torch.optim.SGD, rho=0.1, backend="cpp", lr=0.1)
            for step in range(2):
                for p, g in zip(params, gs):
                    p.grad = g * (step + 1)
                opt.first_step()
                if step == 0:
                    opt.second_step()
            results.append((opt.last_perturbation_norm.clone(), [p.detach().clone() for p in params]))
    finally:
        torch.set_num_threads(threads)
    (norm1, x1), (norm2, x2) = results
    assert norm1.view(torch.int32) == norm2.view(torch.int32), (float(norm1), float(norm2))
    for a, b in zip(x1, x2):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# -- the ops' schemas ---------------------------------------------------------------
def _rows(dtype=torch.float32, n=3):
    """Three parameters, their gradients and their slices of flat buffers (offsets 0, 16, 32)."""
    sizes, offsets = [5, 9, 16], [0, 16, 32]
    params = [torch.randn(s, dtype=torch.float64).to(dtype) for s in sizes]
    grads = [torch.randn(s, dtype=torch.float64).to(dtype) for s in sizes]
    return params, grads, offsets


def _flat(dtype):
    return torch.randn(48, dtype=torch.float64).to(dtype)


OPCHECK_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
def test_opcheck_sum_of_squares(dtype):
    params, grads, offsets = _rows(dtype)
    args = (params, grads, _flat(torch.float32), offsets, [1, 0, 1], 3, 2, 0.1, 0.9, 1e-3, 0.01)
    torch.library.opcheck(ops().sum_of_squares, args)


@pytest.mark.parametrize("out_of_place", [False, True], ids=["in_place", "out_of_place"])
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
def test_opcheck_perturb(dtype, out_of_place):
    params, grads, offsets = _rows(dtype)
    op = ops().perturb_out_of_place_ if out_of_place else ops().perturb_
    args = (params, grads, _flat(dtype), _flat(torch.float32), offsets, [0, 1, 0], [3, 2, 1], [0.1, 0.2], 0.5, False,
            3, 1, 0.1, 0.9, 1e-3, 0.01)
    torch.library.opcheck(op, args)


def test_opcheck_restore():
    params, _, offsets = _rows()
    torch.library.opcheck(ops().restore_, (params, _flat(torch.float32), offsets))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_opcheck_restore_step(kind):
    params, grads, offsets = _rows()
    if kind == "sgd":
        hyper, width, states = [0.1, 0.9, 1.0, 0.01, 1.0, 0.0, 0.0], 7, (_flat(torch.float32), None)
    else:
        hyper, width, states = [-0.01, 0.1, 1e-8, 1.0, 0.0, 0.1, 0.999, 0.001, 0.0], 9, (
            _flat(torch.float32), _flat(torch.float32).abs())
    args = (params, grads, _flat(torch.float32), *states, offsets, [0, 0, 0], [2, 0, 2], hyper, width,
            {"sgd": 0, "adam": 1}[kind], True)
    torch.library.opcheck(ops().restore_step_, args)


def _layout_cases():
    x = torch.randn(6, 4)
    t = x.t().contiguous().t()  # column-major
    return {
        "same_layout": ([x], [torch.randn(6, 4)], [torch.empty(6, 4)], True),
        "param_restrided": ([t], [torch.empty_like(t)], [torch.empty(6, 4)], False),
        "grad_restrided": ([x], [torch.empty_like(t)], [torch.empty(6, 4)], False),
        "view_other_shape": ([x], [torch.randn(6, 4)], [torch.empty(24)], False),
        "float64": ([x.double()], [x.double()], [x.double()], False),
        "not_dense": ([x[:, :2]], [x[:, :2]], [x[:, :2]], False),
        "lengths_differ": ([x], [], [], False),
    }


@pytest.mark.parametrize("case", list(_layout_cases()))
def test_rows_are_linear_says_which_rows_the_ops_can_walk(case):
    """The C++ layout check against the expected answer and its fake (Python) kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    params, grads, views, expected = _layout_cases()[case]
    assert ops().rows_are_linear(params, grads, views) is expected
    with FakeTensorMode() as mode:
        fakes = [[mode.from_tensor(t) for t in ts] for ts in (params, grads, views)]
        assert bool(ops().rows_are_linear(*fakes)) is expected


def test_op_with_a_bad_row_raises_before_writing_anything():
    params, grads, offsets = _rows()
    before = [p.clone() for p in params]
    backup = torch.zeros(40)  # the last row (offset 32, 16 elements) runs past it
    with pytest.raises(RuntimeError, match="runs past"):
        ops().perturb_(params, grads, backup, None, offsets, [0, 0, 0], [2, 2, 2], [0.1], 1.0, False, 0, 0,
                       1.0, 0.0, 1e-12, 0.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not backup.any()


# -- the optimizer on the cpp backend ---------------------------------------------------
def test_auto_and_presam_backend_pick_cpp_on_the_cpu(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3))]
    assert SAM(params, torch.optim.SGD, lr=0.1).backend == "cpp"
    monkeypatch.setenv("PRESAM_BACKEND", "cpp")
    assert SAM(params, torch.optim.SGD, lr=0.1).backend == "cpp"


def test_restrided_parameter_takes_the_eager_path_with_the_same_result():
    """A parameter given other strides after the buckets were built cannot be
    walked against its slices of the flat buffers: eager does the call."""
    results = []
    for backend in ("cpp", "eager"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
        opt = InfoSAM(params, torch.optim.SGD, rho=0.1, backend=backend, lr=0.0, perturb="in_place")
        opt.backend  # builds the buckets with the contiguous layout
        params[0].data = params[0].data.t().contiguous().t()  # same values, column-major
        for step in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.first_step()
            # x + e, and the EMA as the state shows it (elementwise: a walk in the wrong
            # order would keep x consistent but scramble grad_ema against its parameter)
            results.append([p.detach().clone() for p in params] + [opt.state[p]["grad_ema"].clone() for p in params])
            opt.second_step()
    cpp, eager = results[:2], results[2:]
    for a, b in zip(cpp, eager):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


_HIDDEN = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["presam_kernels._C"] = None  # as if the build had failed
    import torch
    import presam_kernels
    from presam_kernels import SAM
    assert not presam_kernels.extension_available()
    params = [torch.nn.Parameter(torch.randn(4))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert SAM(params, torch.optim.SGD, lr=0.1).backend == "eager"
        assert SAM(params, torch.optim.SGD, lr=0.1).backend == "eager"
    assert len([w for w in caught if "C++ extension" in str(w.message)]) == 1, [str(w.message) for w in caught]
    try:
        SAM(params, torch.optim.SGD, lr=0.1, backend="cpp").backend
    except ValueError as exc:
        assert "C++ extension" in str(exc), exc
    else:
        raise AssertionError("backend='cpp' without the extension did not raise")
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    params[0].grad = torch.ones(4)
    opt.first_step()
    opt.second_step()
    print("ok")
    """
)


def test_without_the_extension_auto_runs_eager_and_says_so_once_and_cpp_raises():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _HIDDEN], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_setup_installs_without_the_extension_when_the_compiler_fails(tmp_path):
    """setup.py build_ext with a compiler that always fails: a warning, exit status 0."""
    for name in ("setup.py", "README.md"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "csrc").mkdir()
    for source in (ROOT / "csrc").iterdir():
        (tmp_path / "csrc" / source.name).write_text(source.read_text())
    (tmp_path / "presam_kernels").mkdir()
    (tmp_path / "presam_kernels" / "__init__.py").write_text("")
    env = {**os.environ, "CC": "false", "CXX": "false"}
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "the C++ extension did not build" in run.stderr
    assert not list((tmp_path / "presam_kernels").glob("_C*.so"))


def test_float64_parameters_take_the_eager_path_with_the_same_result():
    """The kernels take fp32, bf16 and fp16: a float64 bucket on "cpp" runs eager's arithmetic."""
    results = []
    for backend in ("cpp", "eager"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))]
        opt = InfoSAM(params, torch.optim.SGD, rho=0.1, backend=backend, lr=0.1, momentum=0.9)
        for _ in range(2):
            params[0].grad = torch.randn_like(params[0])
            opt.first_step()
            params[0].grad = torch.randn_like(params[0])
            opt.second_step()
        assert opt.backend == backend
        results.append(params[0].detach().clone())
    assert torch.equal(results[0], results[1])
