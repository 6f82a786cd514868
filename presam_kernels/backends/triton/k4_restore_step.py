"""K4: restore fused into the base optimizer's update (docs/design.md §3).

Reads the saved x (the backup, for perturbed rows of an in-place table; x
itself for rows never perturbed and for out-of-place tables), the gradient
taken at x + e and the base optimizer's state, and writes the updated x and
state: SGD (momentum, dampening, nesterov, weight decay, maximize) or Adam /
AdamW (amsgrad off).  Hyperparameters are one fp32 row per param group
(``base_update.*_COLUMNS``), indexed by the table row's group.

Same operations in the same order as torch.optim's single-tensor and foreach
paths, each result rounded to the parameter dtype where torch materialises
it (a no-op for fp32), so the numbers match torch within an ulp or two (FMA
contraction); with lr = 0, x comes back bit for bit.
"""
from __future__ import annotations

from typing import Literal

import triton
import triton.language as tl

from .table import CHUNK, FLAG_PERTURBED, as_pointer, first_chunk, load_row

# A streaming update like K3 plus the state: same chunking. Not measured yet.
NUM_WARPS = 4
# fp32 slots per param group in the hyperparameter tensor (64 B rows);
# constexpr: the compiled kernel may read no other kind of global.
HYPER_WIDTH = tl.constexpr(16)

SGD = tl.constexpr(0)
ADAM = tl.constexpr(1)
KIND_CODE = {"sgd": 0, "adam": 1}


@triton.jit
def _round(v, elem):
    """v rounded to the parameter dtype and back (identity for fp32)."""
    return v.to(elem).to(tl.float32)


@triton.jit
def _step_chunk(
    idx, length, x_ptr, src_ptr, g_ptr, s1_ptr, s2_ptr, h0, h1, h2, h3, h4, h5, h6, h7, h8,
    KIND: tl.constexpr, MASKED: tl.constexpr,
):
    mask = idx < length if MASKED else None
    other = 0.0 if MASKED else None
    x_raw = tl.load(src_ptr + idx, mask=mask, other=other)
    elem = x_raw.dtype
    x = x_raw.to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=other).to(tl.float32)
    if KIND == SGD:
        lr, momentum, one_minus_dampening, weight_decay, nesterov, maximize, first = h0, h1, h2, h3, h4, h5, h6
        d = tl.where(maximize != 0.0, -g, g)
        d = tl.where(weight_decay != 0.0, _round(d + weight_decay * x, elem), d)
        # A branch, not a mask: without momentum there is no buffer (s1_ptr is
        # then another buffer, never to be written), and a scalar i1 in a mask
        # is rejected by Triton 3.9's interpreter.
        if momentum != 0.0:
            buf = tl.load(s1_ptr + idx, mask=mask, other=other).to(tl.float32)
            buf = tl.where(first != 0.0, d, _round(_round(buf * momentum, elem) + one_minus_dampening * d, elem))
            tl.store(s1_ptr + idx, buf.to(elem), mask=mask)
            step_dir = tl.where(nesterov != 0.0, _round(d + momentum * buf, elem), buf)
        else:
            step_dir = d
        x_new = x + (-lr) * step_dir
    else:
        neg_step_size, bc2_sqrt, eps, decay, weight_decay, w1, beta2, one_minus_beta2, maximize = (
            h0, h1, h2, h3, h4, h5, h6, h7, h8
        )
        d = tl.where(maximize != 0.0, -g, g)
        x = _round(x * decay, elem)  # decoupled weight decay (decay = 1 otherwise: exact)
        d = tl.where(weight_decay != 0.0, _round(d + weight_decay * x, elem), d)
        m = tl.load(s1_ptr + idx, mask=mask, other=other).to(tl.float32)
        v = tl.load(s2_ptr + idx, mask=mask, other=other).to(tl.float32)
        # torch's lerp: start + w (end - start) for |w| < 0.5, else end - (end - start)(1 - w)
        m = tl.where(w1 < 0.5, m + w1 * (d - m), d - (d - m) * (1.0 - w1))
        m = _round(m, elem)
        v = _round(_round(v * beta2, elem) + (one_minus_beta2 * d) * d, elem)
        tl.store(s1_ptr + idx, m.to(elem), mask=mask)
        tl.store(s2_ptr + idx, v.to(elem), mask=mask)
        denom = _round(_round(tl.div_rn(_round(tl.sqrt_rn(v), elem), bc2_sqrt), elem) + eps, elem)
        x_new = x + tl.div_rn(neg_step_size * m, denom)
    tl.store(x_ptr + idx, x_new.to(elem), mask=mask)


