"""The elementwise math K1 and K2 share: u, c and the EMA's next value.

Same formulas, same order of operations as ``eager._direction`` and
``eager._constraint`` (docs/design.md §1), in fp32 whatever the parameter
dtype. K1 and K2 both call ``precondition`` so that K2 recomputes exactly the
c * u whose norm K1 summed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...preconditioners import Constraint, Objective

# Compile-time codes of the variant (tl.constexpr switches of one kernel
# family): each enum member's position, named here for the kernels.
OBJECTIVE_CODE = {objective: code for code, objective in enumerate(Objective)}
CONSTRAINT_CODE = {constraint: code for code, constraint in enumerate(Constraint)}

GRADIENT = tl.constexpr(OBJECTIVE_CODE[Objective.GRADIENT])
EMA = tl.constexpr(OBJECTIVE_CODE[Objective.EMA])
INFO = tl.constexpr(OBJECTIVE_CODE[Objective.INFO])

NONE = tl.constexpr(CONSTRAINT_CODE[Constraint.NONE])
ADAPTIVE = tl.constexpr(CONSTRAINT_CODE[Constraint.ADAPTIVE])
ASAM = tl.constexpr(CONSTRAINT_CODE[Constraint.ASAM])
FISHER = tl.constexpr(CONSTRAINT_CODE[Constraint.FISHER])


def variant_constexprs(objective: Objective, constraint: Constraint, first_step: bool) -> dict:
    """The switches K1 and K2 share. A variant without an EMA has no later
    step to tell apart: FIRST_STEP is set, so that it names one kernel."""
    return dict(
        OBJECTIVE=OBJECTIVE_CODE[objective],
        CONSTRAINT=CONSTRAINT_CODE[constraint],
        FIRST_STEP=first_step or objective is Objective.GRADIENT,
    )


@triton.jit
def load_first(first_ptr, OBJECTIVE: tl.constexpr, FIRST_STEP: tl.constexpr):
    """1.0 while the EMA has had no successful step (read from the device), 0.0
    when it has; a constant where the host knows or the variant has no EMA."""
    if OBJECTIVE == GRADIENT or FIRST_STEP:
        first = 1.0
    else:
        first = tl.load(first_ptr).to(tl.float32)
    return first


@triton.jit
def precondition(
    g,
    x,
    m,
    is_weight,
    first,
    ema_weight,
    one_minus_weight,
    alpha,
    delta,
    eta,
    OBJECTIVE: tl.constexpr,
    CONSTRAINT: tl.constexpr,
    FIRST_STEP: tl.constexpr,
):
    """(c * u, c, m_new) from fp32 g, x (param), m (old EMA).

    INFO returns u' = delta * u = g / (1 + belief / delta) (no overflow; the
    caller scales eps_norm by delta to match); on the first step u = g.
    """
    if OBJECTIVE == GRADIENT:
        u = g
        m_new = g
    elif FIRST_STEP:
        u = g
        m_new = g
    elif OBJECTIVE == EMA:
        weight = ema_weight + one_minus_weight * first  # 1 on the first step: m = g
        m_new = (g - m) * weight + m
        u = m_new
    else:
        # m_new - g = alpha * (m_old - g), formed without cancellation.
        gap = (m - g) * (alpha * (1.0 - first))
        m_new = g + gap
        belief = gap * gap * tl.div_rn(1.0 - first, delta) + 1.0
        u = tl.div_rn(g, belief)

    if CONSTRAINT == ADAPTIVE:
        c = tl.abs(x)
    elif CONSTRAINT == ASAM:
        c = tl.where(is_weight, tl.abs(x) + eta, 1.0)
    elif CONSTRAINT == FISHER:
        c = tl.div_rn(1.0, tl.sqrt_rn(g * g * eta + 1.0))
    else:
        c = 1.0
    return c * u, c, m_new
