"""Fused C++ CPU backend (csrc/, issue 15): the verbs of ``backends.eager`` as
``presam_cpp::`` ops over each bucket's rows, two passes for ``perturb`` (the
sum of (c u)^2, then the perturbation with the EMA and the backup), one for
``restore`` and one for ``restore_and_step`` (the base SGD / Adam / AdamW
update of the saved x), each vectorised and split over threads.

The ops walk every row as linear memory laid out as its slices of the
bucket's flat buffers, in fp32, bf16 or fp16; where a row is not (a
parameter re-strided since the buckets were built, a tensor subclass,
float64), the whole call takes the eager path,
as the Triton backend does. Scalars (the norm, the skip flag) are read on the
host: the CPU runs ops synchronously, so that stalls nothing.
"""
from __future__ import annotations

import torch

from .. import _extension
from ..base_update import STATE_KEYS
from ..buckets import _non_overlapping_and_dense
from ..preconditioners import Constraint, Objective, Preconditioner
from . import eager
from .protocol import Perturbation, PerturbCall, RestoreStepCall

name = "cpp"

# Codes of csrc/kernels.h (Direction folds "the EMA is not ready yet" into the objective: EMA_COLD).
GRADIENT, EMA_COLD, EMA, INFO = 0, 1, 2, 3
CONSTRAINT_CODE = {constraint: constraint.code for constraint in Constraint}  # csrc's order is the enum's
KIND_CODE = {"sgd": 0, "adam": 1}
FLAG_WEIGHT, FLAG_PERTURBED = 1, 2
_PLAIN = (torch.Tensor, torch.nn.Parameter)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # others (float64) take the eager path


def _ops():
    if not _extension.extension_available():
        raise RuntimeError(f"backend='cpp' needs the C++ extension: {_extension.unavailable_reason()}")
    return torch.ops.presam_cpp


def unscale_(tables, inv_scale, found_inf):
    """Divide the gradients by the loss scale in place, recording overflow (eager)."""
    eager.unscale_(tables, inv_scale, found_inf)


def _walkable(table, bucket) -> bool:
    """Whether the ops can walk every row of ``table``: a plain CPU tensor whose
    parameter and gradient have the strides of its slices of the flat buffers
    (checked in C++: ``presam_cpp::rows_are_linear``)."""
    layout = bucket.layout
    if layout.device.type != "cpu" or layout.mesh is not None or layout.dtype not in KERNEL_DTYPES:
        return False
    if table.merged:
        return True  # 1-D slices of the flat buffers themselves
    if not all(type(p) in _PLAIN for p in table.params) or not all(type(g) in _PLAIN for g in table.grads):
        return False
    views = table.adversarials if table.out_of_place else table.backups
    return _ops().rows_are_linear(table.params, table.grads, views)


def _flags(table):
    return [(FLAG_WEIGHT if w else 0) | (FLAG_PERTURBED if p else 0) for w, p in zip(table.is_weight, table.perturbed)]


def _direction(spec: Preconditioner, ema_ready: bool) -> int:
    if spec.objective is Objective.GRADIENT:
        return GRADIENT
    if not ema_ready:
        return EMA_COLD
    return EMA if spec.objective is Objective.EMA else INFO


def perturb(tables, buckets, spec: Preconditioner, rhos, ema_ready, found_inf=None) -> Perturbation:
    """x <- x + e for every row (one global norm over all tables), backup <- x,
    EMA <- m_new (out of place: adversarial <- x + e). A non-finite norm or
    ``found_inf`` > 0 writes only the backup (the adversarial copy of x).
    The norm and skipped flag are 0-d fp32 / bool tensors; the path is
    "eager" where a row is not walkable (the whole call goes there)."""
    stateful = spec.objective.has_state
    if not all(_walkable(t, b) for t, b in zip(tables, buckets)) or (
        stateful and any(b.buffers.grad_ema is None for b in buckets)
    ):
        return eager.perturb(tables, buckets, spec, rhos, ema_ready, found_inf)
    ops = _ops()
    direction = _direction(spec, bool(ema_ready))  # a flag on the CPU: reading it stalls nothing
    constants = (CONSTRAINT_CODE[spec.constraint], spec.ema_weight, 1.0 - spec.ema_weight, spec.delta, spec.eta)
    active = [(t, b, _flags(t)) for t, b in zip(tables, buckets) if len(t)]
    total = 0.0  # sums of fixed chunks, added in a fixed order: the same bits on any thread count
    for table, bucket, flags in active:
        ema = bucket.buffers.grad_ema if direction in (EMA, INFO) else None
        total += float(ops.sum_of_squares(table.params, table.grads, ema, table.offsets, flags, direction, *constants))
    norm = torch.tensor(total, dtype=torch.float32).sqrt()  # fp32, as eager and Triton: inf past FLT_MAX
    skipped = not bool(torch.isfinite(norm))
    if found_inf is not None:
        skipped = skipped or bool(found_inf.reshape(()) > 0)
    eps = spec.eps_norm * spec.delta if direction == INFO else spec.eps_norm  # u' = delta * u (eager)
    scale = 0.0 if skipped else float(1.0 / (norm + eps))
    rho_values = [float(r) for r in rhos]
    for table, bucket, flags in active:
        ema = bucket.buffers.grad_ema if direction != GRADIENT else None
        op = ops.perturb_out_of_place_ if table.out_of_place else ops.perturb_
        saved = bucket.buffers.adversarial if table.out_of_place else bucket.buffers.backup
        op(table.params, table.grads, saved, ema, table.offsets, table.group_index, flags, rho_values, scale,
           skipped, direction, *constants)
    return Perturbation(norm, torch.tensor(skipped), path=name, tables=list(tables), plans=list(buckets))


