"""Fused Triton backend (issue 3): the verbs of ``backends.eager``, as three
multi-tensor kernels per bucket walking a device table of addresses.

``perturb``: K1 (``k1_reduce``) per bucket writes per-program partial sums of
(c u)^2 into one buffer shared by all buckets; K2 (``k2_perturb``) per bucket
re-reduces them all into the global norm on the device and writes backup,
x + e and the EMA (out of place: x + e into the adversarial buffer, no
backup). ``restore``: K3 (``k3_restore``), x = backup. ``restore_and_step``:
K4 (``k4_restore_step``), the base optimizer's update of the saved x.
Launches per step: 2 per bucket for perturb, 1 per bucket for restore, however
many tensors. No host read of any tensor.

Falls back to the eager backend for the whole call where the kernels cannot
walk a row as linear memory (param and grad strides differ, a layout that is
not dense, DTensor or other tensor subclasses), where buckets span several
devices, or where the device is not the kernels' (CUDA compiled, CPU under
TRITON_INTERPRET=1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import eager
from ..protocol import Perturbation
from ...preconditioners import Objective, Preconditioner
from . import k1_reduce, k2_perturb, k3_restore, k4_restore_step
from .table import (
    device_table,
    hyper_tensor,
    launch_config,
    partials_buffer,
    rho_tensor,
    saved_buffer,
    supported_device,
)

name = "triton"


def unscale_(tables, inv_scale, found_inf):
    """Divide the gradients by the loss scale in place, recording overflow (eager)."""
    eager.unscale_(tables, inv_scale, found_inf)


def _device_tables(tables, buckets, chunk: int, needs_ema: bool = False):
    """One device table per bucket (None for a bucket without rows), or None
    when any row needs the eager path (or the base step, for K4)."""
    out = []
    for table, bucket in zip(tables, buckets):
        if not len(table):
            out.append(None)
            continue
        if saved_buffer(bucket, table) is None or (needs_ema and bucket.buffers.grad_ema is None):
            return None
        dev = device_table(bucket, table, chunk)
        if dev is None:
            return None
        out.append(dev)
    return out


def _ema_ready_flag(ema_ready, device):
    """The kernels' per-step flag: a 0-d fp32 tensor, 1.0 once the EMA is
    ready, or None where the host knows it is not (the EMA_READY=False
    specialization reads no flag)."""
    if ema_ready is False:
        return None
    if isinstance(ema_ready, torch.Tensor):
        return ema_ready.to(device=device, dtype=torch.float32)
    return torch.ones((), dtype=torch.float32, device=device)


def perturb(tables, buckets, spec: Preconditioner, rhos, ema_ready, found_inf=None) -> Perturbation:
    """x <- x + e for every row (one global norm over all tables), backup <- x,
    EMA <- m_new; a non-finite norm or ``found_inf`` > 0 writes only backup.
    The norm and skipped flag are 0-d fp32 and bool device tensors; the path
    is "eager" where the kernels cannot walk a row (the whole call goes there)."""
    return plan_perturb(tables, buckets, spec, rhos, ema_ready)(tables, found_inf)


def plan_perturb(tables, buckets, spec: Preconditioner, rhos, ema_ready):
    """``perturb``'s host work for these tables, rhos and ``ema_ready``: a
    ``PerturbLaunch`` that launches the kernels (``launch(tables, found_inf)``),
    or the eager backend's where they cannot walk a row."""
    device = buckets[0].layout.device
    if not (all(b.layout.device == device for b in buckets) and supported_device(device)):
        return eager.plan_perturb(tables, buckets, spec, rhos, ema_ready)
    stateful = spec.objective is not Objective.GRADIENT
    programs, chunk, partials_block = launch_config(device)
    dev_tables = _device_tables(tables, buckets, chunk, needs_ema=stateful)
    if dev_tables is None:
        return eager.plan_perturb(tables, buckets, spec, rhos, ema_ready)
    active = tuple(k for k, d in enumerate(dev_tables) if d is not None and d.n_rows)
    if not active:
        return PerturbLaunch(device, active, (), (), None, None, None, spec, programs, chunk, partials_block)
    launches = []
    for k in active:
        backup = saved_buffer(buckets[k], tables[k])  # out of place: the adversarial buffer
        # The EMA is unused when stateless: the backup stands in for it.
        launches.append((dev_tables[k], backup, buckets[k].buffers.grad_ema if stateful else backup))
    return PerturbLaunch(
        device, active, tuple(launches),
        tuple((dev, backup, programs, chunk) for dev, backup, _ in launches),
        # The launchers' flag: None while the EMA is cold and the host knows it
        # (the EMA_READY=False specialization reads none), else 0-d, 1.0 once ready.
        _ema_ready_flag(ema_ready, device) if stateful else None,
        partials_buffer(buckets[0], programs * len(active)), rho_tensor(rhos, device), spec, programs, chunk,
        partials_block, torch.empty((), dtype=torch.float32, device=device),
        torch.empty((), dtype=torch.uint8, device=device),
    )


