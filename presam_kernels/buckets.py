"""What the backends iterate over (docs/design.md §2).

A bucket holds every parameter of one (device, dtype): a fixed slice of the
optimizer's own flat buffers per parameter (the backup, or with out-of-place
perturbation the adversarial point, in the parameter's dtype; the fp32 EMA
state; the base optimizer's state when its update is fused), and, with
``flatten=True``, the parameters and their gradients too.  Each step the optimizer asks the bucket for a ``Table``:
the rows that take part in that step (parameters that have a gradient), with
the tensors, lengths, offsets and per-row metadata a backend needs.  Rows that
are adjacent in every flat buffer are merged, so a flattened bucket with one
param group is a single row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _host

# Table layouts (every list of a table but the gradients) kept per bucket,
# keyed by which parameters have a gradient: a few, for steps that alternate.
TABLE_LAYOUTS_PER_BUCKET = 8
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


@dataclass
class Table:
    """The rows of one bucket that take part in one step.

    ``params``/``grads``/``backups``/``grad_emas`` are same-shaped tensors per
    row (with ``flatten=True``, 1-D views of the flat buffers).  ``perturbed``
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

    @property
    def out_of_place(self) -> bool:
        return self.adversarials is not None

    def __len__(self):
        return len(self.params)

    def with_grads(self, grads) -> "Table":
        """This table with ``grads`` as its gradients (the other lists shared)."""
        table = Table.__new__(Table)
        table.__dict__.update(self.__dict__)
        table.grads = grads
        return table


