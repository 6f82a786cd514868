"""K3: x <- backup, bit for bit, for every perturbed row (docs/design.md §3).

A copy in the parameters' own dtype (no conversion, so every bit pattern,
-0.0 and NaN payloads included, comes back as it was saved).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .table import CHUNK, FLAG_PERTURBED, load_row, owns_tail, row_chunks

# A pure copy; same chunking as K1/K2. Not measured yet.
NUM_WARPS = 4


@triton.jit
def _restore_chunk(row, b_ptr, lanes, start, MASKED: tl.constexpr):
    """x <- backup over elements ``start + lanes`` of ``row`` (``b_ptr``: its backup slice)."""
    mask = lanes < row.length - start if MASKED else None
    tl.store(row.x_ptr + start + lanes, tl.load(b_ptr + start + lanes, mask=mask), mask=mask)


@triton.jit
def _restore_kernel(table_ptr, n_rows, backup_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    elem = backup_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    r = 0
    while r < n_rows:  # while, not range: see table.py on the interpreter
        row = load_row(table_ptr, r, elem, ALIGNED)
        b_ptr = backup_ptr + row.offset
        # An unperturbed row was never written: skipped.
        chunk, full = row_chunks(row, pid, num_programs, (row.flags & FLAG_PERTURBED) != 0, BLOCK)
        while chunk < full:  # whole chunks, unmasked (so loads and stores vectorise)
            _restore_chunk(row=row, b_ptr=b_ptr, lanes=lanes, start=chunk * BLOCK, MASKED=False)
            chunk += num_programs
        if owns_tail(chunk, full, row.length, BLOCK):
            _restore_chunk(row=row, b_ptr=b_ptr, lanes=lanes, start=chunk * BLOCK, MASKED=True)
        r += 1


KERNEL = _restore_kernel
ARGUMENTS = dict(table_ptr="*i64", n_rows="i32", backup_ptr="*PARAM")  # see k1_reduce.ARGUMENTS


def constexprs(aligned: bool, block: int = CHUNK) -> dict:
    """The compile-time switches of one launch (see k1_reduce.constexprs)."""
    return dict(ALIGNED=aligned, BLOCK=block)


def launch_restore(dev_table, backup, programs, block):
    """K3 over one bucket."""
    _restore_kernel[(programs,)](
        table_ptr=dev_table.rows, n_rows=dev_table.n_rows, backup_ptr=backup, num_warps=NUM_WARPS,
        **constexprs(dev_table.aligned, block),
    )
