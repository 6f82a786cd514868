"""The implementations the benchmarks compare ("providers" of one step).

Every provider is built by ``build(provider, variant, params, rho)`` and is an
object with ``first_step()`` / ``second_step()`` (and ``zero_grad``), driving
the same base optimizer: ``torch.optim.SGD(lr=BASE_LR)`` with torch's defaults,
so the base step costs the same everywhere (the ``base_only`` provider times it
alone).

- ``loop``: the per-parameter loop the way most PyTorch code has it.
  SAM: the common SAM wrapper (one ``norm`` per tensor, a stack, a clone of
  every parameter, restore by re-pointing ``p.data``). ASAM: the same loop with
  the official ASAM constraint (c = |x| + eta on weights, 1 elsewhere).
  infoSAM: per tensor, as the authors' reference code does it (EMA, belief,
  division, per-tensor norms, e kept in the state, x += e, restore x -= e).
- ``loop_compiled``: ``torch.compile`` of the loop's perturbation (GPU only).
- ``pytorch_optimizer``: ``pytorch_optimizer.SAM`` when that package is
  installed (SAM only; never installed by us).
- ``ours_eager`` / ``ours_eager_flat`` / ``ours_triton`` / ``ours_triton_flat`` /
  ``ours_cpp`` / ``ours_cpp_flat``: presam_kernels, default mode and
  ``flatten=True``, on each backend (cpp: the C++ extension's CPU kernels).
All loop code below is written for this benchmark from the published
algorithms, not copied from any implementation.
"""
from __future__ import annotations

import importlib.util

import torch

import presam_kernels
from presam_kernels import backends

BASE_LR = 1e-6  # small: the parameters barely move over a benchmark's rounds
RHO = {"sam": 0.05, "asam": 0.5, "infosam": 0.05}
ASAM_ETA = 0.01
INFO_ALPHA = 0.9
INFO_DELTA = 1e-12
INFO_EPS_NORM = 1e-7  # the authors' code adds 1e-7 to the norm

VARIANTS = ("sam", "asam", "infosam")
PROVIDERS = (
    "loop",
    "loop_compiled",
    "pytorch_optimizer",
    "ours_eager",
    "ours_eager_flat",
    "ours_triton",
    "ours_triton_flat",
    "ours_cpp",
    "ours_cpp_flat",
    "base_only",
)
REFERENCE = "loop"  # speedups are against this provider


def base_optimizer(params):
    return torch.optim.SGD(params, lr=BASE_LR)


# -- (a) the common per-parameter loop -------------------------------------
class LoopSAM(torch.optim.Optimizer):
    """SAM as the widely copied wrapper does it: e = rho * g / (||g|| + 1e-12),
    the global norm as a norm of the stacked per-tensor norms.

    ``constraint="asam"`` gives official ASAM semantics in the same loop:
    c = |x| + eta for weights (ndim >= 2), c = 1 otherwise; e = rho c^2 g / ||c g||.
    """

    def __init__(self, params, rho=0.05, constraint="none", eta=ASAM_ETA, compiled=False):
        super().__init__(params, {"rho": rho})
        self.base_optimizer = base_optimizer(self.param_groups)
        self.param_groups = self.base_optimizer.param_groups
        self.constraint = constraint
        self.eta = eta
        self._perturb = torch.compile(_loop_perturb) if compiled else _loop_perturb

    def _c(self, p):
        if self.constraint == "asam" and p.ndim >= 2:
            return p.abs() + self.eta
        return None

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self.state[p]["old_p"] = p.data.clone()
            self._perturb(params, [p.grad for p in params], [self._c(p) for p in params], group["rho"])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def _loop_perturb(params, grads, cs, rho):
    """x += rho c^2 g / (||c g|| + 1e-12), one tensor at a time (c = None: 1).
    One group's norm here; the benchmark sets have one group."""
    device = params[0].device
    norms = [(g if c is None else c * g).norm(p=2).to(device) for g, c in zip(grads, cs)]
    scale = rho / (torch.norm(torch.stack(norms), p=2) + 1e-12)
    for p, g, c in zip(params, grads, cs):
        e_w = g * scale.to(p) if c is None else c * c * g * scale.to(p)
        p.add_(e_w)


# -- (b) infoSAM as the authors' reference code loops ----------------------
class LoopInfoSAM(torch.optim.Optimizer):
    """infoSAM one tensor at a time: m <- alpha m + (1 - alpha) g (m = g on the
    first step), belief = (m - g)^2 (1 on the first step), u = g / (belief + delta),
    e = rho u / (||u|| + 1e-7) with ||u|| the norm of the stacked per-tensor
    norms; x += e, and the restore is x -= e.

    The authors divide by the belief with no floor (0/0 = NaN where m == g);
    we add ``delta`` = 1e-12 as presam_kernels does, which costs the same one
    add per element and keeps the benchmark's numbers finite.
    """

    def __init__(self, params, rho=0.05, alpha=INFO_ALPHA, delta=INFO_DELTA, compiled=False):
        super().__init__(params, {"rho": rho})
        self.base_optimizer = base_optimizer(self.param_groups)
        self.param_groups = self.base_optimizer.param_groups
        self.alpha, self.delta = alpha, delta
        self._perturb = torch.compile(_info_perturb) if compiled else _info_perturb

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if all("m" in self.state[p] for p in params):
                es = self._perturb(params, grads, [self.state[p]["m"] for p in params],
                                   group["rho"], self.alpha, self.delta)
            else:  # the first step: m = g, belief = 1, u = g
                for p in params:
                    self.state[p]["m"] = p.grad.clone()
                es = _info_perturb_first(params, grads, group["rho"])
            for p, e in zip(params, es):
                self.state[p]["e"] = e
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                e = self.state[p].get("e")
                if e is not None:
                    p.sub_(e)
                    self.state[p]["e"] = None
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def _info_perturb(params, grads, ms, rho: float, alpha: float, delta: float):
    """Per tensor: m <- alpha m + (1 - alpha) g; u = g / ((m - g)^2 + delta);
    then x += e = rho u / (||u|| + 1e-7). Returns the e's (kept for the restore)."""
    us = []
    for g, m in zip(grads, ms):
        m.mul_(alpha).add_(g, alpha=1.0 - alpha)
        belief = (m - g) ** 2
        us.append(g / (belief + delta))
    return _add_scaled(params, us, rho)


