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

import triton
import triton.language as tl

from ...preconditioners import Constraint, Objective
from .precondition import GRADIENT, INFO, load_first, precondition, variant_constexprs
from .table import CHUNK, FLAG_PERTURBED, FLAG_WEIGHT, PARTIALS_BLOCK, as_pointer, first_chunk, load_row

# Same work per element as K1 plus the writes; same shape. Not measured yet.
NUM_WARPS = 4
# A register cap for ptxas: without one, Triton 3.9's ptxas keeps infoSAM +
# Fisher (fp32, unaligned, out of place, sm_90) at 96 registers and spills 4 B;
# with it, 114 and no spill, still 4 programs per SM (bench/codegen.md).
MAX_REGISTERS = 128
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _perturb_chunk(
    idx, length, g_ptr, x_ptr, m_ptr, b_ptr, is_weight, perturbed, ok, factor, first,
    ema_weight, one_minus_weight, alpha, delta, eta,
    OBJECTIVE: tl.constexpr, CONSTRAINT: tl.constexpr, FIRST_STEP: tl.constexpr, OUT_OF_PLACE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """m <- m_new (unless skipped); backup <- x and x <- x + e (perturbed rows,
    x only unless skipped) over one chunk; MASKED only for a row's last chunk.
    OUT_OF_PLACE: b_ptr is the adversarial slice, written x + e (or x)."""
    in_row = idx < length if MASKED else None
    other = 0.0 if MASKED else None
    g = tl.load(g_ptr + idx, mask=in_row, other=other).to(tl.float32)
    x_raw = tl.load(x_ptr + idx, mask=in_row, other=other)
    x = x_raw.to(tl.float32)
    if OBJECTIVE != GRADIENT and not FIRST_STEP:
        m = tl.load(m_ptr + idx, mask=in_row, other=other)
    else:
        m = g
    cu, c, m_new = precondition(
        g, x, m, is_weight, first, ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP
    )
    # The row- and launch-wide conditions (perturbed, ok) are branches, not
    # parts of the mask: a scalar i1 in a mask is rejected by Triton 3.9's
    # interpreter, and a branch keeps the unmasked stores unpredicated.
    if OBJECTIVE != GRADIENT:
        if ok:
            tl.store(m_ptr + idx, m_new, mask=in_row)
    e = c * cu * factor
    if x_raw.dtype == tl.float64:  # added in fp64, as eager's addcmul does: in fp32 x itself would round
        x_adv = x_raw + e.to(tl.float64)
    else:
        x_adv = (x + e).to(x_raw.dtype)
    if perturbed:
        if OUT_OF_PLACE:
            tl.store(b_ptr + idx, tl.where(ok, x_adv, x_raw), mask=in_row)
        else:
            tl.store(b_ptr + idx, x_raw, mask=in_row)
            if ok:
                tl.store(x_ptr + idx, x_adv, mask=in_row)


@triton.jit(do_not_specialize=["has_found_inf", "write_norm"])
def _perturb_kernel(
    table_ptr,
    n_rows,
    backup_ptr,
    grad_ema_ptr,
    first_ptr,
    partials_ptr,
    n_partials,
    rho_ptr,
    found_inf_ptr,
    has_found_inf,  # runtime flags, not constexprs: each would double the kernels to compile
    norm_ptr,
    write_norm,  # program 0 stores the norm and the skip flag
    skipped_ptr,
    ema_weight,
    one_minus_weight,
    alpha,
    delta,
    eta,
    eps_norm,
    OBJECTIVE: tl.constexpr,
    CONSTRAINT: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    OUT_OF_PLACE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    elem = backup_ptr.dtype.element_ty
    first = load_first(first_ptr, OBJECTIVE, FIRST_STEP)

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
    ok = skipped == 0
    if OBJECTIVE == INFO and not FIRST_STEP:
        eps = eps_norm * (first + (1.0 - first) * delta)  # u is scaled by delta after the first step
    else:
        eps = eps_norm
    scale = tl.where(skipped, 0.0, tl.div_rn(1.0, norm + eps))
    if (write_norm != 0) & (pid == 0):
        tl.store(norm_ptr, norm)
        tl.store(skipped_ptr, skipped.to(tl.uint8))

    lanes = tl.arange(0, BLOCK)
    r = 0
    while r < n_rows:  # while, not range: see table.py on the interpreter
        param_addr, grad_addr, length, offset, chunk_start, group, flags = load_row(table_ptr, r, ALIGNED)
        x_ptr = as_pointer(param_addr, elem, ALIGNED)
        g_ptr = as_pointer(grad_addr, elem, ALIGNED)
        m_ptr = grad_ema_ptr + offset
        b_ptr = backup_ptr + offset
        is_weight = (flags & FLAG_WEIGHT) != 0
        perturbed = (flags & FLAG_PERTURBED) != 0
        factor = scale * tl.load(rho_ptr + group)
        full = length // BLOCK
        if OBJECTIVE == GRADIENT:  # no state to update: an unperturbed row is not touched
            full = tl.where(perturbed, full, -1)
        chunk = first_chunk(pid, num_programs, chunk_start)
        while chunk < full:  # whole chunks, unmasked (so loads and stores vectorise)
            start = chunk * BLOCK  # pointers advance a chunk at a time: the lanes' offsets stay 32-bit
            _perturb_chunk(
                lanes, length - start, g_ptr + start, x_ptr + start, m_ptr + start, b_ptr + start,
                is_weight, perturbed, ok, factor, first,
                ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP, OUT_OF_PLACE, False,
            )
            chunk += num_programs
        if (chunk == full) & (full * BLOCK < length):  # this program owns the tail
            start = chunk * BLOCK
            _perturb_chunk(
                lanes, length - start, g_ptr + start, x_ptr + start, m_ptr + start, b_ptr + start,
                is_weight, perturbed, ok, factor, first,
                ema_weight, one_minus_weight, alpha, delta, eta, OBJECTIVE, CONSTRAINT, FIRST_STEP, OUT_OF_PLACE, True,
            )
        r += 1


KERNEL = _perturb_kernel
ARGUMENTS = dict(  # see k1_reduce.ARGUMENTS
    table_ptr="*i64", n_rows="i32", backup_ptr="*PARAM", grad_ema_ptr="*fp32", first_ptr="*fp32",
    partials_ptr="*fp32", n_partials="i32", rho_ptr="*fp32", found_inf_ptr="*fp32", has_found_inf="i32",
    norm_ptr="*fp32", write_norm="i32", skipped_ptr="*u8", ema_weight="fp32", one_minus_weight="fp32",
    alpha="fp32", delta="fp32", eta="fp32", eps_norm="fp32",
)


def constexprs(
    objective: Objective, constraint: Constraint, first_step: bool, out_of_place: bool, aligned: bool,
    block: int = CHUNK, partials_block: int = PARTIALS_BLOCK,
) -> dict:
    """The compile-time switches of one launch (see k1_reduce.constexprs)."""
    return dict(
        variant_constexprs(objective, constraint, first_step),
        OUT_OF_PLACE=out_of_place, ALIGNED=aligned, BLOCK=block, PARTIALS_BLOCK=partials_block,
    )


def launch_perturb(
    dev_table, backup, grad_ema, first, partials, n_partials, rhos, found_inf, norm, skipped,
    programs, block, spec_args, eps_norm, variant, write_norm, out_of_place=False, partials_block=PARTIALS_BLOCK,
):
    """K2 over one bucket; the program 0 of the launch with ``write_norm``
    stores the norm and the skip flag. ``variant``: (objective, constraint,
    first_step); ``out_of_place``: ``backup`` is the adversarial buffer."""
    _perturb_kernel[(programs,)](
        dev_table.rows,
        dev_table.n_rows,
        backup,
        grad_ema,
        first,
        partials,
        n_partials,
        rhos,
        partials if found_inf is None else found_inf,
        int(found_inf is not None),
        norm,
        int(write_norm),
        skipped,
        *spec_args,
        eps_norm,
        num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS,
        **constexprs(*variant, out_of_place, dev_table.aligned, block, partials_block),
    )
