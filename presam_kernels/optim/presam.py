"""PreSAM: the one optimizer core behind SAM, ASAM, InfoSAM, VaSSO and FisherSAM.

It owns the param groups (shared with the base optimizer), the buckets, the
two-step protocol and the state_dict; it never does elementwise math itself:
each step it gathers the bucket tables and calls the backend's verbs.
"""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable

import torch
from torch.optim import Optimizer

from .. import _host, backends, base_update
from ..buckets import _is_dtensor, build_buckets, local
from ..preconditioners import Constraint, Objective, Preconditioner, check_finite_number
from . import amp, library_ops
from .ema import EmaReady
from .pending_step import PendingStep
from .steady import SteadyStep

# Keys of ours in optimizer.state[p], beside the base optimizer's own keys
# (exp_avg, momentum_buffer, ...): chosen so that they cannot collide.
GRAD_EMA = "grad_ema"
# Saved in the state_dict only: whether the EMA has had a successful step.
GRAD_EMA_READY = "grad_ema_ready"
# Keys a checkpoint of the common SAM wrapper holds per parameter: transient.
_COMMON_WRAPPER_KEYS = frozenset({"old_p", "e_w"})
PERTURB_MODES = ("auto", "in_place", "out_of_place")
# Base optimizer state keys (torch.optim) that hold one value per parameter element.
_PER_ELEMENT_STATE = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg"})

# Between first_step and second_step the parameters hold x + e: every operation
# that reads or replaces the optimizer's parameters, layout or state refuses then.
_MIDSTEP = (
    "{what} between first_step() and second_step(): the parameters hold the perturbed "
    "point x + e now; call opt.second_step() (after the second backward) or opt.restore() "
    "(puts them back at x and drops the pending step) first"
)
FIRST_PASS_MODES = ("auto", "present", "closure", "done")
# Attribute set on a gradient tensor by the optimizer: its version when the
# optimizer last stepped or zeroed it (step(closure)'s first-pass rule).
_SEEN_VERSION = "_presam_seen_version"

_STEP_WITHOUT_CLOSURE = (
    "{cls}.step() needs a closure that runs the forward and backward pass, because "
    "sharpness-aware minimization evaluates the gradient twice. Either call "
    "opt.step(closure) with closure() doing loss = loss_fn(model(x), y); loss.backward(); "
    "return loss, or use the two-step API: loss.backward(); opt.first_step(zero_grad=True); "
    "loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)."
)


