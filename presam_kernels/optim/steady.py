"""The steady state (issue 15): a half step whose inputs are the last one's
replays that one's host work.

A general ``first_step`` scans the parameters, builds each bucket's table
and has the backend check the rows and plan its launches
(``plan_perturb``); ``second_step`` does the same for the second pass
(``plan_restore_and_step``). Step after step of training all of that comes
out the same: the same parameters, gradients at the same addresses, the same
rhos. So each general half step that may be replayed leaves a record here:
its table layouts (every field but the gradients), the backend's launch,
and a ``ParamWatch`` (csrc/host.cpp, ``_host.param_watch``) of everything it
read of the parameters and gradients. The next half step replays the record
when one C++ walk finds the parameters and gradients as recorded and the
few other inputs (buckets, backend, rhos, the EMA flag, the base optimizer's
kind) compare equal; the watch hands back the gradients, so the replayed
tables are complete. Anything else takes the general path, which records
anew. Records hold no gradient (a freed gradient's memory is not kept).

Not replayed: steps under a GradScaler, tensor rhos (checked on the device
each step), torch.compile's bound operands, and the second step of an
out-of-place perturbation (its parameters are switched back first). Without
the extension (or with ``_host.USE_NATIVE`` off) every step is general. A
record that does not hold is dropped, and so are both when the buckets are
rebuilt: none keeps old buffers alive.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _host, base_update


@dataclass(eq=False)
class FirstHalf:
    """A first_step to replay: the inputs it was made from, and what it made."""

    buckets: list
    backend: object
    perturb_mode: str
    rhos: tuple  # per param group, floats
    ema_ready: object  # EmaReady.for_step's answer (False or the device flag), or None when stateless
    watch: object  # the parameters and gradients as its tables read them
    layouts: tuple  # per bucket, its table without this step's gradients
    active: tuple  # the buckets with rows, as launched
    launch: object  # the backend's plan_perturb
    group_perturbed: list
    storage: bytes  # where first_step left the parameters' storage (PendingStep.storage)


@dataclass(eq=False)
class SecondHalf:
    """A fused second_step to replay, after a first_step whose tables had these layouts."""

    buckets: list
    first_params: tuple  # per bucket, the first step's table's params (identity: its layout)
    group_perturbed: list
    storage: bytes
    kind: str  # base_update.covered's
    watch: object
    layouts: tuple
    launch: object  # the backend's plan_restore_and_step


def _numbers(values) -> bool:
    return all(type(v) is float or type(v) is int for v in values)


def _without_grads(table):
    """A table's layout: its gradients dropped unless they are flat-buffer slices."""
    return table.with_grads(None if table.members is not None else table.grads)


def _tables(rec, groups):
    """The record's tables with this step's gradients, or None when its watch
    finds anything changed; a launch that does not read the gradients gets
    the record's layouts themselves (their gradients None)."""
    grads = rec.watch.check(groups, rec.launch.reads_grads)
    if grads is None:
        return None
    if not rec.launch.reads_grads:
        return list(rec.layouts)
    return [t.with_grads(t.grads if g is None else g) for t, g in zip(rec.layouts, grads)]


class SteadyStep:
    def __init__(self):
        self.first: FirstHalf | None = None
        self.second: SecondHalf | None = None

    def forget(self):
        self.first = self.second = None

    # -- first_step ----------------------------------------------------------
    def replay_first(self, opt):
        """(the record, this step's tables) when the record holds, else None
        (the record dropped: the general step records anew)."""
        out = self._replay_first(opt)
        if out is None:
            self.first = None
        return out

    def _replay_first(self, opt):
        rec = self.first
        if rec is None or not _host.USE_NATIVE or opt._buckets is not rec.buckets or opt._backend is not rec.backend:
            return None
        if opt.perturb_mode != rec.perturb_mode or opt._bound_to_operands:
            return None
        rhos = tuple(group.get("rho") for group in opt.param_groups)
        if not _numbers(rhos) or rhos != rec.rhos:
            return None
        if rec.ema_ready is not None and opt._ema_ready.for_step(rec.buckets[0].layout.device) is not rec.ema_ready:
            return None
        tables = _tables(rec, opt.param_groups)
        return None if tables is None else (rec, tables)

    def watch_first(self, opt, tables, rhos, found_inf):
        """The watch of a general first_step that may be replayed (before it
        switches parameters out of place), else None (and the record is dropped)."""
        self.first = None
        if found_inf is not None or opt._bound_to_operands or not _numbers(rhos):
            return None
        return _host.param_watch(opt.param_groups, tables)

    def keep_first(self, opt, watch, tables, active, launch, rhos, ema_ready, pending):
        if watch is None or launch is None:
            return
        self.first = FirstHalf(
            buckets=opt._buckets, backend=opt._backend, perturb_mode=opt.perturb_mode, rhos=tuple(rhos),
            ema_ready=ema_ready if opt.preconditioner.objective.has_state else None, watch=watch,
            layouts=tuple(_without_grads(t) for t in tables), active=tuple(active), launch=launch,
            group_perturbed=list(pending.group_perturbed), storage=pending.storage,
        )

    # -- second_step ---------------------------------------------------------
    def replay_second(self, opt, pending):
        """(the record, the second pass's tables) when the record holds for
        ``pending``, else None (the record dropped). Reads nothing but the checks."""
        out = self._replay_second(opt, pending)
        if out is None:
            self.second = None
        return out

    def _replay_second(self, opt, pending):
        rec = self.second
        if rec is None or not _host.USE_NATIVE or pending.switched or pending.grad_scaler_used:
            return None
        if opt._bound_to_operands or opt._buckets is not rec.buckets:
            return None
        if pending.storage != rec.storage or pending.group_perturbed != rec.group_perturbed:
            return None
        if len(pending.tables) != len(rec.first_params) or any(
            t.params is not params for t, params in zip(pending.tables, rec.first_params)
        ):
            return None
        if base_update.covered(opt.base_optimizer) != rec.kind:
            return None
        tables = _tables(rec, opt.param_groups)
        return None if tables is None else (rec, tables)

    def keep_second(self, opt, pending, kind, launch, tables):
        """After a general fused second_step: its record, where it may be replayed."""
        self.second = None
        if pending.grad_scaler_used or opt._bound_to_operands:
            return
        watch = _host.param_watch(opt.param_groups, tables)
        # The parameters where first_step left them, which a step out of place
        # (switched back since) never replays: no record.
        if watch is None or watch.data_addresses() != pending.storage:
            return
        self.second = SecondHalf(
            buckets=opt._buckets, first_params=tuple(t.params for t in pending.tables),
            group_perturbed=list(pending.group_perturbed), storage=pending.storage, kind=kind, watch=watch,
            layouts=tuple(_without_grads(t) for t in tables), launch=launch,
        )
