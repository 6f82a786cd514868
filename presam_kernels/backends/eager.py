"""Eager PyTorch backend: the CPU path and the readable reference.

Every verb works on the per-bucket ``Table``s with ``torch._foreach_*`` ops,
one call per op over all rows (one row per bucket and group when flattened).
Scalars that depend on the data (the norm, the scale, the overflow flag, the
EMA-ready flag) stay device tensors: on an accelerator nothing here reads a
tensor on the host.  On the CPU, which runs ops synchronously, the overflow
flag is read to skip a pass: there is no device queue to stall.

Notation of DESIGN.md section 1: g gradient, m EMA state, u direction,
c constraint diagonal, e = rho * c^2 * u / (||c u|| + eps_norm).
"""
from __future__ import annotations

import torch

from ..preconditioners import Constraint, Objective, Preconditioner

name = "eager"


def _fp32(tensors):
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def _direction(spec: Preconditioner, g, m, first, scratch):
    """u (possibly scaled by delta, see below) and the EMA's next value m_new.

    ``first`` is True when the host knows no EMA step has happened yet, else a
    0-d fp32 tensor (1.0 = no successful EMA step yet; False when known ready)
    so that a skipped first step (non-finite gradients) needs no host read.
    infoSAM evaluates u' = delta * u = g / (1 + belief / delta): e does not
    change when u is scaled, and g / belief overflows fp32 (DESIGN.md).
    The returned lists are fresh tensors the caller may overwrite, except
    that u may be g itself (the gradient objective, or the first step).
    """
    if spec.objective is Objective.GRADIENT:
        return g, None
    if first is True:
        return g, g
    if first is False:
        return _direction_known_ready(spec, g, m, scratch)
    if spec.objective is Objective.EMA:
        weight = spec.ema_weight + (1.0 - spec.ema_weight) * first  # 1 on the first step: m = g
        m_new = torch._foreach_sub(g, m)
        torch._foreach_mul_(m_new, weight)
        torch._foreach_add_(m_new, m)
        return m_new, m_new
    # INFO: m_new - g = alpha * (m_old - g), formed without cancellation.
    alpha = 1.0 - spec.ema_weight
    gap = torch._foreach_sub(m, g)
    torch._foreach_mul_(gap, alpha * (1.0 - first))  # zero on the first step: m_new = g
    u = torch._foreach_mul(gap, gap)  # belief
    torch._foreach_mul_(u, (1.0 - first) / spec.delta)  # first step: belief / delta -> 0, u = g
    torch._foreach_add_(u, 1.0)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, g)  # u' = g / (1 + belief / delta)
    torch._foreach_add_(gap, g)  # m_new = g + alpha * (m_old - g)
    return u, gap


def _direction_known_ready(spec: Preconditioner, g, m, scratch):
    """_direction when the host knows the EMA is running (``first`` False, as
    on the CPU), in as few passes as torch allows: ``scratch[0]`` receives u,
    infoSAM's ``scratch[1]`` the gap m_old - g (3 passes, against 7 with the
    blended formulas), and m_new is returned as a callable that writes it
    into m in one more pass (ResNet-50 set: 12 B per element less than
    recomputing the gap there)."""
    u = scratch[0]
    if spec.objective is Objective.EMA:
        for s, mi, gi in zip(u, m, g):
            torch.lerp(mi, gi, spec.ema_weight, out=s)  # m + theta (g - m)
        return u, u
    alpha = 1.0 - spec.ema_weight
    gap = scratch[1]
    for s, d, mi, gi in zip(u, gap, m, g):
        torch.sub(mi, gi, out=d)
        torch.addcmul(_ONE, d, d, value=alpha * alpha / spec.delta, out=s)  # 1 + belief / delta
        torch.div(gi, s, out=s)  # u' = g / (1 + belief / delta)

    def m_new_into(targets):
        # g + alpha * (m_old - g), rounded as the Triton kernels and DESIGN.md
        # form it (torch.lerp rounds differently: 1 ulp of g off near m = g).
        for t, d, gi in zip(targets, gap, g):
            torch.add(gi, d, alpha=alpha, out=t)

    return u, m_new_into


_ONE = torch.ones(())


def _constraint(spec: Preconditioner, table, g):
    """c per row, or None where c = 1."""
    kind = spec.constraint
    if kind is Constraint.NONE or not len(table):  # no rows: the foreach ops refuse empty lists
        return [None] * len(table)
    if kind is Constraint.FISHER:
        c = torch._foreach_mul(g, g)
        torch._foreach_mul_(c, spec.eta)
        torch._foreach_add_(c, 1.0)
        torch._foreach_rsqrt_(c)
        return c
    c = [None] * len(table)
    rows = [i for i in range(len(table)) if kind is Constraint.ADAPTIVE or table.is_weight[i]]
    if rows:
        absx = torch._foreach_abs(_fp32([table.params[i] for i in rows]))
        if kind is Constraint.ASAM:
            torch._foreach_add_(absx, spec.eta)
        for i, a in zip(rows, absx):
            c[i] = a
    return c


def _mul_where(c, u):
    """c * u row by row, skipping rows with c = 1."""
    rows = [i for i, ci in enumerate(c) if ci is not None]
    out = list(u)
    if rows:
        for i, prod in zip(rows, torch._foreach_mul([c[i] for i in rows], [u[i] for i in rows])):
            out[i] = prod
    return out


def _sum_of_squares(tensors, device):
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(tensors)
    return torch.stack(norms).float().square().sum()


