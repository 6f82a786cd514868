"""The perturbation and restore of every variant against the float64 oracle
(docs/design.md §1), over odd shapes, dtypes, param groups, both bucket
modes and every backend.

Gradients are set by hand and the base optimizer is SGD with lr = 0, so
second_step only restores: x is the same before every first_step.
"""
from __future__ import annotations

import pytest
import torch

from helpers import (
    BF16, CL, DTYPES, EMA_VARIANTS, FP32, RHO, SHAPES, TOLERANCES, VARIANTS, assert_bits_equal, assert_close,
    assert_ema_matches, bits, group_list, like, make_tensors, new_params, noisy_gradients, run_against_oracle, set_grad,
)
from oracle import F64, Oracle, Spec


# -- x + e against the oracle ------------------------------------------------------
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_perturbed_point_matches_float64_oracle(name, shapes, tol, flatten, backend, device, core_case):
    core_case(shapes == SHAPES["mixed"] and (tol is FP32 or (name, tol) == ("infosam", BF16)))
    variant = VARIANTS[name]
    xs = make_tensors(shapes, tol[0], device, backend=backend)
    run_against_oracle(variant, xs, noisy_gradients(xs, variant.steps), tol, flatten=flatten, backend=backend)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_norm_is_global_across_param_groups_with_different_rho(name, flatten, backend, device, core_case):
    core_case(name == "infosam")
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    group_of = [0, 1, 2, 1, 0, 2]
    group_rhos = [0.05, 0.5, 0.01]
    variant = VARIANTS[name]
    run_against_oracle(
        variant, xs, noisy_gradients(xs, variant.steps), FP32,
        flatten=flatten, backend=backend, group_of=group_of, group_rhos=group_rhos,
    )


