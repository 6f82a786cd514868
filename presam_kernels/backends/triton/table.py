"""The device table the kernels walk, and the small device buffers they share.

One table per bucket: a row per ``Table`` row, ``ROW_WIDTH`` int64 each::

    0 param address   1 grad address   2 length (elements)
    3 offset of the row in the bucket's flat buffers (backup or adversarial,
      grad_ema, the base optimizer's state) (elements)
    4 index of the row's first chunk among all chunks of the table
    5 param group index (into the per-group rho tensor)
    6 flags: FLAG_WEIGHT (ASAM constraint applies), FLAG_PERTURBED (rho != 0)
    7 unused (rows stay 64 B)

Parameters and gradients are reached through their addresses, so the table is
rebuilt only when an address (or a row's metadata) changes: a host-side check
of ``data_ptr()`` per step, a non-blocking copy when something moved. The
check and the cache run in C++ (csrc/host.cpp, ``_C.DeviceTables``) where the
extension is built, in Python otherwise (``device_table``'s fallback), with the
same rows, the same key and the same invalidations.

The kernels loop with ``while``, not ``range``: under TRITON_INTERPRET every
scalar is a 1-element array, and since NumPy 2.4 ``range`` cannot take one
(``int()`` of an array with ndim > 0 raises); ``while`` only needs ``bool()``.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import _extension, _host
from ...buckets import _non_overlapping_and_dense

# Elements per chunk, the unit of work a program takes at a time: 1024 keeps
# 8 elements (two 16-B vectors of fp32) per thread at 4 warps. Not measured
# yet; to be tuned on the GPU.
CHUNK = 1024
# Partials K2 sums per step of its norm loop: 4 per thread at 4 warps, so its
# registers do not grow with programs x buckets (one block of all of them,
# next_power_of_2(n_partials), took 8-16 registers per thread more).
PARTIALS_BLOCK = 512
# A few programs per SM: enough resident warps to saturate memory bandwidth,
# few enough that K2's re-read of every partial stays a few KB. Not measured yet.
PROGRAMS_PER_SM = 4
# Under TRITON_INTERPRET: small chunks and a handful of programs, so that
# small test tensors still span several chunks and several programs.
INTERPRETER_CHUNK = 256
INTERPRETER_PROGRAMS = 3
# K2's norm loop takes this many partials a step under the interpreter, so that
# two buckets of INTERPRETER_PROGRAMS partials take two steps (a tail included).
INTERPRETER_PARTIALS_BLOCK = 4
# Device tables kept per bucket (addresses that alternate between steps,
# e.g. gradients freed and reallocated, still hit the cache).
TABLES_PER_BUCKET = 4

ROW_WIDTH = 8
FLAG_WEIGHT = tl.constexpr(1)  # constexpr: read inside the kernels too
FLAG_PERTURBED = tl.constexpr(2)
# Row slices in the flat buffers start on multiples of this many elements
# (buckets.SLICE_ALIGN); the alignment hint relies on it.
OFFSET_ALIGN = 16


class Row(NamedTuple):
    """One row of the device table, as the kernels use it."""

    x_ptr: tl.tensor  # the parameter, as a pointer to the bucket's dtype
    g_ptr: tl.tensor  # its gradient, same dtype
    length: tl.tensor  # elements
    offset: tl.tensor  # of the row in the bucket's flat buffers (elements)
    chunk_start: tl.tensor  # index of the row's first chunk among all chunks of the table
    group: tl.tensor  # param group index
    flags: tl.tensor  # FLAG_WEIGHT | FLAG_PERTURBED


@triton.jit
def load_row(table_ptr, r, elem, ALIGNED: tl.constexpr):
    """Row r of the table, its addresses as pointers to ``elem``."""
    row = table_ptr + r * 8
    param_addr = tl.load(row + 0)
    grad_addr = tl.load(row + 1)
    length = tl.load(row + 2)
    offset = tl.load(row + 3)
    chunk_start = tl.load(row + 4)
    group = tl.load(row + 5)
    flags = tl.load(row + 6)
    if ALIGNED:  # the host checked: offsets are multiples of 16 elements
        offset = tl.multiple_of(offset, 16)
    return Row(
        x_ptr=as_pointer(param_addr, elem, ALIGNED), g_ptr=as_pointer(grad_addr, elem, ALIGNED), length=length,
        offset=offset, chunk_start=chunk_start, group=group, flags=flags,
    )


@triton.jit
def as_pointer(addr, elem, ALIGNED: tl.constexpr):
    """The int64 address ``addr`` as a pointer to ``elem``; with ALIGNED (the host
    checked addr % 16 == 0) hinted so that loads and stores vectorise. The hint
    must sit on the pointer: one on the integer does not survive the cast."""
    ptr = addr.to(tl.pointer_type(elem))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def first_chunk(pid, num_programs, chunk_start):
    """The first chunk of a row that program ``pid`` owns: chunks are dealt out
    round-robin over the whole table (global chunk index mod num_programs)."""
    return (pid + num_programs - chunk_start % num_programs) % num_programs


@triton.jit
def walk_rows(
    table_ptr, n_rows, elem, acc, args,
    ROW_FN: tl.constexpr, CHUNK_FN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """The one row walk of K1-K4: this program's chunks of every row of the table.

    Per row, ``ctx = ROW_FN(row=, args=)``: what the kernel derives once from
    the row (pointers into its flat buffers, a scale), with a ``walk`` field
    (False: the row is skipped). Per chunk, ``acc = CHUNK_FN(acc=, row=, ctx=,
    args=, lanes=, start=, MASKED=)`` over elements ``start + lanes`` of the
    row: the whole chunks unmasked (so loads and stores vectorise), then, by
    the program that owns it, the row's last, partial chunk MASKED. ``acc`` is
    carried through every chunk and returned: K1's sums; elsewhere a one-element
    tensor the chunks return unchanged and the compiler drops (None, a
    constexpr, cannot be reassigned in a loop).

    ``args``: the launch's own values, a NamedTuple whose constexpr fields are
    the kernel's switches. They stay constexprs only while the tuple is passed
    as an argument: assigning a tuple to a name (``a = Args(...)``, ``v =
    args.variant``) turns every constexpr in it into an i32 tensor (Triton 3.6
    and 3.9, ``visit_Assign``), and an ``if`` on one becomes a branch at run
    time, or fails to compile ("Mismatched type for c between then block ...
    and else block"). So kernels build ``args`` inside the call, with their switches as
    its top-level fields; ``ctx`` is assigned here and holds tensors only.
    Pointers advance by ``start``, so the lanes' offsets stay 32-bit."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    r = 0
    while r < n_rows:  # while, not range: see the module docstring on the interpreter
        row = load_row(table_ptr, r, elem, ALIGNED)
        ctx = ROW_FN(row=row, args=args)
        full = tl.where(ctx.walk, row.length // BLOCK, -1)  # -1: no whole chunk and no tail
        chunk = first_chunk(pid, num_programs, row.chunk_start)
        while chunk < full:  # the hot loop: whole chunks, unmasked
            acc = CHUNK_FN(acc=acc, row=row, ctx=ctx, args=args, lanes=lanes, start=chunk * BLOCK, MASKED=False)
            chunk += num_programs
        if (chunk == full) & (full * BLOCK < row.length):  # this program owns the partial last chunk
            acc = CHUNK_FN(acc=acc, row=row, ctx=ctx, args=args, lanes=lanes, start=chunk * BLOCK, MASKED=True)
        r += 1
    return acc


def interpreting() -> bool:
    """Whether @triton.jit functions run under the interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(load_row, InterpretedFunction)


_INTERPRETING = interpreting()  # fixed when this module's kernels were decorated


def supported_device(device: torch.device) -> bool:
    """The interpreter dereferences host addresses; compiled kernels device ones."""
    return device.type == "cpu" if _INTERPRETING else device.type == "cuda"


_programs: dict = {}


def launch_config(device: torch.device) -> tuple[int, int, int]:
    """(programs per launch, elements per chunk, K2's partials per step) on ``device``."""
    if _INTERPRETING:
        return INTERPRETER_PROGRAMS, INTERPRETER_CHUNK, INTERPRETER_PARTIALS_BLOCK
    if device not in _programs:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        _programs[device] = PROGRAMS_PER_SM * sms
    return _programs[device], CHUNK, PARTIALS_BLOCK


@dataclass
class DeviceTable:
    rows: torch.Tensor  # [n_rows, ROW_WIDTH] int64 on the bucket's device
    n_rows: int
    aligned: bool  # every address and offset 16-B aligned
    param_addresses: tuple  # what restore checks before trusting the rows
    host: torch.Tensor  # the (pinned) source of the copy, kept alive with it


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bucket -> {key: DeviceTable}
_native_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bucket -> _C.DeviceTables


def native_tables_available() -> bool:
    """Whether the C++ extension (csrc/host.cpp) can check and cache the tables."""
    return _extension.extension_available()


def _plain(t) -> bool:
    # DTensor and other subclasses take the eager path.
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


def saved_buffer(bucket, table):
    """The flat buffer K2 writes besides x: the adversarial buffer for an
    out-of-place table, else the backup."""
    return bucket.buffers.adversarial if table.out_of_place else bucket.buffers.backup


def device_table(bucket, table, chunk: int) -> DeviceTable | None:
    """The device table of ``table`` (rows of ``bucket``), cached; None when a
    row cannot be walked as linear memory (the caller falls back to eager)."""
    compiled = _host.native()
    if compiled is not None:
        return _native_tables(bucket, compiled).get(
            table.params, table.grads, table.members,
            None if table.members is not None else (table.adversarials if table.out_of_place else table.backups),
            None if table.members is not None else table.grad_emas,
            table.offsets, table.lengths, table.group_index, table.is_weight, table.perturbed,
            saved_buffer(bucket, table), bucket.buffers.grad_ema, chunk, functools.partial(_upload, bucket),
            table.signature,
        )
    backup = saved_buffer(bucket, table)
    ema = bucket.buffers.grad_ema
    key = (
        chunk,
        backup.data_ptr(),
        None if ema is None else ema.data_ptr(),
        tuple((p.data_ptr(), g.data_ptr(), p.stride(), g.stride()) for p, g in zip(table.params, table.grads)),
        tuple(table.offsets),
        tuple(table.lengths),
        tuple(table.group_index),
        tuple(table.is_weight),
        tuple(table.perturbed),
    )
    entries = _cache.setdefault(bucket, {})
    if key in entries:
        found = entries.pop(key)
        entries[key] = found  # most recently used last
        return found
    built = _build(bucket, table, chunk)
    entries[key] = built
    while len(entries) > TABLES_PER_BUCKET:
        entries.pop(next(iter(entries)))
    return built


def _native_tables(bucket, compiled):
    """The bucket's C++ table cache, made once: it keeps the bucket's
    per-parameter layout to check each row against."""
    found = _native_cache.get(bucket)
    if found is None:
        found = compiled.DeviceTables(
            bucket.layout.dtype, bucket.layout.device, [list(s) for s in bucket.layout.shapes],
            [list(s) for s in bucket.layout.strides],
            TABLES_PER_BUCKET,
        )
        _native_cache[bucket] = found
    return found


def _row_is_linear(bucket, table, i) -> bool:
    """Whether row i's param, grad, backup and grad_ema are the same dense
    layout, so that each is ``length`` consecutive elements from its address."""
    p, g = table.params[i], table.grads[i]
    if not (_plain(p) and _plain(g)):
        return False
    layout = bucket.layout
    if p.dtype != layout.dtype or g.dtype != layout.dtype or p.device != layout.device or g.device != layout.device:
        return False
    if table.members is not None:
        # A parameter's own row: its backup and EMA are the bucket's views of
        # it, laid out as the bucket's dense strides for it, so matching those
        # is the whole check (a fifth of the general one's host time).
        k = table.members[i]
        stride = layout.strides[k]
        return p.shape == layout.shapes[k] and g.shape == p.shape and p.stride() == stride and g.stride() == stride
    if p.shape != g.shape or p.numel() != table.lengths[i] or p.stride() != g.stride():
        return False
    if not _non_overlapping_and_dense(p):
        return False
    flat = saved_buffer(bucket, table)
    b = (table.adversarials if table.out_of_place else table.backups)[i]
    if b.stride() != p.stride() or b.data_ptr() != flat.data_ptr() + table.offsets[i] * flat.element_size():
        return False
    if table.grad_emas is not None:
        m = table.grad_emas[i]
        if m.stride() != p.stride() or m.data_ptr() != bucket.buffers.grad_ema.data_ptr() + table.offsets[i] * 4:
            return False
    return True


def _build(bucket, table, chunk: int) -> DeviceTable | None:
    rows = []
    chunk_start = 0
    flat = saved_buffer(bucket, table)
    ema = bucket.buffers.grad_ema
    aligned = flat.data_ptr() % 16 == 0 and (ema is None or ema.data_ptr() % 16 == 0)
    for i in range(len(table)):
        length = table.lengths[i]
        if length == 0:
            continue  # contributes nothing, touches nothing
        if not _row_is_linear(bucket, table, i):
            return None
        p_addr, g_addr, offset = table.params[i].data_ptr(), table.grads[i].data_ptr(), table.offsets[i]
        aligned = aligned and p_addr % 16 == 0 and g_addr % 16 == 0 and offset % OFFSET_ALIGN == 0
        flags = (FLAG_WEIGHT.value if table.is_weight[i] else 0) | (FLAG_PERTURBED.value if table.perturbed[i] else 0)
        rows.append((p_addr, g_addr, length, offset, chunk_start, table.group_index[i], flags, 0))
        chunk_start += (length + chunk - 1) // chunk  # not triton.cdiv: a jit-wrapped call, ~5 us a row
    host = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), ROW_WIDTH)
    return _upload(bucket, host, len(rows), aligned, tuple(p.data_ptr() for p in table.params))


def _upload(bucket, host, n_rows: int, aligned: bool, param_addresses: tuple) -> DeviceTable:
    """A new device table from its host image ``host`` ([n_rows, ROW_WIDTH]
    int64): copied to the bucket's device without a host sync (from pinned
    memory, kept alive with it)."""
    if bucket.layout.device.type == "cuda":
        host = host.pin_memory()
    return DeviceTable(
        rows=host.to(bucket.layout.device, non_blocking=True),
        n_rows=n_rows,
        aligned=aligned,
        param_addresses=param_addresses,
        host=host,
    )


# -- small shared buffers ----------------------------------------------------
_host_copies: dict = {}
_HOST_COPIES = 16


def _cached_copy(key, device: torch.device, make_host) -> torch.Tensor:
    """The device copy of the host tensor ``make_host()``, made once per
    ``key`` (non-blocking, from pinned memory, which is kept with it)."""
    found = _host_copies.get(key)
    if found is None:
        host = make_host()
        if device.type == "cuda":
            host = host.pin_memory()
        found = (host.to(device, non_blocking=True), host)
        if len(_host_copies) >= _HOST_COPIES:
            _host_copies.pop(next(iter(_host_copies)))
        _host_copies[key] = found
    return found[0]


def rho_tensor(rhos, device: torch.device) -> torch.Tensor:
    """Per-group rho as an fp32 device tensor, without a host read: floats are
    copied once per distinct value tuple; tensors are stacked on the device."""
    if all(not isinstance(r, torch.Tensor) for r in rhos):
        values = tuple(float(r) for r in rhos)
        return _cached_copy(("rho", device, values), device, lambda: torch.tensor(values, dtype=torch.float32))
    return torch.stack(
        [
            r.detach().to(device=device, dtype=torch.float32).reshape(())
            if isinstance(r, torch.Tensor)
            else torch.full((), float(r), dtype=torch.float32, device=device)
            for r in rhos
        ]
    )


def hyper_tensor(rows, width: int, device: torch.device) -> torch.Tensor:
    """Per-group rows of hyperparameters as a [groups, width] fp32 device
    tensor, without a host read: the floats are copied once per distinct
    value tuple; entries that are tensors (an lr on the device) are written
    into a copy on the device, so that a CUDA graph capture holds no
    host-to-device copy."""
    tensors = {(k, j): v for k, row in enumerate(rows) for j, v in enumerate(row) if isinstance(v, torch.Tensor)}
    floats = tuple(tuple(0.0 if (k, j) in tensors else float(v) for j, v in enumerate(row)) for k, row in enumerate(rows))

    def host():
        table = torch.zeros(len(rows), width, dtype=torch.float32)
        for k, row in enumerate(floats):
            table[k, : len(row)] = torch.tensor(row, dtype=torch.float64)
        return table

    base = _cached_copy(("hyper", device, width, floats), device, host)
    if not tensors:
        return base
    out = base.clone()
    for (k, j), v in tensors.items():
        out[k, j] = v.detach().to(device=device, dtype=torch.float32).reshape(())
    return out


# Per optimizer, through the step's first bucket: two optimizers never share
# one (their steps may run on different streams, or one be captured in a CUDA
# graph that another's larger buffer would free under it).
_partials: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def partials_buffer(owner, n: int) -> torch.Tensor:
    """One fp32 slot per program per bucket, kept with ``owner`` (the step's
    first bucket); every K1 program writes its slot, so it is never cleared."""
    buf = _partials.get(owner)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32, device=owner.layout.device)
        _partials[owner] = buf
    return buf
