"""What the backends iterate over (docs/design.md §2).

A bucket holds every parameter of one (device, dtype, mesh).  Its
``BucketLayout`` says, once and for all, where each parameter's slice lies
in a flat buffer (offset, shape, strides) and which param group and weight
flag it has; its ``BucketBuffers`` are the optimizer's own flat buffers laid
out that way (the backup, or with out-of-place perturbation the adversarial
point, in the parameter's dtype; the fp32 EMA state; the base optimizer's
state when its update is fused) and, with ``flatten=True``, the flat
buffers the parameters and their gradients live in.  Each step the optimizer
asks the bucket for a ``Table``: the rows that take part in that step
(parameters that have a gradient), with the tensors, lengths, offsets and
per-row metadata a backend needs.  Rows that are adjacent in every flat
buffer are merged, so a flattened bucket with one param group is a single
row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _host

# Slices start on multiples of this many elements (64 B for fp32, 32 B for
# bf16) so that every slice address is 16-byte aligned for vectorised loads.
SLICE_ALIGN = 16


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def local(t):
    """The local shard of a DTensor (sharing its storage), else t itself."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides a slice of a flat buffer gets: the tensor's own when it is
    dense (so channels_last stays channels_last), contiguous otherwise."""
    if _non_overlapping_and_dense(t):
        return tuple(t.stride())
    return torch.empty(t.shape, device="meta").stride()


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill exactly t.numel() consecutive slots, in some dim order."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# A table's per-row fields but the gradients: tuples, so that tables sharing
# them (Bucket.table keeps them from step to step) cannot change them under
# each other, and the C++ table check can trust one it has seen.
_ROW_FIELDS = ("params", "backups", "adversarials", "grad_emas", "offsets", "lengths", "group_index", "is_weight",
               "perturbed")
# Table layouts (every field of a table but the gradients) kept per bucket,
# keyed by which parameters have a gradient: a few, for steps that alternate.
TABLE_LAYOUTS_PER_BUCKET = 8


@dataclass
class Table:
    """The rows of one bucket that take part in one step.

    ``params``/``grads``/``backups``/``grad_emas`` are same-shaped tensors per
    row (with ``flatten=True``, 1-D views of the flat buffers); ``grads`` is
    None in a table layout, and in a replayed step's table where the
    backend's launch reaches the gradients through their addresses only
    (optim/steady.py).  ``perturbed``
    is False for rows of a param group with rho == 0: they count in the norm
    and update their EMA but are never written.  With out-of-place
    perturbation ``backups`` is None and ``adversarials`` holds each row's
    slice of the bucket's adversarial buffer, where x + e is written instead
    of into x.
    """

    params: tuple
    grads: list
    backups: tuple | None
    grad_emas: tuple | None
    offsets: tuple
    lengths: tuple
    group_index: tuple
    is_weight: tuple
    perturbed: tuple
    # For DTensor buckets: maps this table's local sum of squares to the sum
    # over the whole mesh (replicas counted once); None for plain tensors.
    reduce_sum_of_squares: object = None
    adversarials: tuple | None = None
    merged: bool = False  # flatten=True rows spanning several parameters
    members: tuple | None = None  # per-parameter rows: the bucket's parameter index of each
    # What the C++ scan that found the gradients saw of every row's parameter
    # and gradient (``_host.rows_with_grads``), or None; only Bucket.table sets
    # it (not the constructor, nor dataclasses.replace), so a table whose
    # tensors were swapped never carries a signature that is not theirs.
    signature: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def out_of_place(self) -> bool:
        return self.adversarials is not None

    def __len__(self):
        return len(self.params)

    def with_grads(self, grads, signature=None) -> "Table":
        """This table with ``grads`` as its gradients (the other fields shared)
        and the ``signature`` of its rows."""
        table = Table.__new__(Table)
        table.__dict__.update(self.__dict__)
        table.grads = grads
        table.signature = signature
        return table


@dataclass(frozen=True, eq=False)
class BucketLayout:
    """Where each parameter of a bucket lives in the bucket's flat buffers,
    fixed when the bucket is built: parameter i's slice starts at
    ``offsets[i]`` and holds ``numels[i]`` elements shaped ``shapes[i]`` with
    ``strides[i]``; every flat buffer holds ``flat_numel`` elements (gaps
    included).  ``group_index``/``is_weight`` are each parameter's param
    group and ASAM weight flag; ``mesh``/``placements`` those of DTensor
    parameters (None for plain tensors)."""

    device: torch.device
    dtype: torch.dtype
    shapes: tuple
    strides: tuple
    offsets: tuple
    numels: tuple
    flat_numel: int
    group_index: tuple
    is_weight: tuple
    mesh: object = None
    placements: tuple | None = None

    @classmethod
    def of(cls, params, group_index, is_weight, device, dtype, mesh=None, placements=None) -> BucketLayout:
        """The layout of ``params`` (their local shards), in order."""
        shapes, strides, offsets, numels = [], [], [], []
        offset = 0
        for p in params:
            shard = local(p)
            shapes.append(shard.shape)
            numels.append(shard.numel())
            strides.append(_dense_strides(shard))
            offsets.append(offset)
            offset = _round_up(offset + shard.numel(), SLICE_ALIGN)
        return cls(
            device=device,
            dtype=dtype,
            shapes=tuple(shapes),
            strides=tuple(strides),
            offsets=tuple(offsets),
            numels=tuple(numels),
            flat_numel=offset,
            group_index=tuple(group_index),
            is_weight=tuple(is_weight),
            mesh=mesh,
            placements=placements,
        )

    def __len__(self):
        return len(self.offsets)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter i's slice of ``flat``, shaped and strided like the parameter."""
        return flat.as_strided(self.shapes[i], self.strides[i], flat.storage_offset() + self.offsets[i])

    def mergeable(self, i: int, j: int) -> bool:
        """Whether parameters i and j may share a merged row: same group and weight flag."""
        return self.group_index[i] == self.group_index[j] and self.is_weight[i] == self.is_weight[j]

    def sum_over_mesh(self, local_sum: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank partial over the mesh dims the parameters are sharded
        on, but not over replicated dims (HSDP), which would count replicas twice."""
        from torch.distributed.tensor import DTensor, Partial, Replicate

        placements = [Partial("sum") if pl.is_shard() else Replicate() for pl in self.placements]
        return DTensor.from_local(local_sum, self.mesh, placements, run_check=False).full_tensor()


class BucketBuffers:
    """The optimizer's own flat buffers of one bucket, each laid out by the
    bucket's ``BucketLayout`` and made on first use: ``backup`` (x, in place)
    or ``adversarial`` (x + e, out of place), in the parameter dtype;
    ``grad_ema`` (fp32); ``base_state[key]``, the base optimizer's state
    under torch's key when its update is fused (base_update.py); and with
    flatten=True, ``flat_param`` and ``flat_grad``, which the parameters and
    their gradients themselves live in."""

    def __init__(self, layout: BucketLayout):
        self.layout = layout
        self.backup: torch.Tensor | None = None
        self.adversarial: torch.Tensor | None = None
        self.grad_ema: torch.Tensor | None = None
        self.flat_param: torch.Tensor | None = None
        self.flat_grad: torch.Tensor | None = None
        self.base_state: dict = {}
        # The per-parameter views handed out as optimizer.state[p][key].
        self._base_state_views: dict = {}
        # Per-parameter views of flat buffers, made once per buffer: a view costs
        # ~2 us, and a step needs up to three per parameter (GPT-2 medium set,
        # 292 tensors: the step's table took 0.77 ms of host time, 0.1 ms cached).
        self._views: dict = {}

    def new_flat(self, dtype=None) -> torch.Tensor:
        # Zeros, not empty: the gaps between slices must stay harmless
        # (zero gradient, zero parameter) because merged rows cover them.
        return torch.zeros(self.layout.flat_numel, dtype=dtype or self.layout.dtype, device=self.layout.device)

    def ensure_backup(self):
        if self.backup is None:
            self.backup = self.new_flat()
        return self.backup

    def ensure_adversarial(self):
        if self.adversarial is None:
            self.adversarial = self.new_flat()
        return self.adversarial

    def ensure_grad_ema(self):
        if self.grad_ema is None:
            self.grad_ema = self.new_flat(torch.float32)
        return self.grad_ema

    def ensure_base_state(self, key: str) -> list:
        """The per-parameter views (parameter dtype, zeros when new) of the flat
        buffer holding the base optimizer's state ``key``."""
        if key not in self.base_state:
            flat = self.new_flat()
            self.base_state[key] = flat
            self._base_state_views[key] = [self.layout.view(flat, i) for i in range(len(self.layout))]
        return self._base_state_views[key]

    def views(self, flat: torch.Tensor) -> list:
        """Every parameter's ``BucketLayout.view`` of ``flat``, made once per buffer."""
        entry = self._views.get(id(flat))
        if entry is None or entry[0] is not flat:  # the entry holds flat, so its id is not reused
            entry = (flat, [self.layout.view(flat, i) for i in range(len(self.layout))])
            self._views[id(flat)] = entry
        return entry[1]

    def adversarial_view(self, i: int) -> torch.Tensor:
        """Parameter i's slice of the adversarial buffer (out of place switches to it every step)."""
        return self.views(self.adversarial)[i]


class Bucket:
    """The parameters of one (device, dtype, mesh), their ``layout`` in the
    flat buffers and the ``buffers`` themselves; with ``flatten=True`` it
    keeps the parameters and gradients inside ``buffers.flat_param`` and
    ``buffers.flat_grad``.  Compared by identity (backends cache per bucket)."""

    def __init__(self, params: list, layout: BucketLayout, flatten: bool):
        self.params = params
        self.layout = layout
        self.buffers = BucketBuffers(layout)
        self.flatten = flatten
        # table()'s layouts, by (rows with a gradient, its arguments), most recent last.
        self._table_layouts = {}
        if flatten:
            if layout.mesh is not None:
                raise ValueError("flatten=True does not support DTensor (FSDP2) parameters; use flatten=False")
            self._flatten_params()

    def state_view(self, flat: torch.Tensor, i: int):
        """As ``BucketLayout.view``, wrapped as a DTensor sharded like the parameter when it is one."""
        layout = self.layout
        shard = layout.view(flat, i)
        if layout.mesh is None:
            return shard
        from torch.distributed.tensor import DTensor

        p = self.params[i]
        return DTensor.from_local(
            shard, layout.mesh, layout.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    # -- flatten=True ----------------------------------------------------
    def _flatten_params(self):
        """Re-point every parameter (and gradient) into one flat buffer each."""
        buffers, layout = self.buffers, self.layout
        buffers.flat_param = buffers.new_flat()
        buffers.flat_grad = buffers.new_flat()
        for i, p in enumerate(self.params):
            view = layout.view(buffers.flat_param, i)
            view.copy_(p.detach())
            p.data = view
            if p.grad is not None:  # a missing gradient stays missing, as in torch
                grad_view = layout.view(buffers.flat_grad, i)
                grad_view.copy_(p.grad)
                p.grad = grad_view

    def readopt(self, i: int) -> bool:
        """flatten=True: bring parameter i (and its gradient) back into the flat
        buffers if something replaced them; one copy, never dropped.
        Returns False when the parameter moved to another device or dtype
        (the caller must rebuild the buckets)."""
        p = self.params[i]
        layout, buffers = self.layout, self.buffers
        if p.device != layout.device or p.dtype != layout.dtype:
            return False
        view = layout.view(buffers.flat_param, i)
        if p.data_ptr() != view.data_ptr() or p.stride() != view.stride():
            view.copy_(p.detach())
            p.data = view
        g = p.grad
        if g is not None:
            grad_view = layout.view(buffers.flat_grad, i)
            if g.data_ptr() != grad_view.data_ptr() or g.stride() != grad_view.stride():
                grad_view.copy_(g)
                p.grad = grad_view
        return True

    def readopt_replaced(self):
        """flatten=True: ``readopt`` every parameter found outside the flat buffers."""
        for i in range(len(self.params)):
            if not self.in_flat_buffers(i):
                self.readopt(i)

    def in_flat_buffers(self, i: int) -> bool:
        """flatten=True: whether parameter i and its gradient still live in the flat buffers."""
        p, offset = self.params[i], self.layout.offsets[i]
        flat_param, flat_grad = self.buffers.flat_param, self.buffers.flat_grad
        if p.data_ptr() != flat_param.data_ptr() + offset * flat_param.element_size():
            return False
        g = p.grad
        return g is None or g.data_ptr() == flat_grad.data_ptr() + offset * flat_grad.element_size()

    def zero_flat_grad(self):
        """flatten=True: zero every gradient in one op and keep them allocated;
        a gradient found replaced is pointed back at its zeroed slice, and a
        parameter that never had one keeps none (so it joins no step); nor
        does a frozen one (requires_grad off), which a kept zero gradient
        would let the base optimizer step on momentum alone."""
        self.buffers.flat_grad.zero_()
        for i, p in enumerate(self.params):
            if p.grad is not None and not p.requires_grad:
                p.grad = None
            elif p.grad is not None and not self.in_flat_buffers(i):
                p.grad = self.layout.view(self.buffers.flat_grad, i)

    # -- the per-step table ---------------------------------------------
    def table(self, group_perturbed, out_of_place: bool = False, merge: bool = True) -> Table:
        """The rows with a gradient this step.  ``group_perturbed[k]`` says
        whether param group k has a nonzero rho; ``out_of_place`` gives the
        rows adversarial slices instead of backups; ``merge=False`` keeps one
        row per parameter with flatten=True too (the rows then reach the
        parameters through the tensors themselves, not the flat buffers).

        Everything but the gradients depends only on which parameters have one
        and on the arguments, so it is made once per such key and kept (a
        step's tables took ~50 us of host time for ResNet-50's 161 tensors,
        bench/RESULTS.md "CPU (host)"); the gradients are this step's own."""
        rows, grads, signature = _host.rows_with_grads(self.params)  # a scan in C++ where the extension is built
        merge = merge and self.flatten  # one layout for both spellings of "one row per parameter"
        if self.layout.mesh is not None:  # DTensor: the local shards are new tensors each time
            return self._new_table(rows, grads, group_perturbed, out_of_place, merge)
        buffers = self.buffers
        saved = buffers.ensure_adversarial() if out_of_place else buffers.ensure_backup()
        # The buffers by identity: the layout's views of them keep them alive.
        key = (rows, tuple(group_perturbed), out_of_place, merge, id(saved), id(buffers.grad_ema))
        layout = self._table_layouts.get(key)
        if layout is None:
            layout = self._new_table(rows, None, group_perturbed, out_of_place, merge)
            self._table_layouts[key] = layout
            while len(self._table_layouts) > TABLE_LAYOUTS_PER_BUCKET:
                self._table_layouts.pop(next(iter(self._table_layouts)))
        if layout.merged:  # rows over the flat buffers: the C++ check walks these few rows each time
            return layout.with_grads(layout.grads)
        return layout.with_grads(grads, signature)

    def _new_table(self, rows, grads, group_perturbed, out_of_place, merge) -> Table:
        if self.flatten and merge:
            return self._merged_table(rows, group_perturbed, out_of_place)
        layout, buffers = self.layout, self.buffers
        ema = buffers.grad_ema
        saved = buffers.views(buffers.ensure_adversarial() if out_of_place else buffers.ensure_backup())
        views = tuple(saved[i] for i in rows)
        params = tuple(self.params[i] for i in rows)
        if layout.mesh is not None:
            params, grads = tuple(local(p) for p in params), [local(g) for g in grads]
        emas = None if ema is None else buffers.views(ema)
        return Table(
            params=params,
            grads=grads,
            backups=None if out_of_place else views,
            adversarials=views if out_of_place else None,
            grad_emas=None if ema is None else tuple(emas[i] for i in rows),
            offsets=tuple(layout.offsets[i] for i in rows),
            lengths=tuple(layout.numels[i] for i in rows),
            group_index=tuple(layout.group_index[i] for i in rows),
            is_weight=tuple(layout.is_weight[i] for i in rows),
            perturbed=tuple(group_perturbed[layout.group_index[i]] for i in rows),
            reduce_sum_of_squares=None if layout.mesh is None else layout.sum_over_mesh,
            members=rows,
        )

    def _merged_table(self, rows, group_perturbed, out_of_place=False) -> Table:
        """flatten=True: runs of consecutive parameters with the same group and
        weight flag become one 1-D row spanning the flat buffers."""
        layout, buffers = self.layout, self.buffers
        saved = buffers.ensure_adversarial() if out_of_place else buffers.ensure_backup()
        runs = []  # [first_param, last_param]
        for i in rows:
            if runs and runs[-1][1] == i - 1 and layout.mergeable(runs[-1][1], i):
                runs[-1][1] = i
            else:
                runs.append([i, i])
        table = Table([], [], [], None if buffers.grad_ema is None else [], [], [], [], [], [], merged=True)
        if out_of_place:
            table.adversarials = table.backups
        for first, last in runs:
            start = layout.offsets[first]
            stop = layout.offsets[last] + self.params[last].numel()
            table.params.append(buffers.flat_param[start:stop])
            table.grads.append(buffers.flat_grad[start:stop])
            table.backups.append(saved[start:stop])
            if table.grad_emas is not None:
                table.grad_emas.append(buffers.grad_ema[start:stop])
            table.offsets.append(start)
            table.lengths.append(stop - start)
            table.group_index.append(layout.group_index[first])
            table.is_weight.append(layout.is_weight[first])
            table.perturbed.append(group_perturbed[layout.group_index[first]])
        if out_of_place:
            table.backups = None
        for name in _ROW_FIELDS:
            value = getattr(table, name)
            setattr(table, name, None if value is None else tuple(value))
        return table


def build_buckets(params, group_index, is_weight, flatten: bool) -> list:
    """Group parameters by (device, dtype); in flatten mode order each bucket by
    (group, weight flag) so that a bucket's rows merge into as few as possible."""
    by_key: dict = {}
    for p, g, w in zip(params, group_index, is_weight):
        mesh = placements = None
        if _is_dtensor(p):
            mesh, placements = p.device_mesh, tuple(p.placements)
        by_key.setdefault((p.device, p.dtype, mesh, placements), []).append((p, g, w))
    buckets = []
    for (device, dtype, mesh, placements), members in by_key.items():
        if flatten:
            members.sort(key=lambda m: (m[1], not m[2]))
        bucket_params = [m[0] for m in members]
        layout = BucketLayout.of(
            bucket_params, [m[1] for m in members], [m[2] for m in members], device, dtype, mesh, placements
        )
        buckets.append(Bucket(bucket_params, layout, flatten))
    return buckets