@pytest.mark.parametrize("name", ["sam", "sam_adaptive", "infosam", "vasso"])
def test_norm_is_global_across_dtype_buckets(name, flatten, backend, device, core_case):
    """fp32, bf16 and fp16 parameters in one optimizer: one norm over all of them."""
    core_case(name == "sam")
    xs = [torch.randn(33), torch.randn(5, 7).bfloat16(), torch.randn(17).half(), torch.randn(4, 4)]
    xs = [t.to(device) for t in xs]
    variant = VARIANTS[name]
    grads = noisy_gradients(xs, variant.steps)
    params = new_params(xs)
    opt = variant.make(params, flatten=flatten, backend=backend)
    oracle = Oracle(variant.spec, len(xs))
    for t, gs in enumerate(grads):
        for p, g in zip(params, gs):
            set_grad(p, g)
        expected = oracle.step(xs, gs, [RHO] * len(xs))
        opt.first_step()
        for i, (p, x_adv) in enumerate(zip(params, expected)):
            assert_close(p, x_adv, TOLERANCES[p.dtype], f"step {t}: param {i} ({p.dtype})")
        opt.second_step()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_group_with_rho_zero_is_bitwise_unchanged_but_counts_in_norm(name, flatten, backend, device, core_case):
    core_case(name == "infosam")
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    group_of = [0, 1, 0, 0, 1, 1]  # the 4097-element tensor is in the rho = 0 group
    group_rhos = [0.1, 0.0]
    variant = VARIANTS[name]
    grads = noisy_gradients(xs, variant.steps)
    steady = like(xs)
    for gs in grads:  # a large steady part: the rho = 0 group dominates the norm of every variant
        for i, k in enumerate(group_of):
            if k == 1:
                gs[i] = gs[i] + 10 * steady[i]
    params = new_params(xs)
    groups, rhos = group_list(params, group_of, group_rhos)
    opt = variant.make(groups, flatten=flatten, backend=backend)
    oracle = Oracle(variant.spec, len(xs))
    without = Oracle(variant.spec, len(xs))
    for t, gs in enumerate(grads):
        for p, g in zip(params, gs):
            set_grad(p, g)
        expected = oracle.step(xs, gs, rhos)
        local = without.step(xs, [g if k == 0 else None for g, k in zip(gs, group_of)], rhos)
        if variant.has_ema:
            without.m = list(oracle.m)
        # A norm over the perturbed group only would move x + e by far more than the tolerance.
        assert max(float((a - b).abs().max()) for a, b, k in zip(expected, local, group_of) if k == 0) > 1e-3
        opt.first_step()
        for i, (p, x, x_adv) in enumerate(zip(params, xs, expected)):
            if group_of[i] == 1:
                assert_bits_equal(p, x, f"step {t}: param {i} in the rho = 0 group")
            else:
                assert_close(p, x_adv, FP32, f"step {t}: param {i}")
        if variant.has_ema:
            assert_ema_matches(opt, params, oracle, gs, f"step {t}")
        opt.second_step()
        for i, (p, x) in enumerate(zip(params, xs)):
            assert_bits_equal(p, x, f"step {t}: restore of param {i}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_without_gradient_is_neither_perturbed_nor_its_ema_touched(name, flatten, backend, device, core_case):
    """Step 2 gives parameter 3 (a channels_last conv weight) no gradient: it
    is not written, its grad_ema keeps its bits, and it is left out of the norm."""
    core_case(name == "infosam")
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    variant = VARIANTS[name]
    grads = noisy_gradients(xs, 3)
    missing = 3
    grads[1][missing] = None
    params = new_params(xs)
    opt = variant.make(params, flatten=flatten, backend=backend)
    oracle = Oracle(variant.spec, len(xs))
    for t, gs in enumerate(grads):
        for p, g in zip(params, gs):
            set_grad(p, g)
        ema_before = opt.state[params[missing]]["grad_ema"].clone() if variant.has_ema and t else None
        expected = oracle.step(xs, gs, [RHO] * len(xs))
        opt.first_step()
        for i, (p, x_adv) in enumerate(zip(params, expected)):
            if gs[i] is None:
                assert_bits_equal(p, xs[i], f"step {t}: param {i} without gradient")
            else:
                assert_close(p, x_adv, FP32, f"step {t}: param {i}")
        if ema_before is not None:
            if gs[missing] is None:
                m = opt.state[params[missing]]["grad_ema"]
                assert_bits_equal(m, ema_before, f"step {t}: grad_ema without gradient")
            assert_ema_matches(opt, params, oracle, [g for g in gs if g is not None], f"step {t}")
        opt.second_step()
        for i, (p, x) in enumerate(zip(params, xs)):
            assert_bits_equal(p, x, f"step {t}: restore of param {i}")


# -- restore -------------------------------------------------------------------
@pytest.mark.parametrize("tol", DTYPES)
@pytest.mark.parametrize("name", ["sam", "asam", "fisher", "infosam", "vasso"])
def test_restore_is_bit_exact(name, tol, flatten, backend, device, core_case):
    """x comes back bit for bit after second_step, including a parameter that
    got no gradient in the second backward (x - e would be off by an ulp)."""
    core_case(name == "infosam" and tol[0] == torch.bfloat16)
    dtype = tol[0]
    xs = make_tensors(SHAPES["mixed"], dtype, device, backend=backend)
    variant = VARIANTS[name]
    params = new_params(xs)
    opt = variant.make(params, rho=2.0, flatten=flatten, backend=backend)
    for t, gs in enumerate(noisy_gradients(xs, 3)):
        for p, g in zip(params, gs):
            set_grad(p, g)
        opt.first_step()
        changed = sum(int((bits(p) != bits(x)).sum()) for p, x in zip(params, xs))
        assert changed > 0, f"step {t}: first_step moved nothing, so restore would prove nothing"
        for p, g in zip(params, like(xs)):  # the second backward; parameter 1 gets no gradient
            set_grad(p, g)
        params[1].grad = None
        opt.second_step()
        for i, (p, x) in enumerate(zip(params, xs)):
            assert_bits_equal(p, x, f"step {t}: restore of param {i} ({dtype})")


@pytest.mark.parametrize("tol", DTYPES)
def test_restore_method_puts_parameters_back_bit_exact(tol, flatten, backend, device, core_case):
    core_case(tol[0] == torch.float32)
    xs = make_tensors(SHAPES["mixed"], tol[0], device, backend=backend)
    params = new_params(xs)
    opt = VARIANTS["infosam"].make(params, rho=0.5, flatten=flatten, backend=backend)
    for p, g in zip(params, like(xs)):
        set_grad(p, g)
    opt.first_step()
    opt.restore()
    for i, (p, x) in enumerate(zip(params, xs)):
        assert_bits_equal(p, x, f"restore() of param {i}")


# -- determinism -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_perturbation_norm_and_params_are_identical_run_to_run(name, flatten, backend, device, core_case):
    core_case(name == "infosam")
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    variant = VARIANTS[name]
    grads = noisy_gradients(xs, variant.steps)
    runs = []
    for _ in range(2):
        params = new_params(xs)
        groups, _ = group_list(params, [0, 1, 0, 1, 0, 1], [0.05, 0.2])
        opt = variant.make(groups, flatten=flatten, backend=backend)
        trace = []
        for gs in grads:
            for p, g in zip(params, gs):
                set_grad(p, g)
            opt.first_step()
            trace.append((opt.last_perturbation_norm.clone(), [p.detach().clone() for p in params]))
            opt.second_step()
        runs.append(trace)
    for t, ((norm_a, params_a), (norm_b, params_b)) in enumerate(zip(*runs)):
        assert torch.equal(norm_a, norm_b), f"step {t}: norm {norm_a.item()!r} then {norm_b.item()!r}"
        for i, (a, b) in enumerate(zip(params_a, params_b)):
            assert_bits_equal(a, b, f"step {t}: param {i} run to run")


# -- eps_norm ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sam", "vasso", "infosam"])
def test_eps_norm_is_added_after_the_square_root(name, flatten, backend, device, core_case):
    """Gradients with ||g|| = eps_norm = 1e-12: e = rho g / (||g|| + eps) has
    norm rho / 2 (sqrt(||g||^2 + eps) would give 1e-6 rho)."""
    core_case(name == "sam")
    x = torch.zeros(7, device=device)
    g = torch.randn(7, dtype=F64)
    g = (g / g.norm() * 1e-12).float().to(device)
    variant = VARIANTS[name]
    params = new_params([x])
    opt = variant.make(params, rho=1.0, flatten=flatten, backend=backend)
    set_grad(params[0], g)
    opt.first_step()
    assert_close(params[0], Oracle(variant.spec, 1).step([x], [g], [1.0])[0], (torch.float32, 1e-9, 1e-5), "x + e")
    assert abs(float(params[0].detach().double().norm()) - 0.5) < 1e-5


def test_custom_eps_norm_is_added_after_the_square_root(flatten, backend, device, core_case):
    core_case(False)
    x = torch.randn(33).to(device)
    g = (torch.randn(33) * 1e-3).to(device)
    variant = VARIANTS["sam"].with_(eps_norm=1e-2)
    run_against_oracle(variant, [x], [[g]], FP32, flatten=flatten, backend=backend, rho=1.0)


def test_infosam_eps_norm_matches_oracle_after_first_step(flatten, backend, device, core_case):
    """After the first step infoSAM's norm is ||g / (belief + delta)||: with a
    constant gradient (belief 0) of norm eps_norm * delta it equals eps_norm,
    so e is half as long as rho only if the scaled evaluation scales eps_norm
    by delta exactly.  (delta = 1e-3 keeps the squares of the scaled direction
    inside fp32's range, where the norm is accumulated; with delta = 1e-12 they
    would underflow, as in any fp32 SAM.)"""
    core_case(True)
    delta = 1e-3
    x = torch.zeros(9, device=device)
    g = torch.randn(9, dtype=F64)
    g = (g / g.norm() * 1e-12 * delta).float().to(device)
    tol = (torch.float32, 1e-9, 1e-4)
    variant = VARIANTS["infosam"].with_(delta=delta)
    run_against_oracle(variant, [x], [[g]] * 3, tol, flatten=flatten, backend=backend, rho=1.0)


# -- constants of the variants -----------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("delta", [1e-12, 1e-3, 1.0])
def test_infosam_matches_oracle_for_alpha_and_delta(alpha, delta, flatten, backend, device, core_case):
    core_case((alpha, delta) == (0.99, 1e-12))
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    variant = VARIANTS["infosam"].with_(alpha=alpha, delta=delta)
    run_against_oracle(variant, xs, noisy_gradients(xs, 4), FP32, flatten=flatten, backend=backend)


def test_infosam_alpha_zero_keeps_ema_equal_to_gradient(flatten, backend, device, core_case):
    """alpha = 0: m = g, belief = 0, u = g / delta: the SAM direction, finite."""
    core_case(False)
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    variant = VARIANTS["infosam"].with_(alpha=0.0)
    grads = noisy_gradients(xs, 3)
    opt, _ = run_against_oracle(variant, xs, grads, FP32, flatten=flatten, backend=backend)
    for i, (p, g) in enumerate(zip(opt.param_groups[0]["params"], grads[-1])):
        assert_bits_equal(opt.state[p]["grad_ema"], g, f"grad_ema of param {i}")


@pytest.mark.parametrize("theta", [0.1, 0.5, 1.0])
def test_vasso_matches_oracle_for_theta(theta, flatten, backend, device, core_case):
    core_case(False)
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    variant = VARIANTS["vasso"].with_(theta=theta)
    run_against_oracle(variant, xs, noisy_gradients(xs, 3), FP32, flatten=flatten, backend=backend)


@pytest.mark.parametrize("eta", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("name", ["asam", "fisher"])
def test_constraint_matches_oracle_for_eta(name, eta, flatten, backend, device, core_case):
    core_case((name, eta) == ("asam", 1.0))
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    xs[0].zero_()  # a weight at zero: c = eta there
    variant = VARIANTS[name].with_(eta=eta)
    run_against_oracle(variant, xs, noisy_gradients(xs, 2, noise=2.0), FP32, flatten=flatten, backend=backend)


def test_asam_weights_are_named_weight_when_names_are_given(flatten, backend, device, core_case):
    """Official ASAM: c = |x| + eta where the name contains "weight" (a 1-D
    norm weight included), 1 for biases (a 2-D "bias" included)."""
    core_case(True)
    named = [
        ("conv.weight", torch.randn(4, 3, 3, 3).contiguous(memory_format=CL)),
        ("conv.bias", torch.randn(4)),
        ("bn.weight", torch.randn(4)),
        ("bn.bias", torch.randn(4)),
        ("odd.bias", torch.randn(2, 3)),
        ("fc.weight", torch.zeros(5, 4)),
    ]
    named = [(n, t.to(device)) for n, t in named]
    xs = [t for _, t in named]
    is_weight = ["weight" in n for n, _ in named]
    params = new_params(xs)
    variant = VARIANTS["asam"]
    opt = variant.make(list(zip([n for n, _ in named], params)), rho=0.5, flatten=flatten, backend=backend)
    oracle = Oracle(variant.spec, len(xs))
    for t, gs in enumerate(noisy_gradients(xs, 2)):
        for p, g in zip(params, gs):
            set_grad(p, g)
        expected = oracle.step(xs, gs, [0.5] * len(xs), is_weight)
        opt.first_step()
        for i, (p, x_adv) in enumerate(zip(params, expected)):
            assert_close(p, x_adv, FP32, f"step {t}: {named[i][0]}")
        opt.second_step()


def test_sam_adaptive_scales_biases_by_abs_x_without_eta(flatten, backend, device, core_case):
    """adaptive=True: c = |x| everywhere, so a bias at zero is not perturbed."""
    core_case(False)
    xs = [t.to(device) for t in (torch.randn(6, 5), torch.zeros(5), torch.randn(5))]
    params = new_params(xs)
    opt = VARIANTS["sam_adaptive"].make(params, flatten=flatten, backend=backend)
    gs = like(xs)
    for p, g in zip(params, gs):
        set_grad(p, g)
    expected = Oracle(VARIANTS["sam_adaptive"].spec, 3).step(xs, gs, [RHO] * 3)
    opt.first_step()
    assert_bits_equal(params[1], xs[1], "bias at zero")
    for i, (p, x_adv) in enumerate(zip(params, expected)):
        assert_close(p, x_adv, FP32, f"param {i}")


# -- infoSAM ---------------------------------------------------------------------
@pytest.mark.parametrize("tol", DTYPES)
def test_infosam_first_step_equals_sam_exactly(tol, flatten, backend, device, core_case):
    core_case(tol[0] == torch.float32)
    xs = make_tensors(SHAPES["mixed"], tol[0], device, backend=backend)
    gs = like(xs)
    results = []
    for name in ["sam", "infosam"]:
        params = new_params(xs)
        opt = VARIANTS[name].make(params, rho=0.3, flatten=flatten, backend=backend)
        for p, g in zip(params, gs):
            set_grad(p, g)
        opt.first_step()
        results.append((opt.last_perturbation_norm.clone(), [p.detach().clone() for p in params]))
    (norm_sam, sam), (norm_info, info) = results
    assert torch.equal(norm_sam, norm_info)
    expected = Oracle(VARIANTS["sam"].spec, len(xs)).step(xs, gs, [0.3] * len(xs))
    for i, (a, b, x_adv) in enumerate(zip(sam, info, expected)):
        assert_bits_equal(b, a, f"infoSAM vs SAM, param {i}")
        assert_close(b, x_adv, tol, f"infoSAM first step, param {i}")


def test_infosam_constant_gradient_gives_finite_sam_direction(flatten, backend, device, core_case):
    """m == g exactly from the second step on: belief = 0 and u = g / delta,
    finite thanks to delta, which is SAM's direction; a parameter whose
    gradient is zero every step gets no perturbation (0 / delta, not 0 / 0)."""
    core_case(True)
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    gs = like(xs)
    gs[2] = torch.zeros_like(xs[2])
    sam_point = Oracle(Spec(), len(xs)).step(xs, gs, [RHO] * len(xs))
    params = new_params(xs)
    opt = VARIANTS["infosam"].make(params, flatten=flatten, backend=backend)
    for t in range(3):
        for p, g in zip(params, gs):
            set_grad(p, g)
        opt.first_step()
        assert bool(torch.isfinite(opt.last_perturbation_norm)), f"step {t}: norm {opt.last_perturbation_norm}"
        for i, (p, x_adv) in enumerate(zip(params, sam_point)):
            assert_close(p, x_adv, FP32, f"step {t}: param {i} along SAM's direction")
        opt.second_step()


def test_infosam_huge_gradient_to_belief_ratio_does_not_overflow(flatten, backend, device, core_case):
    """Steady coordinates of size 1e8 (belief 0) next to noisy ones: the plain
    g / (belief + delta) is 1e20 and its square overflows fp32; the result must
    still be finite and match the oracle."""
    core_case(True)
    x = torch.randn(257).to(device)
    steady = torch.randn(257, dtype=F64) * 1e8
    noisy = torch.rand(257) < 0.5
    grads = []
    for _ in range(4):
        g = steady + torch.where(noisy, torch.randn(257, dtype=F64) * 1e7, 0.0)
        grads.append([g.float().to(device)])
    assert torch.isinf(((grads[1][0] / 1e-12) ** 2).sum())  # the naive evaluation would overflow
    opt, _ = run_against_oracle(VARIANTS["infosam"], [x], grads, FP32, flatten=flatten, backend=backend)
    assert bool(torch.isfinite(opt.last_perturbation_norm))


def test_infosam_tiny_ema_differences_match_oracle(flatten, backend, device, core_case):
    """A gradient that is constant up to 1e-6 relative noise: belief ~ 1e-12,
    as small as delta, formed from m - g without cancellation."""
    core_case(False)
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    base = like(xs)
    grads = []
    for _ in range(4):
        grads.append([(b.double() * (1 + 1e-6 * torch.randn(b.shape, dtype=F64, device=device))).float() for b in base])
    run_against_oracle(VARIANTS["infosam"], xs, grads, FP32, flatten=flatten, backend=backend)


@pytest.mark.parametrize("scale", [1e-20, 1e4, 1e10, 1e12])
def test_infosam_noisy_gradients_of_extreme_size_match_oracle(scale, flatten, backend, device, core_case):
    """Pure noise of size 1e10 (1e12): u' = g / (1 + belief / delta) is about
    1e-22 (1e-24), whose square underflows fp32; the norm must not lose it.
    Size 1e-20: belief far below delta."""
    core_case(scale == 1e10)
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    grads = [like(xs, scale) for _ in range(4)]
    run_against_oracle(VARIANTS["infosam"], xs, grads, FP32, flatten=flatten, backend=backend)


@pytest.mark.parametrize("name", EMA_VARIANTS)
def test_step_after_skipped_first_step_is_plain_sam(name, flatten, backend, device, core_case):
    """A first step with non-finite gradients does not count: the next one is
    plain SAM and sets m = g."""
    core_case(name == "infosam")
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    bad = like(xs)
    bad[4][100] = float("inf")
    gs = like(xs)
    params = new_params(xs)
    opt = VARIANTS[name].make(params, flatten=flatten, backend=backend)
    for p, g in zip(params, bad):
        set_grad(p, g)
    opt.first_step()
    for p, g in zip(params, like(xs)):  # the second backward's gradients are finite
        set_grad(p, g)
    opt.second_step()
    for p, g in zip(params, gs):
        set_grad(p, g)
    oracle = Oracle(VARIANTS[name].spec, len(xs))  # a fresh oracle: the skipped step never happened
    expected = oracle.step(xs, gs, [RHO] * len(xs))
    opt.first_step()
    for i, (p, x_adv) in enumerate(zip(params, expected)):
        assert_close(p, x_adv, FP32, f"param {i}")
    for i, (p, g) in enumerate(zip(params, gs)):
        assert_close(opt.state[p]["grad_ema"], g, (torch.float32, 0.0, 1e-7), f"grad_ema of param {i}")


# -- non-finite gradients ------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_non_finite_gradient_perturbs_nothing_and_keeps_ema(name, bad_value, flatten, backend, device, core_case):
    """Step 2 has one non-finite gradient element: no parameter is written, the
    EMA keeps its bits, skipped_steps (a tensor) counts it, and step 3 goes on
    from the EMA of step 1."""
    core_case((name, repr(bad_value)) in (("sam", "inf"), ("infosam", "nan")))
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)
    variant = VARIANTS[name]
    grads = noisy_gradients(xs, 3)
    grads[1][4][-97] = bad_value  # a whole chunk past the first, not the tail (element 4000, or 928 interpreted)
    params = new_params(xs)
    opt = variant.make(params, flatten=flatten, backend=backend)
    oracle = Oracle(variant.spec, len(xs))
    for t, gs in enumerate(grads):
        for p, g in zip(params, gs):
            set_grad(p, g)
        ema_before = [opt.state[p]["grad_ema"].clone() for p in params] if variant.has_ema and t else None
        opt.first_step()
        if t == 1:
            assert isinstance(opt.skipped_steps, torch.Tensor)
            assert int(opt.skipped_steps) == 1
            if ema_before is not None:
                for i, (p, m) in enumerate(zip(params, ema_before)):
                    assert_bits_equal(opt.state[p]["grad_ema"], m, f"grad_ema of param {i} after a skipped step")
            for i, (p, x) in enumerate(zip(params, xs)):
                assert_bits_equal(p, x, f"param {i} after a skipped step")
        else:
            expected = oracle.step(xs, gs, [RHO] * len(xs))
            assert int(opt.skipped_steps) == (t > 1)
            for i, (p, x_adv) in enumerate(zip(params, expected)):
                assert_close(p, x_adv, FP32, f"step {t}: param {i}")
            if variant.has_ema:
                assert_ema_matches(opt, params, oracle, gs, f"step {t}")
        for p, g in zip(params, like(xs)):  # the second backward's gradients are finite
            set_grad(p, g)
        opt.second_step()
        for i, (p, x) in enumerate(zip(params, xs)):
            assert_bits_equal(p, x, f"step {t}: restore of param {i}")


# -- flatten=True ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sam", "infosam"])
def test_flatten_adopts_a_replaced_gradient(name, backend, device, core_case):
    """flatten=True: a gradient assigned as a new tensor is copied back in, not dropped."""
    core_case(name == "infosam")
    xs = make_tensors(SHAPES["mixed"], device=device, backend=backend)

    def assign_new_tensor(p, g):
        p.grad = g.clone()

    run_against_oracle(VARIANTS[name], xs, noisy_gradients(xs, 3), FP32, flatten=True, backend=backend,
                       give_grad=assign_new_tensor)
