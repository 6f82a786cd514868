"""Freeze BatchNorm running statistics for the second (perturbed) forward pass.

The statistics of the batch at x + e are not the model's: updating them twice
per step biases them toward the perturbed weights.
"""
from __future__ import annotations

from torch import nn

_SAVED = "_presam_saved_momentum"


def disable_running_stats(model: nn.Module) -> None:
    """Stop every BatchNorm layer from updating its running mean/var (keeps the momentum)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not hasattr(module, _SAVED):
            setattr(module, _SAVED, module.momentum)
            module.momentum = 0.0


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and hasattr(module, _SAVED):
            module.momentum = getattr(module, _SAVED)
            delattr(module, _SAVED)
