"""The SAM step's own work: first_step + second_step on given gradients, no
forward or backward, every provider driving the same base SGD(lr=1e-6).

Regimes:
  fresh  gradients are new tensors before every step, as autograd hands them
         out after zero_grad(set_to_none=True) (pedantic setup, untimed);
  kept   gradients stay allocated (our flatten=True lives here).
``test_kernel_bandwidth`` times our perturb + restore alone (no base step) on
uniform sets, for the kernel table.
"""
from __future__ import annotations

import os

import pytest
import torch

import baselines
import shapes
from shapes import DTYPES

REGIMES = ("fresh", "kept")
_VALUES: dict = {}  # the current set's parameter and gradient values (one set at a time)


def _values(set_name, dtype_name, bench):
    key = (set_name, dtype_name, str(bench.device), bench.smoke)
    if key not in _VALUES:
        _VALUES.clear()
        shape_list = shapes.SETS[set_name]() if not set_name.startswith("uniform_") else \
            shapes.uniform(int(set_name.split("_")[1]))
        if bench.smoke:
            shape_list = shapes.tiny(shape_list)
        params = shapes.make_params(shape_list, bench.device, DTYPES[dtype_name])
        _VALUES[key] = ([p.detach() for p in params], shapes.make_grads(params))
    return _VALUES[key]


@pytest.fixture(scope="module", autouse=True)
def _free_values():
    yield
    _VALUES.clear()


def _extra_info(bench, copy_gbps, *, kind, set_name, dtype_name, variant, regime, provider, params, peak):
    numel = sum(p.numel() for p in params)
    esize = params[0].element_size()
    return dict(
        kind=kind, set=set_name, dtype=dtype_name, variant=variant, regime=regime, provider=provider,
        tensors=len(params), numel=numel,
        bytes_model=baselines.BYTES_PER_ELEMENT[(variant, esize)] * numel,
        bytes_base=0 if kind == "kernel" else baselines.base_bytes_per_element(esize) * numel,
        device=bench.device.type, device_name=bench.device_name, copy_gbps=copy_gbps,
        peak_extra_bytes=peak, smoke=bench.smoke, torch=torch.__version__, load1=os.getloadavg()[0],
        code=bench.code_rev,
    )


def _cases():
    """(variant, regime, provider) triples that make sense: flatten=True only
    with kept gradients; the base step alone once per regime (under "sam")."""
    return [
        pytest.param(v, r, p, id=f"{v}-{r}-{p}")
        for v in baselines.VARIANTS for r in REGIMES for p in baselines.PROVIDERS
        if not (r == "fresh" and p.endswith("_flat")) and not (p == "base_only" and v != "sam")
    ]


@pytest.mark.parametrize(("variant", "regime", "provider"), _cases())
def test_step_overhead(benchmark, bench, copy_gbps, set_name, dtype_name, variant, regime, provider):
    reason = baselines.unavailable(provider, variant, bench.device)
    if reason:
        pytest.skip(reason)
    if provider == "loop_compiled" and bench.compiled_only is not None \
            and f"{set_name}/{dtype_name}/{variant}" not in bench.compiled_only:
        pytest.skip("compiled loop not selected by PRESAM_BENCH_COMPILED")

    values, grad_values = _values(set_name, dtype_name, bench)
    params = [v.clone().requires_grad_(True) for v in values]

    def fresh_grads():
        for p, g in zip(params, grad_values):
            p.grad = g.clone()

    fresh_grads()
    probe = bench.memory_probe()
    probe.start()  # parameters and gradients exist; everything else is the optimizer's
    opt = baselines.build(provider, variant, params)

    def step():
        opt.first_step()
        opt.second_step()
        bench.sync()

    setup = fresh_grads if regime == "fresh" else None
    for _ in range(bench.warm_steps):
        if setup:
            setup()
        step()
    peak = probe.stop()

    benchmark.group = f"step {set_name} {dtype_name} {variant} {regime}"
    benchmark.extra_info.update(_extra_info(
        bench, copy_gbps, kind="step", set_name=set_name, dtype_name=dtype_name, variant=variant,
        regime=regime, provider=provider, params=params, peak=peak))
    benchmark.pedantic(step, setup=setup, rounds=bench.rounds, iterations=1)
    assert all(torch.isfinite(p).all() for p in params[:3])


@pytest.mark.parametrize("mode", ("default", "flatten"))
@pytest.mark.parametrize("variant", baselines.VARIANTS)
def test_kernel_bandwidth(benchmark, bench, copy_gbps, kernel_size, dtype_name, variant, mode):
    """Our perturb + restore alone (first_step + restore(), no base step) on 64
    equal tensors: docs/design.md §3's bytes over the time, against the copy."""
    provider = next(p for p in ("ours_triton", "ours_cpp", "ours_eager") if baselines.unavailable(p, variant, bench.device) is None)
    provider += "_flat" if mode == "flatten" else ""
    set_name = f"uniform_{kernel_size}"
    values, grad_values = _values(set_name, dtype_name, bench)
    params = [v.clone().requires_grad_(True) for v in values]
    for p, g in zip(params, grad_values):
        p.grad = g.clone()
    probe = bench.memory_probe()
    probe.start()
    opt = baselines.build(provider, variant, params)

    def perturb_and_restore():
        opt.first_step()
        opt.restore()
        bench.sync()

    for _ in range(bench.warm_steps):
        perturb_and_restore()
    peak = probe.stop()
    benchmark.group = f"kernel {dtype_name} {variant} {set_name}"
    benchmark.extra_info.update(_extra_info(
        bench, copy_gbps, kind="kernel", set_name=set_name, dtype_name=dtype_name, variant=variant,
        regime=mode, provider=provider, params=params, peak=peak))
    benchmark.pedantic(perturb_and_restore, rounds=bench.rounds, iterations=1)
