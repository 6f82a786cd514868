"""Eager PyTorch backend: the CPU path and the readable reference.

Every verb works on the per-bucket ``Table``s with ``torch._foreach_*`` ops.
``perturb`` runs in batches of at most ``PIECE`` elements (rows above that
cut into slices, small rows grouped), each through the whole formula before
the next, twice: once for the global norm, once more (recomputing u and c)
to write x + e.  So its temporaries stay a few MB whatever the model's size,
and the optimizer holds only the state the variant needs (README, "Memory").
Scalars that depend on the data (the norm, the scale, the overflow flag, the
EMA-ready flag) stay device tensors: on an accelerator nothing here reads a
tensor on the host.  On the CPU, which runs ops synchronously, the overflow
flag is read to skip a pass: there is no device queue to stall.

Notation of docs/design.md §1: g gradient, m EMA state, u direction,
c constraint diagonal, e = rho * c^2 * u / (||c u|| + eps_norm).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..buckets import _non_overlapping_and_dense
from ..preconditioners import Constraint, Objective, Preconditioner
from .protocol import Perturbation, PerturbCall

name = "eager"

# Elements per batch of perturb's work.  Its temporaries (an fp32 copy of a
# bf16 gradient and parameter, u, c, c u, the fp32 result of a bf16 x + e)
# are at most ~8 fp32 values per element of a batch: 8 MB at 2^18, against
# 14 B per element of the whole model when a batch was a whole bucket.
# ResNet-50 set, infoSAM, fp32, the shared 2-core CPU at load ~14 (noisy),
# step time against the unbatched code in paired alternating runs (median
# of 16-20): 2^14 3.2x, 2^16 1.4x, 2^18 1.2x, 2^20 1.4x, 2^22 1.5x; 2^18
# with the factors made once per table (not per batch) and the reused
# scratch: 1.10x (SAM 1.04x); at load ~5: 1.07x, flatten=True 0.85x
# (SAM 0.97x, 0.99x).
PIECE = 1 << 18
# The same on accelerators (FSDP2 shards take this backend on GPUs), where
# each op of a batch is a launch (~5 us): at ~180 B per element over the
# formula's ~15 ops and ~3 TB/s, batches below ~1M elements are launch-bound.
# 2^22 (temporaries up to ~128 MB) is that estimate, not a measurement yet.
PIECE_ACCELERATOR = 1 << 22


def _piece(device: torch.device) -> int:
    return PIECE if device.type == "cpu" else PIECE_ACCELERATOR


def _makes_temporaries(spec: Preconditioner, dtype: torch.dtype) -> bool:
    """Whether the formula needs temporaries for this bucket: not for plain
    SAM on fp32 (u = c u = g), which then runs as one batch (no extra calls)."""
    return dtype != torch.float32 or spec.objective is not Objective.GRADIENT or spec.constraint is not Constraint.NONE


def _fp32(tensors):
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


class _Scratch:
    """fp32 buffers of one ``perturb`` call that every batch reuses, carved
    into views shaped and strided like the batch's rows: a fresh temporary
    per batch is fresh memory to the OS, and its first touch page-faults
    (ResNet-50 set, infoSAM, against the unbatched step in paired runs:
    1.54x and 1.67x with fresh ones, 1.10x and 1.11x with these)."""

    ALIGN = 16  # elements: views start 64-byte aligned, as bucket slices do

    def __init__(self):
        self.flats = {}

    def like(self, slot, tensors):
        """A view per tensor (fp32, same shape and strides), from buffer ``slot``;
        a fresh tensor where the buffer is full or the tensor is not dense."""
        if not tensors:
            return []
        device = tensors[0].device
        key = (device, slot)
        if key not in self.flats:
            self.flats[key] = torch.empty(_piece(device) + 64 * self.ALIGN, dtype=torch.float32, device=device)
        flat, offset, out = self.flats[key], 0, []
        for t in tensors:
            n = t.numel()
            if offset + n <= flat.numel() and _non_overlapping_and_dense(t):
                out.append(flat.as_strided(t.shape, t.stride(), offset))
                offset += (n + self.ALIGN - 1) // self.ALIGN * self.ALIGN
            else:
                out.append(torch.empty_like(t, dtype=torch.float32))
        return out


def _direction(spec: Preconditioner, g, m, ema_ready, scratch):
    """u (possibly scaled by delta, see below) and the EMA's next value m_new.

    ``ema_ready`` is False when the host knows the EMA has had no finite step,
    True when it knows it has, else a 0-d fp32 tensor (1.0 = ready) so that a
    skipped first step (non-finite gradients) needs no host read.
    infoSAM evaluates u' = delta * u = g / (1 + belief / delta): e does not
    change when u is scaled, and g / belief overflows fp32 (docs/design.md).
    The returned lists are fresh tensors the caller may overwrite, except
    that u may be g itself (the gradient objective, or the first step).
    """
    if spec.objective is Objective.GRADIENT:
        return g, None
    if ema_ready is False:
        return g, g
    if ema_ready is True:
        return _direction_known_ready(spec, g, m, scratch)
    not_ready = 1.0 - ema_ready  # 1.0 until the EMA had a finite step: the blends below then give m = g, u = g
    if spec.objective is Objective.EMA:
        weight = spec.ema_weight + (1.0 - spec.ema_weight) * not_ready  # 1 on the first step: m = g
        m_new = torch._foreach_sub(g, m)
        torch._foreach_mul_(m_new, weight)
        torch._foreach_add_(m_new, m)
        return m_new, m_new
    # INFO: m_new - g = alpha * (m_old - g), formed without cancellation.
    alpha = 1.0 - spec.ema_weight
    gap = torch._foreach_sub(m, g)
    torch._foreach_mul_(gap, alpha * (1.0 - not_ready))  # zero on the first step: m_new = g
    u = torch._foreach_mul(gap, gap)  # belief
    torch._foreach_mul_(u, (1.0 - not_ready) / spec.delta)  # first step: belief / delta -> 0, u = g
    torch._foreach_add_(u, 1.0)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, g)  # u' = g / (1 + belief / delta)
    torch._foreach_add_(gap, g)  # m_new = g + alpha * (m_old - g)
    return u, gap


def _direction_known_ready(spec: Preconditioner, g, m, scratch):
    """_direction when the host knows the EMA is ready (``ema_ready`` True, as
    on the CPU), in as few passes as torch allows: u, and infoSAM's gap
    m_old - g (3 passes, against 7 with the blended formulas), with m_new
    returned as a callable that writes it into m in one more pass.  u and
    the gap are views of ``scratch``, valid until its next batch."""
    u = scratch.like(0, g)
    if spec.objective is Objective.EMA:
        for s, mi, gi in zip(u, m, g):
            torch.lerp(mi, gi, spec.ema_weight, out=s)  # m + theta (g - m)
        return u, u
    alpha = 1.0 - spec.ema_weight
    gap = scratch.like(1, g)
    for s, d, mi, gi in zip(u, gap, m, g):
        torch.sub(mi, gi, out=d)
        torch.addcmul(_ONE, d, d, value=alpha * alpha / spec.delta, out=s)  # 1 + belief / delta
        torch.div(gi, s, out=s)  # u' = g / (1 + belief / delta)

    def m_new_into(targets):
        # g + alpha * (m_old - g), rounded as the Triton kernels and docs/design.md
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


def unscale_(tables, inv_scale, found_inf):
    """Divide the gradients by the loss scale in place, recording overflow in
    ``found_inf`` (a 1-element fp32 tensor per device, as GradScaler keeps)."""
    by_dtype = {}
    for table in tables:
        for g in table.grads:
            by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


@dataclass
class _Batch:
    """At most ``PIECE`` elements of one table: whole rows, or slices of a row
    (1-D, in memory order), with the row's metadata.  ``saved`` is the backup,
    or out of place the adversarial buffer; ``grad_emas`` None without EMA."""

    out_of_place: bool
    grad_emas: list | None
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    saved: list = field(default_factory=list)
    group_index: list = field(default_factory=list)
    is_weight: list = field(default_factory=list)
    perturbed: list = field(default_factory=list)

    def __len__(self):
        return len(self.params)


def _batches(table, piece):
    """``table`` cut into batches of at most ``piece`` elements; a row too
    big for one batch is cut into slices of that many elements."""
    saved = table.adversarials if table.out_of_place else table.backups
    emas = table.grad_emas
    batch, size = _Batch(table.out_of_place, None if emas is None else []), 0
    for i in range(len(table)):
        row = [table.params[i], table.grads[i], saved[i]] + ([emas[i]] if emas is not None else [])
        for part in _slices(row, piece):
            n = part[0].numel()
            if size and size + n > piece:
                yield batch
                batch, size = _Batch(table.out_of_place, None if emas is None else []), 0
            batch.params.append(part[0])
            batch.grads.append(part[1])
            batch.saved.append(part[2])
            if emas is not None:
                batch.grad_emas.append(part[3])
            batch.group_index.append(table.group_index[i])
            batch.is_weight.append(table.is_weight[i])
            batch.perturbed.append(table.perturbed[i])
            size += n
    if len(batch):
        yield batch


def _slices(row, piece):
    """Same-index slices of ``piece`` elements of the row's tensors (param,
    grad, saved[, EMA]), or the row whole when it is small or its tensors do
    not share one dense layout (a gradient strided unlike its parameter:
    rare; that row's temporaries are then row-sized)."""
    first = row[0]
    n = first.numel()
    if n <= piece or any(t.shape != first.shape or t.stride() != first.stride() for t in row) \
            or not _non_overlapping_and_dense(first):
        return [row]
    flat = [t.as_strided((n,), (1,), t.storage_offset()) for t in row]  # memory order, same for all
    return [[f[start:start + piece] for f in flat] for start in range(0, n, piece)]


def _terms(spec: Preconditioner, batch, ema_ready, scratch):
    """(c, c u, m_new) of one batch: temporaries sized like the batch."""
    g = _fp32(batch.grads)
    u, m_new = _direction(spec, g, batch.grad_emas, ema_ready, scratch)
    c = _constraint(spec, batch, g)
    return c, _mul_where(c, u), m_new


def perturb(tables, buckets, spec: Preconditioner, rhos, ema_ready, found_inf=None) -> Perturbation:
    """x <- x + e for every row (one global norm over all tables), backup <- x,
    EMA <- m_new (out-of-place tables: adversarial <- x + e instead).  A
    non-finite norm or ``found_inf`` > 0 perturbs nothing and keeps the EMA.
    The result's norm and skipped flag are 0-d fp32/bool device tensors.

    Two passes over the batches: the norm, then c and u computed again (the
    same ops, so the same bits) to write x + e: recomputing costs less than
    keeping c u for the whole model (4-12 B per element) between the passes."""
    device = buckets[0].layout.device
    if device.type == "cpu" and isinstance(ema_ready, torch.Tensor):
        ema_ready = bool(ema_ready)  # synchronous device: reading the flag stalls nothing
    partials, scratch = [], _Scratch()
    pieces = [_piece(b.layout.device) if _makes_temporaries(spec, b.layout.dtype) else sys.maxsize for b in buckets]
    for table, bucket, piece in zip(tables, buckets, pieces):
        row_device = table.params[0].device if len(table) else bucket.layout.device
        norms = []  # per row or slice, as torch._foreach_norm gives them
        for batch in _batches(table, piece):
            norms += torch._foreach_norm(_terms(spec, batch, ema_ready, scratch)[1])
        partial = _sum_of_squares(norms, row_device)
        if table.reduce_sum_of_squares is not None:
            partial = table.reduce_sum_of_squares(partial)
        partials.append(partial.to(device))
    norm = torch.stack(partials).sum().sqrt()
    skipped = ~torch.isfinite(norm)
    if found_inf is not None:
        skipped = skipped | (found_inf.reshape(()).to(device) > 0)
    eps = spec.eps_norm
    if spec.objective is Objective.INFO and ema_ready is not False:
        not_ready = 1.0 - ema_ready  # u is scaled by delta once the EMA is ready
        eps = spec.eps_norm * (not_ready + (1.0 - not_ready) * spec.delta)
    scale = torch.where(skipped, 0.0, 1.0 / (norm + eps))

    for table, piece in zip(tables, pieces):
        if not len(table):
            continue
        row_device = table.params[0].device
        row_skipped = skipped.to(row_device)
        # A CPU runs ops synchronously, so reading the flag stalls nothing there;
        # elsewhere the flag stays on the device and selects element-wise.
        skip_now = row_device.type == "cpu" and bool(row_skipped)
        factor = {k: scale.to(row_device) * rhos[k] for k in set(table.group_index)}  # rho / (||c u|| + eps)
        for batch in _batches(table, piece):
            c, cu, m_new = ([None] * len(batch), None, None) if skip_now else _terms(spec, batch, ema_ready, scratch)
            _apply(batch, c, cu, m_new, factor, row_skipped, skip_now)
    return Perturbation(norm, skipped, path=name, tables=list(tables))


def _sum_of_squares(norms, device):
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(norms).float().square().sum()


def _apply(batch, c, cu, m_new, factor, skipped, skip_now):
    """One batch's share of the step: EMA <- m_new, backup <- x, x <- x + e,
    unless ``skipped`` (``skip_now``: known on the host).  Out of place:
    adversarial <- x + e (x when skipped), x and the backup untouched.
    ``factor[k]``: group k's rho / (||c u|| + eps), a device tensor."""
    device = batch.params[0].device
    on_host = device.type == "cpu"
    if m_new is not None and not skip_now:
        if callable(m_new):
            m_new(batch.grad_emas)
        elif on_host:
            torch._foreach_copy_(batch.grad_emas, m_new)
        else:
            for m, new in zip(batch.grad_emas, m_new):
                torch.where(skipped, m, new, out=m)
    rows = [i for i in range(len(batch)) if batch.perturbed[i]]
    if not rows:
        return
    params = [batch.params[i] for i in rows]
    if batch.out_of_place:
        targets, originals = [batch.saved[i] for i in rows], params
        if skip_now:
            torch._foreach_copy_(targets, params)
            return
    else:
        backups = [batch.saved[i] for i in rows]
        torch._foreach_copy_(backups, params)
        targets, originals = params, backups
        if skip_now:
            return
    target_of = dict(zip(rows, targets))
    # e = (rho * scale) * c * (c u): one fused multiply-add per row, in fp32
    # whatever x's dtype.  Out of place it writes x + e straight into the
    # adversarial slice: the same multiply-add, so the same bits, without
    # first copying x there (8 B per element less).
    scaled = [i for i in rows if c[i] is not None]
    if scaled:
        torch._foreach_mul_([cu[i] for i in scaled], [factor[batch.group_index[i]] for i in scaled])
    operands = {i: (cu[i], factor[batch.group_index[i]]) if c[i] is None else (c[i], cu[i]) for i in rows}
    if batch.out_of_place:
        for i in rows:
            torch.addcmul(batch.params[i], *operands[i], out=target_of[i])
    else:
        torch._foreach_addcmul_(params, [operands[i][0] for i in rows], [operands[i][1] for i in rows])
    if not on_host:
        # 0 * inf is NaN: a skipped step must leave x (or its copy) as it was, bit for bit.
        for t, o in zip(targets, originals):
            torch.where(skipped, o, t, out=t)


def restore(perturbation: Perturbation):
    """x <- backup, bit for bit, for every perturbed row (nothing to copy out of place)."""
    restore_tables(perturbation.tables)


def restore_tables(tables):
    """``restore`` of these tables (what a compiled backend hands over)."""
    for table in tables:
        if table.out_of_place:
            continue
        rows = [i for i in range(len(table)) if table.perturbed[i]]
        if rows:
            torch._foreach_copy_([table.params[i] for i in rows], [table.backups[i] for i in rows])


def restore_and_step(tables, buckets, prepare) -> bool:
    """No fused step here: the caller restores and steps the base optimizer."""
    return False


def plan_perturb(tables, buckets, spec: Preconditioner, rhos, ema_ready) -> PerturbCall:
    """``perturb`` with these arguments (no host work to keep)."""
    return PerturbCall(perturb, buckets, spec, rhos, ema_ready)


def plan_restore_and_step(tables, buckets) -> None:
    """No fused step here."""
    return None
