"""The elementwise math K1 and K2 share: u, c and the EMA's next value.

Same formulas, same order of operations as ``eager._direction`` and
``eager._constraint`` (docs/design.md §1), in fp32 whatever the parameter
dtype. K1 and K2 both call ``precondition`` so that K2 recomputes exactly the
c * u whose norm K1 summed.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from ...preconditioners import Constraint, Objective, Preconditioner

# Compile-time codes of the variant: the enums' own (``Objective.code``).
GRADIENT = tl.constexpr(Objective.GRADIENT.code)
EMA = tl.constexpr(Objective.EMA.code)
INFO = tl.constexpr(Objective.INFO.code)

NONE = tl.constexpr(Constraint.NONE.code)
ADAPTIVE = tl.constexpr(Constraint.ADAPTIVE.code)
ASAM = tl.constexpr(Constraint.ASAM.code)
FISHER = tl.constexpr(Constraint.FISHER.code)


class Scalars(NamedTuple):
    """The launch's scalars ``precondition`` reads (K1 and K2 build one in the
    kernel and pass it in their walk's ``args``; the switches are ``args``'
    own fields, see table.walk_rows)."""

    ema_ready: tl.tensor  # 1.0 once the EMA has had a finite step, else 0.0 (see load_ema_ready)
    ema_weight: tl.tensor  # the new gradient's weight in the EMA
    old_weight: tl.tensor  # 1 - ema_weight: the old EMA's (infoSAM's alpha)
    delta: tl.tensor
    eta: tl.tensor


def variant_constexprs(objective: Objective, constraint: Constraint, ema_ready: bool) -> dict:
    """The switches K1 and K2 share. A variant without an EMA has no warm
    step to tell apart: EMA_READY is unset, so that it names one kernel."""
    return dict(
        OBJECTIVE=objective.code,
        CONSTRAINT=constraint.code,
        EMA_READY=ema_ready and objective is not Objective.GRADIENT,
    )


def variant_scalars(spec: Preconditioner) -> dict:
    """The kernels' scalar arguments of the variant, by name."""
    return dict(ema_weight=spec.ema_weight, old_weight=1.0 - spec.ema_weight, delta=spec.delta, eta=spec.eta)


@triton.jit
def load_ema_ready(ema_ready_ptr, OBJECTIVE: tl.constexpr, EMA_READY: tl.constexpr):
    """1.0 once the EMA has had a finite step, read from the device (the host
    does not know it: a skipped step leaves it cold); 0.0 where the host knows
    it is cold or the variant has no EMA."""
    if OBJECTIVE == GRADIENT or not EMA_READY:
        ema_ready = 0.0
    else:
        ema_ready = tl.load(ema_ready_ptr).to(tl.float32)
    return ema_ready


@triton.jit
def precondition(
    g, x, m, is_weight, scalars, OBJECTIVE: tl.constexpr, CONSTRAINT: tl.constexpr, EMA_READY: tl.constexpr
):
    """(c * u, c, m_new) from fp32 g, x (param), m (old EMA).

    INFO returns u' = delta * u = g / (1 + belief / delta) (no overflow; the
    caller scales eps_norm by delta to match); while the EMA is cold, u = g.
    """
    if OBJECTIVE == GRADIENT:
        u = g
        m_new = g
    elif not EMA_READY:
        u = g
        m_new = g
    elif OBJECTIVE == EMA:
        weight = scalars.ema_weight + scalars.old_weight * (1.0 - scalars.ema_ready)  # cold: 1, m = g
        m_new = (g - m) * weight + m
        u = m_new
    else:
        # m_new - g = alpha * (m_old - g), formed without cancellation.
        gap = (m - g) * (scalars.old_weight * scalars.ema_ready)
        m_new = g + gap
        belief = gap * gap * tl.div_rn(scalars.ema_ready, scalars.delta) + 1.0
        u = tl.div_rn(g, belief)

    if CONSTRAINT == ADAPTIVE:
        c = tl.abs(x)
    elif CONSTRAINT == ASAM:
        c = tl.where(is_weight, tl.abs(x) + scalars.eta, 1.0)
    elif CONSTRAINT == FISHER:
        c = tl.div_rn(1.0, tl.sqrt_rn(g * g * scalars.eta + 1.0))
    else:
        c = 1.0
    return c * u, c, m_new
