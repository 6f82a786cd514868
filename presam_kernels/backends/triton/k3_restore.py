"""K3: x <- backup, bit for bit, for every perturbed row (docs/design.md §3).

A copy in the parameters' own dtype (no conversion, so every bit pattern,
-0.0 and NaN payloads included, comes back as it was saved).
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from .table import CHUNK, FLAG_PERTURBED, walk_rows

# A pure copy; same chunking as K1/K2. Not measured yet.
NUM_WARPS = 4


class _Args(NamedTuple):
    """The launch's values every row reads (see table.walk_rows)."""

    backup_ptr: tl.tensor


class _RowCtx(NamedTuple):
    b_ptr: tl.tensor  # the row's backup slice
    walk: tl.tensor  # an unperturbed row was never written: skipped


@triton.jit
def _restore_row(row, args):
    return _RowCtx(b_ptr=args.backup_ptr + row.offset, walk=(row.flags & FLAG_PERTURBED) != 0)


@triton.jit
def _restore_chunk(acc, row, ctx, args, lanes, start, MASKED: tl.constexpr):
    """x <- backup over elements ``start + lanes`` of ``row``."""
    mask = lanes < row.length - start if MASKED else None
    tl.store(row.x_ptr + start + lanes, tl.load(ctx.b_ptr + start + lanes, mask=mask), mask=mask)
    return acc


@triton.jit
def _restore_kernel(table_ptr, n_rows, backup_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    walk_rows(
        table_ptr=table_ptr, n_rows=n_rows, elem=backup_ptr.dtype.element_ty, acc=tl.zeros([1], dtype=tl.int1),
        args=_Args(backup_ptr=backup_ptr), ROW_FN=_restore_row, CHUNK_FN=_restore_chunk, ALIGNED=ALIGNED, BLOCK=BLOCK,
    )


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
