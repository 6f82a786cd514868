"""K4: restore fused into the base optimizer's update (docs/design.md §3).

Reads the saved x (the backup, for perturbed rows of an in-place table; x
itself for rows never perturbed and for out-of-place tables), the gradient
taken at x + e and the base optimizer's state, and writes the updated x and
state: SGD (momentum, dampening, nesterov, weight decay, maximize) or Adam /
AdamW (amsgrad off).  Hyperparameters are one fp32 row per param group,
indexed by the table row's group, read by the column names of
``base_update.SGD_COLUMNS`` / ``ADAM_COLUMNS`` (the one definition of the
layout, which the host writes by name too).

Same operations in the same order as torch.optim's single-tensor and foreach
paths, each result rounded to the parameter dtype where torch materialises
it (a no-op for fp32), so the numbers match torch within an ulp or two (FMA
contraction); with lr = 0, x comes back bit for bit.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import triton
import triton.language as tl

from ... import base_update
from ...base_update import ADAM_COLUMNS, SGD_COLUMNS, STATE_KEYS
from .table import CHUNK, FLAG_PERTURBED, walk_rows

# A streaming update like K3 plus the state: same chunking. Not measured yet.
NUM_WARPS = 4
# fp32 slots per param group in the hyperparameter tensor; constexpr: the
# compiled kernel may read no other kind of global.
HYPER_WIDTH = tl.constexpr(base_update.HYPER_WIDTH)

SGD = tl.constexpr(0)
ADAM = tl.constexpr(1)
KIND_CODE = {"sgd": 0, "adam": 1}

# The hyperparameter columns the kernel reads, constexpr indices looked up by
# name in base_update's layout (a column it does not define fails on import).
_SGD_COLUMN = {name: tl.constexpr(i) for i, name in enumerate(SGD_COLUMNS)}
_ADAM_COLUMN = {name: tl.constexpr(i) for i, name in enumerate(ADAM_COLUMNS)}
SGD_LR = _SGD_COLUMN["lr"]
SGD_MOMENTUM = _SGD_COLUMN["momentum"]
SGD_ONE_MINUS_DAMPENING = _SGD_COLUMN["one_minus_dampening"]
SGD_WEIGHT_DECAY = _SGD_COLUMN["weight_decay"]
SGD_NESTEROV = _SGD_COLUMN["nesterov"]
SGD_MAXIMIZE = _SGD_COLUMN["maximize"]
SGD_FIRST = _SGD_COLUMN["first"]
ADAM_NEG_STEP_SIZE = _ADAM_COLUMN["neg_step_size"]
ADAM_BIAS_CORRECTION2_SQRT = _ADAM_COLUMN["bias_correction2_sqrt"]
ADAM_EPS = _ADAM_COLUMN["eps"]
ADAM_DECAY = _ADAM_COLUMN["decay"]
ADAM_WEIGHT_DECAY = _ADAM_COLUMN["weight_decay"]
ADAM_BETA1_WEIGHT = _ADAM_COLUMN["beta1_weight"]
ADAM_BETA2 = _ADAM_COLUMN["beta2"]
ADAM_ONE_MINUS_BETA2 = _ADAM_COLUMN["one_minus_beta2"]
ADAM_MAXIMIZE = _ADAM_COLUMN["maximize"]


class _SgdHyper(NamedTuple):  # a group's row, by base_update.SGD_COLUMNS' names
    lr: tl.tensor
    momentum: tl.tensor
    one_minus_dampening: tl.tensor
    weight_decay: tl.tensor
    nesterov: tl.tensor
    maximize: tl.tensor
    first: tl.tensor  # the momentum buffers start now


class _AdamHyper(NamedTuple):  # by base_update.ADAM_COLUMNS' names
    neg_step_size: tl.tensor
    bias_correction2_sqrt: tl.tensor
    eps: tl.tensor
    decay: tl.tensor
    weight_decay: tl.tensor
    beta1_weight: tl.tensor
    beta2: tl.tensor
    one_minus_beta2: tl.tensor
    maximize: tl.tensor


# Every column the host writes is read (and no other).
assert set(_SgdHyper._fields) == set(SGD_COLUMNS) and set(_AdamHyper._fields) == set(ADAM_COLUMNS)


@triton.jit
def _round(v, elem):
    """v rounded to the parameter dtype and back (identity for fp32)."""
    return v.to(elem).to(tl.float32)


@triton.jit
def _load_hyper(h, KIND: tl.constexpr):
    """The group's row of hyperparameters at ``h``, by column name."""
    if KIND == SGD:
        hyper = _SgdHyper(
            lr=tl.load(h + SGD_LR), momentum=tl.load(h + SGD_MOMENTUM),
            one_minus_dampening=tl.load(h + SGD_ONE_MINUS_DAMPENING), weight_decay=tl.load(h + SGD_WEIGHT_DECAY),
            nesterov=tl.load(h + SGD_NESTEROV), maximize=tl.load(h + SGD_MAXIMIZE), first=tl.load(h + SGD_FIRST),
        )
    else:
        hyper = _AdamHyper(
            neg_step_size=tl.load(h + ADAM_NEG_STEP_SIZE),
            bias_correction2_sqrt=tl.load(h + ADAM_BIAS_CORRECTION2_SQRT), eps=tl.load(h + ADAM_EPS),
            decay=tl.load(h + ADAM_DECAY), weight_decay=tl.load(h + ADAM_WEIGHT_DECAY),
            beta1_weight=tl.load(h + ADAM_BETA1_WEIGHT), beta2=tl.load(h + ADAM_BETA2),
            one_minus_beta2=tl.load(h + ADAM_ONE_MINUS_BETA2), maximize=tl.load(h + ADAM_MAXIMIZE),
        )
    return hyper


