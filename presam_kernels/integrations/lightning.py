"""Lightning (``lightning.pytorch``): a LightningModule base class whose steps
are the README's two-step loop.

Automatic optimization: Lightning hands ``optimizer_step`` one closure for the
last micro-batch of an accumulation window; the first pass (micro-batches
1..k, accumulated as Lightning does) runs here, outside the optimizer's step,
and the second pass replays micro-batches 1..k-1 at x + e before the closure
adds micro-batch k, with BatchNorm's running statistics frozen. Lightning's
``on_before_optimizer_step`` hooks and gradient clipping then run once, after
the second backward, and the loss it reports is the one at x.

Manual optimization: ``self.optimizers()`` returns Lightning's wrapper, whose
``first_step`` / ``second_step`` act on the real optimizer; ``second_step``
goes through Lightning's ``step`` so that it counts (``global_step``,
``max_steps``, schedulers).
"""
from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.enums import GradClipAlgorithmType

from ..batchnorm import disable_running_stats, enable_running_stats
from ..optim.presam import PreSAM

# Attributes copied from the real optimizer onto Lightning's wrapper after
# each step (the wrapper holds a snapshot of the optimizer's __dict__).
_MIRRORED = ("last_perturbation_norm", "skipped_steps", "last_step_fused")


class SharpnessAwareModule(pl.LightningModule):
    """Use in place of ``LightningModule`` when ``configure_optimizers``
    returns a presam optimizer (SAM, ASAM, InfoSAM, ...).

    ``freeze_norm_statistics = True``: BatchNorm running statistics are not
    updated by the second (perturbed) forward pass. If you override
    ``on_train_batch_start`` or ``optimizers``, call ``super()``.
    """

    freeze_norm_statistics = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._presam_window = []  # (batch, batch_idx) of the current accumulation window

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.accumulate_grad_batches > 1:
            self._presam_window.append((batch, batch_idx))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        window, self._presam_window = self._presam_window, []
        real = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if not isinstance(real, PreSAM) or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise NotImplementedError(
                "SharpnessAwareModule does not support precision='16-mixed' (GradScaler) in automatic "
                "optimization; use precision='bf16-mixed', or manual optimization with grad_scaler= on both steps"
            )
        # First pass at x: Lightning's closure adds micro-batch k to 1..k-1 (it zeroes first when k == 1).
        if optimizer_closure() is None:
            return None  # training_step returned None: Lightning skips the backward, we skip the step
        first_result = optimizer_closure._result

        def second_pass():
            if self.freeze_norm_statistics:
                disable_running_stats(self)
            try:
                for batch, index in window[:-1]:
                    self._presam_replay(batch, index, real)
                return optimizer_closure()
            finally:
                if self.freeze_norm_statistics:
                    enable_running_stats(self)

        # Through Lightning's wrapper (counting, precision, hooks and clipping
        # after the closure); the gradients just written are the first pass.
        optimizer.step(closure=second_pass, first_pass="present")
        optimizer_closure._result = first_result  # report the loss at x, as the README's loop does
        _mirror(optimizer, real)
        return None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, without its mixed-precision plugin's refusal:
        the optimizer handles GradScaler itself (``_step_supports_amp_scaling``),
        which that plugin reads as "unscales internally", but in bf16-mixed no
        scaler exists and the gradients clipped here are unscaled."""
        plugin = self.trainer.precision_plugin
        real = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if isinstance(real, PreSAM) and getattr(plugin, "scaler", None) is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            return Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0, algorithm)
        return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _presam_replay(self, batch, batch_idx, optimizer):
        """training_step and backward of an earlier micro-batch, at x + e,
        normalised as Lightning's closure normalises it."""
        trainer = self.trainer
        output = call._call_strategy_hook(trainer, "training_step", batch, batch_idx)
        loss = ClosureResult.from_training_step_output(output, trainer.accumulate_grad_batches).closure_loss
        if loss is not None:
            call._call_strategy_hook(trainer, "backward", loss, optimizer)

    def optimizers(self, use_pl_optimizer: bool = True):
        opts = super().optimizers(use_pl_optimizer)
        for opt in opts if isinstance(opts, list) else [opts]:
            if isinstance(opt, LightningOptimizer) and isinstance(opt.optimizer, PreSAM):
                _bridge(opt)
        return opts


def _mirror(wrapper, real):
    if wrapper is not real:
        for name in _MIRRORED:
            wrapper.__dict__[name] = getattr(real, name)


def _bridge(wrapper):
    """Point the wrapper's two-step API at the real optimizer; second_step goes
    through Lightning's step so that the step counts."""
    if wrapper.__dict__.get("_presam_bridged"):
        return
    real = wrapper.optimizer

    def first_step(zero_grad=False, grad_scaler=None):
        real.first_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
        _mirror(wrapper, real)

    def second_step(zero_grad=False, grad_scaler=None):
        kwargs = {} if grad_scaler is None else {"grad_scaler": grad_scaler}
        # The closure is the second pass the user already ran: nothing to add.
        wrapper.step(closure=_no_backward, first_pass="done", **kwargs)
        if zero_grad:
            real.zero_grad()
        _mirror(wrapper, real)

    wrapper.first_step = first_step
    wrapper.second_step = second_step
    wrapper.zero_grad = real.zero_grad
    wrapper.restore = real.restore
    wrapper._presam_bridged = True
    _mirror(wrapper, real)


def _no_backward():
    return None


__all__ = ["SharpnessAwareModule"]
