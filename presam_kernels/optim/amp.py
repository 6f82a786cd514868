"""GradScaler support for a two-pass optimizer (docs/design.md §1, mixed precision).

``scaler.step(opt)`` would unscale only the second pass's gradients, so the
scaler is handed to both steps instead: the first pass is unscaled by us
(once, and not at all when the user already called ``scaler.unscale_``), the
second by ``scaler.unscale_`` (so clipping after the second backward works as
usual), and the scaler is left holding the overflow flags of BOTH passes so
that ``scaler.update()`` lowers the scale after an overflow in either.
"""
from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState


def active(grad_scaler):
    """The scaler when it is enabled, else None."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    return grad_scaler


def unscale_first_pass(optimizer, scaler, tables, backend):
    """Unscale the first backward's gradients in place; the overflow flag (0-d fp32)."""
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("first_step(grad_scaler=...) after the scaler stepped; call scaler.update() first")
    if state["stage"] is OptState.UNSCALED:
        # The user unscaled already (for example to clip): use the scaler's verdict.
        found = _sum_flags(state["found_inf_per_device"].values())
    else:
        scale, _ = scaler._check_scale_growth_tracker("unscale_")
        inv_scale = scale.double().reciprocal().float()  # as GradScaler.unscale_ does
        found = torch.zeros(1, dtype=torch.float32, device=scale.device)
        backend.unscale_(tables, inv_scale, found)
    # Leave the scaler ready for the second pass's unscale_.
    state["stage"] = OptState.READY
    state["found_inf_per_device"] = {}
    return found.reshape(())


def check_closure_first_pass(optimizer, scaler):
    """step(closure) is about to run the closure for the first pass: the
    scaler must not have unscaled (or stepped) this optimizer already, or the
    first pass would stay scaled."""
    stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
    if stage is not OptState.READY:
        raise RuntimeError(
            f"step(closure, grad_scaler) runs the closure for the first pass, but the scaler's stage for "
            f"this optimizer is {stage.name}: call scaler.unscale_(opt) only after the backward it unscales "
            f"(or take the first backward before step, which then uses it), and scaler.update() after each step"
        )


def unscale_second_pass(optimizer, scaler, tables):
    """Unscale the second backward's gradients unless the user did; its overflow flag."""
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    return _sum_flags(state["found_inf_per_device"].values())


def record_found_inf(optimizer, scaler, first_found, second_found):
    """Hand both passes' overflow flags to the scaler, as scaler.step would have."""
    state = scaler._per_optimizer_states[id(optimizer)]
    device = scaler._scale.device
    total = first_found.float().reshape(1).to(device) + second_found.float().reshape(1).to(device)
    state["found_inf_per_device"] = {device: total}
    state["stage"] = OptState.STEPPED


def _sum_flags(flags):
    flags = list(flags)
    if not flags:
        return torch.zeros((), dtype=torch.float32)
    device = flags[0].device
    return torch.stack([f.reshape(()).float().to(device) for f in flags]).sum()