@dataclass(eq=False)
class PerturbLaunch:
    """K1 then K2 over the device tables of one ``perturb`` call's tables with
    rows (``active``). Replayable while those rows are unchanged (the
    optimizer's steady step checks that, optim/steady.py): nothing in it
    holds a gradient."""

    device: torch.device
    active: tuple  # indices of the tables launched
    launches: tuple  # per active table: (device table, saved buffer, EMA)
    restore_plans: tuple  # per active table: what K3 needs to undo it (Perturbation.plans)
    ready_flag: torch.Tensor | None
    partials: torch.Tensor | None
    rho: torch.Tensor | None
    spec: Preconditioner
    programs: int
    chunk: int
    partials_block: int
    norm_like: torch.Tensor | None = None  # 0-d fp32 and uint8 templates on the device
    skipped_like: torch.Tensor | None = None
    reads_grads: ClassVar[bool] = False  # the device tables hold their addresses

    def __call__(self, tables, found_inf=None) -> Perturbation:
        device = self.device
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32)
        if not self.active:
            norm = torch.zeros((), dtype=torch.float32, device=device)
            skipped = torch.zeros((), dtype=torch.bool, device=device)
            if found_inf is not None:
                skipped = found_inf.reshape(()) > 0
            return Perturbation(norm, skipped, path=name, tables=[], plans=[])
        programs, chunk, spec = self.programs, self.chunk, self.spec
        n_partials = programs * len(self.active)
        # A step's own norm and flag (the caller keeps them): empty_like of a
        # 0-d template parses no dtype or device, 1.4 us against 2.7
        # (bench/RESULTS.md, after "CPU (host)").
        norm = torch.empty_like(self.norm_like)
        skipped = torch.empty_like(self.skipped_like)
        for k, (dev, backup, ema) in enumerate(self.launches):
            k1_reduce.launch_reduce(dev, backup, ema, self.ready_flag, self.partials, k * programs, programs, chunk,
                                    spec)
        active_tables = [tables[k] for k in self.active]
        for k, ((dev, backup, ema), table) in enumerate(zip(self.launches, active_tables)):
            k2_perturb.launch_perturb(
                dev, backup, ema, self.ready_flag, self.partials, n_partials, self.rho, found_inf, norm, skipped,
                programs, chunk, spec, write_norm=k == 0, out_of_place=table.out_of_place,
                partials_block=self.partials_block,
            )
        return Perturbation(
            norm, skipped.view(torch.bool), path=name, tables=active_tables, plans=list(self.restore_plans)
        )


def restore(perturbation: Perturbation):
    """x <- backup, bit for bit, for every perturbed row."""
    if perturbation.path != name:
        eager.restore(perturbation)  # not perturbed by K2
        return
    for table, (dev, backup, programs, chunk) in zip(perturbation.tables, perturbation.plans):
        if table.out_of_place:
            continue
        if dev.param_addresses != tuple(p.data_ptr() for p in table.params):
            eager.restore_tables([table])  # a parameter was re-pointed since
            continue
        k3_restore.launch_restore(dev, backup, programs, chunk)


def restore_and_step(tables, buckets, prepare) -> bool:
    """x <- the base optimizer's update (``prepare()``: a ``base_update.Update``)
    of the saved x, with the gradients in ``tables`` (the second pass's rows,
    the same rows the perturbation wrote); writes the base state in place.

    Returns False, having written nothing, where the kernels cannot walk the
    rows (the caller restores and steps the base optimizer instead)."""
    launch = plan_restore_and_step(tables, buckets)
    return launch is not None and launch(tables, prepare)


def plan_restore_and_step(tables, buckets):
    """``restore_and_step``'s host work for these tables: a
    ``RestoreStepLaunch`` (``launch(tables, prepare)``), or None where the
    kernels cannot walk the rows."""
    device = buckets[0].layout.device
    if not (all(b.layout.device == device for b in buckets) and supported_device(device)):
        return None
    if len(tables) != len(buckets):
        return None
    if any(b.layout.dtype == torch.float64 for b in buckets):
        return None  # K4 computes in fp32 from fp32 hyperparameters: fp64 takes torch's own step
    programs, chunk, _ = launch_config(device)
    dev_tables = _device_tables(tables, buckets, chunk)
    if dev_tables is None:
        return None
    launches = tuple(None if dev is None or not dev.n_rows else (dev, saved_buffer(bucket, table), table.out_of_place)
                     for table, bucket, dev in zip(tables, buckets, dev_tables))
    return RestoreStepLaunch(device, len(buckets), launches, programs, chunk)


@dataclass(eq=False)
class RestoreStepLaunch:
    """K4 over the device tables of one ``restore_and_step`` call's tables;
    replayable as ``PerturbLaunch`` is."""

    device: torch.device
    n_buckets: int
    launches: tuple  # per table: (device table, saved buffer, out of place), or None without rows
    programs: int
    chunk: int
    reads_grads: ClassVar[bool] = False

    def __call__(self, tables, prepare) -> bool:
        update = prepare()
        if update is None or len(update.state) != self.n_buckets:
            return False
        hyper = hyper_tensor(update.hyper, k4_restore_step.HYPER_WIDTH.value, self.device)
        for launch, flats in zip(self.launches, update.state):
            if launch is None:
                continue
            dev, saved, out_of_place = launch
            k4_restore_step.launch_restore_step(
                dev, saved, hyper, flats, update.kind, not out_of_place, self.programs, self.chunk
            )
        return True
