"""What the test files share: tolerances as ``(dtype, atol, rtol)`` tuples,
the optimizer variants with their float64 oracle rows, the tiny training
model, and the two checks every numerics test makes (closeness to the
oracle, bit equality), each naming where and by how much on failure.

Tests parametrize shapes x tolerances, e.g.
``@pytest.mark.parametrize("tol", DTYPES)`` with ``tol = (dtype, atol, rtol)``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oracle import F64, Oracle, Spec
from presam_kernels import ASAM, SAM, FisherSAM, InfoSAM, VaSSO

RHO = 0.05

# -- tolerances: (dtype, atol, rtol) -----------------------------------------------
# fp32 against the float64 value; bf16/fp16 against the float64 value rounded
# to the dtype, allowing one ulp of the dtype (the math is fp32 inside and
# rounds once more on the store).
FP32 = (torch.float32, 1e-6, 1e-5)
BF16 = (torch.bfloat16, 1e-6, 2.0**-7)
FP16 = (torch.float16, 1e-6, 2.0**-10)
# An fp32 sum of the same terms in another order (the global norm): a few fp32
# ulp, whatever the parameters' dtype.
FP32_REORDERED = (torch.float32, 1e-7, 1e-5)
TOLERANCES = {tol[0]: tol for tol in (FP32, BF16, FP16)}
DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(BF16, id="bf16"), pytest.param(FP16, id="fp16")]

# -- shapes: lists of (shape, memory_format), odd sizes, not multiples of any block --
CL = torch.channels_last
LARGE = 4097  # past a 4096-element block by one
SHAPES = {
    "size1": [((1,), None)],
    "size7": [((7,), None)],
    "size4097": [((LARGE,), None)],
    "mixed": [((3, 5), None), ((7,), None), ((1,), None), ((4, 3, 3, 5), CL), ((LARGE,), None), ((2, 1, 3), None)],
    # mixed without a LARGE row, for tests that run many interpreted fused steps
    # (300: two of the interpreter's 256-element chunks, the second masked).
    "mixed_small": [((7,), None), ((33, 5), None), ((300,), None), ((1,), None)],
}
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
# The interpreter dereferences host addresses, compiled kernels device ones.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu")


def interpreted(backend) -> bool:
    """Whether ``backend`` runs its kernels in Triton's interpreter (a Python
    loop over programs and chunks: about a second per step at LARGE)."""
    return backend == "triton" and INTERPRETER


def interpreter_large() -> int:
    """LARGE as the interpreted Triton backend runs it: one program walks two
    whole chunks of the row (programs + 1 of them) and another the masked
    tail of one element, the code paths LARGE takes (1025 at 3 programs of
    256-element chunks), at a quarter of the chunks."""
    from presam_kernels.backends.triton import table

    return (table.INTERPRETER_PROGRAMS + 1) * table.INTERPRETER_CHUNK + 1


# -- the two checks -----------------------------------------------------------------
def assert_close(actual, expected, tol=FP32, what=""):
    """``actual`` (of dtype ``tol[0]``) against ``expected`` (the float64
    oracle, or another run): |actual - expected| <= atol + rtol * |expected|
    elementwise, with a 16-bit ``expected`` first rounded to the dtype. A NaN
    matches only a NaN and an infinity only the same infinity. On failure:
    how many elements are off, the max error, the worst element's flat index
    and both values."""
    dtype, atol, rtol = tol
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, the tolerance is for {dtype}"
    e = expected.detach().to(F64)
    if dtype in (torch.bfloat16, torch.float16):
        e = e.to(dtype).to(F64)
    a = actual.detach().to(F64).reshape(-1)
    e = e.reshape(-1)
    assert a.shape == e.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = torch.where(same, torch.zeros_like(a), (a - e).abs())
    err = torch.nan_to_num(err, nan=float("inf"))
    allowed = torch.where(torch.isfinite(e), atol + rtol * e.abs(), torch.zeros_like(e))
    bad = err > allowed
    if bool(bad.any()):
        k = int(torch.where(bad, err - allowed, torch.full_like(err, -1.0)).nan_to_num(nan=float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements off (atol={atol:g}, rtol={rtol:g}); "
            f"max error {float(err.max()):.6g}; worst at flat index {k}: "
            f"actual {float(a[k])!r}, expected {float(e[k])!r}"
        )


INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}


def bits(t):
    """A float tensor's bits as integers (NaN payloads and signed zeros
    compare too); any other tensor as it is."""
    return t.detach().view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t.detach()


def assert_bits_equal(actual, expected, what=""):
    """Same dtype, shape and bits; on failure how many differ, the first flat
    index and both values."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        diff = (a != e).reshape(-1)
        k = int(diff.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {a.numel()} elements differ bitwise; first at flat index {k}: "
            f"actual {float(actual.reshape(-1)[k])!r}, expected {float(expected.reshape(-1)[k])!r}"
        )