def restore(perturbation: Perturbation):
    """x <- backup, bit for bit, for every perturbed row (nothing to copy out of place)."""
    if perturbation.path != name:
        eager.restore(perturbation)  # not perturbed by the ops
        return
    for table, bucket in zip(perturbation.tables, perturbation.plans):
        if not len(table) or table.out_of_place:
            continue
        if not _walkable(table, bucket):
            eager.restore_tables([table])  # a parameter re-strided since
            continue
        rows = [i for i, p in enumerate(table.perturbed) if p]
        if len(rows) == len(table):
            _ops().restore_(table.params, bucket.buffers.backup, table.offsets)
        elif rows:
            _ops().restore_([table.params[i] for i in rows], bucket.buffers.backup, [table.offsets[i] for i in rows])


def restore_and_step(tables, buckets, prepare) -> bool:
    """x <- the base optimizer's update (``prepare()``: a ``base_update.Update``)
    of the saved x, with the gradients in ``tables``; writes the base state in
    place. Returns False, having written nothing, where the ops cannot walk
    the rows (the caller restores and steps the base optimizer instead)."""
    if len(tables) != len(buckets):
        return False
    if not all(_walkable(t, b) for t, b in zip(tables, buckets) if len(t)):
        return False
    update = prepare()
    if update is None or len(update.state) != len(buckets):
        return False
    ops = _ops()
    width = len(update.hyper[0])
    hyper = [float(v) for row in update.hyper for v in row]  # an lr tensor on the CPU: read, not a stall
    keys = STATE_KEYS[update.kind]
    for table, bucket, flats in zip(tables, buckets, update.state):
        if not len(table):
            continue
        saved = bucket.buffers.adversarial if table.out_of_place else bucket.buffers.backup
        state1 = flats.get(keys[0])  # SGD without momentum: none
        state2 = flats.get(keys[1]) if len(keys) > 1 else None
        ops.restore_step_(table.params, table.grads, saved, state1, state2, table.offsets, table.group_index,
                          _flags(table), hyper, width, KIND_CODE[update.kind], not table.out_of_place)
    return True


def plan_perturb(tables, buckets, spec: Preconditioner, rhos, ema_ready) -> PerturbCall:
    """``perturb`` with these arguments (its checks are the ops' own, each call)."""
    return PerturbCall(perturb, buckets, spec, rhos, ema_ready)


def plan_restore_and_step(tables, buckets) -> RestoreStepCall:
    return RestoreStepCall(restore_and_step, buckets)


def _register_fake_kernels():
    """Shapes only, for torch.compile and opcheck: the ops return nothing but the sum."""
    @torch.library.register_fake("presam_cpp::sum_of_squares")
    def _sum_of_squares(params, grads, grad_ema, offsets, flags, direction, constraint, ema_weight, alpha, delta, eta):
        return params[0].new_empty((), dtype=torch.float64)

    @torch.library.register_fake("presam_cpp::rows_are_linear")
    def _rows_are_linear(params, grads, views):
        return len(params) == len(grads) == len(views) and all(
            p.dtype in KERNEL_DTYPES and g.dtype == p.dtype and v.dtype == p.dtype
            and p.device.type == "cpu" and g.device.type == "cpu"
            and p.shape == v.shape and p.stride() == v.stride() and g.shape == p.shape and g.stride() == p.stride()
            and _non_overlapping_and_dense(p)
            for p, g, v in zip(params, grads, views)
        )

    def nothing(*args, **kwargs):
        return None

    for op in ("perturb_", "perturb_out_of_place_", "restore_", "restore_step_"):
        torch.library.register_fake(f"presam_cpp::{op}")(nothing)


if _extension.extension_available():
    _register_fake_kernels()