def _info_perturb_first(params, grads, rho: float):
    return _add_scaled(params, list(grads), rho)


def _add_scaled(params, us, rho):
    norm = torch.norm(torch.stack([u.norm(p=2) for u in us]), p=2)
    scale = rho / (norm + INFO_EPS_NORM)
    es = []
    for p, u in zip(params, us):
        e = u * scale
        p.add_(e)
        es.append(e)
    return es


# -- the base step alone ----------------------------------------------------
class BaseOnly:
    """Only the base SGD step (what every provider's second_step ends with)."""

    def __init__(self, params):
        self.base_optimizer = base_optimizer(params)

    def first_step(self, zero_grad=False):
        pass

    def second_step(self, zero_grad=False):
        self.base_optimizer.step()
        if zero_grad:
            self.base_optimizer.zero_grad()

    def zero_grad(self, set_to_none=True):
        self.base_optimizer.zero_grad(set_to_none=set_to_none)


# -- the registry -----------------------------------------------------------
def triton_backend_available() -> bool:
    return backends._triton_backend_built()


def unavailable(provider: str, variant: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run ``variant`` here, or None when it can."""
    if provider == "loop_compiled" and device.type != "cuda":
        return "torch.compile of the loop: GPU only"
    if provider == "pytorch_optimizer":
        if variant != "sam":
            return "pytorch_optimizer: SAM only in this benchmark"
        if importlib.util.find_spec("pytorch_optimizer") is None:
            return "pytorch_optimizer is not installed"
    if provider.startswith("ours_cpp"):
        if device.type != "cpu":
            return "cpp backend: CPU only"
        if not presam_kernels.extension_available():
            return "the C++ extension is not built"
    if provider.startswith("ours_triton"):
        if device.type != "cuda":
            return "triton backend: CUDA only"
        if not triton_backend_available():
            return "presam_kernels.backends.triton has no perturb yet"
    return None


def build(provider: str, variant: str, params, rho: float | None = None):
    """The optimizer ``provider`` uses for ``variant`` over ``params`` (one group)."""
    rho = RHO[variant] if rho is None else rho
    if provider == "base_only":
        return BaseOnly(params)
    if provider in ("loop", "loop_compiled"):
        compiled = provider == "loop_compiled"
        if variant == "infosam":
            return LoopInfoSAM(params, rho=rho, compiled=compiled)
        return LoopSAM(params, rho=rho, constraint="asam" if variant == "asam" else "none", compiled=compiled)
    if provider == "pytorch_optimizer":
        from pytorch_optimizer import SAM as PyTorchOptimizerSAM

        return PyTorchOptimizerSAM(params, base_optimizer=torch.optim.SGD, rho=rho, lr=BASE_LR)
    if provider.startswith("ours_"):
        backend = provider.split("_")[1]  # ours_<backend>[_flat]
        flatten = provider.endswith("_flat")
        common = dict(lr=BASE_LR, flatten=flatten, backend=backend)
        if variant == "sam":
            return presam_kernels.SAM(params, torch.optim.SGD, rho=rho, **common)
        if variant == "asam":
            return presam_kernels.ASAM(params, torch.optim.SGD, rho=rho, eta=ASAM_ETA, **common)
        return presam_kernels.InfoSAM(params, torch.optim.SGD, rho=rho, alpha=INFO_ALPHA, delta=INFO_DELTA, **common)
    raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")


# docs/design.md §3: bytes per parameter element that the leanest correct
# perturb + restore moves (out of place: K1 reads, K2 reads and writes x + e
# into its own buffer, restore re-points .data), by variant and parameter
# element size (the EMA is fp32). Every provider is credited with these bytes,
# so "% of copy" is at most 100 % for any provider that really does the work;
# one that moves more (in place: +12 B fp32 for SAM; the loops) shows less.
# In-place figures were counted before (SAM fp32 28 B) and gave rows above
# 100 % for the fused out-of-place step.
BYTES_PER_ELEMENT = {
    ("sam", 4): 16, ("sam", 2): 8,
    ("asam", 4): 20, ("asam", 2): 10,
    ("infosam", 4): 28, ("infosam", 2): 20,
}


def base_bytes_per_element(element_size: int) -> int:
    """SGD without momentum: read x and g, write x."""
    return 3 * element_size
