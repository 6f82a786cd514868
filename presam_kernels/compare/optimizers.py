"""The optimizers the comparison can train with, and their default radii.

Every variant wraps the same base optimizer (SGD with momentum 0.9 and weight
decay 5e-4), so the runs differ only in the sharpness-aware step. ``sgd`` is
plain ``torch.optim.SGD``: one forward and backward per step instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

# The best radius of a sweep on the default task (infoSAM one step lower: 30
# collapsed on other seeds); the sweep: README, "How the default radii were chosen".
DEFAULT_RHO = {
    "sam": 0.5,
    "sam-adaptive": 5.0,
    "asam": 5.0,
    "fishersam": 0.5,
    "vasso": 0.5,
    "infosam": 20.0,
}


@dataclass(frozen=True)
class Variant:
    """How to build one optimizer: ``make(model, lr, rho)``; ``two_pass`` is
    True for the sharpness-aware ones (first_step / second_step)."""

    name: str
    description: str
    make: Callable[[torch.nn.Module, float, float | None], torch.optim.Optimizer]
    two_pass: bool = True


def _base_kwargs(lr: float) -> dict:
    return dict(lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _sgd(model, lr, rho):
    return torch.optim.SGD(model.parameters(), **_base_kwargs(lr))


def _sam(model, lr, rho):
    from presam_kernels import SAM

    return SAM(model.parameters(), torch.optim.SGD, rho=rho, **_base_kwargs(lr))


def _sam_adaptive(model, lr, rho):
    from presam_kernels import SAM

    return SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, **_base_kwargs(lr))


def _asam(model, lr, rho):
    from presam_kernels import ASAM

    # Named parameters: ASAM scales weights by |w| + eta but leaves biases and
    # norm-layer shifts unscaled, and tells them apart by name.
    return ASAM(model.named_parameters(), torch.optim.SGD, rho=rho, eta=0.01, **_base_kwargs(lr))


def _fishersam(model, lr, rho):
    from presam_kernels import FisherSAM

    return FisherSAM(model.parameters(), torch.optim.SGD, rho=rho, eta=1.0, **_base_kwargs(lr))


def _vasso(model, lr, rho):
    from presam_kernels import VaSSO

    return VaSSO(model.parameters(), torch.optim.SGD, rho=rho, theta=0.9, **_base_kwargs(lr))


def _infosam(model, lr, rho):
    from presam_kernels import InfoSAM

    return InfoSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=0.9, **_base_kwargs(lr))


VARIANTS = {
    v.name: v
    for v in (
        Variant("sgd", "SGD with momentum, no perturbation (one pass per step)", _sgd, False),
        Variant("sam", "SAM: e = rho g / ||g||", _sam),
        Variant("sam-adaptive", "SAM(adaptive=True): ball scaled by |w|, biases too", _sam_adaptive),
        Variant("asam", "ASAM: ball scaled by |w| + 0.01 on weight tensors", _asam),
        Variant("fishersam", "FisherSAM: ball scaled by 1/sqrt(1 + g^2)", _fishersam),
        Variant("vasso", "VaSSO: direction from an EMA of g (theta 0.9)", _vasso),
        Variant("infosam", "infoSAM: g damped by its noise variance (alpha 0.9)", _infosam),
    )
}


def build_optimizer(name: str, model: torch.nn.Module, lr: float, rho: float | None):
    """The optimizer ``name`` over ``model``'s parameters."""
    return VARIANTS[name].make(model, lr, rho)