class _Args(NamedTuple):
    """The launch's values every row and chunk reads (see table.walk_rows:
    built in the call, so the switches stay constexprs)."""

    backup_ptr: tl.tensor
    hyper_ptr: tl.tensor
    state1_ptr: tl.tensor
    state2_ptr: tl.tensor
    KIND: tl.constexpr
    FROM_BACKUP: tl.constexpr


class _RowCtx(NamedTuple):
    src_ptr: tl.tensor  # the saved x: the backup slice of a perturbed row (FROM_BACKUP), else x
    s1_ptr: tl.tensor  # the row's state slices
    s2_ptr: tl.tensor
    h: tl.tuple  # the group's hyperparameters (_SgdHyper or _AdamHyper)
    walk: tl.tensor  # every row steps


@triton.jit
def _restore_step_row(row, args):
    src_ptr = row.x_ptr
    if args.FROM_BACKUP:
        if (row.flags & FLAG_PERTURBED) != 0:
            src_ptr = args.backup_ptr + row.offset
    return _RowCtx(
        src_ptr=src_ptr, s1_ptr=args.state1_ptr + row.offset, s2_ptr=args.state2_ptr + row.offset,
        h=_load_hyper(args.hyper_ptr + row.group * HYPER_WIDTH, args.KIND), walk=True,
    )