def unscale_(tables, inv_scale, found_inf):
    """Divide the gradients by the loss scale in place, recording overflow in
    ``found_inf`` (a 1-element fp32 tensor per device, as GradScaler keeps)."""
    by_dtype = {}
    for table in tables:
        for g in table.grads:
            by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


def _like_rows(bucket, table, flat):
    """Each row's slice of a bucket-sized flat buffer, shaped like the row."""
    if table.members is not None:
        views = bucket.views(flat)  # cached: no per-step views of per-parameter rows
        return [views[i] for i in table.members]
    return [flat.as_strided(t.size(), t.stride(), flat.storage_offset() + off)
            for t, off in zip(table.grad_emas, table.offsets)]


def perturb(tables, buckets, spec: Preconditioner, rhos, first, found_inf=None):
    """x <- x + e for every row (one global norm over all tables), backup <- x,
    EMA <- m_new (out-of-place tables: adversarial <- x + e instead).  A
    non-finite norm or ``found_inf`` > 0 perturbs nothing and keeps the EMA.
    Returns (norm, skipped) as 0-d fp32/bool device tensors."""
    device = buckets[0].device
    if device.type == "cpu" and isinstance(first, torch.Tensor):
        first = bool(first)  # synchronous device: reading the flag stalls nothing
    work, partials = [], []
    for table, bucket in zip(tables, buckets):
        g = _fp32(table.grads)
        scratch = None
        if first is False and spec.objective.has_state and len(table):
            slots = bucket.ensure_direction_scratch(2 if spec.objective is Objective.INFO else 1)
            scratch = [_like_rows(bucket, table, flat) for flat in slots]
        u, m_new = _direction(spec, g, table.grad_emas, first, scratch)
        c = _constraint(spec, table, g)
        cu = _mul_where(c, u)
        work.append((c, cu, m_new))
        partial = _sum_of_squares(cu, table.params[0].device if len(table) else buckets[0].device)
        if table.reduce_sum_of_squares is not None:
            partial = table.reduce_sum_of_squares(partial)
        partials.append(partial.to(device))
    norm = torch.stack(partials).sum().sqrt()
    skipped = ~torch.isfinite(norm)
    if found_inf is not None:
        skipped = skipped | (found_inf.reshape(()).to(device) > 0)
    eps = spec.eps_norm
    if spec.objective is Objective.INFO and first is not True:
        eps = spec.eps_norm * (first + (1.0 - first) * spec.delta)
    scale = torch.where(skipped, 0.0, 1.0 / (norm + eps))

    for table, (c, cu, m_new) in zip(tables, work):
        if len(table):
            _apply(table, c, cu, m_new, scale, skipped, rhos)
    return norm, skipped


def _apply(table, c, cu, m_new, scale, skipped, rhos):
    """One table's share of the step: EMA <- m_new, backup <- x, x <- x + e,
    unless ``skipped``.  Out of place: adversarial <- x + e (x when skipped),
    x and the backup untouched."""
    device = table.params[0].device
    skipped = skipped.to(device)
    # A CPU runs ops synchronously, so reading the flag stalls nothing there;
    # elsewhere the flag stays on the device and selects element-wise.
    on_host = device.type == "cpu"
    skip_now = on_host and bool(skipped)
    if m_new is not None and not skip_now:
        if callable(m_new):
            m_new(table.grad_emas)
        elif on_host:
            torch._foreach_copy_(table.grad_emas, m_new)
        else:
            for m, new in zip(table.grad_emas, m_new):
                torch.where(skipped, m, new, out=m)
    rows = [i for i in range(len(table)) if table.perturbed[i]]
    if not rows:
        return
    params = [table.params[i] for i in rows]
    if table.out_of_place:
        targets, originals = [table.adversarials[i] for i in rows], params
        if skip_now:
            torch._foreach_copy_(targets, params)
            return
    else:
        backups = [table.backups[i] for i in rows]
        torch._foreach_copy_(backups, params)
        targets, originals = params, backups
        if skip_now:
            return
    target_of = dict(zip(rows, targets))
    # e = (rho * scale) * c * (c u): one fused multiply-add per row, in fp32
    # whatever x's dtype, with no temporary (CPU: a fresh 100 MB temporary
    # costs more in page faults than the whole add).  Out of place it writes
    # x + e straight into the adversarial slice: the same multiply-add, so the
    # same bits, without first copying x there (8 B per element less).
    factor = {k: scale.to(device) * rhos[k] for k in {table.group_index[i] for i in rows}}
    scaled = [i for i in rows if c[i] is not None]
    if scaled:
        torch._foreach_mul_([cu[i] for i in scaled], [factor[table.group_index[i]] for i in scaled])
    operands = {i: (cu[i], factor[table.group_index[i]]) if c[i] is None else (c[i], cu[i]) for i in rows}
    if table.out_of_place:
        for i in rows:
            torch.addcmul(table.params[i], *operands[i], out=target_of[i])
    else:
        torch._foreach_addcmul_(params, [operands[i][0] for i in rows], [operands[i][1] for i in rows])
    if not on_host:
        # 0 * inf is NaN: a skipped step must leave x (or its copy) as it was, bit for bit.
        for t, o in zip(targets, originals):
            torch.where(skipped, o, t, out=t)

def restore(tables):
    """x <- backup, bit for bit, for every perturbed row (nothing to copy out of place)."""
    for table in tables:
        if table.out_of_place:
            continue
        rows = [i for i in range(len(table)) if table.perturbed[i]]
        if rows:
            torch._foreach_copy_([table.params[i] for i in rows], [table.backups[i] for i in rows])
