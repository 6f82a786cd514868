"""The base optimizer's update fused into SAM's restore (docs/design.md §3).

Instead of x <- backup followed by ``base_optimizer.step()`` (which reads x
again), one kernel per bucket reads the saved x and the gradient taken at
x + e and writes the updated x and the base optimizer's state.  Covered:
``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize)
and ``torch.optim.Adam`` / ``AdamW`` (amsgrad off, float betas, eps, weight
decay coupled or decoupled, maximize), with their default single-tensor or
foreach implementations (not ``fused``, ``capturable`` or ``differentiable``),
no step hooks, and the class exactly (a subclass may override ``step``).

The base optimizer's state stays torch's: per parameter, under torch's keys
(``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), in the state
dict the state_dict saves.  The tensors are views of flat buffers of the
bucket (parameter dtype, as torch keeps them; ``step`` a 0-d fp32 CPU tensor
per parameter, as torch keeps it), so a plain ``base_optimizer.step()``
continues from them, and state that torch created or a checkpoint loaded is
adopted (copied into the flat buffer) on the next fused step.

This module only reads param groups and states and turns them into what a
backend's ``restore_and_step`` takes: the kind, one row of hyperparameters
per param group (floats, or 0-d tensors where the group's lr is a tensor:
never read on the host), and the flat state buffers per bucket.  A case it
does not cover (an option, a group whose parameters are at different steps)
returns None and the caller takes restore + ``base_optimizer.step()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.optim import optimizer as optimizer_module

SGD = "sgd"
ADAM = "adam"
STATE_KEYS = {SGD: ("momentum_buffer",), ADAM: ("exp_avg", "exp_avg_sq")}

# Columns of a param group's row of hyperparameters, per kind: the one
# definition of the layout. The rows are written by these names (``_row``);
# the Triton kernel reads them through indices looked up by name; the C++
# backend (csrc/ops.cpp, kernels.h) reads them by position, in this order
# (tests/test_cpp_backend.py holds it to torch with a distinct value per
# column).  Booleans are 0.0 / 1.0.
SGD_COLUMNS = ("lr", "momentum", "one_minus_dampening", "weight_decay", "nesterov", "maximize", "first")
ADAM_COLUMNS = (
    "neg_step_size",  # -lr / (1 - beta1^step)
    "bias_correction2_sqrt",  # sqrt(1 - beta2^step)
    "eps",
    "decay",  # 1 - lr * weight_decay (decoupled), else 1
    "weight_decay",  # coupled weight decay (added to the gradient), else 0
    "beta1_weight",  # 1 - beta1, lerp's weight
    "beta2",
    "one_minus_beta2",
    "maximize",
)
COLUMNS = {SGD: SGD_COLUMNS, ADAM: ADAM_COLUMNS}
# fp32 slots per param group row on the device (64 B rows): room for every kind's columns.
HYPER_WIDTH = 16
assert all(len(columns) <= HYPER_WIDTH for columns in COLUMNS.values())


def _hooks(optimizer) -> bool:
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or optimizer_module._global_optimizer_pre_hooks
        or optimizer_module._global_optimizer_post_hooks
    )


def _common_options_covered(group) -> bool:
    return not group.get("fused") and not group.get("differentiable", False)


def covered(optimizer) -> str | None:
    """The kind of fused update that reproduces ``optimizer.step()``, or None.

    The class is checked exactly, not ``step``: an ``LRScheduler`` wraps the
    instance's ``step`` (to note that it was called), and the fused path sets
    the same flag instead.
    """
    cls = type(optimizer)
    if _hooks(optimizer):
        return None
    if cls is torch.optim.SGD:
        if all(_common_options_covered(g) for g in optimizer.param_groups):
            return SGD
        return None
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        for g in optimizer.param_groups:
            if not _common_options_covered(g) or g.get("amsgrad") or g.get("capturable"):
                return None
            if any(isinstance(b, torch.Tensor) for b in g["betas"]):
                return None
        return ADAM
    return None


def _scalar(value):
    """A float, or a tensor kept as one (never read on the host)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    return float(value)


@dataclass
class Update:
    """What ``restore_and_step`` takes: the kind, a hyperparameter row per
    param group (``*_COLUMNS`` order; floats or 0-d tensors), and per bucket
    the flat state buffers by torch's key."""

    kind: str
    hyper: list
    state: list