def _split_names(params):
    """(groups as a list of dicts with plain tensors, names per tensor or None)."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of tensors, of (name, tensor) pairs or of dicts, "
            f"got a single {type(params).__name__}; wrap it in a list"
        )
    items = list(params)
    if not items:
        raise ValueError("params is empty: the optimizer got no parameters to optimize")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out, names = [], []
    for group in groups:
        if not isinstance(group, dict):
            raise TypeError("params must be all dicts (param groups) or no dicts at all")
        group = dict(group)
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        # torch >= 2.5 optimizers built on named parameters keep the names in
        # their groups: ASAM(base.param_groups, base) then knows them.
        given = group.get("param_names")
        given = list(given) if given is not None and len(given) == len(members) else [None] * len(members)
        plain, seen = [], set()
        for m, given_name in zip(members, given):
            name, tensor = m if isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], str) else (given_name, m)
            if id(tensor) in seen:
                continue  # listed twice (a tied weight): one row, one backup
            seen.add(id(tensor))
            names.append(name)
            plain.append(tensor)
        group["params"] = plain
        out.append(group)
    return out, names


def _check_param(p):
    """Raise ValueError for a parameter the perturbation cannot handle."""
    if p.is_complex():
        raise ValueError(
            f"complex parameters are not supported (got one of dtype {p.dtype}, shape {tuple(p.shape)}): "
            "hold the real and imaginary parts as a real parameter (e.g. torch.view_as_real's layout) "
            "or optimize it with a plain torch optimizer"
        )
    shard = local(p)
    if any(st == 0 and n > 1 for n, st in zip(shard.shape, shard.stride())) or torch._debug_has_internal_overlap(shard) == 1:
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} has overlapping memory (strides {p.stride()}, e.g. "
            "from expand()): one element stands for several, which a perturbation cannot write; "
            "make it dense first (nn.Parameter(t.clone()))"
        )


def _check_rho(value, where="rho"):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = float(value)  # construction and load time only, never inside a step
    check_finite_number(where, value, low=0.0, hint="; use rho >= 0 (rho = 0 disables the perturbation)")


def _grad_disabled(func):
    """``@torch.no_grad()`` for the eager steps, at a fifth of its host cost
    (0.7 us a call against 3.5, twice a step: bench/RESULTS.md, after "CPU
    (host)"); torch.compile traces neither (its steps are the presam:: ops)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return func(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(enabled)

    return wrapper


def _step_hooks(func):
    """torch's ``Optimizer.profile_hook_step``: the step pre- and post-hooks
    (global, then the optimizer's; a pre-hook may return new arguments) and
    the profiler's ``Optimizer.step#<class>.step`` range, which is opened only
    while a profiler runs: its record_function costs ~15 us a step even with
    none, a tenth of a ResNet-50 step's host time (bench/RESULTS.md "CPU (host)")."""
    from torch.optim import optimizer as optimizer_module

    def hooked(self, args, kwargs):
        # As torch's: the hooks see the positional arguments with the optimizer first.
        for pre_hook in (*optimizer_module._global_optimizer_pre_hooks.values(),
                         *self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
                args, kwargs = result
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        for post_hook in (*self._optimizer_step_post_hooks.values(),
                          *optimizer_module._global_optimizer_post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        if torch._C._autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return hooked(self, (self, *args), kwargs)
        return hooked(self, (self, *args), kwargs)

    return wrapper


class PreSAM(Optimizer):
    """Sharpness-aware minimization with an objective and a constraint preconditioner.

    One step: g = grad f(x); u = D^-1 g; e = rho c^2 u / (||c u|| + eps_norm)
    with one global norm over every parameter that has a gradient; the second
    gradient is taken at x + e; x is restored exactly and ``base_optimizer``
    steps with that gradient.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``)
            or param groups; a group may set its own ``rho``.
        base_optimizer: an optimizer class (built on our param groups with
            ``**base_kwargs``) or an optimizer instance.
        rho: radius of the ball ||C e|| <= rho.
        objective: ``"gradient"`` (u = g), ``"ema"`` (VaSSO, weight ``theta``
            on the new gradient) or ``"info"`` (infoSAM, weight ``alpha`` on
            the old EMA, floor ``delta``).
        constraint: ``"none"`` (c = 1), ``"adaptive"`` (c = |x|),
            ``"asam"`` (c = |x| + eta on weights, 1 elsewhere) or
            ``"fisher"`` (c = 1 / sqrt(1 + eta g^2)).
        eps_norm: added to the norm after the square root.
        flatten: re-point parameters and gradients into one flat buffer per
            (device, dtype); gradients then stay allocated (``zero_grad``
            zeroes them in one op).
        backend: ``"auto"``, ``"eager"``, ``"triton"`` or ``"cpp"`` (the C++
            extension's CPU kernels); ``PRESAM_BACKEND`` overrides ``"auto"``.
        perturb: ``"in_place"`` (x += e, x saved in a backup and copied back),
            ``"out_of_place"`` (x + e written to a buffer of ours and each
            parameter's ``.data`` pointed at it for the second pass, then
            back: no backup, no copy) or ``"auto"`` (per bucket, whichever
            measured faster for its tensor sizes; see ``_OUT_OF_PLACE_MIN_AVG``).
            Out of place, code that caches a parameter's storage address
            across the two passes (CUDA graphs, cuDNN RNN flat weights) sees
            the switch: use ``"in_place"`` there.
        is_weight: ``is_weight(name, tensor) -> bool``, which tensors are
            weights for the ASAM constraint. Default: the name contains
            "weight" when names are given, else ``tensor.ndim >= 2``.
    """

    def __init__(
        self,
        params,
        base_optimizer,
        rho: float = 0.05,
        *,
        objective: str = "gradient",
        constraint: str = "none",
        alpha: float = 0.9,
        theta: float = 0.9,
        delta: float = 1e-12,
        eta: float | None = None,
        eps_norm: float = 1e-12,
        flatten: bool = False,
        backend: str = "auto",
        perturb: str = "auto",
        is_weight: Callable | None = None,
        _extra_defaults: dict | None = None,
        **base_kwargs,
    ):
        try:
            objective = Objective(objective)
        except ValueError:
            raise ValueError(f"objective must be one of {[o.value for o in Objective]}, got {objective!r}") from None
        try:
            constraint = Constraint(constraint)
        except ValueError:
            raise ValueError(f"constraint must be one of {[c.value for c in Constraint]}, got {constraint!r}") from None
        _check_rho(rho)
        check_finite_number("eps_norm", eps_norm, low=0.0, low_open=True, hint="; the default is 1e-12")
        if objective is Objective.INFO:
            check_finite_number("alpha", alpha, low=0.0, high=1.0, high_open=True, hint="; infoSAM uses about 0.9")
            check_finite_number("delta", delta, low=0.0, low_open=True, hint="; the default is 1e-12")
        if objective is Objective.EMA:
            check_finite_number("theta", theta, low=0.0, high=1.0, low_open=True, hint="; theta = 1 is plain SAM")
        if eta is None:
            eta = 1.0 if constraint is Constraint.FISHER else 0.01
        check_finite_number("eta", eta, low=0.0)
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be True or False, got {flatten!r}")
        if perturb not in PERTURB_MODES:
            raise ValueError(f"perturb must be one of {PERTURB_MODES}, got {perturb!r}")

        groups, names = _split_names(params)
        for group in groups:
            for p in group["params"]:
                _check_param(p)
        for k, group in enumerate(groups):
            if "rho" in group:
                _check_rho(group["rho"], where=f"param_groups[{k}]['rho']")
        defaults = {"rho": rho, **(_extra_defaults or {})}
        ema_weight = {Objective.INFO: 1.0 - alpha, Objective.EMA: theta}.get(objective, 1.0)
        self.preconditioner = Preconditioner(objective, constraint, ema_weight, delta, eta, eps_norm)
        smallest_eps = eps_norm * (min(delta, 1.0) if objective is Objective.INFO else 1.0)
        if smallest_eps * _RHO_OVER_EPS_MAX < 1.0:
            raise ValueError(
                f"eps_norm{' * delta' if objective is Objective.INFO else ''} = {smallest_eps!r} is too small: "
                f"1 / it must stay finite in fp32 (at least {1 / _RHO_OVER_EPS_MAX:g}), or an all-zero "
                "gradient gives 0 * inf = NaN"
            )
        self._rho_limit = _RHO_OVER_EPS_MAX * smallest_eps
        for where, value in [("rho", rho)] + [(f"param_groups[{k}]['rho']", g["rho"]) for k, g in enumerate(groups)
                                              if "rho" in g and not isinstance(g["rho"], torch.Tensor)]:
            self._check_rho_scale(value, where)
        self.flatten = flatten
        self.backend_choice = backend
        self.perturb_mode = perturb

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an instance, so these arguments have nowhere to go: "
                    f"{sorted(base_kwargs)}; pass them to the base optimizer yourself or pass its class"
                )
            if not _same_params([p for g in groups for p in g["params"]], base_optimizer):
                raise ValueError(
                    "base_optimizer is an instance: params must be exactly its parameters "
                    "(pass base_optimizer.param_groups' parameters, or pass the class instead)"
                )
            for group in base_optimizer.param_groups:  # a tied weight listed twice: keep it once
                group["params"] = list({id(p): p for p in group["params"]}.values())
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            super().__init__(groups, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or instance, got {base_optimizer!r}"
            )
        # One list of groups and one state dict for both optimizers, so schedulers,
        # state_dict and checkpointing tools see a single optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        # Schedulers read hyperparameters from defaults (OneCycleLR: momentum or betas).
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}

        # Names by identity, from the tensors they were passed with (a base
        # optimizer's groups may list the parameters in another order).
        self._names = {}
        for p, n in zip((p for g in groups for p in g["params"]), names):
            if n is not None:
                self._names[p] = n
        self._is_weight_fn = is_weight
        self._buckets = None
        self._layout = None
        self._pending: PendingStep | None = None  # created by first_step, consumed by second_step / restore
        self.last_step_fused = False  # whether the last second_step fused the base update
        self.last_step_backend = None  # the backend that ran the last perturbation
        self._fallback_warned = set()
        self._ema_ready = EmaReady()
        self._plans = base_update.PlanCache()  # the fused base step's last steady plan
        self._steady = SteadyStep()  # the last half steps' host work, replayed while nothing changed
        self.skipped_steps = None  # device tensor, created on the first step
        self.last_perturbation_norm = None
        # torch.compile: the handle the traced steps pass to the presam:: ops,
        # and whether a step runs on the op's operands (library_ops).
        self._handle = library_ops.register(self)
        self._bound_to_operands = False
        if flatten:
            self._ensure_buckets()

    def __getstate__(self):
        """Everything (torch's Optimizer keeps only groups, state and defaults,
        which is not enough to step), but the backend by name: a module does
        not pickle.  Refused between the two steps (the copy would hold x + e)."""
        self._refuse_midstep("copy.deepcopy() or pickling of the optimizer")
        state = dict(self.__dict__)
        backend = state.pop("_backend", None)
        state["_backend_name"] = None if backend is None else backend.name
        base = state.pop("base_optimizer")
        state["_base_optimizer_parts"] = (type(base), base.__getstate__())
        state.pop("_plans", None)  # refers to this optimizer's state entries: a copy makes its own
        state.pop("_steady", None)  # likewise its parameters and buckets
        return state

    def __setstate__(self, state):
        state = dict(state)
        _migrate_pickled_before_ema_ready(state)
        name = state.pop("_backend_name", None)
        base_class, parts = state.pop("_base_optimizer_parts")
        base = base_class.__new__(base_class)
        # torch's Optimizer.__setstate__, not the class's own: Adam's reads
        # state[p]["step"] of every non-empty entry, and one holding only our
        # grad_ema (before the first step, or of a frozen tensor) has none.
        Optimizer.__setstate__(base, parts)
        state["base_optimizer"] = base
        super().__setstate__(state)
        if name is not None:
            self._backend = backends.get(name)
        self._plans = base_update.PlanCache()
        self._steady = SteadyStep()
        self._handle = library_ops.register(self)  # a copy is another optimizer

    def _step_pending(self) -> bool:
        """Whether first_step ran and neither second_step nor restore has since."""
        return getattr(self, "_pending", None) is not None

    def _check_linked_to_base(self):
        """The optimizer and its base share one ``state`` and one ``param_groups``
        (``__init__``, ``load_state_dict``); torch's ``load_state_dict`` called on
        the base optimizer itself gives it new ones, which the steps would not see."""
        if self.state is not self.base_optimizer.state or self.param_groups is not self.base_optimizer.param_groups:
            raise RuntimeError(
                f"the base optimizer's state or param_groups are no longer this {type(self).__name__}'s (was "
                "opt.base_optimizer.load_state_dict() called, or opt.state / opt.param_groups replaced?), so a "
                "step would read one and write the other; load checkpoints through opt.load_state_dict(), "
                "which keeps them shared"
            )

    def _refuse_midstep(self, what):
        if self._step_pending():
            raise RuntimeError(_MIDSTEP.format(what=what))

    # -- parameters and buckets --------------------------------------------
    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _weight_flag(self, p) -> bool:
        if self.preconditioner.constraint is not Constraint.ASAM:
            return True
        name = self._names.get(p)
        if self._is_weight_fn is not None:
            return bool(self._is_weight_fn(name, p))
        if name is not None:
            return "weight" in name
        return p.ndim >= 2

    def _layout_key(self, scan=None):
        """(id, device, dtype) per parameter (``scan.layout_key`` where the caller
        has it), and each param group's size: a parameter moved to the next
        group keeps the order, not its group's hyperparameters."""
        per_param = _host.layout_key(self._params()) if scan is None else scan.layout_key
        return per_param, tuple(len(group["params"]) for group in self.param_groups)

    def _ensure_buckets(self, layout_key=None):
        """The buckets, rebuilt when parameters were added or moved to another
        device or dtype (the EMA state travels with its parameter); with
        flatten=True, a parameter or gradient found replaced is copied back in.
        ``layout_key``: the caller's ``_layout_key()``, where it has it."""
        if self._step_pending() and self._buckets is not None:
            return self._buckets  # never re-laid out under a pending step: restore needs its tables
        key = self._layout_key() if layout_key is None else layout_key
        if self._buckets is not None and key == self._layout:
            self._readopt_flat()
            return self._buckets
        old_ema = {p: self.state[p][GRAD_EMA].detach().clone() for p in self._params()
                   if GRAD_EMA in self.state.get(p, {})}
        params, group_index = [], []
        for k, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.is_sparse:
                    raise ValueError("sparse parameters are not supported; use dense parameters")
                params.append(p)
                group_index.append(k)
        # The backend first: a choice refused here leaves the parameters and the old layout as they were.
        devices = list(dict.fromkeys(p.device for p in params))
        self._backend = backends.get(
            backends.resolve(self.backend_choice, devices, sharded=any(_is_dtensor(p) for p in params))
        )
        self._buckets = build_buckets(params, group_index, [self._weight_flag(p) for p in params], self.flatten)
        self._layout = key
        # What the caches kept of the old buckets' buffers goes with them.
        self._steady.forget()
        self._plans = base_update.PlanCache()
        self._attach_state_views(old_ema)
        return self._buckets

    def _readopt_flat(self):
        """flatten=True: bring parameters and gradients found replaced back into
        the flat buffers. Never under a pending step (x + e would be copied in)
        nor bound to torch.compile's operands (they are the op's, not ours)."""
        if not self.flatten or self._bound_to_operands or self._step_pending():
            return
        for bucket in self._buckets:
            bucket.readopt_replaced()

    def _attach_state_views(self, values=None):
        """Point optimizer.state[p][GRAD_EMA] at p's slice of the flat EMA,
        copying in ``values[p]`` where given."""
        if not self.preconditioner.objective.has_state:
            return
        with torch.no_grad():
            for bucket in self._buckets:
                ema = bucket.buffers.ensure_grad_ema()
                for i, p in enumerate(bucket.params):
                    if values and p in values:
                        bucket.layout.view(ema, i).copy_(local(values[p]))
                    self.state[p][GRAD_EMA] = bucket.state_view(ema, i)

    @property
    def backend(self) -> str:
        """The backend in use ("eager", "triton" or "cpp")."""
        self._ensure_buckets()
        return self._backend.name

    def _note_path_taken(self, ran: str):
        """Record which backend ran the perturbation (``last_step_backend``), as
        the backend reported it: a compiled backend hands rows it cannot walk
        (float64 on cpp, a parameter strided unlike its gradient, ...) to eager
        for the whole call, and a backend the user named must not be swapped
        silently."""
        if ran != self._backend.name:
            named = backends.named_choice(self.backend_choice)
            if named is not None and named not in self._fallback_warned:
                self._fallback_warned.add(named)
                warnings.warn(
                    f"backend={named!r} cannot run this step's parameters (float64, a layout its kernels do not "
                    f"walk, or a tensor subclass): the step ran on the eager backend, and will whenever that "
                    f"recurs (opt.last_step_backend says which ran; this warning is shown once)",
                    RuntimeWarning,
                    # The caller of first_step: here, _begin_pending, _first_step_eager,
                    # _first_step_and_zero_grad, _grad_disabled's wrapper, first_step.
                    stacklevel=7,
                )
        self.last_step_backend = ran

    # -- checks -------------------------------------------------------------
    def _group_rhos(self):
        rhos, perturbed = [], []
        for k, group in enumerate(self.param_groups):
            rho = group.get("rho")
            if rho is None:
                raise KeyError(f"param_groups[{k}] has no 'rho'; set it (the optimizer default is {self.defaults['rho']})")
            if isinstance(rho, torch.Tensor):
                # Metadata only: the value is checked on the device (_bad_rho).
                if rho.numel() != 1 or not rho.is_floating_point():
                    raise ValueError(
                        f"param_groups[{k}]['rho'] must be a one-element floating-point tensor, got "
                        f"shape {tuple(rho.shape)} and dtype {rho.dtype}"
                    )
                perturbed.append(True)
            else:
                _check_rho(rho, where=f"param_groups[{k}]['rho']")
                rho = float(rho)
                self._check_rho_scale(rho, f"param_groups[{k}]['rho']")
                perturbed.append(rho != 0)
            rhos.append(rho)
        return rhos, perturbed

    def _check_rho_scale(self, rho, where):
        if float(rho) > self._rho_limit:
            raise ValueError(
                f"{where} = {rho!r} is too large for eps_norm = {self.preconditioner.eps_norm!r}: the step "
                f"divides rho by eps_norm{' * delta' if self.preconditioner.objective is Objective.INFO else ''} "
                f"and must stay finite in fp32 (rho <= {self._rho_limit:.3g}), or an all-zero gradient "
                "gives 0 * inf = NaN"
            )

    def _bad_rho(self, rhos, device):
        """1.0 (0-d fp32, on ``device``) when a tensor rho is non-finite,
        negative or too large; None when every rho is a number.  Never read
        on the host: the backend treats it as a found overflow (a skipped step)."""
        tensors = [r for r in rhos if isinstance(r, torch.Tensor)]
        if not tensors:
            return None
        values = torch.stack([r.detach().reshape(()).to(device=device, dtype=torch.float32) for r in tensors])
        good = torch.isfinite(values) & (values >= 0) & (values <= self._rho_limit)
        return (~good).any().float()

    def _check_grads(self, scan):
        if scan.any_sparse_grad:
            raise RuntimeError(
                "sharpness-aware optimizers do not support sparse gradients; "
                "use dense gradients (e.g. nn.Embedding(..., sparse=False))"
            )

    # -- the two steps ------------------------------------------------------
    def first_step(self, zero_grad: bool = False, grad_scaler=None):
        """x <- x + e (the adversarial point), saving x; call after the first backward.

        Under ``torch.compile`` the step is one ``presam::first_step_`` op
        (``library_ops``), always in place (no GradScaler there)."""
        if torch.compiler.is_compiling():
            with torch.no_grad():
                library_ops.traced_step(library_ops.first_step_op, self, grad_scaler)
                if zero_grad:
                    self.zero_grad()
        else:
            self._first_step_and_zero_grad(zero_grad, grad_scaler)

    @_grad_disabled
    def _first_step_and_zero_grad(self, zero_grad, grad_scaler):
        self._first_step_eager(grad_scaler)
        if zero_grad:
            self.zero_grad()

    def _first_step_eager(self, grad_scaler=None):
        if self._step_pending():
            raise RuntimeError(
                "first_step() was called twice in a row; call second_step() (or restore()) "
                "after the second backward before the next first_step()"
            )
        self._check_linked_to_base()
        scaler = amp.active(grad_scaler)
        replay = None
        if scaler is None:
            replay = self._steady.replay_first(self)
        else:
            self._steady.forget()  # steps under a GradScaler are never replayed
        if replay is not None:  # the last first_step's tables and launch, nothing changed since
            record, tables = replay
            perturbation = record.launch([tables[k] for k in record.active])
            self._begin_pending(tables, record.group_perturbed, perturbation, storage=record.storage)
            return
        rhos, group_perturbed = self._group_rhos()
        scan = _host.scan_params(self.param_groups)
        self._check_grads(scan)
        buckets = self._ensure_buckets(self._layout_key(scan))
        tables = [
            b.table(group_perturbed, out_of_place=self._out_of_place(b), merge=not self._bound_to_operands)
            for b in buckets
        ]
        found_inf = amp.unscale_first_pass(self, scaler, tables, self._backend) if scaler else None
        bad_rho = self._bad_rho(rhos, buckets[0].layout.device)
        if bad_rho is not None:
            found_inf = bad_rho if found_inf is None else found_inf + bad_rho.to(found_inf.device)

        stateful = self.preconditioner.objective.has_state
        ema_ready_before = self._ema_ready.save(buckets) if stateful and scaler is not None else None
        ema_ready = self._ema_ready.for_step(buckets[0].layout.device) if stateful else False
        # Buckets without a gradient this step (a frozen dtype) take no part: the backends assume rows.
        active = [k for k, t in enumerate(tables) if len(t)]
        perturbation = launch = None
        if active:
            launch = self._backend.plan_perturb(
                [tables[k] for k in active], [buckets[k] for k in active], self.preconditioner, rhos, ema_ready
            )
            perturbation = launch([tables[k] for k in active], found_inf)
        watch = self._steady.watch_first(self, tables, rhos, found_inf)  # before switching out of place
        pending = self._begin_pending(
            tables, group_perturbed, perturbation, found_inf, scan, scaler is not None, ema_ready_before
        )
        self._steady.keep_first(self, watch, tables, active, launch, rhos, ema_ready, pending)

    def _begin_pending(self, tables, group_perturbed, perturbation, found_inf=None, scan=None, scaler_used=False,
                       ema_ready_before=None, storage=None):
        """What first_step does after ``perturbation`` (None: no bucket had a
        gradient): the EMA flag, skip count and norm, and the pending step,
        its parameters switched out of place. ``storage``: where the
        parameters' storage is after that, where the caller knows it (a
        replayed step), else taken from ``scan`` or a new walk."""
        buckets = self._buckets
        if perturbation is not None:
            norm, skipped = perturbation.norm, perturbation.skipped
            if self.preconditioner.objective.has_state:  # no gradient anywhere: nothing seen
                self._ema_ready.note_step(skipped)
        else:
            norm = torch.zeros((), dtype=torch.float32, device=buckets[0].layout.device)
            skipped = norm > 0 if found_inf is None else found_inf.reshape(()).to(norm.device) > 0
        self._count_skip(skipped)
        self.last_perturbation_norm = norm
        pending = PendingStep(
            tables, group_perturbed, perturbation,
            first_pass_skipped=skipped if scaler_used else None, ema_ready_before=ema_ready_before,
        )
        pending.switch_to_adversarial(buckets)
        if storage is not None:
            pending.storage = storage
        elif not self._bound_to_operands:
            # Where the parameters' storage is now: as scanned, unless this step
            # re-pointed some (out of place, or flatten=True re-adopting one).
            moved_here = self.flatten or pending.switched
            pending.storage = _host.data_addresses(self._params()) if moved_here else scan.data_addresses
        self._pending = pending
        if perturbation is not None:
            # Last: its warning may be raised as an error (python -W error),
            # and the step is pending by then, so restore() can undo it.
            self._note_path_taken(perturbation.path)
        return pending

    def _count_skip(self, skipped):
        if self.skipped_steps is None:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=skipped.device)
        self.skipped_steps.add_(skipped.to(self.skipped_steps.device))

    @_grad_disabled
    def _second_step(self, zero_grad: bool = False, grad_scaler=None):
        pending = self._pending
        if pending is None:
            raise RuntimeError(
                "second_step() was called without first_step(); the order is: backward, "
                "first_step(), backward at the perturbed point, second_step()"
            )
        self._check_linked_to_base()
        scaler = amp.active(grad_scaler)
        if scaler is not None and not pending.grad_scaler_used:
            raise RuntimeError(
                "second_step() got grad_scaler but first_step() did not; pass the same "
                "GradScaler to both steps"
            )
        if scaler is None and pending.grad_scaler_used:
            raise RuntimeError(
                "first_step() got grad_scaler but second_step() did not, so the base step would "
                "use scaled gradients; pass the same GradScaler to both steps"
            )
        replay = None
        if scaler is None:
            replay = self._steady.replay_second(self, pending)
        else:
            self._steady.forget()
        if replay is not None:  # the last fused second_step's tables and launch, nothing changed since
            record, tables = replay
            self._pending = None
            self.last_step_fused = False
            if not self._run_fused(record.kind, record.launch, tables):
                self._restore(pending)
                self._base_step()
            if zero_grad:
                self.zero_grad()
            return
        scan = _host.scan_params(self.param_groups)  # before switch_back: where first_step left them
        if self._moved_since_first_step(pending, scan.data_addresses):
            raise RuntimeError(
                "the parameters were moved, converted or replaced between first_step() and "
                "second_step() (model.to(), p.data = ...), so x can no longer be restored in place; "
                "call opt.restore() (writes x into them where they are now), then take the step again"
            )
        if self._bound_to_operands and any(t.merged or t.out_of_place for t in pending.tables):
            raise RuntimeError(
                "first_step() ran outside torch.compile and second_step() inside it, with flat rows "
                "or out-of-place perturbation, which the compiled step cannot undo; compile both "
                "steps or neither (opt.restore() puts the parameters back at x)"
            )
        found_second = amp.unscale_second_pass(self, scaler, pending.tables) if scaler else None
        self._pending = None
        pending.switch_back()
        self.last_step_fused = False
        if scaler is not None:
            # Host read of the scaler's own flags, as GradScaler.step does.
            first_bad = bool(pending.first_pass_skipped)
            second_bad = bool(found_second.sum() > 0)
            amp.record_found_inf(self, scaler, pending.first_pass_skipped, found_second)
            if second_bad and not first_bad:
                if pending.ema_ready_before is not None:
                    self._ema_ready.roll_back(self._buckets, pending.ema_ready_before)
                self._count_skip(torch.ones((), dtype=torch.bool, device=self.skipped_steps.device))
            if first_bad or second_bad:
                self._restore(pending)
                if zero_grad:
                    self.zero_grad()
                return
        if not self._fused_step(pending, self._layout_key(scan)):
            self._restore(pending)
            self._base_step()
        if zero_grad:
            self.zero_grad()

    def _restore(self, pending):
        """x <- backup for every row the pending step's perturbation wrote."""
        if pending.perturbation is not None:
            self._backend.restore(pending.perturbation)

    def _moved_since_first_step(self, pending, addresses=None) -> bool:
        """``addresses``: the parameters' ``_host.data_addresses`` now, where the caller has them."""
        # Bound to torch.compile's operands, the parameters point at the op's copies: not a move.
        if self._bound_to_operands:
            return False
        return pending.moved(_host.data_addresses(self._params()) if addresses is None else addresses)

    def _out_of_place(self, bucket) -> bool:
        """Whether ``bucket`` is perturbed out of place this step."""
        if self.perturb_mode == "in_place" or bucket.layout.mesh is not None or self._bound_to_operands:
            # DTensor parameters: their .data is not ours to re-point; under
            # torch.compile the op's operands are only bound for one step.
            return False
        if self.perturb_mode == "out_of_place":
            return True
        threshold = _OUT_OF_PLACE_MIN_AVG.get(bucket.layout.device.type)
        return threshold is not None and bucket.layout.flat_numel >= threshold * len(bucket.params)

    def _fused_step(self, pending, layout_key) -> bool:
        """restore + base step as one kernel per bucket, where the backend has
        one for these rows and ``base_update`` covers the base optimizer; False
        (nothing done) otherwise. ``layout_key``: ``_layout_key()``."""
        kind = base_update.covered(self.base_optimizer)
        if kind is None or layout_key != self._layout:
            return False
        buckets, tables, perturbed = self._buckets, pending.tables, pending.group_perturbed
        self._readopt_flat()
        now = [b.table(perturbed, out_of_place=t.out_of_place, merge=t.merged) for b, t in zip(buckets, tables)]
        if any(n.offsets is not t.offsets and (n.offsets != t.offsets or n.lengths != t.lengths)
               for n, t in zip(now, tables)):
            return False  # the second pass's gradients cover other rows than the perturbation
        launch = self._backend.plan_restore_and_step(now, buckets)
        if launch is None or not self._run_fused(kind, launch, now):
            return False
        self._steady.keep_second(self, pending, kind, launch, now)
        return True

    def _run_fused(self, kind, launch, tables) -> bool:
        """The fused step (``launch``: the backend's plan_restore_and_step for
        ``tables``, the second pass's rows); False, nothing written, where the
        base optimizer's state or groups are not what ``base_update`` covers."""
        buckets = self._buckets
        plans = []

        def prepare():
            # Called by the backend once it knows it can run: only then is the
            # base state adopted into the flat buffers.
            plan = self._plans.plan(kind, self.base_optimizer, buckets, self.state, tables)
            if plan is None:
                return None
            plan.adopt()
            plans.append(plan)
            return plan.update

        if not launch(tables, prepare):
            return False
        plans[0].commit()
        self.base_optimizer._opt_called = True  # as an LRScheduler's wrapper of its step would
        self.last_step_fused = True
        return True

    def _base_step(self):
        """base_optimizer.step(), with our entries hidden from per-parameter
        states that hold nothing else: optimizers such as Adam initialise a
        parameter's state only when it is empty."""
        hidden = {}
        for p, entry in self.state.items():
            if len(entry) == 1 and GRAD_EMA in entry:
                hidden[p] = entry.pop(GRAD_EMA)
        try:
            self.base_optimizer.step()
        finally:
            for p, view in hidden.items():
                self.state[p][GRAD_EMA] = view

    def second_step(self, zero_grad: bool = False, grad_scaler=None):
        """Restore x exactly and let the base optimizer step with the gradient
        taken at x + e; counts as the optimizer's step (hooks, schedulers).

        Under ``torch.compile``: one ``presam::second_step_`` op."""
        if torch.compiler.is_compiling():
            library_ops.traced_step(library_ops.second_step_op, self, grad_scaler)
            if zero_grad:
                self.zero_grad()
            return None
        return self._hooked_second_step(zero_grad=zero_grad, grad_scaler=grad_scaler)

    @_step_hooks
    def _hooked_second_step(self, zero_grad=False, grad_scaler=None):
        self._opt_called = True  # what LR schedulers check to see that the optimizer stepped
        self._second_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
        self._mark_gradients_seen()

    # GradScaler.step(opt, closure) hands the scaler to step() as grad_scaler
    # instead of unscaling only the first pass and stepping on the scaled
    # second one (torch/amp/grad_scaler.py, "_step_supports_amp_scaling").
    _step_supports_amp_scaling = True
    # Whether zero_grad and the steps tag gradients for step(closure)'s rule:
    # from the first step(closure) on, so that the two-step API pays nothing.
    _tracks_gradients = False

    def step(self, closure=None, grad_scaler=None, *, first_pass: str = "auto"):
        """One full SAM step driven by ``closure`` (forward + backward, returns the loss).

        ``first_pass`` says where the first backward's gradients come from.
        ``"auto"``: the gradients present, when a backward wrote them since this
        optimizer's last step or ``zero_grad`` (the common SAM wrapper's
        ``loss.backward(); opt.step(closure)``); otherwise the closure runs first
        (torch's closure idiom). Gradients left by the last step or kept zeroed by
        ``zero_grad`` are never taken; they are tracked by version from the first
        ``step(closure)`` on, so before it any gradient present counts.
        Lightning's own closure with such gradients raises (accumulation, which
        it cannot replay). ``"present"``: the gradients present are the first
        pass. ``"closure"``: the closure runs first and its gradients add to those
        present (gradient accumulation, as Lightning does it). ``"done"``:
        ``first_step()`` already ran; the closure is the second pass
        (``closure=None``: the caller took it, as the Hugging Face Trainer does).
        ``grad_scaler``: the README's ``grad_scaler=`` flow (``scaler.step(opt,
        closure)`` passes it). A closure that raises leaves the parameters at x
        and nothing pending. Returns the loss at x when the closure computed it,
        else the loss at x + e.
        """
        if closure is None and first_pass == "done" and self._step_pending():
            closure = _no_second_pass  # the caller took the second backward already
        if closure is None:
            if _called_from_checkpoint_state_init():
                self._init_state_for_checkpoint()
                return None
            raise RuntimeError(_STEP_WITHOUT_CLOSURE.format(cls=type(self).__name__))
        if grad_scaler is None and ("found_inf" in self.__dict__ or "grad_scale" in self.__dict__):
            # GradScaler.step set these instead of handing itself over (it does so
            # when step is wrapped, as accelerate's AcceleratedOptimizer wraps it):
            # the second pass's overflow could not reach scaler.update().
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise RuntimeError(
                "GradScaler.step called this optimizer without passing itself as grad_scaler (its step "
                "is wrapped, e.g. by accelerate's AcceleratedOptimizer); use the two-step API with "
                "grad_scaler=scaler on both steps (presam_kernels.integrations.accelerate does this)"
            )
        if first_pass not in FIRST_PASS_MODES:
            raise ValueError(f"first_pass must be one of {FIRST_PASS_MODES}, got {first_pass!r}")
        if first_pass == "done" and not self._step_pending():
            raise RuntimeError("step(closure, first_pass='done') needs a first_step() before it")
        if first_pass != "done" and self._step_pending():
            raise RuntimeError(
                "first_step() already ran: finish the step with second_step() or "
                "step(closure, first_pass='done'), or call restore()"
            )
        if first_pass == "present" and not any(p.grad is not None for p in self._params()):
            raise RuntimeError("step(closure, first_pass='present') found no gradients: take the first backward first")
        run_first = first_pass == "closure" or (first_pass == "auto" and not self._backward_since_last_step())
        if first_pass == "auto" and not run_first and _is_lightning_closure(closure):
            raise RuntimeError(
                "Lightning called step(closure) with gradients already present: that is accumulate_grad_batches "
                "> 1, whose earlier micro-batches a plain LightningModule cannot replay at x + e. Derive the module "
                "from presam_kernels.integrations.lightning.SharpnessAwareModule; in manual optimization, when "
                "these gradients are this step's first backward, call opt.step(closure, first_pass='present')"
            )
        self._tracks_gradients = True
        scaler = amp.active(grad_scaler)
        if scaler is not None and run_first:
            amp.check_closure_first_pass(self, scaler)
        closure = torch.enable_grad()(closure)
        loss = None
        try:
            if first_pass != "done":
                if run_first:
                    loss = closure()
                self.first_step(zero_grad=True, grad_scaler=grad_scaler)
            second_loss = closure()
        except BaseException:
            self.restore()  # x back, nothing pending: the next step starts clean
            raise
        self._second_step(grad_scaler=grad_scaler)
        self._mark_gradients_seen()
        return second_loss if loss is None else loss

    def _mark_gradients_seen(self):
        """Tag each gradient with its version counter: a backward that writes it
        later (in place or as a new tensor) makes it a first pass for step()."""
        if not self._tracks_gradients or torch.compiler.is_compiling():
            return
        for p in self._params():
            grad = p.grad
            if grad is not None:
                setattr(grad, _SEEN_VERSION, grad._version)

    def _backward_since_last_step(self) -> bool:
        """Untagged gradients count: before the first step(closure) nothing is
        tagged, so gradients present then are taken as a first pass."""
        return any(
            p.grad is not None and getattr(p.grad, _SEEN_VERSION, None) != p.grad._version for p in self._params()
        )

    @torch.no_grad()
    def _init_state_for_checkpoint(self):
        """torch.distributed.checkpoint creates optimizer state by calling
        step() with zero gradients and lr = 0: create ours and the base
        optimizer's, perturbing nothing."""
        self._ensure_buckets()
        self._base_step()

    @torch.no_grad()
    def restore(self):
        """Put the parameters back at x after a failed second pass (for example
        out of memory) and forget the pending step. A no-op without one."""
        pending = self._pending
        if pending is not None:
            if self._moved_since_first_step(pending):
                pending.restore_moved(self._buckets)
            else:
                pending.switch_back()
                self._restore(pending)
            self._pending = None  # only now: a restore that raised stays pending, to be retried
        self._mark_gradients_seen()

    def zero_grad(self, set_to_none: bool | None = None):
        """As torch's, except that with ``flatten=True`` the default keeps the
        gradients allocated and zeroes them in one op per bucket."""
        if set_to_none is None:
            set_to_none = not self.flatten
        if torch.compiler.is_compiling():
            self._traced_zero_grad(set_to_none)
        elif self.flatten and not set_to_none and self._buckets is not None:
            for b in self._buckets:
                b.zero_flat_grad()
        else:
            self.base_optimizer.zero_grad(set_to_none=set_to_none)
        if not set_to_none:
            # Kept zeros are never a first pass, also at the first step(closure):
            # tag them (and from now on every gradient this optimizer leaves).
            self._tracks_gradients = True
        self._mark_gradients_seen()

    def _traced_zero_grad(self, set_to_none: bool):
        """zero_grad as torch.compile can trace it (torch's own is skipped by
        dynamo), per tensor: with flatten=True a gradient may not be in the
        flat buffer yet (compiled steps adopt none)."""
        for p in self._params():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def add_param_group(self, param_group):
        if not hasattr(self, "base_optimizer"):  # called from Optimizer.__init__
            return super().add_param_group(param_group)
        self._refuse_midstep("add_param_group()")
        groups, names = _split_names([param_group])
        group = groups[0]
        for p in group["params"]:
            _check_param(p)
        if "rho" in group:
            _check_rho(group["rho"], where="param_group['rho']")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.base_optimizer.add_param_group(group)
        for p, n in zip(group["params"], names):
            self._names[p] = n
        self._ensure_buckets()

    # -- state_dict ---------------------------------------------------------
    def state_dict(self):
        """torch's {state, param_groups}, with the base optimizer's entries and
        ours side by side per parameter; our entries are copies of each
        parameter's slice (never the whole flat buffer)."""
        self._refuse_midstep("state_dict()")
        sd = super().state_dict()
        ours = base_update.views_of_ours(self._buckets or [])
        if ours:
            for index, entry in sd["state"].items():
                if any(isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in ours for v in entry.values()):
                    sd["state"][index] = {
                        k: v.clone() if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in ours else v
                        for k, v in entry.items()
                    }
        if self.preconditioner.objective.has_state:
            params = self._params()
            for index, entry in sd["state"].items():
                if GRAD_EMA in entry:  # a new dict: the live per-parameter state stays as it is
                    sd["state"][index] = {
                        **entry,
                        GRAD_EMA: entry[GRAD_EMA].clone(),
                        GRAD_EMA_READY: self._ema_ready.flag(params[index].device).clone(),
                    }
        return sd

    def load_state_dict(self, state_dict):
        """Load a state_dict of this class, or of the common SAM wrapper (its
        transient per-parameter entries are dropped; it holds no base state)."""
        self._refuse_midstep("load_state_dict()")
        state_dict = {"state": dict(state_dict["state"]), "param_groups": state_dict["param_groups"]}
        ours = {}
        for index, entry in list(state_dict["state"].items()):
            entry = dict(entry)
            transient = _COMMON_WRAPPER_KEYS & entry.keys()
            if transient:
                for k in transient:
                    entry.pop(k)
            mine = {k: entry.pop(k) for k in (GRAD_EMA, GRAD_EMA_READY) if k in entry}
            if mine:
                ours[index] = mine
            if entry:
                state_dict["state"][index] = entry
            else:
                state_dict["state"].pop(index)
        if ours and not self.preconditioner.objective.has_state:
            raise ValueError(
                f"this state_dict holds '{GRAD_EMA}' entries (saved by InfoSAM or VaSSO) but "
                f"{type(self).__name__} keeps no EMA; load it into the optimizer class that saved it"
            )
        self._check_loadable(state_dict, ours)  # everything, before anything is loaded
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._pending = None
        self._ensure_buckets()
        if self.preconditioner.objective.has_state:
            # What the checkpoint does not hold starts fresh, not from the previous run.
            for bucket in self._buckets:
                if bucket.buffers.grad_ema is not None:
                    bucket.buffers.grad_ema.zero_()
            self._ema_ready.reset()
        # Saved keys are whatever the saved groups list (indices, or FQNs when
        # torch.distributed.checkpoint rekeyed them), in our parameters' order.
        saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        param_of = dict(zip(saved_keys, self._params()))
        self._attach_state_views({param_of[k]: mine[GRAD_EMA] for k, mine in ours.items() if GRAD_EMA in mine})
        for key, mine in ours.items():
            if GRAD_EMA_READY in mine:
                self._ema_ready.load(param_of[key].device, mine[GRAD_EMA_READY])

    def _check_loadable(self, state_dict, ours):
        """Raise ValueError for a checkpoint whose entries do not fit our
        parameters (shape, dtype) or whose groups ask for another variant."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return  # torch's load_state_dict refuses it, before changing anything
        adaptive = self.preconditioner.constraint is Constraint.ADAPTIVE
        for k, group in enumerate(saved_groups):
            if "adaptive" in group and bool(group["adaptive"]) != adaptive:
                raise ValueError(
                    f"param_groups[{k}] was saved with adaptive={group['adaptive']} but this "
                    f"{type(self).__name__} has adaptive={adaptive}; build it with adaptive={group['adaptive']}"
                )
        saved_keys = [key for group in saved_groups for key in group["params"]]
        param_of = dict(zip(saved_keys, self._params()))
        entries = [(key, entry) for key, entry in state_dict["state"].items()] + list(ours.items())
        for key in ours:
            if key not in param_of:
                raise ValueError(
                    f"state_dict['state'][{key!r}] holds '{GRAD_EMA}' but no saved param group lists {key!r}: "
                    "the checkpoint does not belong to these parameters"
                )
        for key, entry in entries:
            p = param_of.get(key)
            if p is None:
                continue  # torch keeps the base optimizer's entries of unknown keys as they are
            for name, value in entry.items():
                where = f"state_dict['state'][{key!r}][{name!r}]"
                if name == GRAD_EMA_READY:
                    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                        raise ValueError(f"{where} must be a one-element tensor, got {value!r}")
                    continue
                if name != GRAD_EMA and name not in _PER_ELEMENT_STATE:
                    continue
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(p.shape):
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"{where} has shape {shape}, but its parameter has shape {tuple(p.shape)}")
                if name == GRAD_EMA and not (value.is_floating_point()):
                    raise ValueError(f"{where} must be a floating-point tensor, got {value.dtype}")

    def __repr__(self):
        spec = self.preconditioner
        return (
            f"{type(self).__name__}(objective={spec.objective.value}, constraint={spec.constraint.value}, "
            f"base={type(self.base_optimizer).__name__}, groups={len(self.param_groups)}, "
            f"flatten={self.flatten}, backend={self.backend_choice}, perturb={self.perturb_mode})"
        )


# perturb="auto": out of place where a bucket's tensors average at least this
# many elements (per device type), in place elsewhere or where absent. CPU:
# out of place measured ahead or within the noise at every size
# (bench/RESULTS_traffic.md). CUDA: in place (what CUDA-graph capture needs)
# until gpu_check.sh measures the crossover.
_OUT_OF_PLACE_MIN_AVG = {"cpu": 0}
# rho / eps_norm (times delta for infoSAM) at most this: rho * 1 / (||c u|| + eps)
# then stays finite in fp32 (max 3.4e38), so an all-zero gradient gives e = 0.
_RHO_OVER_EPS_MAX = 1e38


def _called_from_checkpoint_state_init(max_depth: int = 8) -> bool:
    """Whether torch.distributed.checkpoint's state initialisation is the caller
    (through the step wrappers of hooks and schedulers)."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return False
        module = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name == "_init_optim_state" and module.startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


