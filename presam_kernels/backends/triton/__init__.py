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


def _device_tables(tables, buckets, spec: Preconditioner, chunk: int):
    """One device table per bucket, or None when any row needs the eager path."""
    out = []
    for table, bucket in zip(tables, buckets):
        if not len(table):
            out.append(None)
            continue
        if saved_buffer(bucket, table) is None or (spec.objective.has_state and bucket.grad_ema is None):
            return None
        dev = device_table(bucket, table, chunk)
        if dev is None:
            return None
        out.append(dev)
    return out


def perturb(tables, buckets, spec: Preconditioner, rhos, first, found_inf=None):
    """x <- x + e for every row (one global norm over all tables), backup <- x,
    EMA <- m_new; a non-finite norm or ``found_inf`` > 0 writes only backup.
    Returns (norm, skipped): 0-d fp32 and 0-d bool device tensors."""
    device = buckets[0].device
    dev_tables = None
    if all(b.device == device for b in buckets) and supported_device(device):
        programs, chunk, partials_block = launch_config(device)
        dev_tables = _device_tables(tables, buckets, spec, chunk)
    if dev_tables is None:
        for table in tables:
            table.backend_state = None
        return eager.perturb(tables, buckets, spec, rhos, first, found_inf)

    active = [(t, b, d) for t, b, d in zip(tables, buckets, dev_tables) if d is not None and d.n_rows]
    for table in tables:
        table.backend_state = None
    if found_inf is not None:
        found_inf = found_inf.to(device=device, dtype=torch.float32)
    if not active:
        norm = torch.zeros((), dtype=torch.float32, device=device)
        skipped = torch.zeros((), dtype=torch.bool, device=device)
        if found_inf is not None:
            skipped = found_inf.reshape(()) > 0
        return norm, skipped

    stateful = spec.objective is not Objective.GRADIENT
    # The launchers' ema_ready: None while the EMA is cold (host-known), else a
    # 0-d device flag, 1.0 once the EMA has had a finite step.
    if not stateful or first is True:
        ema_ready = None
    elif isinstance(first, torch.Tensor):
        ema_ready = 1.0 - first.to(device=device, dtype=torch.float32)
    else:
        ema_ready = torch.full((), 1.0 - float(first), dtype=torch.float32, device=device)
    n_partials = programs * len(active)
    partials = partials_buffer(device, n_partials)
    rho = rho_tensor(rhos, device)
    norm = torch.empty((), dtype=torch.float32, device=device)
    skipped = torch.empty((), dtype=torch.uint8, device=device)

    def state(table, bucket):
        backup = saved_buffer(bucket, table)  # out of place: the adversarial buffer
        return backup, bucket.grad_ema if stateful else backup  # the EMA is unused when stateless

    for k, (table, bucket, dev) in enumerate(active):
        backup, ema = state(table, bucket)
        k1_reduce.launch_reduce(dev, backup, ema, ema_ready, partials, k * programs, programs, chunk, spec)
    for k, (table, bucket, dev) in enumerate(active):
        backup, ema = state(table, bucket)
        k2_perturb.launch_perturb(
            dev, backup, ema, ema_ready, partials, n_partials, rho, found_inf, norm, skipped,
            programs, chunk, spec, write_norm=k == 0, out_of_place=table.out_of_place,
            partials_block=partials_block,
        )
        table.backend_state = (dev, backup, programs, chunk)
    return norm, skipped.view(torch.bool)


def restore(tables):
    """x <- backup, bit for bit, for every perturbed row."""
    for table in tables:
        if not len(table) or table.out_of_place:
            continue
        launch = table.backend_state
        if launch is None or launch[0].param_addresses != tuple(p.data_ptr() for p in table.params):
            eager.restore([table])  # not perturbed by K2, or a parameter was re-pointed since
            continue
        dev, backup, programs, chunk = launch
        if dev.n_rows:
            k3_restore.launch_restore(dev, backup, programs, chunk)


def restore_and_step(tables, buckets, update) -> bool:
    """x <- the base optimizer's update (``update``: a ``base_update.Update``)
    of the saved x, with the gradients in ``tables`` (the second pass's rows,
    the same rows the perturbation wrote); writes the base state in place.

    Returns False, having written nothing, where the kernels cannot walk the
    rows (the caller restores and steps the base optimizer instead)."""
    device = buckets[0].device
    if not (all(b.device == device for b in buckets) and supported_device(device)):
        return False
    if len(tables) != len(buckets) or len(update.state) != len(buckets):
        return False
    if any(b.dtype == torch.float64 for b in buckets):
        return False  # K4 computes in fp32 from fp32 hyperparameters: fp64 takes torch's own step
    programs, chunk, _ = launch_config(device)
    dev_tables = []
    for table, bucket in zip(tables, buckets):
        if not len(table):
            dev_tables.append(None)
            continue
        if saved_buffer(bucket, table) is None:
            return False
        dev = device_table(bucket, table, chunk)
        if dev is None:
            return False
        dev_tables.append(dev)
    hyper = hyper_tensor(update.hyper, k4_restore_step.HYPER_WIDTH.value, device)
    for table, bucket, dev, flats in zip(tables, buckets, dev_tables, update.state):
        if dev is None or not dev.n_rows:
            continue
        k4_restore_step.launch_restore_step(
            dev, saved_buffer(bucket, table), hyper, flats, update.kind, not table.out_of_place, programs, chunk
        )
    return True