@dataclass
class Plan:
    """One fused step's bookkeeping around the kernel: adopt foreign state
    before it, attach new state and count steps after it."""

    update: Update
    state: dict
    adopt_list: list = field(default_factory=list)  # (view, tensor to copy into it)
    attach_list: list = field(default_factory=list)  # (param, key, view)
    steps: list = field(default_factory=list)  # Adam: step tensors to increment
    # Per param group: SGD, whether its momentum buffers start now; Adam, its
    # step count before this step (None: no parameter of it takes part).
    first: list = field(default_factory=list)
    step_of: list = field(default_factory=list)
    # (param, its state entry, the tensors under WATCHED_KEYS) of each parameter updated with state.
    watched: list = field(default_factory=list)
    on_commit: object = None  # a kept plan's: counts the commit
    # Nothing is written before adopt(): a plan that returns None leaves the state as it was.

    @property
    def steady(self) -> bool:
        """Whether the state is already the fused step's own: nothing to adopt or attach."""
        return not self.adopt_list and not self.attach_list

    def adopt(self):
        """Copy state that torch created (or a checkpoint loaded) into our flat
        buffers and point the state at our views; create Adam's state where
        there is none.  Harmless if the kernel then does not run: torch's own
        step updates the views in place."""
        if self.steady:
            return  # nothing to copy (and no no_grad context to enter, ~3 us)
        with torch.no_grad():
            for view, value in self.adopt_list:
                if value is None:
                    view.zero_()
                else:
                    view.copy_(value)
        for p, key, view in self.attach_list:
            if key != "momentum_buffer":
                self.state[p][key] = view

    def commit(self):
        """After the kernel: the new momentum buffers join the state; Adam's steps count one more."""
        for p, key, view in self.attach_list:
            if key == "momentum_buffer":
                self.state[p][key] = view
        if self.steps:
            torch._foreach_add_(self.steps, 1.0)
        if self.on_commit is not None:
            self.on_commit()


def plan(kind: str, optimizer, buckets, state) -> Plan | None:
    """The fused update of this step over the parameters that have a gradient,
    or None where it does not reproduce torch (the caller takes the generic path)."""
    groups = optimizer.param_groups
    hyper = [None] * len(groups)
    out = Plan(Update(kind, hyper, []), state)
    first = [None] * len(groups)  # SGD: whether the group's momentum buffers start now
    step_of = [None] * len(groups)  # Adam: the group's step count before this step
    for bucket in buckets:
        flats = {}
        views = None  # Adam: the bucket's per-parameter state views, once it has a gradient
        for i, p in enumerate(bucket.params):
            if p.grad is None:
                continue
            k = bucket.layout.group_index[i]
            group = groups[k]
            entry = state[p]
            if kind == SGD:
                if group["momentum"] == 0:
                    continue
                views = bucket.buffers.ensure_base_state("momentum_buffer")
                flats["momentum_buffer"] = bucket.buffers.base_state["momentum_buffer"]
                buf = entry.get("momentum_buffer")
                starts = buf is None
                if first[k] is None:
                    first[k] = starts
                elif first[k] != starts:
                    return None  # some buffers start, others continue: torch's own path
                if starts:
                    out.attach_list.append((p, "momentum_buffer", views[i]))
                elif not _ours(buf, views[i], flats["momentum_buffer"], bucket.layout.offsets[i]):
                    if buf is views[i] or not _adoptable(buf, views[i]):
                        return None  # ours re-pointed through .data: torch's step uses it where it is
                    out.adopt_list.append((views[i], buf))
                    out.attach_list.append((p, "momentum_buffer", views[i]))
                out.watched.append((p, entry, (buf,)))
            else:
                if views is None:
                    views = {key: bucket.buffers.ensure_base_state(key) for key in STATE_KEYS[ADAM]}
                    flats.update({key: bucket.buffers.base_state[key] for key in STATE_KEYS[ADAM]})
                step = entry.get("step")
                if step is None:
                    step = torch.tensor(0.0, dtype=torch.float32)  # where torch keeps it (capturable off)
                    out.attach_list.append((p, "step", step))
                    for key in STATE_KEYS[ADAM]:
                        out.adopt_list.append((views[key][i], None))
                        out.attach_list.append((p, key, views[key][i]))
                    value = 0.0
                else:
                    if not isinstance(step, torch.Tensor) or step.device.type != "cpu" or step.numel() != 1:
                        return None
                    value = float(step)  # a CPU tensor: no device sync
                    for key in STATE_KEYS[ADAM]:
                        current = entry.get(key)
                        if not _ours(current, views[key][i], flats[key], bucket.layout.offsets[i]):
                            if current is views[key][i] or not _adoptable(current, views[key][i]):
                                return None
                            out.adopt_list.append((views[key][i], current))
                            out.attach_list.append((p, key, views[key][i]))
                if step_of[k] is None:
                    step_of[k] = value
                elif step_of[k] != value:
                    return None  # one bias correction per group: parameters at different steps
                out.steps.append(step)
                out.watched.append((p, entry, (step, *(entry.get(key) for key in STATE_KEYS[ADAM]))))
        out.update.state.append(flats)
    for k, group in enumerate(groups):
        hyper[k] = _sgd_row(group, first[k]) if kind == SGD else _adam_row(group, step_of[k])
    out.first, out.step_of = first, step_of
    return out


# What a watched parameter's state entry holds, per kind, in ``Plan.watched`` order.
WATCHED_KEYS = {SGD: STATE_KEYS[SGD], ADAM: ("step", *STATE_KEYS[ADAM])}


def _group_switches(kind, groups) -> tuple:
    """What of the param groups decides a plan's shape beyond the state: SGD
    groups without momentum keep no state."""
    return tuple(kind == ADAM or group["momentum"] == 0 for group in groups)