def ulps_apart(a, b):
    """Elementwise distance in units in the last place of ``a``'s dtype (fp32,
    bf16 or fp16; both tensors of that dtype): the gap between the two values
    counted in representable numbers, so 0 means the same bits (up to the sign
    of zero)."""
    assert a.dtype == b.dtype and a.dtype in (torch.float32, torch.bfloat16, torch.float16), (a.dtype, b.dtype)
    int_type, mask = (torch.int32, 0x7FFFFFFF) if a.dtype == torch.float32 else (torch.int16, 0x7FFF)

    def ordered(t):  # sign-magnitude bits to a line of integers
        i = t.detach().contiguous().view(int_type).long()
        return torch.where(i < 0, -(i & mask), i)

    return (ordered(a) - ordered(b)).abs()


def assert_within_ulps(actual, expected, ulps, what=""):
    """Closeness for a result that must equal another computation's rounding
    for rounding (torch.optim's step against a fused one): at most ``ulps``
    units in the last place apart. On failure how many are off, the worst
    distance, its flat index and both values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    dist = ulps_apart(actual, expected).reshape(-1)
    worst = int(dist.argmax())
    assert int(dist[worst]) <= ulps, (
        f"{what}: {int((dist > ulps).sum())} of {dist.numel()} elements more than {ulps} ulp off; worst "
        f"{int(dist[worst])} ulp at flat index {worst}: actual {float(actual.reshape(-1)[worst])!r}, "
        f"expected {float(expected.reshape(-1)[worst])!r}"
    )


def assert_params_close(model, reference, tol=FP32):
    """Every parameter of ``model`` against the same-named one of ``reference``."""
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert_close(a, b, tol, name)


def assert_params_equal(model, reference):
    """Every parameter of ``model`` bit for bit the same-named one of ``reference``
    (a twin run through the same operations)."""
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert_bits_equal(a, b, name)


# -- the variants and their oracle rows -------------------------------------------
@dataclass(frozen=True)
class Variant:
    cls: type
    spec: Spec
    kwargs: dict = field(default_factory=dict)  # constructor keywords besides params, base, rho

    @property
    def has_ema(self) -> bool:
        return self.spec.objective != "gradient"

    @property
    def steps(self) -> int:
        """How many steps a test runs: several for the EMA variants, so that
        the EMA path after the first step is covered."""
        return 3 if self.has_ema else 2

    def make(self, params, rho=RHO, *, flatten, backend, base=torch.optim.SGD, **options):
        """The optimizer over ``base`` (lr = 0 unless ``options`` say otherwise)."""
        options.setdefault("lr", 0.0)
        return self.cls(params, base, rho=rho, flatten=flatten, backend=backend, **self.kwargs, **options)

    @property
    def preconditioner(self):
        """What the optimizer hands its backend for this variant (the backend
        verb tests call the backends with it directly)."""
        return self.make([torch.zeros(1, requires_grad=True)], flatten=False, backend="eager").preconditioner

    def with_(self, **constants):
        """The same variant with other constants (alpha, theta, delta, eta, eps_norm)."""
        return Variant(self.cls, replace(self.spec, **constants), {**self.kwargs, **constants})


VARIANTS = {
    "sam": Variant(SAM, Spec()),
    "sam_adaptive": Variant(SAM, Spec(constraint="adaptive"), {"adaptive": True}),
    "asam": Variant(ASAM, Spec(constraint="asam", eta=0.01), {"eta": 0.01}),
    "fisher": Variant(FisherSAM, Spec(constraint="fisher", eta=1.0), {"eta": 1.0}),
    "vasso": Variant(VaSSO, Spec(objective="ema", theta=0.9), {"theta": 0.9}),
    "infosam": Variant(InfoSAM, Spec(objective="info", alpha=0.9, delta=1e-12), {"alpha": 0.9, "delta": 1e-12}),
    # infoSAM composed with the CP rows (eta defaults: 0.01 for ASAM, 1.0 for Fisher).
    "infosam_asam": Variant(InfoSAM, Spec(objective="info", constraint="asam", eta=0.01), {"constraint": "asam"}),
    "infosam_fisher": Variant(InfoSAM, Spec(objective="info", constraint="fisher", eta=1.0), {"constraint": "fisher"}),
}
EMA_VARIANTS = [name for name, v in VARIANTS.items() if v.has_ema]


# -- tensors and gradients by hand ---------------------------------------------------
def make_tensors(shapes, dtype=torch.float32, device="cpu", scale=1.0, generator=None, backend=None):
    """Random tensors for a list of (shape, memory_format); for the interpreted
    Triton backend a LARGE dimension is cut to ``interpreter_large()``."""
    out = []
    for shape, memory_format in shapes:
        if interpreted(backend):
            shape = tuple(interpreter_large() if n == LARGE else n for n in shape)
        t = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
        t = t.to(device=device, dtype=dtype)
        if memory_format is not None:
            t = t.contiguous(memory_format=memory_format)
        out.append(t)
    return out


def like(xs, scale=1.0, generator=None):
    """Random tensors shaped, strided and typed like ``xs``."""
    out = []
    for x in xs:
        t = torch.empty_like(x)
        t.copy_(torch.randn(x.shape, generator=generator, dtype=torch.float64) * scale)
        out.append(t)
    return out


def noisy_gradients(xs, steps, noise=0.5, generator=None):
    """A steady gradient plus fresh noise per step, as a list of per-step lists."""
    base = like(xs, generator=generator)
    # Sums of same-strided tensors keep the strides (channels_last stays so).
    steps_out = []
    for _ in range(steps):
        steps_out.append([(b.to(F64) + n.to(F64)).to(b.dtype) for b, n in zip(base, like(xs, noise, generator))])
    return steps_out


def new_params(xs):
    return [torch.nn.Parameter(x.clone()) for x in xs]


def set_grad(p, g):
    """The first backward's gradient, by hand (None = no gradient). With
    flatten=True the gradient is a view into the flat buffer: copy into it."""
    if g is None:
        p.grad = None
    elif p.grad is not None:
        p.grad.copy_(g)
    else:
        p.grad = g.clone()


# -- runs against the oracle -------------------------------------------------------
def assert_ema_matches(opt, params, oracle, gs, what):
    """grad_ema (fp32, shaped like its parameter) against the oracle's m, to
    fp32 rounding; then the oracle goes on from the package's m.

    The oracle checks one step at a time: infoSAM's belief (m - g)^2 turns a
    one-ulp difference in m into a large one in u where m is close to g, so
    each step starts both from the same (already checked) m."""
    scale = max(float(g.detach().abs().max()) for g in gs if g is not None)
    for i, p in enumerate(params):
        m = opt.state[p]["grad_ema"]
        assert m.dtype == torch.float32 and m.shape == p.shape, f"{what}: grad_ema {i} is {m.dtype} {tuple(m.shape)}"
        if oracle.m[i] is not None:
            assert_close(m, oracle.m[i], (torch.float32, 1e-6 * scale, 1e-6), f"{what}: grad_ema of param {i}")
            oracle.m[i] = m.detach().to(F64)


def group_list(params, group_of, group_rhos):
    """Param groups from per-parameter group indices; rho per parameter."""
    groups = [{"params": [p for p, k in zip(params, group_of) if k == j], "rho": r} for j, r in enumerate(group_rhos)]
    return groups, [group_rhos[k] for k in group_of]


def run_against_oracle(variant, xs, grad_steps, tol, *, flatten, backend, group_of=None, group_rhos=None, rho=RHO,
                       give_grad=set_grad):
    """Every step: first_step must give the oracle's x + e (and m), second_step
    must give x back bit for bit. ``give_grad(p, g)`` hands each gradient over
    (default: as the first backward would). Returns the optimizer and the oracle."""
    params = new_params(xs)
    if group_of is None:
        opt = variant.make(params, rho, flatten=flatten, backend=backend)
        rhos = [rho] * len(params)
    else:
        groups, rhos = group_list(params, group_of, group_rhos)
        opt = variant.make(groups, flatten=flatten, backend=backend)
    oracle = Oracle(variant.spec, len(params))
    for t, gs in enumerate(grad_steps):
        for p, g in zip(params, gs):
            give_grad(p, g)
        expected = oracle.step(xs, gs, rhos)
        opt.first_step()
        for i, (p, x_adv) in enumerate(zip(params, expected)):
            assert_close(p, x_adv, tol, f"step {t}: x + e of param {i} {tuple(p.shape)}")
        if variant.has_ema:
            assert_ema_matches(opt, params, oracle, gs, f"step {t}")
        opt.second_step()
        for i, (p, x) in enumerate(zip(params, xs)):
            assert_bits_equal(p, x, f"step {t}: restore of param {i}")
    return opt, oracle


# -- a smooth loss for the fused base-step tests ------------------------------------------
def positive_params(shapes, dtype=torch.float32, device="cpu"):
    """Leaf parameters drawn in [1, 2) for a list of (shape, memory_format):
    with ``curvature_backward`` every gradient is positive and every update
    small against x, so no sum cancels and one rounding more or less (FMA or
    not) stays within an ulp or two of the result."""
    out = []
    for shape, memory_format in shapes:
        x = (torch.rand(shape, dtype=F64) + 1.0).to(device=device, dtype=dtype)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        out.append(x.requires_grad_(True))
    return out


def curvature(params, seed=7):
    """The per-element weights a of ``curvature_backward``, in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=gen) + 0.5).to(device=p.device, dtype=p.dtype) for p in params]


