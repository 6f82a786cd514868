"""accelerate: the README's two-step loop under ``accelerator.accumulate`` and
its GradScaler.

``AcceleratedOptimizer`` has no ``first_step``, steps only at the end of an
accumulation window, and drives a scaler through a wrapped ``step`` (so
``GradScaler.step`` cannot hand itself to ours: ``step(closure)`` refuses).
:class:`SharpnessAwareStep` takes one micro-batch per call inside
``accelerator.accumulate``: it backpropagates it (``accelerator.backward``:
scaled, divided by the accumulation steps), keeps it, and at the window's end
perturbs once, replays the window at x + e with BatchNorm statistics frozen,
clips where the README says (after the second backward) and steps, with the
accelerator's scaler handed to both steps.
"""
from __future__ import annotations

import contextlib

from ..batchnorm import disable_running_stats, enable_running_stats
from ..optim.presam import PreSAM


class SharpnessAwareStep:
    """``loss = sam_step(compute_loss, batch)`` once per micro-batch, inside
    ``with accelerator.accumulate(model):``; ``compute_loss(batch)`` runs the
    forward pass and returns the loss. Returns that loss (at x).

    Args:
        accelerator: the ``Accelerator``.
        model: the prepared model.
        optimizer: the prepared optimizer (``AcceleratedOptimizer``) or ours.
        max_grad_norm: clip the second pass's gradients to this norm
            (``accelerator.clip_grad_norm_``, which unscales them first).
        freeze_norm_statistics: BatchNorm running statistics are not updated
            by the second forward pass.
    """

    def __init__(self, accelerator, model, optimizer, max_grad_norm=None, freeze_norm_statistics=True):
        real = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(real, PreSAM):
            raise TypeError(f"optimizer must be a presam optimizer or accelerate's wrapper of one, got {type(real)}")
        self.accelerator = accelerator
        self.model = model
        self.optimizer = real
        self.max_grad_norm = max_grad_norm
        self.freeze_norm_statistics = freeze_norm_statistics
        self._window = []  # batches of the current accumulation window

    def __call__(self, compute_loss, batch):
        acc = self.accelerator
        loss = compute_loss(batch)
        acc.backward(loss)
        self._window.append(batch)
        if not acc.sync_gradients:
            return loss
        window, self._window = self._window, []
        scaler = acc.scaler
        self.optimizer.first_step(zero_grad=True, grad_scaler=scaler)
        if self.freeze_norm_statistics:
            disable_running_stats(self.model)
        try:
            for k, micro in enumerate(window):
                # Gradients are synchronised once, with the window's last backward.
                sync = contextlib.nullcontext() if k == len(window) - 1 else acc.no_sync(self.model)
                with sync:
                    acc.backward(compute_loss(micro))
        except BaseException:
            self.optimizer.restore()
            raise
        finally:
            if self.freeze_norm_statistics:
                enable_running_stats(self.model)
        if self.max_grad_norm is not None:
            if scaler is not None and not (acc.native_amp and acc.mixed_precision == "fp16"):
                # accelerate unscales before clipping only in its own native fp16 mode.
                scaler.unscale_(self.optimizer)
            acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.second_step(zero_grad=True, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
        return loss


__all__ = ["SharpnessAwareStep"]
