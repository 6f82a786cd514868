"""The two steps as ``torch.library`` custom ops, so that ``torch.compile``
(``fullgraph=True`` included) can trace ``first_step`` and ``second_step``.

Under tracing a step reduces to one call, ``presam::first_step_`` or
``presam::second_step_``, on the parameters (written) and their gradients
(read). The schema declares exactly the tensors written (``mutates_args``),
so the compiler orders the step against the forward passes and gradient
transforms around it and never reuses a value computed at x for x + e.
(The flat buffers of ``flatten=True`` cannot be the operands: the compiler
refuses a mutated input that shares storage with the parameters without
being their autograd base.)

Why ``custom_op`` and not ``triton_op``: ``triton_op`` lets Inductor trace
the body with fake tensors, but the body builds device tables of raw
addresses (``data_ptr()``), which fake tensors have none of, and the kernels
store through those addresses, where Inductor's mutation analysis cannot see
them. The op stays opaque instead, and its body is the eager step (the host
logic, the bucket tables and one launch per kernel and bucket), run with the
real tensors.

Functionalization may hand the op copies of the tensors it mutates (it
writes the copies back after the graph), and the graph may have computed
new values for the gradients (a clipping in the same graph): the body
therefore binds the parameters and gradients to the tensors it was given
for the length of the step, and points them back afterwards. Bound, a step
is in place and has one table row per parameter. The optimizer's own
buffers (backup, EMA, the base optimizer's state) are written directly, as
state outside the graph.
"""
from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager

import torch

from ..buckets import _is_dtensor

_optimizers: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def register(optimizer) -> int:
    """A fresh handle (an int: what a custom op can take) for ``optimizer``."""
    handle = next(_handles)
    _optimizers[handle] = optimizer
    return handle


def _optimizer(handle: int):
    optimizer = _optimizers.get(handle)
    if optimizer is None:
        raise RuntimeError(f"presam op called with handle {handle}, whose optimizer no longer exists")
    return optimizer


def operands(optimizer):
    """(parameters, their gradients): what the ops take. Traced code."""
    params = optimizer._params()
    return params, [p.grad for p in params]


def traced_step(op, optimizer, grad_scaler):
    """A step as torch.compile traces it: checks, then one op. Traced code."""
    if grad_scaler is not None:
        raise NotImplementedError(
            "grad_scaler is not supported under torch.compile; call first_step/second_step "
            "outside the compiled region when training with a GradScaler"
        )
    params, grads = operands(optimizer)
    if any(_is_dtensor(p) for p in params):
        raise NotImplementedError(
            "DTensor (FSDP2) parameters are not supported under torch.compile: their norm needs a "
            "collective the presam ops do not run; call first_step/second_step outside the compiled region"
        )
    op(optimizer._handle, params, grads)


def _same_tensor(a, b) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


@contextmanager
def _bound(optimizer, params, grads):
    """Point each parameter (and gradient) at the op's operand for the length
    of one step, and back on the way out; the step builds one table row per
    parameter meanwhile (with flatten=True too), so that it reads and writes
    exactly the operands."""
    expected = optimizer._params()
    if len(params) != len(expected) or len(grads) != len(expected):
        raise RuntimeError(
            f"presam op got {len(params)} parameters and {len(grads)} gradients for an optimizer "
            f"with {len(expected)}; the parameters changed since the step was traced"
        )
    swapped = []
    try:
        for p, x, g in zip(expected, params, grads):
            if not _same_tensor(p, x):
                swapped.append((p, "data", p.data))
                p.data = x
            if g is not None and p.grad is not None and not _same_tensor(p.grad, g):
                swapped.append((p, "grad", p.grad))
                p.grad = g
        optimizer._bound_to_operands = True
        yield
    finally:
        optimizer._bound_to_operands = False
        for p, attr, value in reversed(swapped):
            setattr(p, attr, value)


# The ops keep Python state between them (the pending step), so a CUDA graph
# must never replay them without running their bodies: compile's
# mode="reduce-overhead" leaves them out of its graphs.
_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


@torch.library.custom_op("presam::first_step_", mutates_args=("params",), tags=_TAGS)
def first_step_op(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """x <- x + e in ``params``; the gradients are only read."""
    optimizer = _optimizer(handle)
    with _bound(optimizer, params, grads):
        optimizer._first_step_eager()


@torch.library.custom_op("presam::second_step_", mutates_args=("params",), tags=_TAGS)
def second_step_op(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """x <- the base optimizer's step from the saved x, in ``params``."""
    optimizer = _optimizer(handle)
    with _bound(optimizer, params, grads):
        optimizer._hooked_second_step()  # hooks and schedulers see a step


for _op in (first_step_op, second_step_op):
    _op.register_fake(lambda handle, params, grads: None)