@triton.jit
def _restore_step_chunk(acc, row, ctx, args, lanes, start, MASKED: tl.constexpr):
    """x <- the base step from the saved x over elements ``start + lanes`` of
    ``row``, and its state with it."""
    # Pointers at the chunk, each advanced once: ptxas gives the unaligned Adam
    # variants 80-116 registers with ``row.x_ptr + start + lanes`` at every
    # access, 72-118 this way.
    x_ptr = row.x_ptr + start
    src_ptr = ctx.src_ptr + start
    g_ptr = row.g_ptr + start
    s1_ptr = ctx.s1_ptr + start
    s2_ptr = ctx.s2_ptr + start
    h = ctx.h
    mask = lanes < row.length - start if MASKED else None
    other = 0.0 if MASKED else None
    x_raw = tl.load(src_ptr + lanes, mask=mask, other=other)
    elem = x_raw.dtype
    x = x_raw.to(tl.float32)
    g = tl.load(g_ptr + lanes, mask=mask, other=other).to(tl.float32)
    if args.KIND == SGD:
        d = tl.where(h.maximize != 0.0, -g, g)
        d = tl.where(h.weight_decay != 0.0, _round(d + h.weight_decay * x, elem), d)
        # A branch, not a mask: without momentum there is no buffer (state1 is
        # then another buffer, never to be written), and a scalar i1 in a mask
        # is rejected by Triton 3.9's interpreter.
        if h.momentum != 0.0:
            buf = tl.load(s1_ptr + lanes, mask=mask, other=other).to(tl.float32)
            buf = tl.where(
                h.first != 0.0, d, _round(_round(buf * h.momentum, elem) + h.one_minus_dampening * d, elem)
            )
            tl.store(s1_ptr + lanes, buf.to(elem), mask=mask)
            step_dir = tl.where(h.nesterov != 0.0, _round(d + h.momentum * buf, elem), buf)
        else:
            step_dir = d
        x_new = x + (-h.lr) * step_dir
    else:
        d = tl.where(h.maximize != 0.0, -g, g)
        x = _round(x * h.decay, elem)  # decoupled weight decay (decay = 1 otherwise: exact)
        d = tl.where(h.weight_decay != 0.0, _round(d + h.weight_decay * x, elem), d)
        m = tl.load(s1_ptr + lanes, mask=mask, other=other).to(tl.float32)
        v = tl.load(s2_ptr + lanes, mask=mask, other=other).to(tl.float32)
        # torch's lerp: start + w (end - start) for |w| < 0.5, else end - (end - start)(1 - w)
        w1 = h.beta1_weight
        m = tl.where(w1 < 0.5, m + w1 * (d - m), d - (d - m) * (1.0 - w1))
        m = _round(m, elem)
        v = _round(_round(v * h.beta2, elem) + (h.one_minus_beta2 * d) * d, elem)
        tl.store(s1_ptr + lanes, m.to(elem), mask=mask)
        tl.store(s2_ptr + lanes, v.to(elem), mask=mask)
        denom = _round(_round(tl.div_rn(_round(tl.sqrt_rn(v), elem), h.bias_correction2_sqrt), elem) + h.eps, elem)
        x_new = x + tl.div_rn(h.neg_step_size * m, denom)
    tl.store(x_ptr + lanes, x_new.to(elem), mask=mask)
    return acc


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
    walk_rows(
        table_ptr=table_ptr, n_rows=n_rows, elem=backup_ptr.dtype.element_ty, acc=tl.zeros([1], dtype=tl.int1),
        args=_Args(
            backup_ptr=backup_ptr, hyper_ptr=hyper_ptr, state1_ptr=state1_ptr, state2_ptr=state2_ptr, KIND=KIND,
            FROM_BACKUP=FROM_BACKUP,
        ),
        ROW_FN=_restore_step_row, CHUNK_FN=_restore_step_chunk, ALIGNED=ALIGNED, BLOCK=BLOCK,
    )


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


def launch_restore_step(dev_table, saved, hyper, state, kind, from_backup, programs, block):
    """K4 over one bucket. ``saved``: the flat buffer x was saved in (its dtype
    is the parameters'); ``state``: the bucket's flat state buffers by torch's
    key (``base_update.STATE_KEYS[kind]``; SGD without momentum has none);
    ``hyper``: [groups, HYPER_WIDTH] fp32."""
    keys = STATE_KEYS[kind]
    state1 = state.get(keys[0], saved)  # an unused pointer may be any buffer
    state2 = state.get(keys[1], saved) if len(keys) > 1 else saved
    aligned = dev_table.aligned and state1.data_ptr() % 16 == 0 and state2.data_ptr() % 16 == 0
    _restore_step_kernel[(programs,)](
        table_ptr=dev_table.rows,
        n_rows=dev_table.n_rows,
        backup_ptr=saved,
        hyper_ptr=hyper,
        state1_ptr=state1,
        state2_ptr=state2,
        num_warps=NUM_WARPS,
        **constexprs(kind, from_backup, aligned, block),
    )
