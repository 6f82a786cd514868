"""K1: one fp32 partial sum of (c u)^2 per program (DESIGN.md section 2).

Reads g (and m, x where the variant needs them), writes ``num_programs``
partials at ``partials[slot:]`` and nothing else. Every program writes its
slot, even with no chunk to do, so the buffer never needs clearing; each
program sums its chunks in a fixed order, so the partials are run-to-run
identical.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .precondition import ASAM, ADAPTIVE, GRADIENT, load_first, precondition
from .table import FLAG_WEIGHT, as_pointer, first_chunk, load_row

# 4 warps x 32 threads x 8 elements = one 1024-element chunk per step. Not
# measured yet; to be tuned on the GPU together with table.CHUNK.
NUM_WARPS = 4


@triton.jit
def _reduce_chunk(
    acc, idx, length, g_ptr, x_ptr, m_ptr, is_weight, first, ema_weight, one_minus_weight, alpha, delta, eta,
    OBJECTIVE: tl.constexpr, CONSTRAINT: tl.constexpr, FIRST_STEP: tl.constexpr, MASKED: tl.constexpr,
):
    """acc + (c u)^2 over one chunk; MASKED only for a row's last, partial chunk."""
    mask = idx < length if MASKED else None
    other = 0.0 if MASKED else None
    g = tl.load(g_ptr + idx, mask=mask, other=other).to(tl.float32)
    if CONSTRAINT == ADAPTIVE:
        x = tl.load(x_ptr + idx, mask=mask, other=other).to(tl.float32)
    elif CONSTRAINT == ASAM:  # c = 1 on non-weight rows: x not needed
        x_mask = (idx < length) & is_weight if MASKED else is_weight
        x = tl.load(x_ptr + idx, mask=x_mask, other=0.0).to(tl.float32)
    else:
        x = g
    if OBJECTIVE != GRADIENT and not FIRST_STEP:
        m = tl.load(m_ptr + idx, mask=mask, other=other)
    else:
        m = g
    cu, c, m_new = precondition(
        g, x, m, is_weight, first, ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP
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
    first_ptr,
    partials_ptr,
    slot,
    ema_weight,
    one_minus_weight,
    alpha,
    delta,
    eta,
    OBJECTIVE: tl.constexpr,
    CONSTRAINT: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    elem = backup_ptr.dtype.element_ty
    first = load_first(first_ptr, OBJECTIVE, FIRST_STEP)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    r = 0
    while r < n_rows:  # while, not range: see table.py on the interpreter
        param_addr, grad_addr, length, offset, chunk_start, group, flags = load_row(table_ptr, r, ALIGNED)
        x_ptr = as_pointer(param_addr, elem, ALIGNED)
        g_ptr = as_pointer(grad_addr, elem, ALIGNED)
        m_ptr = grad_ema_ptr + offset
        is_weight = (flags & FLAG_WEIGHT) != 0
        full = length // BLOCK
        chunk = first_chunk(pid, num_programs, chunk_start)
        while chunk < full:  # whole chunks, unmasked (so loads vectorise)
            acc = _reduce_chunk(
                acc, chunk * BLOCK + lanes, length, g_ptr, x_ptr, m_ptr, is_weight, first,
                ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP, False,
            )
            chunk += num_programs
        if (chunk == full) & (full * BLOCK < length):  # this program owns the tail
            acc = _reduce_chunk(
                acc, chunk * BLOCK + lanes, length, g_ptr, x_ptr, m_ptr, is_weight, first,
                ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP, True,
            )
        r += 1
    tl.store(partials_ptr + slot + pid, tl.sum(acc, axis=0))


def launch_reduce(dev_table, backup, grad_ema, first, partials, slot, programs, block, spec_args, switches):
    """K1 over one bucket: writes partials[slot : slot + programs]."""
    _reduce_kernel[(programs,)](
        dev_table.rows,
        dev_table.n_rows,
        backup,
        grad_ema,
        first,
        partials,
        slot,
        *spec_args,
        ALIGNED=dev_table.aligned,
        BLOCK=block,
        num_warps=NUM_WARPS,
        **switches,
    )
