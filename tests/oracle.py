"""A float64 re-computation of docs/design.md §1, written from the equations
and independent of the package (tests/helpers.py compares against it).

One step at parameters x with gradients g:

    u = D^-1 g                                  (objective: g, VaSSO's m, infoSAM's g / (belief + delta))
    e = rho * c^2 * u / (||c * u|| + eps_norm)  (c: 1, |x|, |x| + eta on weights, 1 / sqrt(1 + eta g^2))

||.|| is one L2 norm over every parameter that has a gradient, across all
param groups; rho is per group; eps_norm is added after the square root.
The EMA state m is kept in fp32 (as docs/design.md's mixed-precision rule says),
so the oracle rounds the stored m to fp32 after each update, while the values
it uses within the step (m_new, belief) stay float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass(frozen=True)
class Spec:
    """Which row of docs/design.md's table: objective and constraint, with their constants."""

    objective: str = "gradient"  # "gradient" (u = g) | "ema" (VaSSO) | "info" (infoSAM)
    constraint: str = "none"  # "none" | "adaptive" | "asam" | "fisher"
    alpha: float = 0.9  # infoSAM: weight on the OLD EMA value
    theta: float = 0.9  # VaSSO: weight on the NEW gradient
    delta: float = 1e-12  # infoSAM: floor added to the belief
    eta: float = 0.01  # ASAM: added to |x|; Fisher: weight of g^2
    eps_norm: float = 1e-12  # added to the norm after the square root


class Oracle:
    """Replays the optimizer's first steps in float64.

    ``step`` takes the parameters x and gradients g (None = no gradient) of
    every parameter, the rho of each parameter's group and, for ASAM, whether
    each parameter is a weight tensor; it returns x + e per parameter (x where
    the parameter has no gradient or its group has rho == 0) and updates m.
    """

    def __init__(self, spec: Spec, n_params: int):
        self.spec = spec
        self.m = [None] * n_params  # float64 tensors holding fp32-representable values
        self.started = False  # whether one EMA step has happened (then m = g no more)

    def _direction(self, i, g):
        """(u, m_new) for parameter i."""
        s = self.spec
        if s.objective == "gradient":
            return g, None
        if s.objective == "ema":
            m_new = g.clone() if not self.started else (1.0 - s.theta) * self.m[i] + s.theta * g
            return m_new, m_new
        if s.objective == "info":
            if not self.started:
                return g, g.clone()  # belief = 1: plain SAM, m = g
            m_new = s.alpha * self.m[i] + (1.0 - s.alpha) * g
            belief = (m_new - g) ** 2
            return g / (belief + s.delta), m_new
        raise ValueError(s.objective)

    def _constraint(self, x, g, is_weight):
        s = self.spec
        if s.constraint == "none":
            return torch.ones_like(x)
        if s.constraint == "adaptive":
            return x.abs()
        if s.constraint == "asam":
            return x.abs() + s.eta if is_weight else torch.ones_like(x)
        if s.constraint == "fisher":
            return 1.0 / torch.sqrt(1.0 + s.eta * g * g)
        raise ValueError(s.constraint)

    def step(self, xs, gs, rhos, is_weight=None):
        """x + e for every parameter, in float64; also sets ``self.norm`` = ||c u||."""
        n = len(xs)
        is_weight = is_weight or [x.dim() >= 2 for x in xs]
        xs = [x.detach().to(F64) for x in xs]
        gs = [None if g is None else g.detach().to(F64) for g in gs]
        cu, c2u, m_new = [None] * n, [None] * n, [None] * n
        for i in range(n):
            if gs[i] is None:
                continue
            u, m_new[i] = self._direction(i, gs[i])
            c = self._constraint(xs[i], gs[i], is_weight[i])
            cu[i] = c * u
            c2u[i] = c * c * u
        total = sum(float((t * t).sum()) for t in cu if t is not None)
        self.norm = total ** 0.5
        out = []
        for i in range(n):
            if gs[i] is None or rhos[i] == 0:
                out.append(xs[i])
            else:
                out.append(xs[i] + rhos[i] * c2u[i] / (self.norm + self.spec.eps_norm))
        if self.spec.objective != "gradient":
            for i in range(n):
                if m_new[i] is not None:
                    self.m[i] = m_new[i].to(torch.float32).to(F64)  # state is fp32
            self.started = True
        return out

