"""K1: one fp32 partial sum of (c u)^2 per program (docs/design.md §3).

Reads g (and m, x where the variant needs them), writes ``num_programs``
partials at ``partials[slot:]`` and nothing else. Every program writes its
slot, even with no chunk to do, so the buffer never needs clearing; each
program sums its chunks in a fixed order, so the partials are run-to-run
identical.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from ...preconditioners import Constraint, Objective, Preconditioner
from .precondition import (
    ADAPTIVE, ASAM, GRADIENT, Scalars, load_ema_ready, precondition, variant_constexprs, variant_scalars,
)
from .table import CHUNK, FLAG_WEIGHT, walk_rows

# 4 warps x 32 threads x 8 elements = one 1024-element chunk per step. Not
# measured yet; to be tuned on the GPU together with table.CHUNK.
NUM_WARPS = 4
# A register cap for ptxas, as K2's: without one, Triton 3.9's ptxas keeps
# infoSAM (fp32, aligned, after the first step, sm_90) at 72 registers and
# spills 4 B; at 128 the unaligned infoSAM+adaptive/asam variants spill 36 B;
# at 168 no K1 specialization spills on 3.6 or 3.9, sm_80 or sm_90 (the
# codegen sweep, `make test-codegen-all` / `make test-triton-next`).
MAX_REGISTERS = 168


class _Args(NamedTuple):
    """The launch's values every row and chunk reads (see table.walk_rows:
    built in the call, so the switches stay constexprs)."""

    grad_ema_ptr: tl.tensor
    scalars: Scalars
    OBJECTIVE: tl.constexpr
    CONSTRAINT: tl.constexpr
    EMA_READY: tl.constexpr


class _RowCtx(NamedTuple):
    m_ptr: tl.tensor  # the row's EMA
    is_weight: tl.tensor
    walk: tl.tensor  # every row counts


@triton.jit
def _reduce_row(row, args):
    return _RowCtx(m_ptr=args.grad_ema_ptr + row.offset, is_weight=(row.flags & FLAG_WEIGHT) != 0, walk=True)


@triton.jit
def _reduce_chunk(acc, row, ctx, args, lanes, start, MASKED: tl.constexpr):
    """acc + (c u)^2 over elements ``start + lanes`` of ``row``."""
    mask = lanes < row.length - start if MASKED else None
    other = 0.0 if MASKED else None
    g = tl.load(row.g_ptr + start + lanes, mask=mask, other=other).to(tl.float32)
    if args.CONSTRAINT == ADAPTIVE:
        x = tl.load(row.x_ptr + start + lanes, mask=mask, other=other).to(tl.float32)
    elif args.CONSTRAINT == ASAM:  # c = 1 on non-weight rows: x not needed
        if ctx.is_weight:  # a branch, not a mask: see k2_perturb on scalar masks
            x = tl.load(row.x_ptr + start + lanes, mask=mask, other=other).to(tl.float32)
        else:
            x = tl.zeros_like(g)
    else:
        x = g
    if args.OBJECTIVE != GRADIENT and args.EMA_READY:
        m = tl.load(ctx.m_ptr + start + lanes, mask=mask, other=other)
    else:
        m = g
    cu, c, m_new = precondition(
        g=g, x=x, m=m, is_weight=ctx.is_weight, scalars=args.scalars,
        OBJECTIVE=args.OBJECTIVE, CONSTRAINT=args.CONSTRAINT, EMA_READY=args.EMA_READY,
    )
    if MASKED:
        cu = tl.where(mask, cu, 0.0)
    return acc + cu * cu


@triton.jit
def _reduce_kernel(
    table_ptr,
    n_rows,
    backup_ptr,  # only its element type is used: the parameters' dtype
    grad_ema_ptr,
    ema_ready_ptr,
    partials_ptr,
    slot,
    ema_weight,
    old_weight,
    delta,
    eta,
    OBJECTIVE: tl.constexpr,
    CONSTRAINT: tl.constexpr,
    EMA_READY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    scalars = Scalars(
        ema_ready=load_ema_ready(ema_ready_ptr, OBJECTIVE, EMA_READY), ema_weight=ema_weight,
        old_weight=old_weight, delta=delta, eta=eta,
    )
    acc = walk_rows(
        table_ptr=table_ptr, n_rows=n_rows, elem=backup_ptr.dtype.element_ty, acc=tl.zeros([BLOCK], dtype=tl.float32),
        args=_Args(
            grad_ema_ptr=grad_ema_ptr, scalars=scalars, OBJECTIVE=OBJECTIVE, CONSTRAINT=CONSTRAINT, EMA_READY=EMA_READY,
        ),
        ROW_FN=_reduce_row, CHUNK_FN=_reduce_chunk, ALIGNED=ALIGNED, BLOCK=BLOCK,
    )
    tl.store(partials_ptr + slot + tl.program_id(0), tl.sum(acc, axis=0))


KERNEL = _reduce_kernel
# Types of the arguments that are not constexprs ("PARAM": the parameters' dtype),
# for compiling ahead of time (tests/test_codegen.py).
ARGUMENTS = dict(
    table_ptr="*i64", n_rows="i32", backup_ptr="*PARAM", grad_ema_ptr="*fp32", ema_ready_ptr="*fp32",
    partials_ptr="*fp32", slot="i32", ema_weight="fp32", old_weight="fp32", delta="fp32", eta="fp32",
)


def constexprs(objective: Objective, constraint: Constraint, ema_ready: bool, aligned: bool, block: int = CHUNK) -> dict:
    """The compile-time switches of one launch; every combination of the
    annotated switches is a kernel the launcher can produce."""
    return dict(variant_constexprs(objective, constraint, ema_ready), ALIGNED=aligned, BLOCK=block)


def launch_reduce(dev_table, backup, grad_ema, ema_ready, partials, slot, programs, block, spec: Preconditioner):
    """K1 over one bucket: writes partials[slot : slot + programs].
    ``ema_ready``: None where the EMA is cold (or there is none), else a 0-d
    fp32 device tensor, 1.0 once the EMA has had a finite step."""
    _reduce_kernel[(programs,)](
        table_ptr=dev_table.rows,
        n_rows=dev_table.n_rows,
        backup_ptr=backup,
        grad_ema_ptr=grad_ema,
        ema_ready_ptr=backup if ema_ready is None else ema_ready,  # unused while the EMA is cold
        partials_ptr=partials,
        slot=slot,
        **variant_scalars(spec),
        num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS,
        **constexprs(spec.objective, spec.constraint, ema_ready is not None, dev_table.aligned, block),
    )
