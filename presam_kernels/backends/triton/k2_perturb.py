"""K2: backup <- x, x <- x + e, m <- m_new (docs/design.md §3).

Every program re-reduces all partials of every bucket in the same fixed order
(deterministic, no atomics), forms the global norm, the skip flag and the
scale on the device, recomputes c u exactly as K1 did, and writes.
A skipped step (non-finite norm or found_inf > 0) still writes backup = x (so
restore is exact) but leaves x and m untouched. Rows with perturbed = False
(rho == 0) only update m.

OUT_OF_PLACE: the flat buffer passed as ``backup`` is the bucket's adversarial
buffer; K2 writes x + e there (x itself when skipped) and never writes x, so
SAM's own traffic is 16 B per fp32 element (docs/design.md §3).
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from ...preconditioners import Constraint, Objective, Preconditioner
from .precondition import GRADIENT, INFO, Scalars, load_ema_ready, precondition, variant_constexprs, variant_scalars
from .table import CHUNK, FLAG_PERTURBED, FLAG_WEIGHT, PARTIALS_BLOCK, walk_rows

# Same work per element as K1 plus the writes; same shape. Not measured yet.
NUM_WARPS = 4
# A register cap for ptxas: without one, Triton 3.9's ptxas keeps infoSAM +
# Fisher (fp32, unaligned, out of place, sm_90) at 96 registers and spills 4 B;
# with it, 114 and no spill, still 4 programs per SM (bench/codegen.md).
MAX_REGISTERS = 128
FLT_MAX = tl.constexpr(3.4028234663852886e38)


class _Args(NamedTuple):
    """The launch's values every row and chunk reads (see table.walk_rows:
    built in the call, so the switches stay constexprs)."""

    backup_ptr: tl.tensor  # OUT_OF_PLACE: the adversarial buffer
    grad_ema_ptr: tl.tensor
    rho_ptr: tl.tensor
    ok: tl.tensor  # the step is not skipped
    scale: tl.tensor  # 1 / (norm + eps), 0 when skipped
    scalars: Scalars
    OBJECTIVE: tl.constexpr
    CONSTRAINT: tl.constexpr
    EMA_READY: tl.constexpr
    OUT_OF_PLACE: tl.constexpr


class _RowCtx(NamedTuple):
    m_ptr: tl.tensor  # the row's EMA
    b_ptr: tl.tensor  # the row's backup (OUT_OF_PLACE: adversarial) slice
    is_weight: tl.tensor
    perturbed: tl.tensor
    factor: tl.tensor  # scale * the group's rho
    walk: tl.tensor


@triton.jit
def _perturb_row(row, args):
    perturbed = (row.flags & FLAG_PERTURBED) != 0
    if args.OBJECTIVE == GRADIENT:  # no state to update: an unperturbed row is not touched
        walk = perturbed
    else:
        walk = True
    return _RowCtx(
        m_ptr=args.grad_ema_ptr + row.offset, b_ptr=args.backup_ptr + row.offset,
        is_weight=(row.flags & FLAG_WEIGHT) != 0, perturbed=perturbed,
        factor=args.scale * tl.load(args.rho_ptr + row.group), walk=walk,
    )


@triton.jit
def _perturb_chunk(acc, row, ctx, args, lanes, start, MASKED: tl.constexpr):
    """m <- m_new (unless skipped); backup <- x and x <- x + e (perturbed rows,
    x only unless skipped) over elements ``start + lanes`` of ``row``
    (OUT_OF_PLACE: the adversarial slice written x + e, or x)."""
    in_row = lanes < row.length - start if MASKED else None
    other = 0.0 if MASKED else None
    g = tl.load(row.g_ptr + start + lanes, mask=in_row, other=other).to(tl.float32)
    x_raw = tl.load(row.x_ptr + start + lanes, mask=in_row, other=other)
    x = x_raw.to(tl.float32)
    if args.OBJECTIVE != GRADIENT and args.EMA_READY:
        m = tl.load(ctx.m_ptr + start + lanes, mask=in_row, other=other)
    else:
        m = g
    cu, c, m_new = precondition(
        g=g, x=x, m=m, is_weight=ctx.is_weight, scalars=args.scalars,
        OBJECTIVE=args.OBJECTIVE, CONSTRAINT=args.CONSTRAINT, EMA_READY=args.EMA_READY,
    )
    # The row- and launch-wide conditions (perturbed, ok) are branches, not
    # parts of the mask: a scalar i1 in a mask is rejected by Triton 3.9's
    # interpreter, and a branch keeps the unmasked stores unpredicated.
    if args.OBJECTIVE != GRADIENT:
        if args.ok:
            tl.store(ctx.m_ptr + start + lanes, m_new, mask=in_row)
    e = c * cu * ctx.factor
    if x_raw.dtype == tl.float64:  # added in fp64, as eager's addcmul does: in fp32 x itself would round
        x_adv = x_raw + e.to(tl.float64)
    else:
        x_adv = (x + e).to(x_raw.dtype)
    if ctx.perturbed:
        if args.OUT_OF_PLACE:
            tl.store(ctx.b_ptr + start + lanes, tl.where(args.ok, x_adv, x_raw), mask=in_row)
        else:
            tl.store(ctx.b_ptr + start + lanes, x_raw, mask=in_row)
            if args.ok:
                tl.store(row.x_ptr + start + lanes, x_adv, mask=in_row)
    return acc


@triton.jit(do_not_specialize=["has_found_inf", "write_norm"])
def _perturb_kernel(
    table_ptr,
    n_rows,
    backup_ptr,
    grad_ema_ptr,
    ema_ready_ptr,
    partials_ptr,
    n_partials,
    rho_ptr,
    found_inf_ptr,
    has_found_inf,  # runtime flags, not constexprs: each would double the kernels to compile
    norm_ptr,
    write_norm,  # program 0 stores the norm and the skip flag
    skipped_ptr,
    ema_weight,
    old_weight,
    delta,
    eta,
    eps_norm,
    OBJECTIVE: tl.constexpr,
    CONSTRAINT: tl.constexpr,
    EMA_READY: tl.constexpr,
    OUT_OF_PLACE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    ema_ready = load_ema_ready(ema_ready_ptr, OBJECTIVE, EMA_READY)

    # The global norm, identically in every program (same lanes, same order).
    slots = tl.arange(0, PARTIALS_BLOCK)
    sums = tl.zeros([PARTIALS_BLOCK], dtype=tl.float32)
    base = 0
    while base < n_partials:  # while, not range: see table.py on the interpreter
        sums += tl.load(partials_ptr + base + slots, mask=base + slots < n_partials, other=0.0)
        base += PARTIALS_BLOCK
    norm = tl.sqrt_rn(tl.sum(sums, axis=0))
    skipped = (norm != norm) | (norm > FLT_MAX)
    if has_found_inf != 0:
        skipped = skipped | (tl.load(found_inf_ptr).to(tl.float32) > 0.0)
    if OBJECTIVE == INFO and EMA_READY:
        eps = eps_norm * ((1.0 - ema_ready) + ema_ready * delta)  # u is scaled by delta once the EMA is warm
    else:
        eps = eps_norm
    scale = tl.where(skipped, 0.0, tl.div_rn(1.0, norm + eps))
    if (write_norm != 0) & (tl.program_id(0) == 0):
        tl.store(norm_ptr, norm)
        tl.store(skipped_ptr, skipped.to(tl.uint8))

    walk_rows(
        table_ptr=table_ptr, n_rows=n_rows, elem=backup_ptr.dtype.element_ty, acc=tl.zeros([1], dtype=tl.int1),
        args=_Args(
            backup_ptr=backup_ptr, grad_ema_ptr=grad_ema_ptr, rho_ptr=rho_ptr, ok=skipped == 0, scale=scale,
            scalars=Scalars(ema_ready=ema_ready, ema_weight=ema_weight, old_weight=old_weight, delta=delta, eta=eta),
            OBJECTIVE=OBJECTIVE, CONSTRAINT=CONSTRAINT, EMA_READY=EMA_READY, OUT_OF_PLACE=OUT_OF_PLACE,
        ),
        ROW_FN=_perturb_row, CHUNK_FN=_perturb_chunk, ALIGNED=ALIGNED, BLOCK=BLOCK,
    )


KERNEL = _perturb_kernel
ARGUMENTS = dict(  # see k1_reduce.ARGUMENTS
    table_ptr="*i64", n_rows="i32", backup_ptr="*PARAM", grad_ema_ptr="*fp32", ema_ready_ptr="*fp32",
    partials_ptr="*fp32", n_partials="i32", rho_ptr="*fp32", found_inf_ptr="*fp32", has_found_inf="i32",
    norm_ptr="*fp32", write_norm="i32", skipped_ptr="*u8", ema_weight="fp32", old_weight="fp32",
    delta="fp32", eta="fp32", eps_norm="fp32",
)


def constexprs(
    objective: Objective, constraint: Constraint, ema_ready: bool, out_of_place: bool, aligned: bool,
    block: int = CHUNK, partials_block: int = PARTIALS_BLOCK,
) -> dict:
    """The compile-time switches of one launch (see k1_reduce.constexprs)."""
    return dict(
        variant_constexprs(objective, constraint, ema_ready),
        OUT_OF_PLACE=out_of_place, ALIGNED=aligned, BLOCK=block, PARTIALS_BLOCK=partials_block,
    )


def launch_perturb(
    dev_table, backup, grad_ema, ema_ready, partials, n_partials, rhos, found_inf, norm, skipped,
    programs, block, spec: Preconditioner, write_norm, out_of_place=False, partials_block=PARTIALS_BLOCK,
):
    """K2 over one bucket; the program 0 of the launch with ``write_norm``
    stores the norm and the skip flag. ``ema_ready``: as for
    k1_reduce.launch_reduce; ``out_of_place``: ``backup`` is the adversarial buffer."""
    _perturb_kernel[(programs,)](
        table_ptr=dev_table.rows,
        n_rows=dev_table.n_rows,
        backup_ptr=backup,
        grad_ema_ptr=grad_ema,
        ema_ready_ptr=backup if ema_ready is None else ema_ready,  # unused while the EMA is cold
        partials_ptr=partials,
        n_partials=n_partials,
        rho_ptr=rhos,
        found_inf_ptr=partials if found_inf is None else found_inf,
        has_found_inf=int(found_inf is not None),
        norm_ptr=norm,
        write_norm=int(write_norm),
        skipped_ptr=skipped,
        **variant_scalars(spec),
        eps_norm=spec.eps_norm,
        num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS,
        **constexprs(spec.objective, spec.constraint, ema_ready is not None, out_of_place, dev_table.aligned, block,
                     partials_block),
    )
