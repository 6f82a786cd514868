"""The named variants: each only chooses (objective, constraint) and defaults."""
from __future__ import annotations

from .presam import PreSAM


class SAM(PreSAM):
    """SAM with the constructor and numerics of the common PyTorch SAM wrapper.

    ``adaptive=True`` is that wrapper's flag: c = |x| for every tensor, biases
    included, no eta (official ASAM semantics are :class:`ASAM`).
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {adaptive!r}")
        super().__init__(
            params,
            base_optimizer,
            rho,
            objective="gradient",
            constraint="adaptive" if adaptive else "none",
            _extra_defaults={"adaptive": adaptive},
            **kwargs,
        )


class ASAM(PreSAM):
    """Adaptive SAM with the official semantics: c = |x| + eta for weight
    tensors, c = 1 for biases and norm-layer shifts.

    Which tensors are weights: with ``model.named_parameters()``, those whose
    name contains "weight" (as the official code decides); with plain tensors,
    those with ndim >= 2; or whatever ``is_weight(name, tensor)`` says.
    """

    def __init__(self, params, base_optimizer, rho=0.5, eta=0.01, is_weight=None, **kwargs):
        super().__init__(
            params, base_optimizer, rho, objective="gradient", constraint="asam", eta=eta, is_weight=is_weight, **kwargs
        )


class InfoSAM(PreSAM):
    """infoSAM (preSAM paper): u = g / ((m - g)^2 + delta), m an EMA of g with
    weight ``alpha`` on the old value; the first step is plain SAM.

    Its useful rho is much larger than SAM's, because the perturbation
    concentrates on the steadiest coordinates (see the README for the scale).
    ``constraint`` composes it with a CP row ("adaptive", "asam", "fisher").
    """

    def __init__(self, params, base_optimizer, rho=0.05, alpha=0.9, delta=1e-12, constraint="none", **kwargs):
        super().__init__(
            params, base_optimizer, rho, objective="info", constraint=constraint, alpha=alpha, delta=delta, **kwargs
        )


class VaSSO(PreSAM):
    """VaSSO: u = m, m <- (1 - theta) m + theta g, theta in (0, 1] weighting the
    NEW gradient as its authors wrote it (theta = 1 is SAM); m = g at first."""

    def __init__(self, params, base_optimizer, rho=0.05, theta=0.9, **kwargs):
        super().__init__(params, base_optimizer, rho, objective="ema", constraint="none", theta=theta, **kwargs)


class FisherSAM(PreSAM):
    """Fisher SAM: c = 1 / sqrt(1 + eta g^2), u = g."""

    def __init__(self, params, base_optimizer, rho=0.05, eta=1.0, **kwargs):
        super().__init__(params, base_optimizer, rho, objective="gradient", constraint="fisher", eta=eta, **kwargs)
