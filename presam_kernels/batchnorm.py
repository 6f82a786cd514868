"""Freeze BatchNorm running statistics for the second (perturbed) forward pass.

The statistics of the batch at x + e are not the model's: updating them twice
per step biases them toward the perturbed weights.
"""
from __future__ import annotations

from torch import nn

_SAVED = "_presam_saved_momentum"
_SAVED_COUNT = "_presam_saved_num_batches_tracked"


def disable_running_stats(model: nn.Module) -> None:
    """Stop every BatchNorm layer from updating its running mean/var (keeps the momentum)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not hasattr(module, _SAVED):
            setattr(module, _SAVED, module.momentum)
            module.momentum = 0.0
            # forward still counts batches; with momentum=None the count is the averaging factor
            if module.num_batches_tracked is not None:
                setattr(module, _SAVED_COUNT, module.num_batches_tracked.clone())


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and hasattr(module, _SAVED):
            module.momentum = getattr(module, _SAVED)
            delattr(module, _SAVED)
            if hasattr(module, _SAVED_COUNT):
                module.num_batches_tracked.copy_(getattr(module, _SAVED_COUNT))
                delattr(module, _SAVED_COUNT)
