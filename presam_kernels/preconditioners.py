"""The two preconditioners of preSAM (docs/design.md §1) as plain data.

An optimizer picks one objective (how the direction u is made from the
gradient) and one constraint (the diagonal c of the ball ||C e|| <= rho);
the backends turn that choice into arithmetic.  Nothing here touches a tensor.
"""
from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass


class Objective(str, enum.Enum):
    """u = D^-1 g, the objective preconditioner (OP)."""

    GRADIENT = "gradient"  # u = g                                   (SAM, ASAM, FisherSAM)
    EMA = "ema"  # u = m, m <- (1 - theta) m + theta g                (VaSSO)
    INFO = "info"  # u = g / ((m - g)^2 + delta), m <- alpha m + (1 - alpha) g  (infoSAM)

    @property
    def has_state(self) -> bool:
        return self is not Objective.GRADIENT

    @property
    def code(self) -> int:
        """The member's position: the kernels' compile-time code for it."""
        return list(Objective).index(self)


class Constraint(str, enum.Enum):
    """c, with C^-1 = diag(c): the constraint preconditioner (CP)."""

    NONE = "none"  # c = 1
    ADAPTIVE = "adaptive"  # c = |x| for every tensor (the common wrapper's adaptive=True)
    ASAM = "asam"  # c = |x| + eta for weights, 1 for biases and norm shifts (official ASAM)
    FISHER = "fisher"  # c = 1 / sqrt(1 + eta g^2)

    @property
    def code(self) -> int:
        """The member's position: the kernels' compile-time code for it."""
        return list(Constraint).index(self)


@dataclass(frozen=True)
class Preconditioner:
    """Everything a backend needs to know about the variant, besides per-group rho.

    ``ema_weight`` is the weight of the NEW gradient in the EMA, whatever the
    public parameter was called: theta for VaSSO, 1 - alpha for infoSAM.
    """

    objective: Objective = Objective.GRADIENT
    constraint: Constraint = Constraint.NONE
    ema_weight: float = 1.0
    delta: float = 1e-12
    eta: float = 0.0
    eps_norm: float = 1e-12

    def __post_init__(self):
        object.__setattr__(self, "objective", Objective(self.objective))
        object.__setattr__(self, "constraint", Constraint(self.constraint))


def check_finite_number(name: str, value, low=None, high=None, low_open=False, high_open=False, hint=""):
    """Raise ValueError naming ``name`` unless low (<|<=) value (<|<=) high."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real: NumPy scalars too
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}{hint}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}{hint}")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must satisfy {lo}{name}{hi}, got {value!r}{hint}")
