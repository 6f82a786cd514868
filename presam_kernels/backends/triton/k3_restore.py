"""K3: x <- backup, bit for bit, for every perturbed row (docs/design.md §3).

A copy in the parameters' own dtype (no conversion, so every bit pattern,
-0.0 and NaN payloads included, comes back as it was saved).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .table import CHUNK, FLAG_PERTURBED, as_pointer, first_chunk, load_row

# A pure copy; same chunking as K1/K2. Not measured yet.
NUM_WARPS = 4


@triton.jit
def _restore_chunk(x_ptr, b_ptr, idx, length, MASKED: tl.constexpr):
    mask = idx < length if MASKED else None
    tl.store(x_ptr + idx, tl.load(b_ptr + idx, mask=mask), mask=mask)


@triton.jit
def _restore_kernel(table_ptr, n_rows, backup_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    elem = backup_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    r = 0
    while r < n_rows:  # while, not range: see table.py on the interpreter
        param_addr, grad_addr, length, offset, chunk_start, group, flags = load_row(table_ptr, r, ALIGNED)
        x_ptr = as_pointer(param_addr, elem, ALIGNED)
        b_ptr = backup_ptr + offset
        full = tl.where((flags & FLAG_PERTURBED) != 0, length // BLOCK, -1)  # -1: skip the row
        chunk = first_chunk(pid, num_programs, chunk_start)
        while chunk < full:  # whole chunks, unmasked (so loads and stores vectorise)
            start = chunk * BLOCK  # pointers advance a chunk at a time: the lanes' offsets stay 32-bit
            _restore_chunk(x_ptr + start, b_ptr + start, lanes, length - start, False)
            chunk += num_programs
        if (chunk == full) & (full * BLOCK < length):  # this program owns the tail
            start = chunk * BLOCK
            _restore_chunk(x_ptr + start, b_ptr + start, lanes, length - start, True)
        r += 1


KERNEL = _restore_kernel
ARGUMENTS = dict(table_ptr="*i64", n_rows="i32", backup_ptr="*PARAM")  # see k1_reduce.ARGUMENTS


def constexprs(aligned: bool, block: int = CHUNK) -> dict:
    """The compile-time switches of one launch (see k1_reduce.constexprs)."""
    return dict(ALIGNED=aligned, BLOCK=block)


def launch_restore(dev_table, backup, programs, block):
    """K3 over one bucket."""
    _restore_kernel[(programs,)](
        dev_table.rows, dev_table.n_rows, backup, num_warps=NUM_WARPS, **constexprs(dev_table.aligned, block)
    )