@triton.jit
def _restore_step_kernel(
    table_ptr,
    n_rows,
    backup_ptr,
    hyper_ptr,
    state1_ptr,
    state2_ptr,
    KIND: tl.constexpr,
    FROM_BACKUP: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    elem = backup_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    r = 0
    while r < n_rows:  # while, not range: see table.py on the interpreter
        param_addr, grad_addr, length, offset, chunk_start, group, flags = load_row(table_ptr, r, ALIGNED)
        x_ptr = as_pointer(param_addr, elem, ALIGNED)
        g_ptr = as_pointer(grad_addr, elem, ALIGNED)
        src_ptr = x_ptr
        if FROM_BACKUP:
            if (flags & FLAG_PERTURBED) != 0:
                src_ptr = backup_ptr + offset
        s1_ptr = state1_ptr + offset
        s2_ptr = state2_ptr + offset
        h = hyper_ptr + group * HYPER_WIDTH
        h0 = tl.load(h + 0)
        h1 = tl.load(h + 1)
        h2 = tl.load(h + 2)
        h3 = tl.load(h + 3)
        h4 = tl.load(h + 4)
        h5 = tl.load(h + 5)
        h6 = tl.load(h + 6)
        h7 = tl.load(h + 7)
        h8 = tl.load(h + 8)
        full = length // BLOCK
        chunk = first_chunk(pid, num_programs, chunk_start)
        while chunk < full:  # whole chunks, unmasked (so loads and stores vectorise)
            start = chunk * BLOCK  # pointers advance a chunk at a time: the lanes' offsets stay 32-bit
            _step_chunk(
                lanes, length - start, x_ptr + start, src_ptr + start, g_ptr + start, s1_ptr + start, s2_ptr + start,
                h0, h1, h2, h3, h4, h5, h6, h7, h8, KIND, False,
            )
            chunk += num_programs
        if (chunk == full) & (full * BLOCK < length):  # this program owns the tail
            start = chunk * BLOCK
            _step_chunk(
                lanes, length - start, x_ptr + start, src_ptr + start, g_ptr + start, s1_ptr + start, s2_ptr + start,
                h0, h1, h2, h3, h4, h5, h6, h7, h8, KIND, True,
            )
        r += 1


KERNEL = _restore_step_kernel
# fp64 buckets take torch's own step (restore_and_step declines them).
PARAM_DTYPES = ("fp32", "bf16", "fp16")
ARGUMENTS = dict(  # see k1_reduce.ARGUMENTS
    table_ptr="*i64", n_rows="i32", backup_ptr="*PARAM", hyper_ptr="*fp32", state1_ptr="*PARAM", state2_ptr="*PARAM"
)


def constexprs(kind: Literal["sgd", "adam"], from_backup: bool, aligned: bool, block: int = CHUNK) -> dict:
    """The compile-time switches of one launch (see k1_reduce.constexprs);
    AdamW is kind "adam" (its decoupled weight decay is a hyperparameter)."""
    return dict(KIND=KIND_CODE[kind], FROM_BACKUP=from_backup, ALIGNED=aligned, BLOCK=block)


def launch_restore_step(dev_table, backup, hyper, state1, state2, kind, from_backup, programs, block):
    """K4 over one bucket. ``backup``: the flat buffer x was saved in (its dtype
    is the parameters'); ``state1``/``state2``: momentum_buffer, or exp_avg and
    exp_avg_sq (unused ones may be any buffer); ``hyper``: [groups, HYPER_WIDTH] fp32."""
    aligned = dev_table.aligned and state1.data_ptr() % 16 == 0 and state2.data_ptr() % 16 == 0
    _restore_step_kernel[(programs,)](
        dev_table.rows,
        dev_table.n_rows,
        backup,
        hyper,
        state1,
        state2,
        num_warps=NUM_WARPS,
        **constexprs(kind, from_backup, aligned, block),
    )