def curvature_backward(params, scales):
    """loss = sum 0.5 a x^2 + sin(x): a gradient that depends on x (so x + e matters)."""
    sum((0.5 * a * p * p + torch.sin(p)).sum() for p, a in zip(params, scales)).backward()


# -- a tiny classifier and its batches -------------------------------------------------
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(k: int, n: int = 16, dtype=torch.float32, first_seed: int = 1000):
    """Batch ``k`` of a fixed stream (each test file reads its own stream)."""
    gen = torch.Generator().manual_seed(first_seed + k)
    return torch.randn(n, 5, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def loss_of(model, b):
    return F.cross_entropy(model(b[0]), b[1])


MODES = pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])


# The optimizers the training-loop tests (AMP, state_dict) run on make_model().
TRAINING_VARIANTS = {
    "SAM+SGD": lambda params, flatten: SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                                            flatten=flatten),
    "InfoSAM+SGD": lambda params, flatten: InfoSAM(params, torch.optim.SGD, rho=0.05, alpha=0.9, delta=1e-3,
                                                   lr=0.1, momentum=0.9, flatten=flatten),
    "InfoSAM+Adam": lambda params, flatten: InfoSAM(params, torch.optim.Adam, rho=0.05, alpha=0.9, delta=1e-3,
                                                    lr=0.01, flatten=flatten),
}
# The per-parameter state each of them keeps after a step (base optimizer's and ours).
TRAINING_STATE_KEYS = {
    "SAM+SGD": {"momentum_buffer"},
    "InfoSAM+SGD": {"momentum_buffer", "grad_ema"},
    "InfoSAM+Adam": {"exp_avg", "exp_avg_sq", "step", "grad_ema"},
}