class PlanCache:
    """The last steady plan (a fused step whose state was already its own) of
    one optimizer, replayed while nothing it was made from has changed: the
    same kind, the same rows (the tables' layouts, by identity), the same
    param groups' switches, and every watched state entry holding the same
    tensors, Adam's step counts written only by the fused steps since.
    Making the plan anew reads every parameter's state in Python (~0.15 ms a
    step for ResNet-50's 161 tensors, bench/RESULTS.md "CPU (host)"); the
    check runs in C++ where the extension is built (``_host.state_watch``).
    The hyperparameter rows are made anew every step (schedulers change them)."""

    def __init__(self):
        self._steady = None

    def plan(self, kind, optimizer, buckets, state, tables) -> Plan | None:
        groups = optimizer.param_groups
        key = (kind, _group_switches(kind, groups), len(buckets))
        layouts = tuple(t.params for t in tables)
        steady = self._steady
        if (
            steady is not None
            and steady.key == key
            and all(a is b for a, b in zip(steady.layouts, layouts))
            and steady.watch.holds(state)
        ):
            return steady.replay(groups, state)
        self._steady = None
        out = plan(kind, optimizer, buckets, state)
        if out is not None and out.steady:
            self._steady = _SteadyPlan(key, layouts, out)
            out.on_commit = self._steady.committed
        return out


class _SteadyPlan:
    """A plan whose state is the fused step's own, and how to check it still is."""

    def __init__(self, key, layouts, made: Plan):
        from . import _host

        self.key, self.layouts = key, layouts
        self.kind = made.update.kind
        self.flats = made.update.state
        self.steps = made.steps
        self.first = list(made.first)
        self.step_of = list(made.step_of)  # Adam: the groups' step counts before the next step
        self.watch = _host.state_watch(
            [p for p, _, _ in made.watched], [entry for _, entry, _ in made.watched], WATCHED_KEYS[self.kind],
            [v for _, _, values in made.watched for v in values], "step" if self.kind == ADAM else None,
        )

    def replay(self, groups, state) -> Plan:
        if self.kind == SGD:
            hyper = [_sgd_row(group, first) for group, first in zip(groups, self.first)]
        else:
            hyper = [_adam_row(group, step) for group, step in zip(groups, self.step_of)]
        return Plan(Update(self.kind, hyper, self.flats), state, steps=self.steps, on_commit=self.committed)

    def committed(self):
        """The fused step ran: Adam's step counts are one more, written by it."""
        if self.kind == ADAM:
            self.step_of = [None if step is None else step + 1.0 for step in self.step_of]
        self.watch.note_versions()


def _ours(value, view, flat, offset) -> bool:
    """Whether ``value`` is our ``view`` and still in its flat buffer (``view.data = other`` re-points it)."""
    return value is view and view.data_ptr() == flat.data_ptr() + offset * flat.element_size()


def _adoptable(value, view) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == view.shape and value.device == view.device


def _row(kind: str, **values) -> list:
    """A param group's hyperparameters in the order of ``COLUMNS[kind]``, given by name."""
    columns = COLUMNS[kind]
    if len(values) != len(columns) or not all(name in values for name in columns):  # cheaper than two sets
        raise ValueError(f"a {kind} row has the columns {columns}, got {tuple(values)}")
    return [values[name] for name in columns]


def _sgd_row(group, first):
    return _row(
        SGD,
        lr=_scalar(group["lr"]),
        momentum=float(group["momentum"]),
        one_minus_dampening=1.0 - float(group["dampening"]),
        weight_decay=float(group["weight_decay"]),
        nesterov=float(bool(group["nesterov"])),
        maximize=float(bool(group["maximize"])),
        first=float(bool(first)),
    )


def _adam_row(group, step_before):
    """Adam's scalars as torch's single-tensor/foreach path forms them, in
    double on the host from the (CPU) step count; an lr tensor stays a tensor."""
    beta1, beta2 = (float(b) for b in group["betas"])
    step = (step_before or 0.0) + 1.0
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    lr = _scalar(group["lr"])
    weight_decay = float(group["weight_decay"])
    decoupled = bool(group.get("decoupled_weight_decay", False))
    if isinstance(lr, torch.Tensor):
        neg_step_size = -(lr.double() / bias_correction1)
        decay = 1 - lr.double() * weight_decay if decoupled and weight_decay != 0 else 1.0
    else:
        neg_step_size = -(lr / bias_correction1)
        decay = 1 - lr * weight_decay if decoupled and weight_decay != 0 else 1.0
    return _row(
        ADAM,
        neg_step_size=neg_step_size,
        bias_correction2_sqrt=bias_correction2**0.5,
        eps=float(group["eps"]),
        decay=decay,
        weight_decay=0.0 if decoupled else weight_decay,
        beta1_weight=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        maximize=float(bool(group["maximize"])),
    )


def views_of_ours(buckets) -> set:
    """Storage addresses of every flat base-state buffer (for state_dict copies)."""
    return {flat.untyped_storage().data_ptr() for b in buckets for flat in b.buffers.base_state.values()}
