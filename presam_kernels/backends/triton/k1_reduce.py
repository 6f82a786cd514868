"""K1: one fp32 partial sum of (c u)^2 per program (docs/design.md §3).

Reads g (and m, x where the variant needs them), writes ``num_programs``
partials at ``partials[slot:]`` and nothing else. Every program writes its
slot, even with no chunk to do, so the buffer never needs clearing; each
program sums its chunks in a fixed order, so the partials are run-to-run
identical.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...preconditioners import Constraint, Objective
from .precondition import ASAM, ADAPTIVE, GRADIENT, load_first, precondition, variant_constexprs
from .table import CHUNK, FLAG_WEIGHT, as_pointer, first_chunk, load_row

# 4 warps x 32 threads x 8 elements = one 1024-element chunk per step. Not
# measured yet; to be tuned on the GPU together with table.CHUNK.
NUM_WARPS = 4
# A register cap for ptxas, as K2's: without one, Triton 3.9's ptxas keeps
# infoSAM (fp32, aligned, after the first step, sm_90) at 72 registers and
# spills 4 B; at 128 the unaligned infoSAM+adaptive/asam variants spill 36 B;
# at 168 no K1 specialization spills on 3.6 or 3.9, sm_80 or sm_90 (the
# codegen sweep, `make test-codegen-all` / `make test-triton-next`).
MAX_REGISTERS = 168


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
        if is_weight:  # a branch, not a mask: see k2_perturb on scalar masks
            x = tl.load(x_ptr + idx, mask=mask, other=other).to(tl.float32)
        else:
            x = tl.zeros_like(g)
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
            start = chunk * BLOCK  # pointers advance a chunk at a time: the lanes' offsets stay 32-bit
            acc = _reduce_chunk(
                acc, lanes, length - start, g_ptr + start, x_ptr + start, m_ptr + start, is_weight, first,
                ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP, False,
            )
            chunk += num_programs
        if (chunk == full) & (full * BLOCK < length):  # this program owns the tail
            start = chunk * BLOCK
            acc = _reduce_chunk(
                acc, lanes, length - start, g_ptr + start, x_ptr + start, m_ptr + start, is_weight, first,
                ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP, True,
            )
        r += 1
    tl.store(partials_ptr + slot + pid, tl.sum(acc, axis=0))


KERNEL = _reduce_kernel
# Types of the arguments that are not constexprs ("PARAM": the parameters' dtype),
# for compiling ahead of time (tests/test_codegen.py).
ARGUMENTS = dict(
    table_ptr="*i64", n_rows="i32", backup_ptr="*PARAM", grad_ema_ptr="*fp32", first_ptr="*fp32",
    partials_ptr="*fp32", slot="i32", ema_weight="fp32", one_minus_weight="fp32", alpha="fp32", delta="fp32",
    eta="fp32",
)


def constexprs(objective: Objective, constraint: Constraint, first_step: bool, aligned: bool, block: int = CHUNK) -> dict:
    """The compile-time switches of one launch; every combination of the
    annotated switches is a kernel the launcher can produce."""
    return dict(variant_constexprs(objective, constraint, first_step), ALIGNED=aligned, BLOCK=block)


def launch_reduce(dev_table, backup, grad_ema, first, partials, slot, programs, block, spec_args, variant):
    """K1 over one bucket: writes partials[slot : slot + programs]. ``variant``:
    (objective, constraint, first_step)."""
    _reduce_kernel[(programs,)](
        dev_table.rows,
        dev_table.n_rows,
        backup,
        grad_ema,
        first,
        partials,
        slot,
        *spec_args,
        num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS,
        **constexprs(*variant, dev_table.aligned, block),
    )
