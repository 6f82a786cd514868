"""Backends implement the same verbs per bucket table: ``perturb``, ``restore``
(and ``unscale_``).  ``select`` maps a user's choice to one of them."""
from __future__ import annotations

import os

from . import eager

BACKENDS = ("auto", "eager", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve(choice: str, devices, sharded: bool = False) -> str:
    """The backend name for ``choice`` ("auto", "eager", "triton") on ``devices``.

    ``PRESAM_BACKEND`` overrides "auto" only.  DTensor (sharded) parameters
    take the eager path whatever the choice: their norm needs a collective.
    """
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        choice = os.environ.get("PRESAM_BACKEND", "auto") or "auto"
        if choice not in BACKENDS:
            raise ValueError(f"PRESAM_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if sharded:
        return "eager"
    if choice == "auto":
        on_cuda = any(d.type == "cuda" for d in devices)
        choice = "triton" if on_cuda and triton_available() and _triton_backend_built() else "eager"
    if choice == "triton" and not _triton_backend_built():
        raise NotImplementedError(
            "backend='triton' is not available in this build yet; use backend='eager' (or 'auto')"
        )
    return choice


def _triton_backend_built() -> bool:
    try:
        from . import triton as _  # noqa: F401
    except ImportError:
        return False
    return hasattr(_, "perturb")


def get(name: str):
    if name == "eager":
        return eager
    from . import triton as triton_backend

    return triton_backend