@dataclass(eq=False)
class Bucket:
    device: torch.device
    dtype: torch.dtype
    params: list
    group_index: list
    is_weight: list
    flatten: bool
    mesh: object = None  # DTensor parameters: their device mesh and placements
    placements: tuple | None = None
    shapes: list = field(default_factory=list)
    strides: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    numel: int = 0
    numels: list = field(default_factory=list)  # elements per parameter
    backup: torch.Tensor | None = None
    grad_ema: torch.Tensor | None = None
    flat_param: torch.Tensor | None = None
    flat_grad: torch.Tensor | None = None
    adversarial: torch.Tensor | None = None
    # Per-parameter views of flat buffers, made once per buffer: a view costs
    # ~2 us, and a step needs up to three per parameter (GPT-2 medium set,
    # 292 tensors: the step's table took 0.77 ms of host time, 0.1 ms cached).
    _views: dict = field(default_factory=dict, repr=False)
    # The base optimizer's state kept flat when its update is fused
    # (base_update.py): key (torch's state key) -> flat buffer, and the
    # per-parameter views handed out as optimizer.state[p][key].
    base_state: dict = field(default_factory=dict)
    base_views: dict = field(default_factory=dict)
    # table()'s layouts, by (rows with a gradient, its arguments), most recent last.
    _table_layouts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        offset = 0
        for p in self.params:
            shard = local(p)
            self.shapes.append(shard.shape)
            self.numels.append(shard.numel())
            self.strides.append(_dense_strides(shard))
            self.offsets.append(offset)
            offset = _round_up(offset + shard.numel(), SLICE_ALIGN)
        self.numel = offset
        if self.flatten:
            if self.mesh is not None:
                raise ValueError("flatten=True does not support DTensor (FSDP2) parameters; use flatten=False")
            self._flatten_params()

    # -- views -----------------------------------------------------------
    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter i's slice of ``flat``, shaped and strided like the parameter."""
        return flat.as_strided(self.shapes[i], self.strides[i], flat.storage_offset() + self.offsets[i])

    def state_view(self, flat: torch.Tensor, i: int):
        """As ``view``, wrapped as a DTensor sharded like the parameter when it is one."""
        shard = self.view(flat, i)
        if self.mesh is None:
            return shard
        from torch.distributed.tensor import DTensor

        p = self.params[i]
        return DTensor.from_local(shard, self.mesh, self.placements, run_check=False, shape=p.shape, stride=p.stride())

    def sum_over_mesh(self, local_sum: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank partial over the mesh dims the parameters are sharded
        on, but not over replicated dims (HSDP), which would count replicas twice."""
        from torch.distributed.tensor import DTensor, Partial, Replicate

        placements = [Partial("sum") if pl.is_shard() else Replicate() for pl in self.placements]
        return DTensor.from_local(local_sum, self.mesh, placements, run_check=False).full_tensor()

    def new_flat(self, dtype=None) -> torch.Tensor:
        # Zeros, not empty: the gaps between slices must stay harmless
        # (zero gradient, zero parameter) because merged rows cover them.
        return torch.zeros(self.numel, dtype=dtype or self.dtype, device=self.device)

    def ensure_backup(self):
        if self.backup is None:
            self.backup = self.new_flat()
        return self.backup

    def ensure_adversarial(self):
        if self.adversarial is None:
            self.adversarial = self.new_flat()
        return self.adversarial

    def views(self, flat: torch.Tensor) -> list:
        """Every parameter's ``view`` of ``flat``, made once per buffer."""
        entry = self._views.get(id(flat))
        if entry is None or entry[0] is not flat:  # the entry holds flat, so its id is not reused
            entry = (flat, [self.view(flat, i) for i in range(len(self.params))])
            self._views[id(flat)] = entry
        return entry[1]

    def adversarial_view(self, i: int) -> torch.Tensor:
        """Parameter i's slice of the adversarial buffer (out of place switches to it every step)."""
        return self.views(self.adversarial)[i]


    def ensure_base_state(self, key: str) -> list:
        """The per-parameter views (parameter dtype, zeros when new) of the flat
        buffer holding the base optimizer's state ``key``."""
        if key not in self.base_state:
            flat = self.new_flat()
            self.base_state[key] = flat
            self.base_views[key] = [self.view(flat, i) for i in range(len(self.params))]
        return self.base_views[key]

    def ensure_grad_ema(self):
        if self.grad_ema is None:
            self.grad_ema = self.new_flat(torch.float32)
        return self.grad_ema

    # -- flatten=True ----------------------------------------------------
    def _flatten_params(self):
        """Re-point every parameter (and gradient) into one flat buffer each."""
        self.flat_param = self.new_flat()
        self.flat_grad = self.new_flat()
        for i, p in enumerate(self.params):
            view = self.view(self.flat_param, i)
            view.copy_(p.detach())
            p.data = view
            if p.grad is not None:  # a missing gradient stays missing, as in torch
                grad_view = self.view(self.flat_grad, i)
                grad_view.copy_(p.grad)
                p.grad = grad_view

    def readopt(self, i: int) -> bool:
        """flatten=True: bring parameter i (and its gradient) back into the flat
        buffers if something replaced them; one copy, never dropped.
        Returns False when the parameter moved to another device or dtype
        (the caller must rebuild the buckets)."""
        p = self.params[i]
        if p.device != self.device or p.dtype != self.dtype:
            return False
        view = self.view(self.flat_param, i)
        if p.data_ptr() != view.data_ptr() or p.stride() != view.stride():
            view.copy_(p.detach())
            p.data = view
        g = p.grad
        if g is not None:
            grad_view = self.view(self.flat_grad, i)
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
        p = self.params[i]
        if p.data_ptr() != self.flat_param.data_ptr() + self.offsets[i] * self.flat_param.element_size():
            return False
        g = p.grad
        return g is None or g.data_ptr() == self.flat_grad.data_ptr() + self.offsets[i] * self.flat_grad.element_size()

    def zero_flat_grad(self):
        """flatten=True: zero every gradient in one op and keep them allocated;
        a gradient found replaced is pointed back at its zeroed slice, and a
        parameter that never had one keeps none (so it joins no step); nor
        does a frozen one (requires_grad off), which a kept zero gradient
        would let the base optimizer step on momentum alone."""
        self.flat_grad.zero_()
        for i, p in enumerate(self.params):
            if p.grad is not None and not p.requires_grad:
                p.grad = None
            elif p.grad is not None and not self.in_flat_buffers(i):
                p.grad = self.view(self.flat_grad, i)

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
        rows, grads = _host.rows_with_grads(self.params)  # a scan in C++ where the extension is built
        if self.mesh is not None:  # DTensor: the local shards are new tensors each time
            return self._new_table(rows, grads, group_perturbed, out_of_place, merge)
        saved = self.ensure_adversarial() if out_of_place else self.ensure_backup()
        # The buffers by identity: the layout's views of them keep them alive.
        key = (rows, tuple(group_perturbed), out_of_place, merge, id(saved), id(self.grad_ema))
        layout = self._table_layouts.get(key)
        if layout is None:
            layout = self._new_table(rows, None, group_perturbed, out_of_place, merge)
            self._table_layouts[key] = layout
            while len(self._table_layouts) > TABLE_LAYOUTS_PER_BUCKET:
                self._table_layouts.pop(next(iter(self._table_layouts)))
        return layout.with_grads(layout.grads if layout.merged else grads)

    def _new_table(self, rows, grads, group_perturbed, out_of_place, merge) -> Table:
        if self.flatten and merge:
            return self._merged_table(rows, group_perturbed, out_of_place)
        ema = self.grad_ema
        saved = self.views(self.ensure_adversarial() if out_of_place else self.ensure_backup())
        views = tuple(saved[i] for i in rows)
        params = tuple(self.params[i] for i in rows)
        if self.mesh is not None:
            params, grads = tuple(local(p) for p in params), [local(g) for g in grads]
        emas = None if ema is None else self.views(ema)
        return Table(
            params=params,
            grads=grads,
            backups=None if out_of_place else views,
            adversarials=views if out_of_place else None,
            grad_emas=None if ema is None else tuple(emas[i] for i in rows),
            offsets=tuple(self.offsets[i] for i in rows),
            lengths=tuple(self.numels[i] for i in rows),
            group_index=tuple(self.group_index[i] for i in rows),
            is_weight=tuple(self.is_weight[i] for i in rows),
            perturbed=tuple(group_perturbed[self.group_index[i]] for i in rows),
            reduce_sum_of_squares=None if self.mesh is None else self.sum_over_mesh,
            members=rows,
        )

    def _merged_table(self, rows, group_perturbed, out_of_place=False) -> Table:
        """flatten=True: runs of consecutive parameters with the same group and
        weight flag become one 1-D row spanning the flat buffers."""
        saved = self.ensure_adversarial() if out_of_place else self.ensure_backup()
        runs = []  # [first_param, last_param]
        for i in rows:
            if runs and runs[-1][1] == i - 1 and self._same_row_meta(runs[-1][1], i):
                runs[-1][1] = i
            else:
                runs.append([i, i])
        table = Table([], [], [], None if self.grad_ema is None else [], [], [], [], [], [], merged=True)
        if out_of_place:
            table.adversarials = table.backups
        for first, last in runs:
            start = self.offsets[first]
            stop = self.offsets[last] + self.params[last].numel()
            table.params.append(self.flat_param[start:stop])
            table.grads.append(self.flat_grad[start:stop])
            table.backups.append(saved[start:stop])
            if table.grad_emas is not None:
                table.grad_emas.append(self.grad_ema[start:stop])
            table.offsets.append(start)
            table.lengths.append(stop - start)
            table.group_index.append(self.group_index[first])
            table.is_weight.append(self.is_weight[first])
            table.perturbed.append(group_perturbed[self.group_index[first]])
        if out_of_place:
            table.backups = None
        for name in _ROW_FIELDS:
            value = getattr(table, name)
            setattr(table, name, None if value is None else tuple(value))
        return table

    def _same_row_meta(self, i, j):
        return self.group_index[i] == self.group_index[j] and self.is_weight[i] == self.is_weight[j]


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
        buckets.append(
            Bucket(
                device=device,
                dtype=dtype,
                params=[m[0] for m in members],
                group_index=[m[1] for m in members],
                is_weight=[m[2] for m in members],
                flatten=flatten,
                mesh=mesh,
                placements=placements,
            )
        )
    return buckets
