"""Hugging Face ``transformers.Trainer``: a subclass whose optimizer step is the
README's two-step loop.

The Trainer backpropagates each micro-batch in ``training_step``, then, at
the end of an accumulation window, clips (``max_grad_norm``) and calls
``optimizer.step()``. :class:`SharpnessAwareTrainer` keeps the window's
micro-batches; at the window's last one it perturbs (``first_step``) and
replays the window at x + e with BatchNorm statistics frozen, so that the
Trainer's clipping acts on the second pass's gradients, as the README says,
and its ``optimizer.step()`` finishes the step (``step(first_pass="done")``);
its LR scheduler, logging and checkpointing run as usual.
"""
from __future__ import annotations

from transformers import Trainer

from ..batchnorm import disable_running_stats, enable_running_stats
from ..optim.presam import PreSAM


class SharpnessAwareTrainer(Trainer):
    """``Trainer`` for presam optimizers: pass one as ``optimizers=(SAM(...), None)``
    (the Trainer builds its LR scheduler on it). ``freeze_norm_statistics``:
    BatchNorm running statistics are not updated by the second forward pass.
    Mixed precision: bf16 (no GradScaler); fp16's GradScaler path raises."""

    freeze_norm_statistics = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        real = getattr(self.optimizer, "optimizer", self.optimizer)
        if not isinstance(real, PreSAM):
            return loss
        window = self.__dict__.setdefault("_presam_window", [])
        window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss
        self._presam_window = []
        if self.accelerator.scaler is not None:
            raise NotImplementedError(
                "SharpnessAwareTrainer does not support fp16 (GradScaler) yet; use bf16=True or fp32"
            )
        real.first_step(zero_grad=True)
        if self.freeze_norm_statistics:
            disable_running_stats(model)
        try:
            for micro, count in window:
                super().training_step(model, micro, count)
        except BaseException:
            real.restore()
            raise
        finally:
            if self.freeze_norm_statistics:
                enable_running_stats(model)
        _finish_on_next_step(real)
        return loss


def _finish_on_next_step(optimizer):
    """Make the Trainer's next ``optimizer.step()`` (through accelerate's wrapper,
    and any LR scheduler's wrapper of ``step``) finish the pending step."""
    previous = optimizer.__dict__.get("step")
    inner = optimizer.step

    def step(closure=None):
        if previous is None:
            del optimizer.step
        else:
            optimizer.step = previous
        return inner(closure, first_pass="done")

    optimizer.step = step


__all__ = ["SharpnessAwareTrainer"]