def _migrate_pickled_before_ema_ready(state):
    """An optimizer pickled before EmaReady (issue 14) kept the ready flags as a
    dict beside ``_host_ema_started``, and the pending step's parts as attributes
    of their own (None or empty, since pickling refuses mid-step)."""
    if isinstance(state.get("_ema_ready"), dict):
        ready = EmaReady()
        ready.flags = state["_ema_ready"]
        ready.known = bool(state.get("_host_ema_started", False))
        state["_ema_ready"] = ready
    for old in ("_host_ema_started", "_first_found_inf", "_switched", "_pending_perturbed", "_pending_storage",
                "_ema_ready_before"):
        state.pop(old, None)


def _no_second_pass():
    return None


def _is_lightning_closure(closure) -> bool:
    """Whether ``closure`` is Lightning's precision-plugin wrapper
    (``functools.partial(Precision._wrap_closure, ...)``), known without
    importing Lightning."""
    func = getattr(closure, "__wrapped__", closure)
    func = getattr(func, "func", None)
    module = getattr(func, "__module__", None) or ""
    return getattr(func, "__name__", "") == "_wrap_closure" and module.startswith(("lightning", "pytorch_lightning"))


def _same_params(params, optimizer) -> bool:
    theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return {id(p) for p in params} == theirs


__all__ = ["PreSAM", "GRAD_EMA"]
