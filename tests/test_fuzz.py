"""Property-based fuzzing of the optimizer's promises (issue 13): drawn models
(tied and duplicated weights, frozen tensors, mixed dtypes, transposed,
strided and channels_last layouts, two param groups), drawn operation
sequences (steps, closures, zero_grad both ways, state_dict save and load at
any point, add_param_group, deepcopy, restore, bad rho) and drawn bad
hyperparameters, on both backends, bucket modes and perturbation modes.

Invariants: with lr = 0 the parameters are back at x, bit for bit, whenever
no step is pending (restore is exact, nothing moves); every refused call
leaves the parameters and all state as they were; save, load, continue is
bit-identical to an uninterrupted run; a bad hyperparameter is an error at
construction that touches nothing.

``HYPOTHESIS_PROFILE=thorough`` runs many more examples (local runs); the
default keeps ``make test`` short.  The interpreted Triton backend takes
~0.1 s per step, so it gets few, small examples.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import INTERPRETER, VARIANTS, assert_bits_equal, assert_same, snapshot
from presam_kernels import SAM, InfoSAM, backends, extension_available

# As tests/conftest.py decides (not imported: bench/ has a conftest module too).
BACKENDS = (
    ["eager"]
    + (["cpp"] if extension_available() else [])
    + (["triton"] if backends.triton_available() else [])
)
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
# Examples per test: (eager, triton).
EXAMPLES = (400, 40) if THOROUGH else (25, 5)
TRITON_EXAMPLES = EXAMPLES[1] if INTERPRETER else EXAMPLES[0]


def fuzz_settings(examples):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not THOROUGH,  # the default profile draws the same examples every run
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


CLASSES = {name: VARIANTS[name].cls for name in ("sam", "infosam", "vasso", "asam", "fisher")}
LAYOUTS = ("plain", "scalar", "transposed", "strided", "channels_last")


def make_tensor(layout, dtype, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

    if layout == "plain":
        return randn(5)
    if layout == "scalar":
        return randn(())
    if layout == "transposed":
        return randn(3, 2).t()
    if layout == "strided":
        return randn(2, 6)[:, ::2]  # gaps between elements: not dense
    return randn(1, 2, 2, 3).contiguous(memory_format=torch.channels_last)


param_spec = st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(["fp32", "bf16", "fp64"]), st.booleans())
model_spec = st.fixed_dictionaries(
    {
        "params": st.lists(param_spec, min_size=1, max_size=4),
        "tied": st.booleans(),  # the first tensor listed twice
        "two_groups": st.booleans(),  # the last tensor in a group of its own, rho 0 or 0.2
        "second_rho": st.sampled_from([0.0, 0.2]),
        "variant": st.sampled_from(list(CLASSES)),
        "base": st.sampled_from(["sgd", "adam"]),
        "flatten": st.booleans(),
        "perturb": st.sampled_from(["in_place", "out_of_place"]),
        "seed": st.integers(0, 2**16),
    }
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
OPERATIONS = ("grads", "first", "second", "restore", "zero_none", "zero_keep", "closure", "save", "load",
              "deepcopy", "add_group", "bad_rho_float", "bad_rho_tensor")
operations = st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=10)


def build(spec, backend, lr=0.0):
    gen = torch.Generator().manual_seed(spec["seed"])
    tensors = []
    for layout, dtype, frozen in spec["params"]:
        tensors.append(make_tensor(layout, DTYPES[dtype], gen).requires_grad_(not frozen))
    listed = tensors[:1] * spec["tied"] + tensors
    if spec["two_groups"] and len(tensors) > 1:
        groups = [{"params": listed[:-1]}, {"params": listed[-1:], "rho": spec["second_rho"]}]
    else:
        groups = [{"params": listed}]
    base = torch.optim.SGD if spec["base"] == "sgd" else torch.optim.Adam
    extra = {"momentum": 0.9} if spec["base"] == "sgd" else {}
    opt = CLASSES[spec["variant"]](groups, base, rho=0.1, lr=lr, flatten=spec["flatten"], backend=backend,
                                    perturb=spec["perturb"], **extra)
    return tensors, opt, gen


def set_grads(tensors, gen):
    for p in tensors:
        if p.requires_grad:
            g = torch.empty_like(p)
            g.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
            p.grad = g


def assert_at(tensors, xs, what):
    for k, (p, x) in enumerate(zip(tensors, xs)):
        assert_bits_equal(p, x, f"tensor {k} moved ({what})")


def run_sequence(spec, ops, backend):
    """lr = 0: outside a pending step every parameter is at x, bit for bit;
    a refused call changes nothing."""
    tensors, opt, gen = build(spec, backend)
    xs = [p.detach().clone() for p in tensors]
    saved = None
    for op in ops:
        pending = opt._pending is not None
        before = snapshot(opt, tensors)
        refused = None
        if op == "grads":
            set_grads(tensors, gen)
        elif op == "first":
            refused = RuntimeError if pending else None
        elif op == "second":
            refused = None if pending else RuntimeError
        elif op == "load":
            if saved is None:
                continue
            if pending:
                refused = RuntimeError
            elif len(saved["param_groups"]) != len(opt.param_groups):  # saved before add_param_group
                refused = ValueError
        elif op in ("save", "deepcopy", "add_group"):
            refused = RuntimeError if pending else None
        elif op == "bad_rho_float":
            refused = RuntimeError if pending else ValueError
        if refused is not None:
            with pytest.raises(refused):
                call(op, opt, tensors, gen, saved, xs)
            assert_same(before, snapshot(opt, tensors))
            continue
        if op in ("closure", "bad_rho_tensor") and pending:
            continue  # the closure would write gradients before first_step refuses
        result = call(op, opt, tensors, gen, saved, xs)
        if op == "save":
            saved = result
        if opt._pending is None:
            assert_at(tensors, xs, f"after {op}")
    opt.restore()
    assert_at(tensors, xs, "after restore()")


def call(op, opt, tensors, gen, saved, xs):
    if op == "first":
        opt.first_step()
    elif op == "second":
        opt.second_step()
    elif op == "restore":
        opt.restore()
    elif op == "zero_none":
        opt.zero_grad(set_to_none=True)
    elif op == "zero_keep":
        opt.zero_grad(set_to_none=False)
    elif op == "closure":
        def closure():
            set_grads(tensors, gen)
            return torch.zeros(())

        opt.step(closure)
    elif op == "save":
        return copy.deepcopy(opt.state_dict())
    elif op == "load":
        if saved is not None:
            opt.load_state_dict(saved)
    elif op == "deepcopy":
        twin_tensors, _ = copy.deepcopy((tensors, opt))
        assert_at(twin_tensors, xs, "in the copy")
    elif op == "add_group":
        extra = torch.zeros(3, requires_grad=True)
        opt.add_param_group({"params": [extra]})
        tensors.append(extra)
        xs.append(extra.detach().clone())
    elif op == "bad_rho_float":
        rho = opt.param_groups[0]["rho"]
        opt.param_groups[0]["rho"] = -0.5
        try:
            opt.first_step()
        finally:
            opt.param_groups[0]["rho"] = rho
    elif op == "bad_rho_tensor":
        rho = opt.param_groups[0]["rho"]
        skipped = 0 if opt.skipped_steps is None else int(opt.skipped_steps)
        opt.param_groups[0]["rho"] = torch.tensor(math.nan)
        try:
            set_grads(tensors, gen)
            opt.first_step()
            assert int(opt.skipped_steps) == skipped + 1
            assert_at(tensors, xs, "after a first_step with rho = NaN")
            opt.second_step()
        finally:
            opt.param_groups[0]["rho"] = rho


@fuzz_settings(EXAMPLES[0])
@given(spec=model_spec, ops=operations)
def test_fuzz_operation_sequences_eager(spec, ops):
    run_sequence(spec, ops, "eager")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@fuzz_settings(TRITON_EXAMPLES)
@given(spec=model_spec, ops=st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=5))
def test_fuzz_operation_sequences_triton(spec, ops):
    run_sequence(spec, ops, "triton")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@fuzz_settings(EXAMPLES[0])
@given(spec=model_spec, ops=operations)
def test_fuzz_operation_sequences_cpp(spec, ops):
    run_sequence(spec, ops, "cpp")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_fp64_on_triton_restores_exactly():
    spec = dict(params=[("plain", "fp64", False)], tied=False, two_groups=False, second_rho=0.0,
                variant="sam", base="sgd", flatten=False, perturb="in_place", seed=0)
    gen = torch.Generator().manual_seed(0)
    p = (1 + torch.randn(5, generator=gen, dtype=torch.float64) * 1e-12).requires_grad_()
    opt = SAM([p], torch.optim.SGD, rho=0.1, lr=0.0, momentum=0.9, backend="triton")
    x = p.detach().clone()
    for _ in range(2):
        set_grads([p], gen)
        opt.first_step()
        set_grads([p], gen)
        opt.second_step()
    assert spec
    assert_bits_equal(p, x, "fp64 parameter after two steps at lr = 0")


# -- save, load, continue --------------------------------------------------------
def run_steps(tensors, opt, seeds):
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        set_grads(tensors, gen)
        opt.first_step()
        set_grads(tensors, gen)
        opt.second_step(zero_grad=True)


def check_resume(spec, before, after, backend):
    tensors, opt, _ = build(spec, backend, lr=0.05)
    run_steps(tensors, opt, range(before))
    sd = copy.deepcopy(opt.state_dict())
    xs = [p.detach().clone() for p in tensors]
    run_steps(tensors, opt, range(before, before + after))

    resumed, opt2, _ = build(spec, backend, lr=0.05)
    with torch.no_grad():
        for p, x in zip(resumed, xs):
            p.copy_(x)
    opt2.load_state_dict(sd)
    run_steps(resumed, opt2, range(before, before + after))
    for k, (p, q) in enumerate(zip(tensors, resumed)):
        assert_bits_equal(p, q, f"tensor {k}: resumed run")


@fuzz_settings(EXAMPLES[0])
@given(spec=model_spec, before=st.integers(0, 3), after=st.integers(1, 3))
def test_fuzz_save_load_continue_is_bit_identical_eager(spec, before, after):
    check_resume(spec, before, after, "eager")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@fuzz_settings(TRITON_EXAMPLES)
@given(spec=model_spec, before=st.integers(0, 2), after=st.integers(1, 2))
def test_fuzz_save_load_continue_is_bit_identical_triton(spec, before, after):
    check_resume(spec, before, after, "triton")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@fuzz_settings(EXAMPLES[0])
@given(spec=model_spec, before=st.integers(0, 3), after=st.integers(1, 3))
def test_fuzz_save_load_continue_is_bit_identical_cpp(spec, before, after):
    check_resume(spec, before, after, "cpp")


# -- bad hyperparameters ---------------------------------------------------------
BAD_CONSTRUCTION = {
    "negative rho": ({"rho": -0.1}, None),
    "NaN rho": ({"rho": math.nan}, None),
    "huge rho": ({"rho": 1e300}, None),
    "zero eps_norm": ({"eps_norm": 0.0}, None),
    "tiny infoSAM delta": ({"delta": 1e-40}, "infosam"),
    "alpha 1": ({"alpha": 1.0}, "infosam"),
    "complex tensor": ({}, "complex"),
    "expanded tensor": ({}, "expanded"),
    "NaN group rho": ({"group_rho": math.nan}, None),
}


@fuzz_settings(EXAMPLES[0])
@given(spec=model_spec, bad=st.sampled_from(list(BAD_CONSTRUCTION)), backend=st.sampled_from(BACKENDS))
def test_fuzz_bad_hyperparameters_are_refused_at_construction_touching_nothing(spec, bad, backend):
    kwargs, needs = BAD_CONSTRUCTION[bad]
    kwargs = dict(kwargs)
    gen = torch.Generator().manual_seed(spec["seed"])
    tensors = [make_tensor(layout, torch.float32, gen).requires_grad_() for layout, _, _ in spec["params"]]
    if needs == "complex":
        tensors.append(torch.zeros(2, dtype=torch.complex64, requires_grad=True))
    if needs == "expanded":
        tensors.append(torch.zeros(1, 2).expand(3, 2).requires_grad_())
    set_grads([t for t in tensors if not t.is_complex()], gen)
    cls = InfoSAM if needs == "infosam" else CLASSES[spec["variant"]]
    group = {"params": tensors}
    if "group_rho" in kwargs:
        group["rho"] = kwargs.pop("group_rho")
    ptrs = [(t.data_ptr(), None if t.grad is None else t.grad.data_ptr()) for t in tensors]
    values = [t.detach().clone() for t in tensors]
    with pytest.raises((ValueError, TypeError)):
        cls([group], torch.optim.SGD, lr=0.1, flatten=spec["flatten"], backend=backend, **kwargs)
    for t, ptr, x in zip(tensors, ptrs, values):
        assert (t.data_ptr(), None if t.grad is None else t.grad.data_ptr()) == ptr
        assert_bits_equal(t, x, "a tensor after a refused construction")
