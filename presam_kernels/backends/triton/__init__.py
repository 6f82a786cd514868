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
    device = buckets[0].layout.device
    dev_tables = None
    stateful = spec.objective is not Objective.GRADIENT
    if all(b.layout.device == device for b in buckets) and supported_device(device):
        programs, chunk, partials_block = launch_config(device)
        dev_tables = _device_tables(tables, buckets, chunk, needs_ema=stateful)
    if dev_tables is None:
        return eager.perturb(tables, buckets, spec, rhos, ema_ready, found_inf)

    active = [(t, b, d) for t, b, d in zip(tables, buckets, dev_tables) if d is not None and d.n_rows]
    if found_inf is not None:
        found_inf = found_inf.to(device=device, dtype=torch.float32)
    if not active:
        norm = torch.zeros((), dtype=torch.float32, device=device)
        skipped = torch.zeros((), dtype=torch.bool, device=device)
        if found_inf is not None:
            skipped = found_inf.reshape(()) > 0
        return Perturbation(norm, skipped, path=name, tables=[], plans=[])

    # The launchers' flag: None while the EMA is cold and the host knows it
    # (the EMA_READY=False specialization reads none), else 0-d, 1.0 once ready.
    ready_flag = _ema_ready_flag(ema_ready, device) if stateful else None
    n_partials = programs * len(active)
    partials = partials_buffer(buckets[0], n_partials)
    rho = rho_tensor(rhos, device)
    norm = torch.empty((), dtype=torch.float32, device=device)
    skipped = torch.empty((), dtype=torch.uint8, device=device)

    def state(table, bucket):
        backup = saved_buffer(bucket, table)  # out of place: the adversarial buffer
        return backup, bucket.buffers.grad_ema if stateful else backup  # the EMA is unused when stateless

    for k, (table, bucket, dev) in enumerate(active):
        backup, ema = state(table, bucket)
        k1_reduce.launch_reduce(dev, backup, ema, ready_flag, partials, k * programs, programs, chunk, spec)
    plans = []
    for k, (table, bucket, dev) in enumerate(active):
        backup, ema = state(table, bucket)
        k2_perturb.launch_perturb(
            dev, backup, ema, ready_flag, partials, n_partials, rho, found_inf, norm, skipped,
            programs, chunk, spec, write_norm=k == 0, out_of_place=table.out_of_place,
            partials_block=partials_block,
        )
        plans.append((dev, backup, programs, chunk))  # what K3 needs to undo this table
    return Perturbation(norm, skipped.view(torch.bool), path=name, tables=[t for t, _, _ in active], plans=plans)


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
    device = buckets[0].layout.device
    if not (all(b.layout.device == device for b in buckets) and supported_device(device)):
        return False
    if len(tables) != len(buckets):
        return False
    if any(b.layout.dtype == torch.float64 for b in buckets):
        return False  # K4 computes in fp32 from fp32 hyperparameters: fp64 takes torch's own step
    programs, chunk, _ = launch_config(device)
    dev_tables = _device_tables(tables, buckets, chunk)
    if dev_tables is None:
        return False
    update = prepare()
    if update is None or len(update.state) != len(buckets):
        return False
    hyper = hyper_tensor(update.hyper, k4_restore_step.HYPER_WIDTH.value, device)
    for table, bucket, dev, flats in zip(tables, buckets, dev_tables, update.state):
        if dev is None or not dev.n_rows:
            continue
        k4_restore_step.launch_restore_step(
            dev, saved_buffer(bucket, table), hyper, flats, update.kind, not table.out_of_place, programs, chunk
        )
    return True
