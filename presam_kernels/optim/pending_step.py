"""The SAM step between ``first_step`` and ``second_step`` / ``restore``
(docs/design.md §5).

``first_step`` creates one ``PendingStep``; ``second_step`` or ``restore``
consumes it. While it exists the parameters hold x + e, and it holds
everything needed to put them back at x: the tables perturbed, what the
backend's ``perturb`` reported, the parameters switched out of place, and
where their storage was.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..buckets import local


@dataclass(eq=False)
class PendingStep:
    # One per bucket (in bucket order): the rows first_step perturbed.
    tables: list
    # Per param group: whether its rho is nonzero (its rows were written).
    group_perturbed: list
    # What the backend's perturb returned (norm, skipped, path, its restore plan);
    # None when no bucket had a gradient.
    perturbation: object
    # Under a GradScaler: the first pass's skip flag (0-d bool); None without one.
    first_pass_skipped: torch.Tensor | None = None
    # Under a GradScaler with an EMA: the ema_ready flags before this step
    # (EmaReady.save, which also set the EMA aside), put back when the second
    # pass overflows.
    ema_ready_before: dict | None = None
    # The parameters' storage addresses first_step left; None when the step ran
    # bound to torch.compile's operands (they are not the parameters' own).
    storage: tuple | None = None
    # Out of place: (parameter, its own .data holding x) while it points at x + e.
    switched: list = field(default_factory=list)

    @property
    def grad_scaler_used(self) -> bool:
        return self.first_pass_skipped is not None

    def switch_to_adversarial(self, buckets):
        """Out of place: point each perturbed parameter's .data at its slice of
        x + e (same shape and strides); its own storage, holding x, is kept."""
        for bucket, table in zip(buckets, self.tables):
            if not table.out_of_place:
                continue
            for i, p in enumerate(bucket.params):
                if p.grad is not None and self.group_perturbed[bucket.layout.group_index[i]]:
                    self.switched.append((p, p.data))
                    p.data = bucket.buffers.adversarial_view(i)

    def switch_back(self):
        """Point every switched parameter at its own storage again (x, exactly)."""
        for p, data in self.switched:
            p.data = data
        self.switched = []

    def moved(self, addresses) -> bool:
        """Whether the parameters were moved, converted or replaced since
        first_step: ``addresses``, their ``_host.data_addresses`` now, differ."""
        return self.storage is not None and addresses != self.storage

    def restore_moved(self, buckets):
        """restore() after parameters were moved or replaced: x, from where
        first_step kept it, copied into each perturbed parameter as it is now
        (converting dtype and device)."""
        own = {id(p): data for p, data in self.switched}  # out of place: x is the parameter's own storage
        for bucket, table in zip(buckets, self.tables):
            for i in _perturbed_members(bucket, table):
                p = bucket.params[i]
                if id(p) not in own:
                    local(p.data).copy_(bucket.buffers.views(bucket.buffers.backup)[i])
                elif p.data_ptr() == bucket.buffers.adversarial_view(i).data_ptr() and p.dtype == bucket.layout.dtype:
                    p.data = own[id(p)]  # this one was not moved: point it back
                else:
                    local(p.data).copy_(own[id(p)])
        self.switched = []


def _perturbed_members(bucket, table):
    """The bucket's indices of the parameters ``table``'s perturbed rows cover."""
    if table.members is not None:
        return [i for r, i in enumerate(table.members) if table.perturbed[r]]
    out = []
    for start, length, perturbed in zip(table.offsets, table.lengths, table.perturbed):
        if perturbed:
            out += [i for i, offset in enumerate(bucket.layout.offsets) if start <= offset < start + length]
    return out
