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


class Variant(NamedTuple):
    """What ``precondition`` reads besides the elements: the launch's scalars
    and switches (K1 and K2 build one in the kernel)."""

    ema_ready: tl.tensor  # 1.0 once the EMA has had a finite step, else 0.0 (see load_ema_ready)
    ema_weight: tl.tensor  # the new gradient's weight in the EMA
    old_weight: tl.tensor  # 1 - ema_weight: the old EMA's (infoSAM's alpha)
    delta: tl.tensor
    eta: tl.tensor
    OBJECTIVE: tl.constexpr
    CONSTRAINT: tl.constexpr
    EMA_READY: tl.constexpr


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
def precondition(g, x, m, is_weight, variant):
    """(c * u, c, m_new) from fp32 g, x (param), m (old EMA).

    INFO returns u' = delta * u = g / (1 + belief / delta) (no overflow; the
    caller scales eps_norm by delta to match); while the EMA is cold, u = g.
    """
    if variant.OBJECTIVE == GRADIENT:
        u = g
        m_new = g
    elif not variant.EMA_READY:
        u = g
        m_new = g
    elif variant.OBJECTIVE == EMA:
        weight = variant.ema_weight + variant.old_weight * (1.0 - variant.ema_ready)  # cold: 1, m = g
        m_new = (g - m) * weight + m
        u = m_new
    else:
        # m_new - g = alpha * (m_old - g), formed without cancellation.
        gap = (m - g) * (variant.old_weight * variant.ema_ready)
        m_new = g + gap
        belief = gap * gap * tl.div_rn(variant.ema_ready, variant.delta) + 1.0
        u = tl.div_rn(g, belief)

    if variant.CONSTRAINT == ADAPTIVE:
        c = tl.abs(x)
    elif variant.CONSTRAINT == ASAM:
        c = tl.where(is_weight, tl.abs(x) + variant.eta, 1.0)
    elif variant.CONSTRAINT == FISHER:
        c = tl.div_rn(1.0, tl.sqrt_rn(g * g * variant.eta + 1.0))
    else:
        c = 1.0
    return c * u, c, m_new