def step_with_unit_gradients(opt, params):
    """One SAM step (both passes) with every gradient set to ones."""
    for p in params:
        p.grad = torch.ones_like(p)
    opt.first_step(zero_grad=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.second_step(zero_grad=True)


def torch_step_from_saved(ref, ref_params, saved, params, state):
    """torch's own base step (``ref`` over ``ref_params``) from the saved x,
    with each parameter's current (second) gradient and a copy of its base
    state from ``state`` (our ``grad_ema`` left out): what a fused
    restore + base step must equal."""
    with torch.no_grad():
        for rp, s, p in zip(ref_params, saved, params):
            rp.copy_(s)
            rp.grad = p.grad.clone()
    ref.state.clear()
    for rp, p in zip(ref_params, params):
        entry = {k: v.clone() for k, v in state[p].items() if k != "grad_ema"}
        if entry:
            ref.state[rp] = entry
    ref.step()


# -- a refused call changes nothing ---------------------------------------------------
def snapshot(opt, params):
    """Everything a refusal must leave alone: parameters (values and storage),
    gradients, per-parameter state, hyperparameters, the optimizer's buffers."""
    def value(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)

    state = {id(p): {k: value(v) for k, v in opt.state[p].items()} for p in params if p in opt.state}
    groups = [{k: value(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    members = [[id(p) for p in g["params"]] for g in opt.param_groups]
    buffers = []
    for b in opt._buckets or []:
        for name in ("backup", "adversarial", "grad_ema", "flat_param", "flat_grad"):
            t = getattr(b.buffers, name)
            buffers.append(None if t is None else t.clone())
    return dict(
        params=[(p.detach().clone(), p.data_ptr()) for p in params],
        grads=[None if p.grad is None else (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for p in params],
        state=state, groups=groups, members=members, buffers=buffers,
        pending=opt._pending is not None, skipped=value(opt.skipped_steps),
    )


def same_value(v, w):
    """Hyperparameter equality where NaN equals NaN (a refused bad rho stays NaN)
    and a tensor equals a tensor of the same dtype, shape and bits."""
    if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor):
        return (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.dtype == w.dtype
                and v.shape == w.shape and torch.equal(bits(v).cpu(), bits(w).cpu()))
    if isinstance(v, float) and isinstance(w, float) and v != v and w != w:
        return True
    return v == w


def assert_same(before, after):
    for (x, ptr), (y, ptr2) in zip(before["params"], after["params"]):
        assert ptr == ptr2 and torch.equal(x, y), "a refused operation moved a parameter"
    for g, h in zip(before["grads"], after["grads"]):
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), "a refused operation changed a gradient"
    assert before["state"].keys() == after["state"].keys()
    for key, entry in before["state"].items():
        assert entry.keys() == after["state"][key].keys()
        for k, v in entry.items():
            w = after["state"][key][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, f"state {k} changed"
    assert before["members"] == after["members"]
    assert len(before["groups"]) == len(after["groups"]), "a refused operation added or removed a param group"
    for k, (g, h) in enumerate(zip(before["groups"], after["groups"])):
        assert g.keys() == h.keys(), f"param group {k}: keys changed"
        for key, v in g.items():
            assert same_value(v, h[key]), f"param group {k}: {key} changed from {v!r} to {h[key]!r}"
    for a, b in zip(before["buffers"], after["buffers"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), "a refused operation wrote a buffer"
    assert before["pending"] == after["pending"]
    assert (before["skipped"] is None) == (after["skipped"] is None)
    if before["skipped"] is not None:
        assert torch.equal(before["skipped"], after["skipped"])
